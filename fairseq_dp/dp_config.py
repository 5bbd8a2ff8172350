# Copyright (c) fairseq_dp contributors. MIT license.
"""The DP options of every DP task, in one dataclass, and their checks.

A DP task's config inherits :class:`DPConfig` next to its fairseq parent
(``class DPSentencePredictionConfig(SentencePredictionConfig, DPConfig)``),
so every DP task has the same flags, with the same help and the same checks
(:func:`check_dp_config`, run in ``setup_task`` before anything loads).
"""

import math
from dataclasses import dataclass, field
from typing import List, Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II

from .accounting import MAX_NOISE_MULTIPLIER
from .clipping import CLIPPING_MODES
from .errors import DPConfigError
from .prepare import freeze_patterns

ACCOUNTANT_CHOICES = ChoiceEnum(["prv", "rdp"])
CLIPPING_CHOICES = ChoiceEnum(list(CLIPPING_MODES))
SAMPLING_CHOICES = ChoiceEnum(["poisson", "shuffle"])
# backends that reduce gradients only when the trainer asks, after clipping
REDUCE_AFTER_CLIPPING = ("legacy_ddp", "no_c10d")


@dataclass
class DPConfig(FairseqDataclass):
    """The DP options every DP task shares (a task's config inherits them),
    and the settings of other groups that DP depends on."""

    dp_clip_norm: float = field(
        default=1.0,
        metadata={"help": "per-example L2 clip norm C, over all privatized gradients"},
    )
    dp_noise_multiplier: Optional[float] = field(
        default=None,
        metadata={
            "help": "noise multiplier σ: the clipped sum gets N(0, σ²C²) noise once per "
            "logical batch. 0 clips without noise (not private). Give this or "
            "--dp-target-epsilon"
        },
    )
    dp_target_epsilon: Optional[float] = field(
        default=None,
        metadata={
            "help": "calibrate σ before training so that ε after the planned number of "
            "updates (--max-epoch / --max-update) is at most this"
        },
    )
    dp_delta: float = field(default=1e-5, metadata={"help": "δ of the (ε, δ) guarantee"})
    dp_accountant: ACCOUNTANT_CHOICES = field(
        default="prv",
        metadata={"help": "privacy accountant: prv (numerical composition) or rdp"},
    )
    dp_sampling: SAMPLING_CHOICES = field(
        default="poisson",
        metadata={
            "help": "poisson: every update includes each training example independently with "
            "probability q = expected logical batch / N, as the accountant assumes (--batch-size "
            "is then the expected micro-batch size); shuffle: fixed-size batches of a shuffled "
            "partition, as published DP fine-tuning code does (the reported ε then assumes "
            "Poisson sampling that did not happen)"
        },
    )
    dp_max_epsilon: Optional[float] = field(
        default=None,
        metadata={
            "help": "privacy budget: stop after the last update that keeps ε at most this "
            "(saving a checkpoint), and refuse to resume a run that has spent it"
        },
    )
    dp_insecure_seeded_rng: bool = field(
        default=False,
        metadata={
            "help": "INSECURE, for tests and debugging: draw the noise and the Poisson samples "
            "from generators seeded by --seed (reproducible, exact resume), instead of fresh "
            "secret randomness from the operating system. fairseq saves --seed in every "
            "checkpoint: anyone who has one can regenerate the noise and remove it, so the "
            "reported ε then holds only against someone who does not know the seed"
        },
    )
    dp_secure_rng: bool = field(
        default=False,
        metadata={
            "help": "deprecated and ignored: secret randomness is the default "
            "(see --dp-insecure-seeded-rng); kept so that older configs load"
        },
    )
    dp_hide_private_stats: bool = field(
        default=False,
        metadata={
            "help": "keep every statistic of the private training data out of the logs: train "
            "lines then show no loss, accuracy, batch sizes or dp_clipped (they are computed "
            "on private batches without noise), only ε, σ, the noisy gradient's norm and timing; "
            "validating on the training subset is refused"
        },
    )
    dp_assume_fresh_weights: bool = field(
        default=False,
        metadata={
            "help": "state that weights restored from a DP run whose privacy ledger is missing "
            "have never seen this private data (their history then counts as empty); without "
            "it such weights are refused, since their spent privacy is unknown"
        },
    )

    # which parameters train privately, and how their per-example gradients are formed
    dp_clipping: CLIPPING_CHOICES = field(
        default="ghost",
        metadata={
            "help": "ghost: per-example gradient norms without materializing per-example "
            "gradients where that is cheaper (ghost norms), clipped sums in the same pass "
            "(book-keeping); materialize: per-example gradients materialized (reference "
            "path). Both give the same update"
        },
    )
    dp_freeze: Optional[str] = field(
        default=None,
        metadata={
            "help": "comma-separated regular expressions; trainable parameters whose name "
            "matches one (re.search) are frozen, e.g. 'embed_tokens,embed_positions'"
        },
    )

    # settings of other groups that DP depends on, checked in setup_task
    batch_size: Optional[int] = II("dataset.batch_size")
    max_tokens: Optional[int] = II("dataset.max_tokens")
    train_subset: str = II("dataset.train_subset")
    valid_subset: str = II("dataset.valid_subset")
    update_freq: List[int] = II("optimization.update_freq")
    max_epoch: int = II("optimization.max_epoch")
    max_update: int = II("optimization.max_update")
    clip_norm: float = II("optimization.clip_norm")
    fp16: bool = II("common.fp16")
    memory_efficient_fp16: bool = II("common.memory_efficient_fp16")
    amp: bool = II("common.amp")
    bf16: bool = II("common.bf16")
    memory_efficient_bf16: bool = II("common.memory_efficient_bf16")
    tpu: bool = II("common.tpu")
    distributed_world_size: int = II("distributed_training.distributed_world_size")
    ddp_backend: str = II("distributed_training.ddp_backend")
    use_bmuf: bool = II("optimization.use_bmuf")
    seed: int = II("common.seed")


