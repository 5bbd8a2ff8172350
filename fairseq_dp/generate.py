# Copyright (c) fairseq_dp contributors. MIT license.
"""Text generation from a causal LM trained with the plugin: ``fairseq-dp-generate``.

``fairseq-dp-generate CHECKPOINT PROMPTS [--format e2e|tsv|text] [--output FILE]``
decodes one continuation per prompt with beam search (``--beam``, ``--lenpen``,
``--no-repeat-ngram-size``, ``--max-new-tokens``, ``--min-new-tokens``,
``--stop-token``) or sampling (``--sampling --temperature --top-p --top-k``).
A checkpoint of ``transformer_lm`` (DP full fine-tuning, exported, merged, or
fairseq's own ``language_modeling``), ``transformer_lm_lora`` or
``transformer_lm_rgp`` all work.

**The prompt conditions the search but is not part of the hypothesis.** A model
trained on (prompt, target) pairs read ``</s> prompt </s> target </s>``
(``fairseq-dp-prepare-lm --format tsv|e2e``); the generator feeds ``</s> prompt``
through the model once, into its attention cache, and then runs fairseq's own
:class:`~fairseq.sequence_generator.SequenceGenerator` on the continuation
alone, starting from the separating ``</s>``. So the hypothesis score, the
length penalty (score / length ** lenpen), ``--min/--max-new-tokens`` and the
no-repeat-ngram rule all count the generated tokens only, as the LoRA NLG
decoder that Yu et al.'s E2E numbers come from does. fairseq's
``fairseq-generate`` on its ``language_modeling`` task instead forces the prompt
as a prefix of the hypothesis: the prompt's tokens are scored, counted by the
length penalty and covered by the n-gram rule. For a model trained on plain
text (``--format text``) the continuation follows the prompt directly.

Prompts of one batch have the same length (fairseq's learned positions in the
attention cache are one position per step for the whole batch, so rows of
different lengths would read wrong positions); prompts are grouped by length,
then batched, and the hypotheses come back in the prompts' order.

Generating reads only the model and the prompts: it never touches the training
data and spends no privacy budget (post-processing of a DP model).
"""

import argparse
import csv
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from fairseq.models import FairseqIncrementalDecoder
from torch import nn

from .errors import DPConfigError

logger = logging.getLogger(__name__)

PROMPT_FORMATS = ("e2e", "tsv", "text")
PROMPT_STYLES = ("pair", "text")


