"""The plugin's causal LMs (``transformer_lm_lora``, ``transformer_lm_rgp``)
and the one Linear-swap mechanism they share with ``roberta_lora`` /
``roberta_rgp``.

The oracles are fairseq's own: a stock ``transformer_lm`` built with GPT-2's
flags (its logits, its state dict, its parameter init for a seed), stock
fairseq loading a merged / exported checkpoint in a process without the
plugin, and the tensor shapes fairseq's decoder really feeds its modules.
Models are built in-process under fairseq's ``language_modeling`` task on a
tiny dictionary (the DP language-modeling task is not needed for any of this).
"""

import os
import subprocess
import sys
from argparse import Namespace

import pytest
import torch
import torch.nn as nn
from fairseq import checkpoint_utils
from fairseq.models.transformer_lm import TransformerLanguageModel
from fairseq.trainer import Trainer

from fairseq_dp.accounting import LEDGER_KEYS
from fairseq_dp.errors import DPConfigError
from fairseq_dp.export import export_checkpoint
from fairseq_dp.merge_lora import merge_lora_checkpoint
from fairseq_dp.models.causal_lm import stock_transformer_lm_flags
from fairseq_dp.models.swap import LAYER_TARGETS
from fairseq_dp.models.transformer_lm_lora import (
    transformer_lm_lora_architecture,
    transformer_lm_lora_gpt2_large,
    transformer_lm_lora_gpt2_medium,
    transformer_lm_lora_gpt2_small,
)
from fairseq_dp.models.transformer_lm_rgp import (
    transformer_lm_rgp_architecture,
    transformer_lm_rgp_gpt2_large,
    transformer_lm_rgp_gpt2_medium,
    transformer_lm_rgp_gpt2_small,
)
from fairseq_dp.modules import LoRALinear, LowRankLinear
from fairseq_dp.prepare import force_module_attention, set_batch_dims

from helpers import build, data_dir, train_args

SIZES = ["--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "48",
         "--decoder-attention-heads", "4"]
N_SYMBOLS = 20
# what fairseq's --arch transformer_lm needs for GPT-2's shape (the README's recipe), then tiny sizes
PLAIN = [*stock_transformer_lm_flags("gpt2_small"), "--decoder-input-dim", "32", "--decoder-output-dim", "32",
         "--max-target-positions", "1024"]


@pytest.fixture(scope="module")
def dict_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm_dict")
    (path / "dict.txt").write_text("".join(f"w{i} 1\n" for i in range(N_SYMBOLS)))
    return str(path)


def lm_argv(dict_dir, model, *extra, seed=1):
    return [dict_dir, "--task", "language_modeling", *model, *SIZES, "--criterion", "cross_entropy",
            "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "2", "--seed", str(seed), "--cpu",
            "--num-workers", "0", *extra]


def build_lm(dict_dir, model, *extra, seed=1, dtype=torch.float64):
    cfg, task, lm, criterion = build(lm_argv(dict_dir, model, *extra, seed=seed), dtype=dtype, load_train=False)
    return cfg, task, lm, criterion


def lora(*flags):
    return ["--arch", "transformer_lm_lora", "--non-private-baseline", *flags]


def rgp(*flags):
    return ["--arch", "transformer_lm_rgp", "--non-private-baseline", *flags]


def tokens(task, batch=3, length=7, seed=0):
    """Random symbols, the last row padded on the right (fairseq's collater pads LM batches there)."""
    g = torch.Generator().manual_seed(seed)
    d = task.source_dictionary
    t = torch.randint(d.nspecial, len(d), (batch, length), generator=g)
    t[-1, -2:] = d.pad()
    return t


def logits(model, t):
    model.eval()
    with torch.no_grad():
        return model(t)[0]


def layer_modules(model):
    return list(model.decoder.layers)


def target_module(layer, target):
    return layer.get_submodule(LAYER_TARGETS[target])