def check_dp_config(cfg) -> None:
    """Every setting that would make a DP run wrong or ambiguous, before training."""
    errors = []
    sigma, target = cfg.dp_noise_multiplier, cfg.dp_target_epsilon
    if (sigma is None) == (target is None):
        errors.append("give exactly one of --dp-noise-multiplier and --dp-target-epsilon")
    if sigma is not None and not 0 <= sigma <= MAX_NOISE_MULTIPLIER:
        errors.append(
            f"--dp-noise-multiplier must be >= 0 and at most {MAX_NOISE_MULTIPLIER:g}, got {sigma} "
            "(above that every update is noise alone, and float32 norms overflow)"
        )
    if target is not None and not 0 < target < math.inf:
        errors.append(f"--dp-target-epsilon must be > 0 and finite, got {target}")
    if target is not None and not (cfg.max_epoch > 0 or cfg.max_update > 0):
        errors.append("--dp-target-epsilon needs the number of updates: set --max-epoch or --max-update")
    if cfg.dp_max_epsilon is not None and not 0 < cfg.dp_max_epsilon < math.inf:
        errors.append(f"--dp-max-epsilon must be > 0 and finite, got {cfg.dp_max_epsilon}")
    if cfg.dp_max_epsilon is not None and sigma == 0:
        errors.append("--dp-max-epsilon cannot be met with --dp-noise-multiplier 0 (ε = inf)")
    if not 0 < cfg.dp_delta < 1:
        errors.append(f"--dp-delta must be in (0, 1), got {cfg.dp_delta}")
    try:
        freeze_patterns(cfg.dp_freeze)
    except ValueError as e:
        errors.append(str(e))
    if not 0 < cfg.dp_clip_norm < math.inf:
        errors.append(f"--dp-clip-norm must be > 0 and finite, got {cfg.dp_clip_norm}")
    if cfg.dp_secure_rng and cfg.dp_insecure_seeded_rng:
        errors.append("--dp-secure-rng and --dp-insecure-seeded-rng contradict each other; "
                      "secret randomness is the default: drop both")
    if cfg.dp_hide_private_stats and cfg.train_subset in str(cfg.valid_subset).split(","):
        errors.append(
            f"--dp-hide-private-stats: --valid-subset {cfg.valid_subset} includes the training "
            f"subset '{cfg.train_subset}', whose validation statistics would be private data "
            "without noise; validate on held-out data"
        )
    for flag, value in (("--fp16", cfg.fp16), ("--memory-efficient-fp16", cfg.memory_efficient_fp16),
                        ("--amp", cfg.amp)):
        if value:
            errors.append(
                f"{flag} is not supported with DP (dynamic loss scaling would change the clip norm "
                "and skipped overflow steps would still spend privacy); train in fp32, or in bf16 "
                "(common.bf16=true, which needs no loss scaling: see the README's Mixed precision)"
            )
    if cfg.tpu:
        errors.append(
            "--tpu: DP training on TPUs (XLA) is not supported. fairseq-train's --bf16 and "
            "--memory-efficient-bf16 turn --tpu on (fairseq 0.12 treats bf16 as TPU-only on its "
            "command line); for bf16 on a GPU or CPU set common.bf16=true in a Hydra config "
            "(fairseq-hydra-train ... common.bf16=true) or in the Python API's config, which "
            "leaves common.tpu off"
        )
    if cfg.memory_efficient_bf16 and not cfg.bf16:
        errors.append(
            "common.memory_efficient_bf16 without common.bf16 trains in fp32 (fairseq's command "
            "line sets bf16 with it, a Hydra config does not): set common.bf16=true as well"
        )
    if cfg.bf16 and cfg.distributed_world_size > 1:
        errors.append(
            "bf16 with several workers is not supported with DP: each worker's clipped sum, "
            "which carries no noise except on worker 0, would be rounded to bf16 before the "
            "all-reduce, changing the sensitivity by more than the accountant assumes; use one "
            "worker in bf16, or several in fp32"
        )
    if cfg.clip_norm and cfg.clip_norm > 0:
        errors.append(
            f"--clip-norm {cfg.clip_norm} clips the noisy gradient again after DP clipping; "
            "use --clip-norm 0 and set the per-example clip with --dp-clip-norm"
        )
    if cfg.batch_size is None or cfg.batch_size < 1:
        errors.append("DP training needs fixed-size batches: set --batch-size")
    if cfg.max_tokens is not None:
        errors.append(
            "--max-tokens makes batch sizes depend on example lengths, which the accountant does "
            "not model; use --batch-size alone (and --shorten-method truncate for long inputs)"
        )
    if len(set(cfg.update_freq)) > 1:
        errors.append("--update-freq must be one value with DP (the logical batch size is fixed)")
    if any(not f >= 1 for f in cfg.update_freq):
        errors.append(f"--update-freq must be >= 1, got {','.join(map(str, cfg.update_freq))}")
    if cfg.use_bmuf:
        errors.append(
            "--use-bmuf steps every worker on its own gradients and averages the models later, "
            "so only worker 0's steps would carry noise; use --ddp-backend legacy_ddp without BMUF"
        )
    if cfg.distributed_world_size > 1 and cfg.ddp_backend not in REDUCE_AFTER_CLIPPING:
        errors.append(
            f"--ddp-backend {cfg.ddp_backend} reduces gradients during backward (or shards "
            "them), before per-example clipping; multi-worker DP needs --ddp-backend legacy_ddp"
        )
    if errors:
        raise DPConfigError("invalid DP configuration:\n  - " + "\n  - ".join(errors))