@dataclass
class GenerationSettings:
    """How continuations are chosen; the defaults are Yu et al.'s E2E decoding
    (beam 10, length penalty 0.8, no-repeat-ngram 4, at most 64 new tokens)."""

    beam: int = 10
    lenpen: float = 0.8
    no_repeat_ngram_size: int = 4
    max_new_tokens: int = 64
    min_new_tokens: int = 1
    stop_tokens: Tuple[str, ...] = ()
    sampling: bool = False
    temperature: float = 1.0
    top_p: float = -1.0
    top_k: int = -1
    seed: int = 1

    def check(self) -> None:
        problems = []
        if self.beam < 1:
            problems.append(f"--beam {self.beam}: want at least 1")
        if self.sampling and self.beam != 1:
            problems.append(f"--sampling draws one continuation per prompt: --beam {self.beam} would "
                            "return the best of several samples; leave --beam out (or give 1)")
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens {self.max_new_tokens}: want at least 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            problems.append(f"--min-new-tokens {self.min_new_tokens}: want 0..--max-new-tokens "
                            f"({self.max_new_tokens})")
        if self.no_repeat_ngram_size < 0:
            problems.append(f"--no-repeat-ngram-size {self.no_repeat_ngram_size}: want 0 (off) or more")
        if not self.temperature > 0:
            problems.append(f"--temperature {self.temperature}: want > 0")
        if not (self.top_p == -1.0 or 0 < self.top_p <= 1):
            problems.append(f"--top-p {self.top_p}: want a probability in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            problems.append(f"--top-k {self.top_k}: want at least 1 (or leave it out)")
        if not self.sampling and (self.top_p != -1.0 or self.top_k != -1 or self.temperature != 1.0):
            problems.append("--temperature, --top-p and --top-k only apply with --sampling")
        if problems:
            raise DPConfigError("; ".join(problems))


# ---------------------------------------------------------------- prompts


def _read_lines(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return [line.rstrip("\r\n") for line in f.read().splitlines()]
    except FileNotFoundError:
        raise DPConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DPConfigError(f"{path} is a directory, want a file of prompts") from None
    except UnicodeDecodeError as e:
        raise DPConfigError(f"{path}: not UTF-8 text ({e})") from None


def read_prompts(path: str, fmt: str) -> List[str]:
    """The prompts of a file, in order.

    - ``e2e``: a CSV whose header has an ``mr`` column (E2E's ``mr,ref`` or its
      test file's ``MR``): the distinct meaning representations in the order
      they first appear, one prompt each (the E2E evaluation's one hypothesis
      per MR).
    - ``tsv``: the first field of each line (``prompt<TAB>target`` files work).
    - ``text``: each line.
    """
    if fmt not in PROMPT_FORMATS:
        raise DPConfigError(f"--format {fmt!r}: want one of {', '.join(PROMPT_FORMATS)}")
    if fmt == "e2e":
        csv.field_size_limit(sys.maxsize)
        try:
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                columns = [c.strip().lower() for c in header or []]
                if "mr" not in columns:
                    raise DPConfigError(f"{path}: the header is {','.join(header or [])!r}; want an 'mr' "
                                        "column (the E2E NLG CSV)")
                col = columns.index("mr")
                seen, prompts = set(), []
                for row in reader:
                    if not row or col >= len(row) or not row[col].strip():
                        continue
                    if row[col] not in seen:
                        seen.add(row[col])
                        prompts.append(row[col])
        except FileNotFoundError:
            raise DPConfigError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise DPConfigError(f"{path} is a directory, want the E2E CSV") from None
        except csv.Error as e:
            raise DPConfigError(f"{path}: not a valid CSV file ({e})") from None
        except UnicodeDecodeError as e:
            raise DPConfigError(f"{path}: not UTF-8 text ({e})") from None
    else:
        lines = _read_lines(path)
        prompts = [line.split("\t", 1)[0] for line in lines] if fmt == "tsv" else lines
        if prompts and prompts[-1] == "" and fmt == "text":
            prompts.pop()
    if not prompts:
        raise DPConfigError(f"{path}: no prompts")
    return prompts


def guess_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return {".csv": "e2e", ".tsv": "tsv"}.get(ext, "text")


# ---------------------------------------------------------------- the model seen by SequenceGenerator


class _PromptReader(nn.Module):
    """SequenceGenerator's "encoder": runs ``</s> prompt`` through the LM one
    token at a time into a fresh attention cache (fairseq's decoder reads one
    new token per call once it has a cache), without the output projection."""

    def __init__(self, lm_decoder):
        super().__init__()
        self.lm_decoder = lm_decoder

    def forward_torchscript(self, net_input: Dict[str, torch.Tensor]):
        return self.forward(net_input["src_tokens"], net_input["first_tokens"])

    def forward(self, context: torch.Tensor, first_tokens: torch.Tensor):
        cache: Dict[str, Dict[str, Optional[torch.Tensor]]] = {}
        for t in range(1, context.size(1) + 1):
            self.lm_decoder(context[:, :t], incremental_state=cache, features_only=True)
        return {"context": [context], "first": [first_tokens], "cache": [cache]}

    def reorder_encoder_out(self, encoder_out, new_order):
        out = {
            "context": [encoder_out["context"][0].index_select(0, new_order)],
            "first": [encoder_out["first"][0].index_select(0, new_order)],
        }
        # the prompt's cache moves into the generator's own incremental state at
        # the first step; until then it follows the beam order like everything else
        out["cache"] = [
            {
                key: {k: (None if v is None else v.index_select(0, new_order)) for k, v in buffer.items()}
                for key, buffer in encoder_out["cache"][0].items()
            }
        ]
        return out


class _ContinuationDecoder(FairseqIncrementalDecoder):
    """SequenceGenerator's decoder: the continuation so far (``tokens``, whose
    first column SequenceGenerator fills with ``</s>``) is appended to the prompt
    so positions are the ones training used; the prompt's cache is handed to
    the generator's incremental state at the first step."""

    def __init__(self, lm_decoder, eos: int, stop_ids: Sequence[int], min_new_tokens: int,
                 no_repeat_ngram_size: int):
        # an incremental decoder: SequenceGenerator keeps an attention cache for it
        super().__init__(lm_decoder.dictionary)
        self.lm_decoder = lm_decoder
        self.eos = eos
        self.register_buffer("stop_ids", torch.tensor(sorted(set(stop_ids)), dtype=torch.long), persistent=False)
        self.min_new_tokens = min_new_tokens
        self.no_repeat_ngram_size = no_repeat_ngram_size

    def forward(self, tokens, encoder_out=None, incremental_state=None, **kwargs):
        context = encoder_out["context"][0]
        if incremental_state is not None and not incremental_state and encoder_out["cache"][0]:
            incremental_state.update(encoder_out["cache"][0])
            # the cache now lives (and is reordered) in the generator's state:
            # stop copying it along with the encoder output at every step
            encoder_out["cache"][0] = {}
        tokens = tokens.clone()
        tokens[:, 0] = encoder_out["first"][0]
        logits, extra = self.lm_decoder(torch.cat([context, tokens], dim=1), incremental_state=incremental_state)
        # the rules below act on log-probabilities, after the softmax (as
        # fairseq's own blocker does): a blocked token does not renormalize the others
        step = tokens.size(1) - 1  # tokens generated so far
        extra = dict(extra or {})
        extra["banned"] = self._repeated_ngram_tokens(tokens[:, 1:]) if self.no_repeat_ngram_size else None
        extra["stopped"] = None
        if self.stop_ids.numel() and step >= max(1, self.min_new_tokens):
            stopped = torch.isin(tokens[:, -1], self.stop_ids)
            if stopped.any():
                extra["stopped"] = stopped
        return logits, extra

    def apply_rules(self, lprobs: torch.Tensor, extra: dict) -> torch.Tensor:
        """lprobs: (rows, 1, V) log-probabilities of the next token."""
        banned, stopped = extra.get("banned"), extra.get("stopped")
        if banned is not None and banned[0]:
            lprobs[banned[0], -1, banned[1]] = -math.inf
        if stopped is not None:
            # a stop token ends the hypothesis: the only continuation is </s>, at no cost
            lprobs[stopped, -1, :] = -math.inf
            lprobs[stopped, -1, self.eos] = 0.0
        return lprobs

    def _repeated_ngram_tokens(self, generated: torch.Tensor) -> Tuple[List[int], List[int]]:
        """(rows, tokens): a token that would repeat an n-gram of its row's
        continuation, to get -inf.
        (fairseq 0.12's own blocker on the CPU compares the padding at the end
        of its token buffer instead of the last tokens: fairseq issue 4709; so
        SequenceGenerator gets size 0 and the rule lives here.)"""
        n = self.no_repeat_ngram_size
        rows = generated.tolist()
        banned = [], []
        for r, row in enumerate(rows):
            if len(row) < n - 1:
                continue
            tail = row[len(row) - n + 1 :] if n > 1 else []
            for i in range(len(row) - n + 1):
                if row[i : i + n - 1] == tail:
                    banned[0].append(r)
                    banned[1].append(row[i + n - 1])
        return banned


class PromptContinuationModel(nn.Module):
    """A fairseq language model seen by SequenceGenerator as an encoder
    (the prompt) and an incremental decoder (the continuation)."""

    def __init__(self, lm, eos: int, stop_ids: Sequence[int] = (), min_new_tokens: int = 1,
                 no_repeat_ngram_size: int = 0):
        super().__init__()
        self.lm = lm
        self.encoder = _PromptReader(lm.decoder)
        self.decoder = _ContinuationDecoder(lm.decoder, eos, stop_ids, min_new_tokens, no_repeat_ngram_size)

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        lprobs = self.lm.get_normalized_probs(net_output, log_probs=True, sample=sample)
        lprobs = self.decoder.apply_rules(lprobs, net_output[1] or {})
        return lprobs if log_probs else lprobs.exp()

    def max_decoder_positions(self):
        return self.lm.max_decoder_positions()


# ---------------------------------------------------------------- loading


def _decoder_only(state: dict, path: str) -> None:
    model = state["model"]
    if not any(k.startswith("decoder.") for k in model) or any(k.startswith("encoder.") for k in model):
        arch = getattr(state.get("cfg", {}).get("model", None), "arch", None) if state.get("cfg") else None
        raise DPConfigError(
            f"{path}: not a causal language model (architecture {arch!r}); fairseq-dp-generate decodes "
            "checkpoints of transformer_lm, transformer_lm_lora or transformer_lm_rgp"
        )


def _dictionary_dir(state: dict, data: Optional[str], path: str) -> str:
    saved = state["cfg"]["task"].get("data") if state.get("cfg") is not None else None
    chosen = data if data is not None else saved
    flag = "--data" if data is not None else "the checkpoint's task.data"
    if not chosen or not os.path.isfile(os.path.join(chosen, "dict.txt")):
        raise DPConfigError(
            f"{path}: {flag} {chosen!r} has no dict.txt; pass --data DIR, the directory the model was "
            "trained on (fairseq-dp-prepare-lm's output: its dict.txt maps tokens to ids)"
        )
    return chosen


def _tokenizer_files(data: str, encoder_json: Optional[str], vocab_bpe: Optional[str]):
    """The BPE files the training data was tokenized with (prepare_lm.json's
    record), the explicit ones after checking them against it, or GPT-2's."""
    from .gpt2_bpe import gpt2_bpe_files, sha256_file

    record = None
    meta_path = os.path.join(data, "prepare_lm.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            record = json.load(f)
    if encoder_json is None and vocab_bpe is None and record is not None:
        tok = record.get("tokenizer", {})
        paths = [tok.get(k, {}).get("path") for k in ("encoder_json", "vocab_bpe")]
        if all(p and os.path.isfile(p) for p in paths):
            encoder_json, vocab_bpe = paths
    files = gpt2_bpe_files(encoder_json, vocab_bpe)
    if record is not None:
        for key, f in zip(("encoder_json", "vocab_bpe"), files):
            want = record.get("tokenizer", {}).get(key, {}).get("sha256")
            if want and sha256_file(f) != want:
                raise DPConfigError(
                    f"{f} is not the {key.replace('_', '.')} the training data in {data} was tokenized with "
                    f"(prepare_lm.json records {record['tokenizer'][key].get('path')}); pass that file with "
                    "--gpt2-encoder-json/--gpt2-vocab-bpe"
                )
    return files, record


class Generator:
    """A loaded model plus the settings; :meth:`generate` maps prompts to
    continuations. Build it with :func:`load_generator`."""

    def __init__(self, model, dictionary, bpe, settings: GenerationSettings, prompt_style: str):
        from .gpt2_bpe import gpt2_ids_to_fairseq

        settings.check()
        if prompt_style not in PROMPT_STYLES:
            raise DPConfigError(f"--prompt-style {prompt_style!r}: want one of {', '.join(PROMPT_STYLES)}")
        self.model = model.eval()
        self.dictionary = dictionary
        self.bpe = bpe
        self.settings = settings
        self.prompt_style = prompt_style
        self.eos = dictionary.eos()
        stop_ids = []
        for token in settings.stop_tokens:
            ids = gpt2_ids_to_fairseq(bpe.encode(token))
            if len(ids) != 1:
                raise DPConfigError(f"--stop-token {token!r} is {len(ids)} tokens of the model's BPE; "
                                    "a stop token must be exactly one")
            stop_ids.append(ids[0])
        self.wrapped = PromptContinuationModel(
            model, self.eos, stop_ids, settings.min_new_tokens, settings.no_repeat_ngram_size
        )
        self.device = next(model.parameters()).device

    # -- tokens

    def encode(self, prompt: str) -> List[int]:
        """The whole conditioning sequence: ``</s> prompt </s>`` (pairs) or ``</s> prompt``."""
        from .gpt2_bpe import gpt2_ids_to_fairseq

        ids = gpt2_ids_to_fairseq(self.bpe.encode(prompt)) if prompt else []
        return [self.eos] + ids + ([self.eos] if self.prompt_style == "pair" else [])

    def decode(self, ids: Sequence[int]) -> str:
        from .gpt2_bpe import fairseq_ids_to_gpt2

        ids = [int(i) for i in ids if int(i) != self.eos]
        return self.bpe.decode(fairseq_ids_to_gpt2(ids))

    # -- search

    def _sequence_generator(self, room: int):
        from fairseq import search
        from fairseq.sequence_generator import SequenceGenerator

        s = self.settings
        strategy = search.Sampling(self.dictionary, s.top_k, s.top_p) if s.sampling else None
        return SequenceGenerator(
            [self.wrapped],
            self.dictionary,
            beam_size=s.beam,
            max_len_a=0,
            max_len_b=min(s.max_new_tokens, room),
            # SequenceGenerator caps the new tokens at max_len - 1
            max_len=room + 1,
            min_len=min(s.min_new_tokens, room),
            len_penalty=s.lenpen,
            # <unk> and <s> have no GPT-2 id: never generated
            unk_penalty=math.inf,
            tokens_to_suppress=[self.dictionary.bos_word],
            temperature=s.temperature,
            no_repeat_ngram_size=0,  # applied by the continuation decoder (see there)
            search_strategy=strategy,
        )

    @torch.no_grad()
    def search(self, sequences: Sequence[Sequence[int]], batch_size: int = 16, progress: bool = False):
        """Per conditioning sequence (dictionary ids, ``</s>`` first; see
        :meth:`encode`): the best hypothesis as (generated ids without the
        final ``</s>``, fairseq's score: summed log-probability / length ** lenpen)."""
        if batch_size < 1:
            raise DPConfigError(f"--batch-size {batch_size}: want at least 1")
        positions = self.model.max_decoder_positions()
        by_length: Dict[int, List[int]] = {}
        for i, seq in enumerate(sequences):
            by_length.setdefault(len(seq), []).append(i)
        too_long = [i for i, seq in enumerate(sequences) if len(seq) + 1 > positions]
        if too_long:
            raise DPConfigError(
                f"{len(too_long)} prompt(s) (first: number {too_long[0] + 1}, {len(sequences[too_long[0]])} "
                f"tokens with the separators) leave no room for a continuation in the model's {positions} "
                "positions; shorten them"
            )
        if self.settings.sampling:
            torch.manual_seed(self.settings.seed)
        truncated = 0  # prompts whose continuation has less room than --max-new-tokens
        results: List[Optional[Tuple[List[int], float]]] = [None] * len(sequences)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(sequences), desc="generate", unit="prompt", file=sys.stderr)
        for length in sorted(by_length):
            room = positions - length  # positions left for the continuation and its </s>
            if room - 1 < self.settings.max_new_tokens:
                truncated += len(by_length[length])
            generator = self._sequence_generator(room - 1)
            indices = by_length[length]
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                seq = torch.tensor([sequences[i] for i in chunk], dtype=torch.long, device=self.device)
                sample = {"net_input": {"src_tokens": seq[:, :-1], "first_tokens": seq[:, -1]}}
                hypos = generator.generate([self.wrapped], sample)
                for i, hyps in zip(chunk, hypos):
                    best = hyps[0]
                    tokens = best["tokens"].tolist()
                    if tokens and tokens[-1] == self.eos:
                        tokens = tokens[:-1]
                    results[i] = (tokens, float(best["score"]))
                if bar is not None:
                    bar.update(len(chunk))
        if bar is not None:
            bar.close()
        if truncated:
            logger.warning(
                f"{truncated} prompt(s) were long enough that fewer than --max-new-tokens "
                f"{self.settings.max_new_tokens} tokens fit in the model's {positions} positions; their "
                "continuations were cut at the last position"
            )
        return results

    def generate(self, prompts: Sequence[str], batch_size: int = 16, progress: bool = False) -> List[str]:
        """One continuation per prompt (text, without the final ``</s>``), in order."""
        sequences = [self.encode(p) for p in prompts]
        return [self.decode(ids) for ids, _ in self.search(sequences, batch_size, progress)]


def load_generator(
    checkpoint: str,
    data: Optional[str] = None,
    settings: Optional[GenerationSettings] = None,
    prompt_style: Optional[str] = None,
    gpt2_encoder_json: Optional[str] = None,
    gpt2_vocab_bpe: Optional[str] = None,
    device: Optional[str] = None,
) -> Generator:
    """Loads a causal-LM checkpoint for generation.

    ``data``: the directory with the ``dict.txt`` the model was trained with
    (default: the one the checkpoint names). ``prompt_style``: ``pair`` (the
    model read ``</s> prompt </s> target``) or ``text`` (a continuation of the
    prompt); by default what the training data's ``prepare_lm.json`` says, else
    ``pair``."""
    import fairseq_dp  # noqa: F401  (registers the plugin's tasks and archs)
    from fairseq import checkpoint_utils

    from .gpt2_bpe import check_gpt2_dictionary, load_gpt2_bpe

    settings = settings or GenerationSettings()
    settings.check()
    if not os.path.isfile(checkpoint):
        raise DPConfigError(f"{checkpoint}: no such checkpoint file")
    overrides = {"data": data} if data is not None else {}
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(checkpoint, arg_overrides=overrides)
    except Exception as e:  # a truncated or foreign file: say which, not torch's unpickling traceback
        raise DPConfigError(f"{checkpoint}: not a fairseq checkpoint ({type(e).__name__}: {e})") from None
    if state.get("cfg") is None or "model" not in state:
        raise DPConfigError(f"{checkpoint}: not a fairseq checkpoint (no cfg/model)")
    _decoder_only(state, checkpoint)
    data_dir = _dictionary_dir(state, data, checkpoint)
    overrides["data"] = data_dir
    files, record = _tokenizer_files(data_dir, gpt2_encoder_json, gpt2_vocab_bpe)
    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [checkpoint], arg_overrides=overrides, state=state
    )
    dictionary = task.target_dictionary
    check_gpt2_dictionary(dictionary, os.path.join(data_dir, "dict.txt"))
    if prompt_style is None:
        layout = (record or {}).get("item_layout", "")
        prompt_style = "text" if layout.startswith("tokens") else "pair"
    model = models[0]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    return Generator(model, dictionary, load_gpt2_bpe(*files), settings, prompt_style)


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    d = GenerationSettings()
    p = argparse.ArgumentParser(
        prog="fairseq-dp-generate",
        description="Generate one continuation per prompt from a causal LM checkpoint (beam search or "
        "sampling). Reads only the model and the prompts: no training data, no privacy spent.",
    )
    p.add_argument("checkpoint", help="a checkpoint of transformer_lm, transformer_lm_lora or transformer_lm_rgp")
    p.add_argument("prompts", help="the prompts: an E2E CSV (distinct MRs), a TSV (first field) or text (lines)")
    p.add_argument("--format", choices=PROMPT_FORMATS,
                   help="how to read PROMPTS (default: by extension: .csv e2e, .tsv tsv, else text)")
    p.add_argument("--output", "-o", help="write one hypothesis per line here (default: standard output)")
    p.add_argument("--data", help="the directory with the dict.txt the model was trained with "
                   "(default: the one the checkpoint names)")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES,
                   help="pair: the model read '</s> prompt </s> target' (fairseq-dp-prepare-lm --format "
                   "tsv/e2e); text: continue the prompt (--format text). Default: what the data's "
                   "prepare_lm.json says, else pair")
    p.add_argument("--beam", type=int, help=f"beam size (default {d.beam}; 1 with --sampling)")
    p.add_argument("--lenpen", type=float, default=d.lenpen,
                   help="length penalty: a hypothesis scores its summed log-probability / length ** lenpen "
                   "(generated tokens only)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=d.no_repeat_ngram_size,
                   help="never repeat an n-gram of this size within the continuation (0: off)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="at most this many generated tokens, the final </s> not counted")
    p.add_argument("--min-new-tokens", type=int, default=d.min_new_tokens,
                   help="</s> is not allowed before this many generated tokens")
    p.add_argument("--stop-token", action="append", default=[], metavar="TOKEN",
                   help="a string of exactly one BPE token that ends a hypothesis (kept in it); repeatable")
    p.add_argument("--sampling", action="store_true", help="sample instead of beam search")
    p.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling: keep this much probability mass")
    p.add_argument("--top-k", type=int, default=d.top_k, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed (same seed and --batch-size: same output)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (each with --beam rows)")
    p.add_argument("--cpu", action="store_true", help="decode on the CPU even when a GPU is available")
    p.add_argument("--gpt2-encoder-json", help="the BPE encoder.json (default: the one the data was prepared with)")
    p.add_argument("--gpt2-vocab-bpe", help="the BPE vocab.bpe (default: the one the data was prepared with)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    from .errors import install_excepthook

    install_excepthook()
    a = build_parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s | %(name)s | %(message)s", level=logging.INFO, stream=sys.stderr)
    settings = GenerationSettings(
        beam=a.beam if a.beam is not None else (1 if a.sampling else GenerationSettings.beam),
        lenpen=a.lenpen,
        no_repeat_ngram_size=a.no_repeat_ngram_size,
        max_new_tokens=a.max_new_tokens,
        min_new_tokens=a.min_new_tokens,
        stop_tokens=tuple(a.stop_token),
        sampling=a.sampling,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        seed=a.seed,
    )
    settings.check()
    prompts = read_prompts(a.prompts, a.format or guess_format(a.prompts))
    generator = load_generator(
        a.checkpoint, data=a.data, settings=settings, prompt_style=a.prompt_style,
        gpt2_encoder_json=a.gpt2_encoder_json, gpt2_vocab_bpe=a.gpt2_vocab_bpe,
        device="cpu" if a.cpu else None,
    )
    hypotheses = generator.generate(prompts, batch_size=a.batch_size, progress=not a.no_progress)
    # one line per prompt: a line break inside a hypothesis would shift every later line
    lines = [" ".join(h.splitlines()) for h in hypotheses]
    text = "".join(line + "\n" for line in lines)
    if a.output:
        os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
        with open(a.output, "w", encoding="utf-8") as f:
            f.write(text)
        logger.info(f"{len(lines)} hypotheses -> {a.output}")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