# ------------------------------------------------------------ archs and flags
def namespace_after(arch_fn, **given):
    args = Namespace(**given)
    arch_fn(args)
    return args


@pytest.mark.parametrize("arch_fn,shape", [
    (transformer_lm_lora_architecture, (768, 12, 12, 3072)),
    (transformer_lm_lora_gpt2_small, (768, 12, 12, 3072)),
    (transformer_lm_lora_gpt2_medium, (1024, 24, 16, 4096)),
    (transformer_lm_lora_gpt2_large, (1280, 36, 20, 5120)),
    (transformer_lm_rgp_architecture, (768, 12, 12, 3072)),
    (transformer_lm_rgp_gpt2_small, (768, 12, 12, 3072)),
    (transformer_lm_rgp_gpt2_medium, (1024, 24, 16, 4096)),
    (transformer_lm_rgp_gpt2_large, (1280, 36, 20, 5120)),
])
def test_archs_are_openai_gpt2_sizes_with_gpt2_shape(arch_fn, shape):
    args = namespace_after(arch_fn)
    assert (args.decoder_embed_dim, args.decoder_layers, args.decoder_attention_heads,
            args.decoder_ffn_embed_dim) == shape
    assert args.decoder_learned_pos and args.no_scale_embedding and args.decoder_normalize_before
    assert args.share_decoder_input_output_embed and not args.no_decoder_final_norm
    assert args.activation_fn == "gelu_accurate"
    assert (args.dropout, args.attention_dropout) == (0.1, 0.1)
    assert (args.tokens_per_sample, args.max_target_positions) == (1024, 1024)
    if "lora" in arch_fn.__name__:
        assert (args.lora_rank, args.lora_alpha, args.lora_targets) == (4, 32.0, "q,v")
    else:
        assert (args.rgp_rank, args.rgp_power_iters, args.rgp_carrier_source) == (1, 1, "weight")
        assert args.rgp_targets == "q,k,v,out,fc1,fc2"
    # the command line wins over the arch's defaults; a task's unset option (None) does not
    given = namespace_after(arch_fn, decoder_layers=3, activation_fn="relu", max_target_positions=None,
                            tokens_per_sample=128)
    assert (given.decoder_layers, given.activation_fn, given.max_target_positions,
            given.tokens_per_sample) == (3, "relu", 1024, 128)


# ------------------------------------------------------- where the swap goes
LM_CASES = {
    "lora_default_q_v": (lora(), LoRALinear, ["q", "v"], {"rank": 4, "scaling": 8.0}),
    "lora_medium_k_out_fc1": (["--arch", "transformer_lm_lora_gpt2_medium", "--non-private-baseline",
                               "--lora-targets", "k,out,fc1", "--lora-rank", "2", "--lora-alpha", "4"],
                              LoRALinear, ["k", "out", "fc1"], {"rank": 2, "scaling": 2.0}),
    "rgp_default_all_six": (rgp("--rgp-rank", "2"), LowRankLinear, list(LAYER_TARGETS),
                            {"rank": 2, "batch_dim": 1}),
    "rgp_large_fc": (["--arch", "transformer_lm_rgp_gpt2_large", "--non-private-baseline",
                      "--rgp-targets", "fc1,fc2"], LowRankLinear, ["fc1", "fc2"], {"rank": 1, "batch_dim": 1}),
}


@pytest.mark.parametrize("case", list(LM_CASES))
def test_swapped_modules_and_trainable_parameters(dict_dir, case):
    model_flags, kind, targets, attrs = LM_CASES[case]
    _, _, model, _ = build_lm(dict_dir, model_flags)
    layers = layer_modules(model)
    assert len(layers) == 2
    expected_trainable = set()
    for i, layer in enumerate(layers):
        for target in LAYER_TARGETS:
            module = target_module(layer, target)
            if target in targets:
                assert type(module) is kind, (i, target)
                for name, value in attrs.items():
                    assert getattr(module, name) == value, (i, target, name)
                names = ("lora_A", "lora_B") if kind is LoRALinear else ("weight",)
                expected_trainable |= {f"decoder.layers.{i}.{LAYER_TARGETS[target]}.{n}" for n in names}
            else:
                assert type(module) is nn.Linear, (i, target)
        # fairseq's attention must call the projection modules, not read their weights
        assert layer.self_attn.skip_embed_dim_check
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable
    # the tied token embedding / output projection stays frozen
    assert model.decoder.output_projection.weight is model.decoder.embed_tokens.weight
    assert not model.decoder.embed_tokens.weight.requires_grad


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    return data_dir(tmp_path_factory, n_train=16, n_valid=8)


