"""One worker of a data-parallel DP run, through fairseq's own Trainer.

Usage: python dist_worker.py OUT.pt UPDATES -- <fairseq training args>

Runs UPDATES updates of fairseq's ``Trainer.train_step`` on the task's own
iterator (Poisson draws, ``--update-freq`` grouping, ``legacy_ddp`` when the
world size is above 1), then saves the trainable parameters and the ledger.
"""

import sys

import torch
from fairseq import tasks
from fairseq.data import iterators
from fairseq.distributed import utils as distributed_utils
from fairseq.logging import metrics
from fairseq.trainer import Trainer

import fairseq_dp  # noqa: F401
from fairseq_dp.trainer import unwrap_model

from helpers import parse


def run(cfg, out, updates):
    torch.manual_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)
    epoch_itr = trainer.get_train_iterator(epoch=1)
    itr = iterators.GroupedIterator(epoch_itr.next_epoch_itr(shuffle=True), cfg.optimization.update_freq[0])
    for _, samples in zip(range(updates), itr):
        with metrics.aggregate(new_root=True):
            trainer.train_step(samples)
    params = {n: p.detach().clone() for n, p in unwrap_model(trainer.model).named_parameters() if p.requires_grad}
    torch.save({"params": params, "ledger": task.accountant.history,
                "rank": cfg.distributed_training.distributed_rank}, out)


def main(cfg, out, updates):
    run(cfg, out, updates)


if __name__ == "__main__":
    out, updates, sep, *argv = sys.argv[1:]
    assert sep == "--"
    cfg = parse(argv)
    distributed_utils.call_main(cfg, main, out=out, updates=int(updates))
