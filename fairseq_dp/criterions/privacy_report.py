# Copyright (c) fairseq_dp contributors. MIT license.
"""What every DP criterion adds to its fairseq parent: the check that it runs
under a DP task, and the privacy report in the train logs (``dp_epsilon``,
``dp_sigma``, ``dp_clipped``, and ``dp_rng`` for an insecurely seeded run)."""

from fairseq.logging import metrics
from fairseq.logging.meters import MetersDict

from ..errors import DPConfigError

# fairseq_cli.train's aggregators for the train log lines and the epoch summary
EPSILON_AGGREGATORS = ("train_inner", "train")


class PrivacyReportMixin:
    """Goes before a fairseq criterion in a DP criterion's bases."""

    # the fairseq criterion to use for a non-private baseline (named in the refusal)
    non_private_criterion = None

    def start_privacy_report(self, cfg, task) -> None:
        """Called first by a DP criterion's ``__init__``: refuses a task that
        does not train privately."""
        if not hasattr(task, "accountant"):
            # under a fairseq task nothing would clip or add noise: the run
            # would train without privacy
            # fairseq's legacy tasks (language_modeling) keep their config as .args
            task_cfg = getattr(task, "cfg", None) or getattr(task, "args", None)
            name = getattr(task_cfg, "_name", None) or type(task).__name__
            own = getattr(cfg, "_name", None) or type(self).__name__
            raise DPConfigError(
                f"--criterion {own} trains privately only under --task {own} (got --task {name}); "
                f"for a non-private baseline use --criterion {self.non_private_criterion}"
            )
        self.dp_task = task

    def epsilon(self) -> float:
        """ε spent so far at the task's δ."""
        return self.dp_task.accountant.get_epsilon(self.dp_task.cfg.dp_delta)

    def report_privacy(self, logging_outputs) -> None:
        # A derived meter is read when its line is printed, so it shows the ε
        # after the last update. It goes only into the aggregators that print
        # train lines: fairseq also reads a throw-away aggregator after every
        # update, and a PRV evaluation (about 0.5 s) there would slow training.
        seeded = bool(self.dp_task.cfg.dp_insecure_seeded_rng)
        for name in EPSILON_AGGREGATORS:
            meters = metrics.get_meters(name)
            if meters is not None and "dp_epsilon" not in meters:
                meters.add_meter(
                    "dp_epsilon", MetersDict._DerivedMeter(lambda _: round(self.epsilon(), 4)), 900
                )
            if seeded and meters is not None and "dp_rng" not in meters:
                # every line of such a run says that its ε assumes a secret seed
                meters.add_meter("dp_rng", MetersDict._DerivedMeter(lambda _: "seeded-INSECURE"), 905)
        # weight 0: the meter shows the last value instead of an average
        metrics.log_scalar("dp_sigma", self.dp_task.noise_multiplier, weight=0, priority=910, round=4)
        nclipped = sum(log.get("dp_nclipped", 0) for log in logging_outputs)
        nsentences = sum(log.get("nsentences", 0) for log in logging_outputs)
        if nsentences > 0:
            metrics.log_scalar("dp_clipped", nclipped / nsentences, nsentences, priority=920, round=3)
