# Copyright (c) fairseq_dp contributors. MIT license.
"""``dp_sentence_prediction``: fairseq's sentence prediction, trained with DP.

The task validates the whole run's setup before anything trains, calibrates
σ from a target ε when asked, and hands every micro-batch to
:class:`fairseq_dp.trainer.DPTrainer`.
"""

import logging
import math
import os
import secrets
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
from fairseq.data import data_utils
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.sentence_prediction import SentencePredictionConfig, SentencePredictionTask
from omegaconf import II

from ..accounting import PrivacyAccountant, calibrate_noise_multiplier, keep_ledger_with_weights
from ..data.poisson import PoissonEpochBatchIterator, draws_for_epoch, draws_per_epoch
from ..errors import DPConfigError
from ..models.sentence_encoder import keep_first_token_pooling_of_old_checkpoint
from ..prepare import freeze_patterns, prepare_model_for_dp
from ..trainer import CLIPPING_MODES, DPTrainer, PrivacyBudgetExhausted, unwrap_model

logger = logging.getLogger(__name__)

ACCOUNTANT_CHOICES = ChoiceEnum(["prv", "rdp"])
CLIPPING_CHOICES = ChoiceEnum(list(CLIPPING_MODES))
SAMPLING_CHOICES = ChoiceEnum(["poisson", "shuffle"])
# backends that reduce gradients only when the trainer asks, after clipping
REDUCE_AFTER_CLIPPING = ("legacy_ddp", "no_c10d")


def data_parallel_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


