# Copyright (c) fairseq_dp contributors. MIT license.
"""Canary scores from the trained model: the higher, the better the model fits
the canary, the more likely it was trained on.

Classification: the log-probability of the canary's (random) label.
Language modeling: the log-likelihood of the canary's (random) tokens, summed.
Both are read from the final checkpoint, loaded as fairseq loads it for
validation; the scores look at nothing but the model and the canaries
(black-box, the weakest auditor, so the bound is a conservative one).
"""

from typing import List

import numpy as np
import torch
from fairseq import checkpoint_utils

from .canaries import CANARY_SPLIT


@torch.no_grad()
def canary_scores(checkpoint: str, audit_data: str, batch_size: int = 64) -> np.ndarray:
    """(m,) scores of the ``canaries`` split of ``audit_data``, in canary order."""
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint],
                                                                      arg_overrides={"data": audit_data})
    model = models[0].eval().float()
    task.load_dataset(CANARY_SPLIT)
    dataset = task.dataset(CANARY_SPLIT)
    classification = hasattr(task, "label_dictionary")
    head = getattr(cfg.criterion, "classification_head_name", "sentence_classification_head")
    scores: List[np.ndarray] = []
    for start in range(0, len(dataset), batch_size):
        sample = dataset.collater([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        if classification:
            logits, _ = model(**sample["net_input"], features_only=True, classification_head_name=head)
            lprobs = torch.log_softmax(logits.float(), dim=-1)
            target = model.get_targets(sample, [logits]).view(-1)
            score = lprobs.gather(1, target.unsqueeze(1)).squeeze(1)
        else:
            net_output = model(**sample["net_input"])
            lprobs = model.get_normalized_probs(net_output, log_probs=True).float()
            target = sample["target"]
            mask = target.ne(task.target_dictionary.pad())
            token = lprobs.gather(2, target.clamp(min=0).unsqueeze(2)).squeeze(2)
            score = (token * mask).sum(1)
        ids = sample["id"].numpy()
        if not np.array_equal(ids, np.arange(start, start + len(ids))):
            raise RuntimeError("the canary split came back out of order")
        scores.append(score.double().numpy())
    return np.concatenate(scores)
