# Copyright (c) fairseq_dp contributors. MIT license.
"""``dp_sentence_prediction``: fairseq's sentence prediction, trained with DP.

The task validates the whole run's setup before anything trains, calibrates
σ from a target ε when asked, and hands every micro-batch to
:class:`fairseq_dp.trainer.DPTrainer`.
"""

import logging
import math
from dataclasses import dataclass, field
from typing import List, Optional

from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.sentence_prediction import SentencePredictionConfig, SentencePredictionTask
from omegaconf import II

from ..accounting import PrivacyAccountant, calibrate_noise_multiplier
from ..prepare import freeze_patterns, prepare_model_for_dp
from ..trainer import CLIPPING_MODES, DPTrainer, unwrap_model

logger = logging.getLogger(__name__)

ACCOUNTANT_CHOICES = ChoiceEnum(["prv", "rdp"])
CLIPPING_CHOICES = ChoiceEnum(list(CLIPPING_MODES))
ALL_REDUCE_IN_BACKWARD = ("c10d", "pytorch_ddp", "fully_sharded", "slowmo")


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
    if cfg.distributed_world_size > 1:
        if cfg.ddp_backend in ALL_REDUCE_IN_BACKWARD:
            errors.append(
                f"--ddp-backend {cfg.ddp_backend} all-reduces gradients during backward, before "
                "per-example clipping; DP needs --ddp-backend legacy_ddp"
            )
        errors.append("multi-worker DP training is not supported yet: use --distributed-world-size 1")
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

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        check_dp_config(cfg)
        return super().setup_task(cfg, **kwargs)

    @property
    def expected_batch_size(self) -> int:
        return self.cfg.batch_size * self.cfg.update_freq[0] * max(self.cfg.distributed_world_size, 1)

    def planned_updates(self, dataset_size: int) -> Optional[int]:
        batches = math.ceil(dataset_size / self.cfg.batch_size)
        per_epoch = math.ceil(batches / self.cfg.update_freq[0])
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
            probe = PrivacyAccountant(self.cfg.dp_accountant)
            probe.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, num_steps=updates)
            logger.info(f"DP: ε after the planned {updates} updates: {probe.get_epsilon(self.cfg.dp_delta):.4g}")
        if self.noise_multiplier == 0:
            logger.warning(
                "DP: --dp-noise-multiplier 0: per-example clipping without noise. "
                "THIS RUN IS NOT PRIVATE (ε = inf)."
            )
        logger.info(
            "DP: the accountant assumes Poisson sampling at rate q; this run draws "
            "shuffled fixed-size batches, as the published DP fine-tuning code does"
        )
        if self.dp_trainer is not None:
            self._configure_trainer(self.dp_trainer)

    def _configure_trainer(self, dp_trainer: DPTrainer) -> None:
        dp_trainer.noise_multiplier = self.noise_multiplier
        dp_trainer.sample_rate = self.sample_rate

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        prepare_model_for_dp(unwrap_model(model), self.cfg.dp_freeze)
        self.dp_trainer = self._make_dp_trainer(model)
        return model

    def _make_dp_trainer(self, model) -> DPTrainer:
        dp_trainer = DPTrainer(
            unwrap_model(model),
            accountant=self.accountant,
            clip_norm=self.cfg.dp_clip_norm,
            noise_multiplier=self.noise_multiplier,
            expected_batch_size=self.expected_batch_size,
            sample_rate=self.sample_rate,
            seed=self.cfg.seed,
            clipping=self.cfg.dp_clipping,
        )
        if self.dp_trainer is not None and self.dp_trainer is not dp_trainer:
            self.dp_trainer.remove_hooks()
        return dp_trainer

    def build_criterion(self, cfg):
        from ..criterions.dp_sentence_prediction import DPSentencePredictionCriterion

        criterion = super().build_criterion(cfg)
        if not isinstance(criterion, DPSentencePredictionCriterion):
            raise ValueError(
                "--task dp_sentence_prediction needs --criterion dp_sentence_prediction, "
                "which reports the privacy spent"
            )
        return criterion

    def get_batch_iterator(self, dataset, **kwargs):
        if dataset is self.datasets.get(self.cfg.train_subset):
            # fairseq rounds batch sizes down to this multiple; DP needs exactly --batch-size
            kwargs["required_batch_size_multiple"] = 1
        return super().get_batch_iterator(dataset, **kwargs)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if self.noise_multiplier is None:
            raise RuntimeError(
                "DP: σ and the sampling rate are set when the training set is loaded; "
                f"call task.load_dataset('{self.cfg.train_subset}') before training"
            )
        if self.dp_trainer is None or self.dp_trainer.model is not unwrap_model(model):
            self.dp_trainer = self._make_dp_trainer(model)
        self._configure_trainer(self.dp_trainer)
        return self.dp_trainer.train_step(sample, model, criterion, update_num, ignore_grad)

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        if any("dp_sample" in log for log in logging_outputs):
            criterion.report_privacy(logging_outputs)

    def state_dict(self):
        return {"dp_accountant": self.accountant.state_dict()}

    def load_state_dict(self, state_dict):
        if "dp_accountant" in state_dict:
            self.accountant.load_state_dict(state_dict["dp_accountant"])
