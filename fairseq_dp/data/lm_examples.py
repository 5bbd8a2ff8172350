# Copyright (c) fairseq_dp contributors. MIT license.
"""One training example per item, for private language modeling.

fairseq's ``language_modeling`` task cuts the token stream into blocks
(``TokenBlockDataset``) that cross example boundaries; the accountant's q
counts examples, so DP needs each sampled unit to be exactly one example.
Each item here is one line of ``fairseq-dp-prepare-lm``'s output: plain text
``tokens + [eos]``, or a pair ``prompt + [eos] + target + [eos]``. The model
reads ``[eos] + item[:-1]`` (GPT-2 starts from ``<|endoftext|>``, which is
fairseq's eos here) and predicts ``item``; the positions before the item's
``loss_start`` (the prompt and its separator) are padding in the target, so
the loss covers the target tokens only.
"""

import os
from typing import Optional

import numpy as np
import torch
from fairseq.data import FairseqDataset, data_utils


# where each split's loss starts live, beside the binarized splits: a folder of
# its own, since fairseq takes every ``valid<N>.*`` file of the data directory
# for a validation subset and refuses a run that does not validate on it
LOSS_START_DIR = "loss_start"


def loss_start_path(data_dir: str, split: str) -> str:
    """The int64 array of one split: per example, the index in its item of
    the first token the loss covers (0 for plain text)."""
    return os.path.join(data_dir, LOSS_START_DIR, f"{split}.npy")


class LMExampleDataset(FairseqDataset):
    """Args:
        tokens: fairseq indexed dataset, one example an item.
        loss_start: per example, the index of the first item token in the loss.
        dictionary: gives pad and eos.
        max_length: items longer than this are cut to it (``truncate``), keeping
            their final eos; ``None`` keeps every item whole.
    """

    def __init__(self, tokens, loss_start: np.ndarray, dictionary, max_length: Optional[int] = None):
        assert len(tokens) == len(loss_start)
        self.tokens = tokens
        self.loss_start = np.asarray(loss_start, dtype=np.int64)
        self.pad = dictionary.pad()
        self.eos = dictionary.eos()
        self.max_length = max_length
        sizes = np.asarray(tokens.sizes, dtype=np.int64)
        self.sizes = sizes if max_length is None else np.minimum(sizes, max_length)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        item = self.tokens[index].long()
        if self.max_length is not None and len(item) > self.max_length:
            item = torch.cat([item[: self.max_length - 1], item.new_tensor([self.eos])])
        source = torch.cat([item.new_tensor([self.eos]), item[:-1]])
        target = item.clone()
        target[: int(self.loss_start[index])] = self.pad
        return {"id": index, "source": source, "target": target}

    def collater(self, samples):
        if len(samples) == 0:
            return {}
        source = data_utils.collate_tokens([s["source"] for s in samples], self.pad, left_pad=False)
        target = data_utils.collate_tokens([s["target"] for s in samples], self.pad, left_pad=False)
        return {
            "id": torch.LongTensor([s["id"] for s in samples]),
            "nsentences": len(samples),
            "ntokens": int(target.ne(self.pad).sum()),
            "net_input": {
                "src_tokens": source,
                "src_lengths": torch.LongTensor([len(s["source"]) for s in samples]),
            },
            "target": target,
        }

    def num_tokens(self, index):
        return int(self.sizes[index])

    def size(self, index):
        return int(self.sizes[index])

    def ordered_indices(self):
        return np.argsort(self.sizes, kind="mergesort")

    @property
    def supports_prefetch(self):
        return False
