"""GPT-2 conversion (``fairseq-dp-convert`` on a HuggingFace ``GPT2LMHeadModel``)
against HuggingFace ``transformers``.

No GPT-2 weights exist offline, so each test converts a random small
``GPT2LMHeadModel`` with GPT-2's real vocabulary (50,257 tokens) and compares
``transformers``' logits (the independent implementation) with those of the
fairseq model that fairseq's own loaders build from the converted files, on
real text tokenized with the project's GPT-2 BPE. Column i of transformers'
logits is fairseq's column i + 4, and ``<|endoftext|>`` (50256) is fairseq's
``</s>`` (2): written out here, not taken from the converter.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from fairseq import checkpoint_utils, tasks
from transformers import GPT2Config, GPT2LMHeadModel

from fairseq_dp.convert import convert
from fairseq_dp.errors import DPConfigError
from fairseq_dp.gpt2_bpe import gpt2_ids_to_fairseq, load_gpt2_bpe

from helpers import parse

ENDOFTEXT = 50256
VOCAB = 50257
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Émotion brute 🙂 and 100% worth it — naïve café, Zürich.",
    "東京は晴れ、気温は25度です。",
    "  leading spaces, a\ttab and  double   spaces\n",
    "name[The Eagle], eatType[coffee shop], food[French], priceRange[moderate]",
]
# fairseq's column of each of transformers' columns, by the layout of dict.txt
FAIRSEQ_COLUMN = torch.tensor([i + 4 for i in range(ENDOFTEXT)] + [2])


def random_gpt2(tied=True, seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=VOCAB,
                        tie_word_embeddings=tied)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # random init leaves biases zero and LayerNorms at 1: make every tensor matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        # a direction shared by all token embeddings, as GPT-2's have: the mean
        # of a position's logits is then far from 0, which tells the mean row
        # of <s>/<pad>/<unk> apart from a zero row
        model.transformer.wte.weight.add_(torch.randn(config.n_embd) * 0.5)
        if not tied:
            model.lm_head.weight.add_(torch.randn(config.n_embd) * 0.5)
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    return model.eval()


def save_old_style_bin(model, hf_dir):
    """What older transformers wrote for GPT-2 (the hub's ``gpt2``): a
    ``pytorch_model.bin`` without the ``transformer.`` prefix, with the causal
    mask buffers and the tied ``lm_head.weight``."""
    model.config.save_pretrained(str(hf_dir))
    state = {k.removeprefix("transformer."): v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["wte.weight"].clone()
    n = model.config.n_positions
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, hf_dir / "pytorch_model.bin")


@pytest.fixture(scope="module", params=["safetensors", "bin", "untied"])
def converted(request, tmp_path_factory):
    """(HuggingFace model, fairseq output directory, conversion info)."""
    kind = request.param
    model = random_gpt2(tied=kind != "untied")
    hf_dir = tmp_path_factory.mktemp(f"hf_{kind}")
    if kind == "bin":
        save_old_style_bin(model, hf_dir)
    else:
        model.save_pretrained(str(hf_dir))
    assert os.path.exists(hf_dir / ("pytorch_model.bin" if kind == "bin" else "model.safetensors"))
    out = tmp_path_factory.mktemp(f"fairseq_{kind}")
    info = convert(str(hf_dir), str(out))
    return model, str(out), info


def text_batch():
    """GPT-2 ids of SENTENCES, each after <|endoftext|> (GPT-2's start of text,
    fairseq's eos that the LM task puts first), right-padded, with the mask."""
    bpe = load_gpt2_bpe()
    rows = [[ENDOFTEXT] + bpe.encode(s) for s in SENTENCES]
    rows[0] += [ENDOFTEXT] + bpe.encode(" And a second document.")  # <|endoftext|> inside an input too
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return rows, ids, mask


def fairseq_tokens(rows, width):
    """The fairseq ids of the same rows, padded with fairseq's <pad> (1)."""
    mapped = [gpt2_ids_to_fairseq(r) for r in rows]
    for r, m in zip(rows, mapped):  # the layout of common.md, written out
        assert m == [2 if t == ENDOFTEXT else t + 4 for t in r]
    return torch.tensor([m + [1] * (width - len(m)) for m in mapped])


def compare_logits(hf_model, fairseq_model):
    rows, ids, mask = text_batch()
    tokens = fairseq_tokens(rows, ids.shape[1])
    with torch.no_grad():
        reference = hf_model(input_ids=ids, attention_mask=mask).logits
        logits, _ = fairseq_model(tokens)
    assert logits.shape == (len(rows), ids.shape[1], VOCAB + 3)
    real = mask.bool()
    difference = (logits[..., FAIRSEQ_COLUMN] - reference)[real].abs().max().item()
    assert difference < 1e-4, difference
    assert reference[real].abs().max() > 1  # not a trivially small comparison
    return logits[real], reference[real]


def test_logits_match_transformers_on_real_text(converted):
    hf_model, out, info = converted
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([os.path.join(out, "model.pt")])
    model = models[0].eval()
    assert type(model).__name__ == "TransformerLanguageModel"
    assert len(task.source_dictionary) == VOCAB + 3
    logits, reference = compare_logits(hf_model, model)

    tied = hf_model.config.tie_word_embeddings
    m = cfg.model
    assert m._name == "transformer_lm"
    assert (m.decoder_embed_dim, m.decoder_input_dim, m.decoder_output_dim) == (64, 64, 64)
    assert (m.decoder_layers, m.decoder_attention_heads, m.decoder_ffn_embed_dim) == (2, 4, 256)
    assert m.activation_fn == "gelu_accurate" and m.decoder_learned_pos and m.no_scale_embedding
    assert m.decoder_normalize_before and not m.no_decoder_final_norm
    assert m.share_decoder_input_output_embed == tied == info["tied_output_embedding"]
    assert m.max_target_positions == m.tokens_per_sample == 128
    assert (m.dropout, m.attention_dropout) == (0.1, 0.1)  # resid_pdrop, attn_pdrop
    assert cfg.task._name == "language_modeling" and cfg.task.data == out
    assert cfg.bpe._name == "gpt2" and cfg.bpe.gpt2_encoder_json == os.path.join(out, "encoder.json")

    # <s>, <pad>, <unk> (0, 1, 3) have the mean row: their logit is the mean of
    # the real tokens' logits, so each has probability at most 1/V
    for column in (0, 1, 3):
        torch.testing.assert_close(logits[:, column], reference.mean(-1), atol=1e-4, rtol=0)
    assert reference.mean(-1).abs().max() > 1  # a zero row would fail the comparison above
    special_mass = logits.softmax(-1)[:, [0, 1, 3]].sum(-1)
    assert special_mass.max() <= 3 / VOCAB


def test_untied_fine_tuning_and_the_printed_flags_load_the_checkpoint(converted):
    """A fine-tuning model built from the flags the converter prints, without
    --share-decoder-input-output-embed and with a --tokens-per-sample below
    n_positions, loads the checkpoint strictly and computes the same logits."""
    hf_model, out, info = converted
    flags = [f for f in info["fairseq_flags"] if f != "--share-decoder-input-output-embed"]
    cfg = parse([out, "--task", "language_modeling", "--tokens-per-sample", "64", *flags])
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    assert model.decoder.embed_tokens.weight is not model.decoder.output_projection.weight
    state = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    compare_logits(hf_model, model.eval())


STOCK_FAIRSEQ = """
import os, sys, torch
from fairseq.models.transformer_lm import TransformerLanguageModel
hub = TransformerLanguageModel.from_pretrained(sys.argv[1], "model.pt")
assert not any(name.startswith("fairseq_dp") for name in sys.modules), "the plugin was imported"
hub.eval()
sentences = [line for line in open(sys.argv[2], encoding="utf-8").read().split("\\0")]
tokens = [hub.encode(s) for s in sentences]
with torch.no_grad():
    logits = [hub.models[0](t.unsqueeze(0))[0][0] for t in tokens]
torch.save({"tokens": [t.tolist() for t in tokens], "logits": logits,
            "decoded": [hub.decode(t) for t in tokens]}, sys.argv[3])
"""


def test_stock_fairseq_hub_loads_it_without_the_plugin(converted, tmp_path):
    """``TransformerLanguageModel.from_pretrained(dir, "model.pt")`` in a
    process that never imports the plugin, with torch's safe ``weights_only``
    default (no TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD): it loads offline (the BPE
    files are next to model.pt), its ``encode`` gives the ids of the project's
    BPE plus </s>, and its model transformers' logits."""
    hf_model, out, _ = converted
    script, text, result = tmp_path / "stock.py", tmp_path / "sentences.txt", tmp_path / "result.pt"
    script.write_text(STOCK_FAIRSEQ)
    text.write_text("\0".join(SENTENCES), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONPATH="")
    done = subprocess.run([sys.executable, str(script), out, str(text), str(result)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    stock = torch.load(result, weights_only=True)

    bpe = load_gpt2_bpe()
    for sentence, tokens, decoded, logits in zip(SENTENCES, stock["tokens"], stock["decoded"], stock["logits"]):
        gpt2_ids = bpe.encode(sentence)
        assert tokens == [t + 4 for t in gpt2_ids] + [2]
        assert decoded == sentence
        with torch.no_grad():
            reference = hf_model(input_ids=torch.tensor([gpt2_ids])).logits[0]
        assert (logits[:-1, FAIRSEQ_COLUMN] - reference).abs().max() < 1e-4


def write_config(hf_dir, **changes):
    hf_dir.mkdir(exist_ok=True)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128).to_dict()
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(config))
    return str(hf_dir)


@pytest.mark.parametrize("changes,message", [
    ({"activation_function": "silu"}, "activation_function 'silu': fairseq's transformer_lm has an exact "
                                      "equivalent only for 'gelu_new'"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon 1e-06: fairseq's transformer_lm uses 1e-5"),
    ({"vocab_size": 50258}, "vocab_size 50258: the converted dictionary is GPT-2's"),
    ({"scale_attn_by_inverse_layer_idx": True}, "fairseq has no per-layer attention scaling"),
    ({"model_type": "gpt_neo"}, "model_type 'gpt_neo' cannot be converted; supported: 'bert' and 'roberta'"),
])
def test_configurations_fairseq_cannot_compute_are_refused(tmp_path, changes, message):
    hf_dir = write_config(tmp_path / "hf", **changes)
    with pytest.raises(DPConfigError) as refused:
        convert(hf_dir, str(tmp_path / "out"))
    assert message in str(refused.value)
    assert not os.path.exists(tmp_path / "out" / "model.pt")


def test_tied_config_with_a_different_lm_head_is_refused(tmp_path):
    """A checkpoint whose config says tied but whose lm_head differs from wte
    is ambiguous: refused rather than converted one way silently."""
    model = random_gpt2(tied=False)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(str(hf_dir))
    config = json.loads((hf_dir / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(DPConfigError, match="lm_head.weight differs from wte.weight"):
        convert(str(hf_dir), str(tmp_path / "out"))


@pytest.mark.parametrize("case", ["no config.json", "model_type llama"])
def test_command_line_mistakes_print_a_message_only(tmp_path, case):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    if case == "no config.json":
        shutil.copy(__file__, hf_dir / "notes.py")
        message = f"{hf_dir} is not a HuggingFace checkpoint directory (no config.json)"
    else:
        write_config(hf_dir, model_type="llama")
        message = (f"{hf_dir / 'config.json'}: model_type 'llama' cannot be converted; supported: 'bert' and "
                   "'roberta' (to a fairseq RoBERTa) and 'gpt2' (GPT2LMHeadModel, to a fairseq transformer_lm)")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "fairseq_dp.convert", str(hf_dir), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path))
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in out, out[-3000:]
    assert f"fairseq_dp.convert: error: {message}" in out, out[-3000:]


def test_the_checkpoints_own_tokenizer_files_are_used_and_checked(tmp_path):
    """HuggingFace's vocab.json and merges.txt are GPT-2's encoder.json and
    vocab.bpe: when HF_DIR has them they are the ones copied next to model.pt
    (and written into its --bpe gpt2 configuration); a vocab.json that is not
    in GPT-2's id layout is refused."""
    import hashlib

    from fairseq_dp.gpt2_bpe import gpt2_bpe_files

    encoder_json, vocab_bpe = gpt2_bpe_files()
    hf_dir = tmp_path / "hf"
    random_gpt2().save_pretrained(str(hf_dir))
    shutil.copy(encoder_json, hf_dir / "vocab.json")
    merges = open(vocab_bpe, encoding="utf-8").read().rstrip("\n")  # no final newline: fairseq would drop a merge
    (hf_dir / "merges.txt").write_text(merges, encoding="utf-8")
    info = convert(str(hf_dir), str(tmp_path / "out"))
    assert info["bpe"]["from"] == "the checkpoint's vocab.json and merges.txt"
    copied = (tmp_path / "out" / "vocab.bpe").read_text(encoding="utf-8")
    assert copied == merges + "\n"
    assert json.loads((tmp_path / "out" / "encoder.json").read_text(encoding="utf-8")) == json.load(open(encoder_json))
    assert info["bpe"]["sha256"]["vocab.bpe"] == hashlib.sha256(copied.encode("utf-8")).hexdigest()
    state = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert state["cfg"]["bpe"]["gpt2_vocab_bpe"] == str(tmp_path / "out" / "vocab.bpe")

    vocab = json.load(open(encoder_json))
    vocab["<|extra|>"] = len(vocab)  # a token added to the tokenizer
    (hf_dir / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(DPConfigError, match="vocab.json is not GPT-2's vocabulary"):
        convert(str(hf_dir), str(tmp_path / "out2"))
    assert not os.path.exists(tmp_path / "out2")