ROBERTA_SIZES = ["--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "48",
                 "--encoder-attention-heads", "4"]


@pytest.mark.parametrize("arch,flags,kind,targets", [
    ("roberta_rgp", ["--rgp-rank", "2"], LowRankLinear, list(LAYER_TARGETS)),
    ("roberta_lora", ["--lora-targets", "q,fc2", "--lora-rank", "2"], LoRALinear, ["q", "fc2"]),
])
def test_roberta_models_swap_through_the_same_mechanism(cls_data, arch, flags, kind, targets):
    _, _, model, _ = build(train_args(cls_data, model=["--arch", arch, *ROBERTA_SIZES, *flags]), load_train=False)
    layers = list(model.encoder.sentence_encoder.layers)
    assert len(layers) == 2
    for layer in layers:
        for target in LAYER_TARGETS:
            module = target_module(layer, target)
            assert type(module) is (kind if target in targets else nn.Linear), target
            if kind is LowRankLinear and target in targets:
                assert module.batch_dim == 1 and module.rank == 2  # time-major encoder layers
        assert layer.self_attn.skip_embed_dim_check
    names = {n for n, _ in model.named_parameters()}
    # RoBERTa's parameter names: checkpoints of fairseq's own RoBERTa load unchanged
    assert "encoder.sentence_encoder.layers.0.self_attn.q_proj.weight" in names
    assert "encoder.sentence_encoder.layers.1.fc2.bias" in names


# ------------------------------------------------ plain checkpoints load into both
@pytest.mark.parametrize("model_flags", [lora(), lora("--lora-targets", "q,k,v,out,fc1,fc2"), rgp()],
                         ids=["lora_q_v", "lora_all", "rgp"])
def test_plain_transformer_lm_state_loads_with_identical_logits(dict_dir, model_flags):
    _, task, plain, _ = build_lm(dict_dir, PLAIN, seed=7)
    assert type(plain) is TransformerLanguageModel
    _, _, model, _ = build_lm(dict_dir, model_flags, seed=3)
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    model.load_state_dict(state, strict=True)  # fairseq's load: upgrade_state_dict, then strict
    for name, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    for module in model.modules():
        if isinstance(module, LoRALinear):  # the adapters the checkpoint lacks keep B = 0
            assert not torch.any(module.lora_B) and torch.any(module.lora_A)
    t = tokens(task)
    got = logits(model, t)
    # stock attention's fast path (plain) against the path that calls the modules
    # (swapped), whose softmax fairseq runs in float32
    torch.testing.assert_close(got, logits(plain, t), atol=1e-5, rtol=1e-5)
    force_module_attention(plain)  # the same path: equal up to float64 rounding (B = 0 adds exact zeros)
    torch.testing.assert_close(got, logits(plain, t), atol=1e-12, rtol=1e-12)


def test_rgp_starts_from_the_stock_models_weights_for_a_seed(dict_dir):
    """Swapping does not draw from the RNG: a seed gives transformer_lm_rgp
    exactly the initial weights fairseq's transformer_lm gets."""
    _, _, plain, _ = build_lm(dict_dir, PLAIN, seed=5)
    _, _, model, _ = build_lm(dict_dir, rgp(), seed=5)
    assert plain.state_dict().keys() == model.state_dict().keys()
    for name, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


