# Copyright (c) fairseq_dp contributors. MIT license.
"""``dp_language_modeling``: causal language modeling trained with DP.

The privacy unit is one training example: one line of a text file, or one
(prompt, target) pair, as ``fairseq-dp-prepare-lm`` writes them (never
fairseq's token blocks, which cut across examples while the accountant's q
counts examples). For pairs the loss covers the target tokens only; for
plain text every token. Everything private is the shared DP engine
(:class:`DPTaskMixin`); the model is fairseq's ``transformer_lm`` family,
or the plugin's ``transformer_lm_lora`` / ``transformer_lm_rgp``.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from fairseq.data import data_utils
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask
from omegaconf import OmegaConf, open_dict

from ..data.lm_examples import LMExampleDataset, loss_start_path
from ..dp_config import DPConfig
from ..errors import DPConfigError
from .dp_task import DPTaskMixin

logger = logging.getLogger(__name__)

LAYOUT = ("a dp_language_modeling directory has dict.txt and the binarized splits "
          "(SPLIT.bin, SPLIT.idx, and loss_start/SPLIT.npy for prompt/target data); "
          "fairseq-dp-prepare-lm writes them")


@dataclass
class DPLanguageModelingConfig(LanguageModelingConfig, DPConfig):
    untie_output_embedding: bool = field(
        default=False,
        metadata={
            "help": "give the output projection its own weight instead of the token embedding's, "
            "as private-transformers does for DP full fine-tuning (GPT-2 ties them; DP trains the "
            "tied weight correctly too, with one per-example norm over both uses). The saved model "
            "config says untied, so every loader builds the same model; both start from the "
            "checkpoint's embedding"
        },
    )


@register_task("dp_language_modeling", dataclass=DPLanguageModelingConfig)
class DPLanguageModelingTask(DPTaskMixin, LanguageModelingTask):
    """Causal language modeling with differentially private training."""

    @classmethod
    def check_data_dir(cls, cfg) -> None:
        data = cfg.data
        if not data or not os.path.isdir(data):
            raise DPConfigError(f"data directory {data!r} does not exist; {LAYOUT}")
        if not os.path.isfile(os.path.join(data, "dict.txt")):
            raise DPConfigError(f"data directory {data!r} has no dict.txt; {LAYOUT}")

    @classmethod
    def check_task_cfg(cls, cfg) -> None:
        if cfg.shorten_method == "random_crop":
            raise DPConfigError(
                "--shorten-method random_crop would cut prompts at random; dp_language_modeling "
                "supports none (examples longer than --tokens-per-sample are refused) or truncate"
            )
        if cfg.add_bos_token:
            raise DPConfigError(
                "--add-bos-token: dp_language_modeling always starts an example from </s>, as GPT-2 "
                "starts from <|endoftext|> (which is fairseq's </s> here); drop the flag"
            )
        if cfg.sample_break_mode in ("complete", "complete_doc"):
            raise DPConfigError(
                f"--sample-break-mode {cfg.sample_break_mode} packs several examples into one "
                "sample; with DP one sample is exactly one example (the unit q counts): drop the flag"
            )

    def max_positions(self):
        return self.cfg.tokens_per_sample

    def _split_path(self, split: str) -> str:
        return os.path.join(self.cfg.data, split)

    def train_tokens_path(self, split: str) -> Optional[str]:
        return self._split_path(split) + ".bin"

    def train_size_on_disk(self) -> Optional[int]:
        tokens = data_utils.load_indexed_dataset(self._split_path(self.cfg.train_subset), self.dictionary)
        return None if tokens is None else len(tokens)

    def task_settings(self) -> dict:
        return {"tokens_per_sample": self.cfg.tokens_per_sample, "shorten_method": str(self.cfg.shorten_method)}

    def check_model_cfg(self, cfg, from_checkpoint: bool) -> None:
        embed = getattr(cfg, "decoder_embed_dim", None)
        dims = {f: getattr(cfg, f, None) for f in ("decoder_input_dim", "decoder_output_dim")}
        if not from_checkpoint and embed not in (None, 512) and all(v == 512 for v in dims.values()):
            # fairseq's command line fills both with 512 whatever the embedding
            # size, which adds two projections GPT-2 does not have
            logger.warning(
                f"--decoder-input-dim and --decoder-output-dim are 512 while --decoder-embed-dim is "
                f"{embed}: the model gets projections between them (fairseq's command-line default). "
                f"For GPT-2's shape pass --decoder-input-dim {embed} --decoder-output-dim {embed}"
            )
        if self.cfg.untie_output_embedding and getattr(cfg, "share_decoder_input_output_embed", False):
            if OmegaConf.is_config(cfg):
                with open_dict(cfg):
                    cfg.share_decoder_input_output_embed = False
            else:
                cfg.share_decoder_input_output_embed = False
            logger.info("DP: --untie-output-embedding: the output projection gets its own weight")

    def load_examples(self, split, combine=False, **kwargs):
        path = self._split_path(split)
        tokens = data_utils.load_indexed_dataset(path, self.dictionary, combine=combine)
        if tokens is None:
            raise DPConfigError(f"dp_language_modeling: no split '{split}' in {self.cfg.data} "
                                f"({path}.bin/.idx); {LAYOUT}")
        starts_file = loss_start_path(self.cfg.data, split)
        if os.path.exists(starts_file):
            loss_start = np.load(starts_file)
            if loss_start.shape != (len(tokens),):
                raise DPConfigError(f"{starts_file} has {loss_start.shape[0]} entries for "
                                    f"{len(tokens)} examples; prepare the data again")
        else:
            # fairseq-preprocess output: one line an example, every token in the loss
            loss_start = np.zeros(len(tokens), dtype=np.int64)
        truncate = self.cfg.shorten_method == "truncate"
        limit = self.cfg.tokens_per_sample
        sizes = np.asarray(tokens.sizes)
        too_long = np.flatnonzero(sizes > limit)
        if len(too_long) and not truncate:
            raise DPConfigError(
                f"dp_language_modeling: {len(too_long)} examples of the '{split}' split are longer "
                f"than --tokens-per-sample {limit} (first ids {too_long[:5].tolist()}, up to "
                f"{int(sizes.max())} tokens). Raise --tokens-per-sample (at most the model's "
                "positions), cut them with --shorten-method truncate, or remove them"
            )
        no_loss = np.flatnonzero(loss_start >= np.minimum(sizes, limit))
        if len(no_loss):
            raise DPConfigError(
                f"dp_language_modeling: {len(no_loss)} examples of the '{split}' split have no "
                f"target token within --tokens-per-sample {limit} (first ids {no_loss[:5].tolist()}): "
                "their prompt fills the whole sample. Raise --tokens-per-sample or shorten the prompts"
            )
        self.datasets[split] = LMExampleDataset(tokens, loss_start, self.dictionary,
                                                max_length=limit if truncate else None)
        return self.datasets[split]