@dataclass
class DPSentencePredictionConfig(SentencePredictionConfig):
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
    dp_secure_rng: bool = field(
        default=False,
        metadata={
            "help": "draw the noise (and the Poisson samples) from generators seeded from the "
            "operating system's secure source, not from --seed; runs are then not reproducible"
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
    update_freq: List[int] = II("optimization.update_freq")
    max_epoch: int = II("optimization.max_epoch")
    max_update: int = II("optimization.max_update")
    clip_norm: float = II("optimization.clip_norm")
    fp16: bool = II("common.fp16")
    memory_efficient_fp16: bool = II("common.memory_efficient_fp16")
    amp: bool = II("common.amp")
    bf16: bool = II("common.bf16")
    distributed_world_size: int = II("distributed_training.distributed_world_size")
    ddp_backend: str = II("distributed_training.ddp_backend")
    use_bmuf: bool = II("optimization.use_bmuf")


def check_dp_config(cfg) -> None:
    """Every setting that would make a DP run wrong or ambiguous, before training."""
    errors = []
    sigma, target = cfg.dp_noise_multiplier, cfg.dp_target_epsilon
    if (sigma is None) == (target is None):
        errors.append("give exactly one of --dp-noise-multiplier and --dp-target-epsilon")
    if sigma is not None and not sigma >= 0:
        errors.append(f"--dp-noise-multiplier must be >= 0, got {sigma}")
    if target is not None and not target > 0:
        errors.append(f"--dp-target-epsilon must be > 0, got {target}")
    if target is not None and not (cfg.max_epoch > 0 or cfg.max_update > 0):
        errors.append("--dp-target-epsilon needs the number of updates: set --max-epoch or --max-update")
    if cfg.dp_max_epsilon is not None and not cfg.dp_max_epsilon > 0:
        errors.append(f"--dp-max-epsilon must be > 0, got {cfg.dp_max_epsilon}")
    if not 0 < cfg.dp_delta < 1:
        errors.append(f"--dp-delta must be in (0, 1), got {cfg.dp_delta}")
    try:
        freeze_patterns(cfg.dp_freeze)
    except ValueError as e:
        errors.append(str(e))
    if not cfg.dp_clip_norm > 0:
        errors.append(f"--dp-clip-norm must be > 0, got {cfg.dp_clip_norm}")
    for flag, value in (("--fp16", cfg.fp16), ("--memory-efficient-fp16", cfg.memory_efficient_fp16),
                        ("--amp", cfg.amp), ("--bf16", cfg.bf16)):
        if value:
            errors.append(
                f"{flag} is not supported with DP (loss scaling would change the clip norm and "
                "skipped overflow steps would still spend privacy); train in fp32"
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
        raise ValueError("invalid DP configuration:\n  - " + "\n  - ".join(errors))


@register_task("dp_sentence_prediction", dataclass=DPSentencePredictionConfig)
class DPSentencePredictionTask(SentencePredictionTask):
    """Sentence prediction with differentially private training."""

    def __init__(self, cfg, data_dictionary, label_dictionary):
        super().__init__(cfg, data_dictionary, label_dictionary)
        self.accountant = PrivacyAccountant(cfg.dp_accountant)
        self.noise_multiplier: Optional[float] = None
        self.sample_rate: Optional[float] = None
        self.dp_trainer: Optional[DPTrainer] = None
        self.budget_steps: Optional[int] = None
        self._stop_update_set = False
        # Poisson draw t is a function of this and t; from --seed the draws
        # are reproducible (and exactly resumable), from the OS they are secret
        self._sampling_seed: Optional[int] = None if cfg.dp_secure_rng else int(cfg.seed)

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        # fairseq's command line gives --total-num-update no default (its
        # dataclass default is an interpolation of --max-update, which argparse
        # drops), and its own config conversion then rejects the missing value;
        # 0 marks it as not given, and complete_lr_schedule fills it in
        parser.set_defaults(total_num_update=0)

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        check_dp_config(cfg)
        task = super().setup_task(cfg, **kwargs)
        task.complete_lr_schedule()
        return task

    def complete_lr_schedule(self) -> None:
        """Without --total-num-update, fairseq's ``polynomial_decay`` (linear
        warm-up, then linear decay) decays over the planned updates.

        Its own default is --max-update, which is 0 (and refused by the
        scheduler) when --max-epoch limits the run. Under fairseq-hydra-train
        an unset value has already been resolved to --max-update, so a value
        equal to it counts as not given too. This runs in ``setup_task``
        because fairseq builds the scheduler before it loads the training set
        when it restores a checkpoint.
        """
        root = self.cfg._get_root() if hasattr(self.cfg, "_get_root") else None
        scheduler = getattr(root, "lr_scheduler", None)
        if scheduler is None or scheduler.get("_name") != "polynomial_decay":
            return
        total = scheduler.get("total_num_update")
        max_update = root.optimization.max_update if "optimization" in root else 0
        if total is not None and total > 0 and total != max_update:
            return
        train = data_utils.load_indexed_dataset(
            os.path.join(self.cfg.data, "input0", self.cfg.train_subset), self.source_dictionary
        )
        if train is None:
            return  # not a training run (or no training set, which training reports itself)
        planned = self.planned_updates(len(train))
        if planned is None:
            raise DPConfigError(
                "--lr-scheduler polynomial_decay needs the number of updates to decay over: "
                "set --max-epoch or --max-update (the plugin then uses the planned updates), "
                "or --total-num-update"
            )
        scheduler.total_num_update = planned
        logger.info(
            f"DP: --total-num-update not given: polynomial_decay decays over the planned "
            f"{planned} updates"
        )

    @property
    def expected_batch_size(self) -> int:
        return self.cfg.batch_size * self.cfg.update_freq[0] * self.world_size

    @property
    def world_size(self) -> int:
        return max(self.cfg.distributed_world_size, 1)

    def updates_per_epoch(self, dataset_size: int) -> int:
        if self.cfg.dp_sampling == "poisson":
            return draws_per_epoch(dataset_size, self.expected_batch_size)
        # fairseq shards the batches over workers, then groups --update-freq of them
        batches = math.ceil(dataset_size / self.cfg.batch_size)
        return math.ceil(math.ceil(batches / self.world_size) / self.cfg.update_freq[0])

    def planned_updates(self, dataset_size: int) -> Optional[int]:
        per_epoch = self.updates_per_epoch(dataset_size)
        limits = [self.cfg.max_epoch * per_epoch] if self.cfg.max_epoch > 0 else []
        limits += [self.cfg.max_update] if self.cfg.max_update > 0 else []
        return min(limits) if limits else None

    def load_dataset(self, split, combine=False, **kwargs):
        dataset = super().load_dataset(split, combine=combine, **kwargs)
        if split == self.cfg.train_subset:
            self.configure_privacy(len(dataset))
        return dataset

    def configure_privacy(self, dataset_size: int) -> None:
        """Sampling rate and σ for a training set of ``dataset_size`` examples."""
        if dataset_size < 1:
            raise ValueError("the DP training set is empty")
        if self.expected_batch_size > dataset_size:
            raise ValueError(
                f"DP: the expected logical batch (--batch-size × --update-freq × workers = "
                f"{self.expected_batch_size}) is larger than the training set ({dataset_size} "
                "examples); make it smaller"
            )
        self.sample_rate = min(1.0, self.expected_batch_size / dataset_size)
        updates = self.planned_updates(dataset_size)
        if self.cfg.dp_target_epsilon is not None:
            self.noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=self.cfg.dp_target_epsilon,
                delta=self.cfg.dp_delta,
                sample_rate=self.sample_rate,
                steps=updates,
                mechanism=self.cfg.dp_accountant,
            )
        else:
            self.noise_multiplier = float(self.cfg.dp_noise_multiplier)
        logger.info(
            f"DP: N={dataset_size} examples, expected logical batch {self.expected_batch_size}, "
            f"q={self.sample_rate:.6g}, planned updates {updates}, C={self.cfg.dp_clip_norm}, "
            f"σ={self.noise_multiplier:.6g}, δ={self.cfg.dp_delta}, accountant {self.cfg.dp_accountant}"
        )
        if updates is not None and self.noise_multiplier > 0:
            planned_eps = PrivacyAccountant(self.cfg.dp_accountant).epsilon_after(
                self.cfg.dp_delta, noise_multiplier=self.noise_multiplier,
                sample_rate=self.sample_rate, num_steps=updates,
            )
            logger.info(f"DP: ε after the planned {updates} updates: {planned_eps:.4g}")
        if self.noise_multiplier == 0:
            logger.warning(
                "DP: --dp-noise-multiplier 0: per-example clipping without noise. "
                "THIS RUN IS NOT PRIVATE (ε = inf)."
            )
        if self.cfg.dp_sampling == "shuffle":
            logger.warning(
                "DP: --dp-sampling shuffle: the reported ε assumes Poisson sampling at rate q, "
                "but this run draws shuffled fixed-size batches (as published DP fine-tuning "
                "code does); use --dp-sampling poisson for a guarantee that holds"
            )
        if not self.cfg.dp_secure_rng:
            logger.info(
                "DP: noise and samples come from generators seeded by --seed; anyone who knows "
                "the seed can reproduce them. Use --dp-secure-rng for a deployment"
            )
        self.configure_budget(updates)
        if self.dp_trainer is not None:
            self._configure_trainer(self.dp_trainer)

    def configure_budget(self, planned_updates: Optional[int]) -> None:
        """With --dp-max-epsilon: how many ledger steps the budget allows,
        counting what the ledger (restored with the weights) already holds."""
        max_eps = self.cfg.dp_max_epsilon
        if max_eps is None:
            return
        if self.noise_multiplier == 0:
            raise ValueError("--dp-max-epsilon cannot be met with --dp-noise-multiplier 0 (ε = inf)")
        spent = self.accountant.get_epsilon(self.cfg.dp_delta)
        allowed = self.accountant.steps_within_budget(
            max_eps,
            self.cfg.dp_delta,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            limit=None if planned_updates is None else planned_updates + 1,
        )
        if allowed == 0:
            raise PrivacyBudgetExhausted(
                f"DP: the privacy budget is spent: the weights' ledger holds {self.accountant.steps} "
                f"updates (ε = {spent:.4g} at δ = {self.cfg.dp_delta}), and one more update would "
                f"exceed --dp-max-epsilon {max_eps}. Refusing to train; raise the budget knowingly "
                "or start from weights that have not seen this data"
            )
        self.budget_steps = self.accountant.steps + allowed
        if planned_updates is None or allowed < planned_updates:
            eps_last = self.accountant.epsilon_after(
                self.cfg.dp_delta, noise_multiplier=self.noise_multiplier,
                sample_rate=self.sample_rate, num_steps=allowed,
            )
            logger.info(
                f"DP: --dp-max-epsilon {max_eps}: the budget allows {allowed} more updates "
                f"(ε = {eps_last:.4g} after them); training stops there"
            )

    def _configure_trainer(self, dp_trainer: DPTrainer) -> None:
        dp_trainer.noise_multiplier = self.noise_multiplier
        dp_trainer.sample_rate = self.sample_rate
        dp_trainer.budget_steps = self.budget_steps
        dp_trainer.secure_rng = bool(self.cfg.dp_secure_rng)
        # one worker adds the noise; legacy_ddp's sum then holds it once
        dp_trainer.adds_noise = data_parallel_rank() == 0

    def build_model(self, cfg, from_checkpoint=False):
        if getattr(cfg, "encoder_layerdrop", 0) > 0:
            raise ValueError(
                "--encoder-layerdrop skips layers at random, so a skipped layer's per-example "
                "gradients are missing from that update; use --encoder-layerdrop 0 with DP"
            )
        for flag in ("mha_reg_scale_factor", "ffn_reg_scale_factor"):
            if getattr(cfg, flag, 0):
                raise ValueError(
                    f"--{flag.replace('_', '-')} adds a regularizer computed from the weights, "
                    "outside the modules whose per-example gradients DP clips, so its gradient "
                    "would be dropped; set it to 0 with DP"
                )
        if from_checkpoint:
            keep_first_token_pooling_of_old_checkpoint(cfg)
        model = super().build_model(cfg, from_checkpoint)
        keep_ledger_with_weights(model, self.accountant)
        prepare_model_for_dp(unwrap_model(model), self.cfg.dp_freeze)
        self.dp_trainer = self._make_dp_trainer(model)
        return model

    def _make_dp_trainer(self, model) -> DPTrainer:
        # the old trainer's hooks go first: LowRankLinear holds one recorder
        if self.dp_trainer is not None:
            self.dp_trainer.remove_hooks()
            self.dp_trainer = None
        return DPTrainer(
            unwrap_model(model),
            accountant=self.accountant,
            clip_norm=self.cfg.dp_clip_norm,
            noise_multiplier=self.noise_multiplier,
            expected_batch_size=self.expected_batch_size,
            sample_rate=self.sample_rate,
            seed=self.cfg.seed,
            clipping=self.cfg.dp_clipping,
        )

    def build_criterion(self, cfg):
        from ..criterions.dp_sentence_prediction import DPSentencePredictionCriterion

        criterion = super().build_criterion(cfg)
        if not isinstance(criterion, DPSentencePredictionCriterion):
            raise ValueError(
                "--task dp_sentence_prediction needs --criterion dp_sentence_prediction, "
                "which reports the privacy spent"
            )
        return criterion

    def filter_indices_by_size(self, indices, dataset, max_positions=None, ignore_invalid_inputs=False):
        if dataset is not self.datasets.get(self.cfg.train_subset):
            return super().filter_indices_by_size(indices, dataset, max_positions, ignore_invalid_inputs)
        kept, ignored = dataset.filter_indices_by_size(indices, max_positions)
        if len(ignored) > 0:
            # q = expected batch / N counts every training example; one that is
            # silently dropped would make q (and ε) wrong
            raise ValueError(
                f"DP: {len(ignored)} training examples are longer than max positions "
                f"{max_positions} (first ids {list(ignored[:5])}); fairseq would skip them, "
                "which the privacy accounting cannot allow. Use --shorten-method truncate, or "
                "remove them from the training data"
            )
        return kept

    def get_batch_iterator(self, dataset, **kwargs):
        if dataset is not self.datasets.get(self.cfg.train_subset):
            return super().get_batch_iterator(dataset, **kwargs)
        # fairseq rounds batch sizes down to this multiple; DP needs exactly --batch-size
        kwargs["required_batch_size_multiple"] = 1
        if self.cfg.dp_sampling != "poisson":
            return super().get_batch_iterator(dataset, **kwargs)
        return self._poisson_batch_iterator(dataset, **kwargs)

    def _poisson_batch_iterator(
        self, dataset, max_positions=None, num_shards=1, shard_id=0, num_workers=0,
        epoch=1, data_buffer_size=0, **unused,
    ):
        num_examples = len(dataset)
        if max_positions is not None:
            self.filter_indices_by_size(np.arange(num_examples), dataset, max_positions)
        if num_shards != self.world_size:
            raise ValueError(f"DP: {num_shards} data shards but --distributed-world-size {self.world_size}")
        seed = self.sampling_seed()
        chunks = num_shards * self.cfg.update_freq[0]
        draws = draws_per_epoch(num_examples, self.expected_batch_size)
        q = self.sample_rate

        def batches_for_epoch(first_draw: int):
            # draw t of the ledger always comes from (seed, t): a resumed run
            # gets the draws of an uninterrupted one, and a run continuing
            # from weights with a ledger never repeats their draws
            return draws_for_epoch(num_examples, q, first_draw, draws, chunks, seed)

        dataset.set_epoch(epoch)
        return PoissonEpochBatchIterator(
            dataset=dataset,
            collate_fn=dataset.collater,
            batch_sampler=batches_for_epoch,
            ledger=self.accountant,
            update_freq=self.cfg.update_freq[0],
            seed=seed,
            num_shards=num_shards,
            shard_id=shard_id,
            num_workers=num_workers,
            epoch=epoch,
            buffer_size=data_buffer_size,
        )

    def sampling_seed(self) -> int:
        """The seed of the Poisson draws: --seed, or with --dp-secure-rng a
        secret from the OS, drawn once per process and shared by all workers
        (their draws must agree) but never saved, so a resumed run draws its
        remaining batches afresh (independent draws, same guarantee)."""
        if self._sampling_seed is None:
            seed = torch.tensor([secrets.randbits(62)], dtype=torch.int64)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.broadcast(seed, src=0)
            self._sampling_seed = int(seed.item())
        return self._sampling_seed

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if self.noise_multiplier is None:
            raise RuntimeError(
                "DP: σ and the sampling rate are set when the training set is loaded; "
                f"call task.load_dataset('{self.cfg.train_subset}') before training"
            )
        if (
            self.dp_trainer is None
            or self.dp_trainer.model is not unwrap_model(model)
            # a parameter made trainable, or a classification head registered,
            # after the DP trainer was built: check coverage again
            or [id(p) for p in self.dp_trainer.params]
            != [id(p) for p in unwrap_model(model).parameters() if p.requires_grad]
        ):
            self.dp_trainer = self._make_dp_trainer(model)
        self._configure_trainer(self.dp_trainer)
        self.dp_trainer.catch_up_ledger(update_num)
        self._stop_at_budget(update_num)
        steps_before = self.accountant.steps
        result = self.dp_trainer.train_step(sample, model, criterion, update_num, ignore_grad)
        if self.budget_steps is not None and steps_before < self.budget_steps == self.accountant.steps:
            logger.info(
                f"DP: privacy budget reached: ε = {self.accountant.get_epsilon(self.cfg.dp_delta):.4g} "
                f"after this update, and one more would exceed --dp-max-epsilon "
                f"{self.cfg.dp_max_epsilon}; stopping"
            )
        return result

    def _stop_at_budget(self, update_num: int) -> None:
        """Lower fairseq's --max-update to the last update within
        --dp-max-epsilon, so the training loop stops there and saves a
        checkpoint as it does at any --max-update."""
        if self.budget_steps is None or self._stop_update_set:
            return
        self._stop_update_set = True
        stop = update_num + (self.budget_steps - self.accountant.steps)
        root = self.cfg._get_root() if hasattr(self.cfg, "_get_root") else None
        optimization = getattr(root, "optimization", None)
        if optimization is None:
            return  # no fairseq training loop to stop; the DP trainer still refuses
        if not optimization.max_update or stop < optimization.max_update:
            optimization.max_update = stop
            logger.info(
                f"DP: --dp-max-epsilon {self.cfg.dp_max_epsilon}: training stops after update "
                f"{stop}, the last one within the privacy budget"
            )

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        if any("dp_sample" in log for log in logging_outputs):
            criterion.report_privacy(logging_outputs)