# ------------------------------------------------------------------- mistakes
@pytest.mark.parametrize("flags,message", [
    (lora("--lora-targets", "q,x"), "--lora-targets must be a comma-separated subset of q,k,v,out,fc1,fc2, "
                                    "got 'q,x'"),
    (lora("--lora-targets", "q,q"), "--lora-targets must be a comma-separated subset"),
    (lora("--lora-targets", ","), "--lora-targets must be a comma-separated subset"),
    (lora("--lora-rank", "0"), "--lora-rank must be >= 1, got 0"),
    (rgp("--rgp-targets", "query"), "--rgp-targets must be a comma-separated subset of q,k,v,out,fc1,fc2, "
                                    "got 'query'"),
    (rgp("--rgp-rank", "0"), "--rgp-rank must be >= 1, got 0"),
    (rgp("--quant-noise-pq", "0.1"), "transformer_lm_rgp does not support --checkpoint-activations or "
                                     "--quant-noise-pq"),
    (lora("--quant-noise-pq", "0.1"), "transformer_lm_lora does not support --quant-noise-pq"),
])
def test_option_mistakes_are_refused_with_a_message(dict_dir, flags, message):
    with pytest.raises(DPConfigError) as e:
        build_lm(dict_dir, flags)
    assert message in str(e.value)


@pytest.mark.parametrize("arch", ["transformer_lm_lora", "transformer_lm_rgp"])
def test_training_without_privacy_needs_the_explicit_flag(dict_dir, arch):
    with pytest.raises(DPConfigError, match=f"--arch {arch} is a fairseq_dp architecture, but --task "
                                            "language_modeling .* --task dp_language_modeling --criterion "
                                            "dp_language_modeling, or add --non-private-baseline"):
        build_lm(dict_dir, ["--arch", arch])


# ------------------------------------------------------ time-major decoder modules
def test_decoder_batch_dims_match_the_shapes_fairseq_feeds(dict_dir):
    """set_batch_dims against the shapes fairseq's decoder really feeds each
    module (B = 3 and T = 7 differ, so the batch dimension is unambiguous)."""
    _, task, model, _ = build_lm(dict_dir, lora("--lora-targets", "q,fc1"))
    set_batch_dims(model)
    seen = {}
    # the modules with per-example gradient rules (their input's batch dimension is what the rules read)
    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, inputs[0].shape)
        return hook

    hooks = [m.register_forward_hook(record(name))
             for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Embedding))]
    t = tokens(task, batch=3, length=7)
    logits(model, t)
    for h in hooks:
        h.remove()
    modules = dict(model.named_modules())
    checked = 0
    for name, shape in seen.items():
        if len(shape) < 2:
            continue
        batch_dim = shape.index(3)
        assert getattr(modules[name], "dp_batch_dim", 0) == batch_dim, (name, shape)
        checked += 1
    assert "decoder.layer_norm" in seen and modules["decoder.layer_norm"].dp_batch_dim == 1
    assert "decoder.layers.0.self_attn.q_proj" in seen and "decoder.output_projection" in seen
    assert checked >= 10


# ------------------------------------- merged / exported checkpoints on stock fairseq
STOCK_FAIRSEQ = r"""
import sys, torch
from fairseq import checkpoint_utils
from fairseq.models.transformer_lm import TransformerLanguageModel
tokens, out = torch.load(sys.argv[1]), sys.argv[2]
logits = {}
for path in sys.argv[3:]:
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path])
    model = models[0].double().eval()
    assert type(model) is TransformerLanguageModel, type(model)
    assert cfg.task._name == "language_modeling", cfg.task._name
    with torch.no_grad():
        logits[path] = model(tokens)[0]
assert not any(m.startswith("fairseq_dp") for m in sys.modules)
torch.save(logits, out)
"""


