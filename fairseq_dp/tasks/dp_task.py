# Copyright (c) fairseq_dp contributors. MIT license.
"""The DP engine's task side, shared by every DP task.

:class:`DPTaskMixin` goes before a fairseq task in a DP task's bases
(``class DPSentencePredictionTask(DPTaskMixin, SentencePredictionTask)``) and
gives it, once for all DP tasks:

- the checks of the DP options (``dp_config.py``) before anything loads, and
  of the model (every trainable parameter covered by a per-example rule,
  ``recording.py``) when it is built;
- the sampling rate q and the planned updates when the training set loads;
  σ (or its calibration from a target ε, counting the ledger restored with
  the weights), the budget and the frozen :class:`~fairseq_dp.trainer.DPSettings`
  before the first update, when the DP trainer is built from them;
- Poisson sampling of whole examples (``data/poisson.py``), multi-worker
  checks, the ledger kept in every checkpoint (``checkpoint_ledger.py``), the
  budget stop, and ε / σ in the logs (through the criterion's
  ``report_privacy``).

A task adds only what is its own: its config (its fairseq parent's plus
:class:`~fairseq_dp.dp_config.DPConfig`), the data directory's layout
(:meth:`check_data_dir`, :meth:`train_size_on_disk`), and checks of its splits
and model config.
"""

import hashlib
import json
import logging
import os
import secrets
from typing import Optional

import numpy as np
import torch
from fairseq.optim import FP16Optimizer

from .. import planning
from ..accounting import (
    PrivacyAccountant,
    calibrate_noise_multiplier,
    epsilon_of,
    keep_ledger_with_weights,
    restore_ledger,
)
from ..checkpoint_fit import check_checkpoints_on_load, check_pretrained_checkpoint
from ..checkpoint_ledger import read_checkpoint_history, refresh_best_checkpoint_ledgers, restored_checkpoint_path
from ..clipping import LOW_PRECISION
from ..data.poisson import PoissonEpochBatchIterator, draws_for_epoch, draws_per_epoch
from ..dp_config import check_dp_config
from ..errors import DPConfigError
from ..prepare import prepare_model_for_dp
from ..recording import Recorder
from ..trainer import DPSettings, DPTrainer, PrivacyBudgetExhausted, unwrap_model

logger = logging.getLogger(__name__)


def signal_gradients_written(optimizer) -> None:
    """Tell fairseq's optimizer that this micro-batch wrote gradients, as
    fairseq's own ``FairseqTask.train_step`` does by calling
    ``optimizer.backward(loss)``.

    The DP step writes ``.grad`` itself, without ``optimizer.backward``. For a
    float32 optimizer that makes no difference, but under bf16 fairseq's
    ``FP16Optimizer`` steps float32 master weights and copies the model's
    bf16 ``.grad`` into their gradients only when its ``backward`` has run
    since the last ``zero_grad``: without this call it would step on zero
    gradients every update, silently. So the task calls the public
    ``optimizer.backward`` on a zero-valued scalar leaf of its own, which
    reaches no parameter: its backward adds nothing to any ``.grad``, and
    every fairseq optimizer's ``backward`` is then a no-op for the model, or
    marks the gradients for copying (``FP16Optimizer``). If a future
    fairseq's ``FP16Optimizer`` no longer marks them that way, this refuses
    to go on rather than train on stale gradients."""
    marker = torch.zeros((), requires_grad=True)
    optimizer.backward(marker)
    if isinstance(optimizer, FP16Optimizer) and getattr(optimizer, "_needs_sync", None) is not True:
        raise RuntimeError(
            "DP: fairseq's FP16Optimizer did not mark its float32 master gradients for an update "
            "after optimizer.backward(): this fairseq version would step bf16 training on stale "
            "gradients. bf16 with DP needs fairseq 0.12's FP16Optimizer; train in fp32"
        )


def log_precision(model) -> None:
    """Say so when the model trains in bf16 (or fp16, through the Python API),
    and where float32 is kept."""
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    low = sorted(str(d).replace("torch.", "") for d in dtypes if d in LOW_PRECISION)
    if low:
        logger.info(
            f"DP: the model trains in {', '.join(low)}: per-example norms, clip factors, clipped sums "
            "and the noise are float32, and each update's gradient is rounded to the model's "
            "precision once, after the noise is added"
        )