def trained_checkpoint(dict_dir, model_flags, path, perturb):
    """A checkpoint as fairseq-train writes it, with weights moved as
    training would move them; ``path`` + ``.ledger`` is the same with a
    privacy ledger in the model state, as the DP task saves it."""
    cfg, task, model, criterion = build_lm(dict_dir, model_flags, dtype=torch.float32)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(perturb * torch.randn(p.shape, generator=g))
    trainer = Trainer(cfg, task, model, criterion)
    trainer.consolidate_optimizer()  # as checkpoint_utils.save_checkpoint does
    trainer.save_checkpoint(path, {})
    state = torch.load(path, weights_only=False)
    for key in LEDGER_KEYS:
        state["model"][key] = torch.tensor([[1.0, 0.01, 3.0]], dtype=torch.float64)
    torch.save(state, path + ".ledger")
    return task, model


def test_merged_lora_and_exported_rgp_load_in_stock_fairseq_with_the_same_logits(dict_dir, tmp_path):
    lora_task, lora_model = trained_checkpoint(dict_dir, lora("--lora-targets", "q,v,fc2"),
                                               str(tmp_path / "lora.pt"), perturb=0.3)
    assert any(torch.any(m.lora_B) for m in lora_model.modules() if isinstance(m, LoRALinear))
    _, rgp_model = trained_checkpoint(dict_dir, rgp("--rgp-rank", "2"), str(tmp_path / "rgp.pt"), perturb=0.05)
    merge_lora_checkpoint(str(tmp_path / "lora.pt.ledger"), str(tmp_path / "merged.pt"))
    export_checkpoint(str(tmp_path / "rgp.pt.ledger"), str(tmp_path / "exported.pt"))
    for name in ("merged.pt", "exported.pt"):
        state = torch.load(tmp_path / name, weights_only=False)
        assert not any("lora_" in k or k in LEDGER_KEYS for k in state["model"]), name
        assert set(state["dp_ledger"]) == set(LEDGER_KEYS), name  # the ledger moves to the top level
        assert state["last_optimizer_state"] is None

    t = tokens(lora_task)
    torch.save(t, tmp_path / "tokens.pt")
    script = tmp_path / "stock.py"
    script.write_text(STOCK_FAIRSEQ)
    # torch >= 2.6 refuses fairseq's pickled configs by default; a stock
    # fairseq user opts out of weights_only as fairseq's own docs require
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1",
               PYTHONPATH="")
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "tokens.pt"), str(tmp_path / "logits.pt"),
                           str(tmp_path / "merged.pt"), str(tmp_path / "exported.pt")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    stock = torch.load(tmp_path / "logits.pt")
    # the oracle: the LoRA / RGP model itself, in eval (adapters unmerged)
    for name, model in (("merged.pt", lora_model), ("exported.pt", rgp_model)):
        expected = logits(model.double(), t)
        torch.testing.assert_close(stock[str(tmp_path / name)], expected, atol=1e-5, rtol=1e-5)

    # the unmerged checkpoint loads back into the plugin's own model, unchanged
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(tmp_path / "lora.pt")])
    assert type(models[0]).__name__ == "TransformerLMLoRAModel"
    torch.testing.assert_close(logits(models[0].double(), t), logits(lora_model, t), atol=1e-12, rtol=1e-12)


def test_merge_lora_refuses_an_rgp_language_model(dict_dir, tmp_path):
    trained_checkpoint(dict_dir, rgp(), str(tmp_path / "rgp.pt"), perturb=0.0)
    with pytest.raises(DPConfigError, match="is not a roberta_lora checkpoint \\(architecture 'transformer_lm_rgp'\\) "
                                            "nor a transformer_lm_lora one"):
        merge_lora_checkpoint(str(tmp_path / "rgp.pt"), str(tmp_path / "m.pt"))
    trained_checkpoint(dict_dir, lora(), str(tmp_path / "lora.pt"), perturb=0.0)
    with pytest.raises(DPConfigError, match="plugin's architecture 'transformer_lm_lora'.*merge_lora"):
        export_checkpoint(str(tmp_path / "lora.pt"), str(tmp_path / "no.pt"))