def data_parallel_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def example_lengths(dataset) -> np.ndarray:
    """Tokens per training example (fairseq's ``num_tokens``), for grouping
    the micro-batches of a Poisson draw by length."""
    indices = np.arange(len(dataset))
    try:
        return np.asarray(dataset.num_tokens_vec(indices))
    except NotImplementedError:
        return np.asarray([dataset.num_tokens(i) for i in indices])


class DPTaskMixin:
    """Differentially private training for the fairseq task after it in the bases."""

    def __init__(self, cfg, *args, **kwargs):
        super().__init__(cfg, *args, **kwargs)
        # fairseq's legacy tasks (language_modeling) keep their config as .args
        self.cfg = cfg
        self.accountant = PrivacyAccountant(cfg.dp_accountant)
        # σ and the budget are fixed when training starts (start_private_training),
        # and with them the settings the DP trainer is built from
        self.noise_multiplier: Optional[float] = None
        self.sample_rate: Optional[float] = None
        self.budget_steps: Optional[int] = None
        self.planned: Optional[int] = None
        self.settings: Optional[DPSettings] = None
        self.recorder: Optional[Recorder] = None
        self.dp_trainer: Optional[DPTrainer] = None
        self._started = False
        self._history_checked = False
        self._stop_update_set = False
        # Poisson draw t is a function of this and t: a secret drawn once per
        # process (default), or --seed with --dp-insecure-seeded-rng
        self._sampling_seed: Optional[int] = int(cfg.seed) if cfg.dp_insecure_seeded_rng else None

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
        cls.check_task_cfg(cfg)
        cls.check_data_dir(cfg)
        task = super().setup_task(cfg, **kwargs)
        task.complete_lr_schedule()
        return task

    @classmethod
    def check_task_cfg(cls, cfg) -> None:
        """The task's own settings that DP cannot train with, refused before
        anything loads (the DP options themselves: ``check_dp_config``)."""

    @classmethod
    def check_data_dir(cls, cfg) -> None:
        """What the data directory must hold, checked before fairseq opens it
        (fairseq would fail on the first missing file with a traceback)."""

    def train_size_on_disk(self) -> Optional[int]:
        """The number of training examples, read before the training set is
        loaded (fairseq builds the LR scheduler first); None without one."""
        raise NotImplementedError

    def train_tokens_path(self, split: str) -> Optional[str]:
        """The file holding the training split's tokens (checked for being empty)."""
        return None

    def check_split(self, split: str) -> None:
        """A task's checks of a loaded training or validation split, before
        any privacy is spent (e.g. labels inside --num-classes)."""

    def task_settings(self) -> dict:
        """The task's own settings that every worker must share."""
        return {}

    def check_model_cfg(self, cfg, from_checkpoint: bool) -> None:
        """A task's checks (or upgrades) of the model config before building it."""

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
        train_size = self.train_size_on_disk()
        if train_size is None:
            return  # not a training run (or no training set, which training reports itself)
        planned = self.planned_updates(train_size)
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
        return planning.updates_per_epoch(
            dataset_size, expected_batch_size=self.expected_batch_size, sampling=self.cfg.dp_sampling,
            batch_size=self.cfg.batch_size, update_freq=self.cfg.update_freq[0], world_size=self.world_size,
        )

    def planned_updates(self, dataset_size: int) -> Optional[int]:
        return planning.planned_updates(
            self.updates_per_epoch(dataset_size), self.cfg.max_epoch, self.cfg.max_update
        )

    def load_dataset(self, split, combine=False, **kwargs):
        if split == self.cfg.train_subset:
            tokens = self.train_tokens_path(split)
            if tokens is not None and os.path.exists(tokens) and os.path.getsize(tokens) == 0:
                # fairseq would fail to memory-map it, with a traceback
                raise DPConfigError(f"DP: the training split '{split}' is empty ({tokens})")
        dataset = self.load_examples(split, combine=combine, **kwargs)
        if split == self.cfg.train_subset or split in str(self.cfg.valid_subset).split(","):
            self.check_split(split)
        if split == self.cfg.train_subset:
            self.configure_privacy(len(self.datasets[split]))
        return dataset

    def load_examples(self, split, combine=False, **kwargs):
        """Loads ``split`` into ``self.datasets``, one item per training
        example (the privacy unit): the fairseq parent's loader by default."""
        return super().load_dataset(split, combine=combine, **kwargs)

    def _root_cfg(self):
        return self.cfg._get_root() if hasattr(self.cfg, "_get_root") else None

    # ------------------------------------------------------------ set-up checks

    def check_same_on_every_rank(self, dataset_size: int, dataset=None) -> None:
        """Workers with different seeds, batch sizes, DP flags or data would draw
        overlapping batches, record the wrong q, or hang: refused, before any
        update, by comparing one fingerprint of each worker's settings."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        settings = {k: str(v) for k, v in self.cfg.items() if k.startswith("dp_")}
        settings.update(
            seed=self.cfg.seed, batch_size=self.cfg.batch_size, update_freq=list(self.cfg.update_freq),
            max_epoch=self.cfg.max_epoch, max_update=self.cfg.max_update, train_examples=dataset_size,
            **self.task_settings(),
        )
        if dataset is not None:
            settings["train_data"] = hashlib.sha256(np.ascontiguousarray(dataset.sizes).tobytes()).hexdigest()[:16]
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, settings)
        differ = sorted(k for k in settings if len({json.dumps(g.get(k), default=str) for g in gathered}) > 1)
        if differ:
            raise DPConfigError(
                "DP: the workers disagree on " + ", ".join(
                    f"{k} ({' / '.join(str(g.get(k)) for g in gathered)})" for k in differ)
                + ". Every worker must run with the same settings and data"
            )

    def check_weights_history(self) -> None:
        """Weights restored by fairseq must not count as fresh if a DP run
        trained them: a ledger kept outside the model state (at the top level
        of merged or exported checkpoints, in the task state of
        ``masked_lm_selected``'s, or beside the training data of a plain
        ``masked_lm`` pre-training on a selected corpus) is adopted; weights
        whose saved config is a DP task's but carry no ledger are refused unless
        --dp-assume-fresh-weights says they never saw this data."""
        if self._history_checked or self.accountant.loaded_history is None:
            return
        root = self._root_cfg()
        path = restored_checkpoint_path(root.checkpoint) if root is not None else None
        if path is None:
            return
        self._history_checked = True
        if self.accountant.loaded_history == "ledger":
            return
        outside_model, from_dp_task, where = read_checkpoint_history(path)
        if outside_model is not None:
            restore_ledger(self.accountant, outside_model)
            logger.info(f"DP: {path} {where}: continuing it, {self.accountant.steps} updates already spent")
        elif from_dp_task and not self.cfg.dp_assume_fresh_weights:
            raise DPConfigError(
                f"DP: {path} was trained by a DP task but carries no privacy ledger (its dp_ledger "
                "keys were removed), so the privacy these weights already spent is unknown. Restore "
                "the checkpoint as saved, or, if these weights never saw this private data, say so "
                "with --dp-assume-fresh-weights"
            )

    def configure_privacy(self, dataset_size: int) -> None:
        """Sampling rate and planned updates for a training set of
        ``dataset_size`` examples, and every check that needs N. σ itself is
        fixed when training starts (:meth:`start_private_training`), when
        the ledger restored with the weights and fairseq's update count are
        known."""
        if dataset_size < 1:
            raise DPConfigError(f"DP: the training split '{self.cfg.train_subset}' is empty")
        if self.expected_batch_size > dataset_size:
            raise DPConfigError(
                f"DP: the expected logical batch (--batch-size × --update-freq × workers = "
                f"{self.expected_batch_size}) is larger than the training set ({dataset_size} "
                "examples); make it smaller"
            )
        if not self.cfg.dp_delta < 1 / dataset_size:
            raise DPConfigError(
                f"DP: --dp-delta {self.cfg.dp_delta} is not below 1/N = {1 / dataset_size:.3g} for "
                f"N = {dataset_size} training examples: a mechanism that publishes one random "
                "example in full meets such a δ. Use δ well below 1/N (e.g. 1/(10·N))"
            )
        self.check_same_on_every_rank(dataset_size, self.datasets.get(self.cfg.train_subset))
        self.check_weights_history()
        self.sample_rate = planning.sample_rate(dataset_size, self.expected_batch_size)
        self.planned = self.planned_updates(dataset_size)
        self._dataset_size = dataset_size
        if self.cfg.dp_noise_multiplier is not None:
            self.noise_multiplier = float(self.cfg.dp_noise_multiplier)
        if self.settings is not None:
            raise DPConfigError("DP: the training set was loaded again after training started; "
                                "its size fixes q, which cannot change within a run")

    def start_private_training(self, update_num: int) -> None:
        """Before the first update of this process: check δ against the
        ledger's, fix σ (a target ε is the total, the ledger included, for the
        updates still planned after fairseq's ``update_num``), log the plan,
        and set the budget."""
        self._started = True
        if self.cfg.max_update > 0 and update_num >= self.cfg.max_update:
            # fairseq's loop takes one update before it checks --max-update:
            # relaunching a finished run would spend privacy on every relaunch
            raise DPConfigError(
                f"DP: this run has already taken its --max-update {self.cfg.max_update} updates "
                f"(the restored checkpoint is at update {update_num}); fairseq would take one more, "
                "spending privacy beyond the plan. Raise --max-update to train further"
            )
        delta = self.cfg.dp_delta
        if self.accountant.steps > 0 and self.accountant.delta is not None and delta > self.accountant.delta:
            raise DPConfigError(
                f"DP: --dp-delta {delta} is larger than the δ = {self.accountant.delta} that these "
                f"weights' ledger ({self.accountant.steps} updates) was stated at: a larger δ would "
                "report a smaller ε for privacy already spent. Use --dp-delta "
                f"{self.accountant.delta} or smaller"
            )
        self.accountant.delta = delta if self.accountant.delta is None else min(delta, self.accountant.delta)
        remaining = None if self.planned is None else max(1, self.planned - update_num)
        spent = list(self.accountant.history)
        if self.cfg.dp_target_epsilon is not None:
            self.noise_multiplier = self._noise_for_target(remaining, spent, update_num)
        logger.info(
            f"DP: N={self._dataset_size} examples, expected logical batch {self.expected_batch_size}, "
            f"q={self.sample_rate:.6g}, planned updates {self.planned}, C={self.cfg.dp_clip_norm}, "
            f"σ={self.noise_multiplier:.6g}, δ={delta}, accountant {self.cfg.dp_accountant}"
        )
        if spent:
            logger.info(f"DP: the weights' ledger already holds {self.accountant.steps} updates "
                        f"(ε = {epsilon_of(spent, delta, self.cfg.dp_accountant):.4g}); ε below is the total")
        if remaining is not None and self.noise_multiplier > 0:
            planned_eps = self.accountant.epsilon_after(
                delta, noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, num_steps=remaining,
            )
            logger.info(f"DP: ε after the planned {self.planned} updates: {planned_eps:.4g}")
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
        if self.cfg.dp_insecure_seeded_rng:
            logger.warning(
                "DP: --dp-insecure-seeded-rng: the noise and the samples are functions of --seed, "
                "which every checkpoint stores. The reported ε holds ONLY against someone who does "
                "not know the seed; never release this model"
            )
        if self.cfg.dp_secure_rng:
            logger.info("DP: --dp-secure-rng is the default now and has no effect")
        if self.cfg.dp_hide_private_stats:
            logger.info("DP: --dp-hide-private-stats: train lines carry no statistic of the private "
                        "data (fairseq prints loss=-1 as its placeholder)")
        self.configure_budget(remaining)
        self.settings = DPSettings(
            clip_norm=self.cfg.dp_clip_norm,
            noise_multiplier=self.noise_multiplier,
            expected_batch_size=self.expected_batch_size,
            sample_rate=self.sample_rate,
            seed=self.cfg.seed,
            seeded_rng=bool(self.cfg.dp_insecure_seeded_rng),
            micro_batches_per_update=self.cfg.update_freq[0],
            # one worker adds the noise; legacy_ddp's sum then holds it once
            adds_noise=data_parallel_rank() == 0,
            budget_steps=self.budget_steps,
            clipping=self.cfg.dp_clipping,
        )

    def _noise_for_target(self, remaining: Optional[int], spent, update_num: int) -> float:
        if remaining is None:
            raise DPConfigError("--dp-target-epsilon needs the number of updates: set --max-epoch or --max-update")
        target = self.cfg.dp_target_epsilon
        # a resumed run keeps the σ it started with while that still meets the
        # target, so that resuming does not change the noise
        if update_num > 0 and spent:
            sigma = spent[-1][0]
            eps = epsilon_of(spent + [(sigma, self.sample_rate, remaining)], self.cfg.dp_delta, self.cfg.dp_accountant)
            if eps <= target:
                return sigma
        return calibrate_noise_multiplier(
            target_epsilon=target, delta=self.cfg.dp_delta, sample_rate=self.sample_rate,
            steps=remaining, mechanism=self.cfg.dp_accountant, spent=spent,
        )

    def configure_budget(self, planned_updates: Optional[int]) -> None:
        """With --dp-max-epsilon: how many ledger steps the budget allows,
        counting what the ledger (restored with the weights) already holds."""
        max_eps = self.cfg.dp_max_epsilon
        if max_eps is None:
            return
        if self.noise_multiplier == 0:
            raise DPConfigError("--dp-max-epsilon cannot be met with --dp-noise-multiplier 0 (ε = inf)")
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
                f"DP: --dp-max-epsilon {max_eps}: the budget allows {allowed} more update{'s' if allowed != 1 else ''} "
                f"(ε = {eps_last:.4g} after them); training stops there"
            )

    def build_model(self, cfg, from_checkpoint=False):
        self.check_model_cfg(cfg, from_checkpoint)
        for flag in ("encoder_layerdrop", "decoder_layerdrop"):
            if getattr(cfg, flag, 0) > 0:
                raise DPConfigError(
                    f"--{flag.replace('_', '-')} skips layers at random, so a skipped layer's "
                    "per-example gradients are missing from that update; set it to 0 with DP"
                )
        for flag in ("mha_reg_scale_factor", "ffn_reg_scale_factor"):
            if getattr(cfg, flag, 0):
                raise DPConfigError(
                    f"--{flag.replace('_', '-')} adds a regularizer computed from the weights, "
                    "outside the modules whose per-example gradients DP clips, so its gradient "
                    "would be dropped; set it to 0 with DP"
                )
        model = super().build_model(cfg, from_checkpoint)
        check_checkpoints_on_load(model)  # fairseq's own archs too
        if not from_checkpoint:
            check_pretrained_checkpoint(model, self.cfg)
        keep_ledger_with_weights(model, self.accountant)
        prepare_model_for_dp(unwrap_model(model), self.cfg.dp_freeze)
        # every trainable parameter covered by a rule, checked now, before training
        self._new_recorder(model)
        return model

    def _new_recorder(self, model) -> Recorder:
        # the old recorder's hooks go first: LowRankLinear holds one recorder
        if self.recorder is not None:
            self.recorder.remove_hooks()
        self.recorder = Recorder(unwrap_model(model))
        self.dp_trainer = None
        return self.recorder

    def build_criterion(self, cfg):
        # each DP task's criterion has the task's name (its loss reads the task's batches)
        if getattr(cfg, "_name", None) != self.cfg._name:
            raise DPConfigError(
                f"--task {self.cfg._name} needs --criterion {self.cfg._name}, "
                "which reports the privacy spent"
            )
        criterion = super().build_criterion(cfg)
        if not hasattr(criterion, "report_privacy"):
            raise DPConfigError(
                f"--task {self.cfg._name} needs --criterion {self.cfg._name}, "
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
            already = getattr(self.cfg, "shorten_method", None) == "truncate"
            raise DPConfigError(
                f"DP: {len(ignored)} training examples are longer than max positions "
                f"{max_positions} (first ids {list(ignored[:5])}); fairseq would skip them, "
                "which the privacy accounting cannot allow. "
                + ("They are cut to --tokens-per-sample, which is larger than the model's positions: "
                   f"use --tokens-per-sample {max_positions} or less" if already else
                   "Use --shorten-method truncate, or remove them from the training data")
            )
        return kept

    def get_batch_iterator(self, dataset, **kwargs):
        # fairseq rounds batch sizes down to this multiple (8): DP needs exactly
        # --batch-size, and with a smaller --batch-size validation would skip
        # examples (or, on a split smaller than 8, fail)
        kwargs["required_batch_size_multiple"] = 1
        if dataset is not self.datasets.get(self.cfg.train_subset):
            return super().get_batch_iterator(dataset, **kwargs)
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
            raise DPConfigError(f"DP: {num_shards} data shards but --distributed-world-size {self.world_size}")
        seed = self.sampling_seed()
        chunks = num_shards * self.cfg.update_freq[0]
        draws = draws_per_epoch(num_examples, self.expected_batch_size)
        q = self.sample_rate
        # micro-batches grouped by length: less padding, the same update
        sizes = example_lengths(dataset)

        def batches_for_epoch(first_draw: int):
            # draw t of the ledger always comes from (seed, t): a resumed run
            # gets the draws of an uninterrupted one, and a run continuing
            # from weights with a ledger never repeats their draws
            return draws_for_epoch(num_examples, q, first_draw, draws, chunks, seed, sizes)

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
        """The seed of the Poisson draws: a secret from the OS, drawn once per
        process and shared by all workers (their draws must agree) but never
        saved, so a resumed run draws its remaining batches afresh
        (independent draws, same guarantee); --seed with
        --dp-insecure-seeded-rng."""
        if self._sampling_seed is None:
            seed = torch.tensor([secrets.randbits(62)], dtype=torch.int64)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.broadcast(seed, src=0)
            self._sampling_seed = int(seed.item())
        return self._sampling_seed

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if self.sample_rate is None:
            raise RuntimeError(
                "DP: the sampling rate is set when the training set is loaded; "
                f"call task.load_dataset('{self.cfg.train_subset}') before training"
            )
        if not self._started:
            self.start_private_training(update_num)
            log_precision(model)
        if self.recorder is None or not self.recorder.covers(unwrap_model(model)):
            # a parameter made trainable, or a classification head registered,
            # after the model was built: check coverage again
            self._new_recorder(model)
        if self.dp_trainer is None:
            self.dp_trainer = DPTrainer(self.recorder, self.accountant, self.settings)
        self.dp_trainer.catch_up_ledger(update_num)
        self._stop_at_budget(update_num)
        steps_before = self.accountant.steps
        loss, sample_size, logging_output = self.dp_trainer.train_step(
            sample, model, criterion, update_num, ignore_grad)
        if optimizer is not None:
            signal_gradients_written(optimizer)
        if self.budget_steps is not None and steps_before < self.budget_steps == self.accountant.steps:
            logger.info(
                f"DP: privacy budget reached: ε = {self.accountant.get_epsilon(self.cfg.dp_delta):.4g} "
                f"after this update, and one more would exceed --dp-max-epsilon "
                f"{self.cfg.dp_max_epsilon}; stopping"
            )
        if self.cfg.dp_hide_private_stats:
            # the loss, accuracy, batch size and clipped share of a private
            # batch, without noise: none of them leaves this step
            logging_output = {"dp_sample": 1}
        return loss, sample_size, logging_output

    def _stop_at_budget(self, update_num: int) -> None:
        """Lower fairseq's --max-update to the last update within
        --dp-max-epsilon, so the training loop stops there and saves a
        checkpoint as it does at any --max-update."""
        if self.budget_steps is None or self._stop_update_set:
            return
        self._stop_update_set = True
        stop = update_num + (self.budget_steps - self.accountant.steps)
        root = self._root_cfg()
        optimization = getattr(root, "optimization", None)
        if optimization is None:
            return  # no fairseq training loop to stop; the DP trainer still refuses
        if not optimization.max_update or stop < optimization.max_update:
            optimization.max_update = stop
            logger.info(
                f"DP: --dp-max-epsilon {self.cfg.dp_max_epsilon}: training stops after update "
                f"{stop}, the last one within the privacy budget"
            )

    def state_dict(self):
        """fairseq's Trainer asks for the task state whenever it saves a
        checkpoint: the moment to bring the ledger of the checkpoints chosen
        by validation up to date (see ``checkpoint_ledger``)."""
        root = self._root_cfg()
        checkpoint = getattr(root, "checkpoint", None)
        if checkpoint is not None and self.accountant.steps > 0 and data_parallel_rank() == 0:
            refresh_best_checkpoint_ledgers(checkpoint.save_dir, checkpoint.checkpoint_suffix or "",
                                            self.accountant)
        return super().state_dict()

    def reduce_metrics(self, logging_outputs, criterion):
        private = any("dp_sample" in log for log in logging_outputs)
        if not (private and self.cfg.dp_hide_private_stats):
            super().reduce_metrics(logging_outputs, criterion)
        if private:
            criterion.report_privacy(logging_outputs)

    def post_validate(self, model, stats, agg):
        # fairseq_cli.train calls this once per validation, before it prints
        # the stats to the log line, TensorBoard and W&B: ε goes in there,
        # next to the validation metric, computed once
        if self.noise_multiplier is not None:
            stats["dp_epsilon"] = round(self.accountant.get_epsilon(self.cfg.dp_delta), 4)
            if self.cfg.dp_insecure_seeded_rng:
                stats["dp_rng"] = "seeded-INSECURE"
