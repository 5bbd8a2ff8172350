"""DP full fine-tuning of plain ``roberta`` (both clipping modes) and DP-LoRA
(``roberta_lora``): the whole train step (float64, dropout 0, noise 0, two
micro-batches with padding, a clip norm that clips half the examples) against
a loop that runs every example alone through the model, takes autograd's
gradient of every trainable parameter and clips it, as private-transformers
tests its engine."""

import copy
import logging
import re

import pytest
import torch
import torch.nn as nn
from fairseq import checkpoint_utils, tasks
from fairseq.distributed import utils as distributed_utils
from fairseq.logging import metrics
from fairseq.models.roberta import RobertaModel
from fairseq.trainer import Trainer
from fairseq_cli import train
from omegaconf import OmegaConf

from fairseq_dp.merge_lora import main as merge_lora_main
from fairseq_dp.merge_lora import merge_lora_checkpoint
from fairseq_dp.modules import LoRALinear
from fairseq_dp.recording import Recorder

from helpers import batch, build, data_dir, parse, per_example_oracle, randomize_lora_b, \
    task_step_grads, train_args

B_MICRO, UPDATE_FREQ = 4, 2
SIZES = ["--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "48",
         "--encoder-attention-heads", "4"]
FULL = ["--arch", "roberta", *SIZES]
LORA = ["--arch", "roberta_lora", *SIZES, "--lora-rank", "4", "--lora-alpha", "8"]
MEAN = ["--classification-pooling", "mean"]
NO_DROPOUT = ["--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0",
              "--pooler-dropout", "0"]
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
               "fc1", "fc2")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return data_dir(tmp_path_factory, n_train=64, n_valid=16)


def make(data, model, sigma=0.0, clip=1.0, dtype=torch.float64, extra=()):
    argv = train_args(
        data, "--weight-decay", "0", "--lr", "1", "--update-freq", str(UPDATE_FREQ),
        "--dp-clip-norm", str(clip), *NO_DROPOUT, *extra,
        model=model, noise=("--dp-noise-multiplier", str(sigma)),
    )
    argv[argv.index("--batch-size") + 1] = str(B_MICRO)
    argv[argv.index("--optimizer") + 1] = "sgd"
    cfg, task, model, criterion = build(argv, dtype=dtype)
    randomize_lora_b(model)
    return cfg, task, model, criterion


def samples_of(task):
    samples = [batch(task, size=B_MICRO, start=0), batch(task, size=B_MICRO, start=B_MICRO)]
    pad = task.source_dictionary.pad()
    assert all((s["net_input"]["src_tokens"] == pad).any() for s in samples), "want padding"
    return samples


def oracle_update(model0, criterion, task, samples, clip):
    """Σ_i clip(∇ℓ_i) / B over every trainable parameter, each example alone."""
    return per_example_oracle(model0, criterion, task, samples, clip, B_MICRO * UPDATE_FREQ)




def median_clip(model, criterion, task, samples):
    _, norms = oracle_update(model, criterion, task, samples, float("inf"))
    return norms.median().item()


def step_and_oracle(task, model, criterion):
    """The DP step's update and the per-example loop's, at a clip norm that
    clips about half the examples: (got, expected, per-example norms, clip)."""
    samples = samples_of(task)
    clip = median_clip(model, criterion, task, samples)
    task.cfg.dp_clip_norm = clip  # fixed when the first update starts
    model0 = copy.deepcopy(model)
    got = task_step_grads(task, model, criterion, samples)
    expected, norms = oracle_update(model0, criterion, task, samples, clip)
    return got, expected, norms, clip


@pytest.mark.parametrize("arch", ["full", "lora", "full_mean_pooled", "lora_mean_pooled"])
@pytest.mark.parametrize("clipping", ["ghost", "materialize"])
def test_train_step_matches_per_example_loop_float64(data, arch, clipping):
    model_args = {"full": FULL, "lora": LORA, "full_mean_pooled": ["--arch", "roberta_pooled", *SIZES, *MEAN],
                  "lora_mean_pooled": LORA + MEAN}[arch]
    cfg, task, model, criterion = make(data, model_args, extra=("--dp-clipping", clipping))
    got, expected, norms, clip = step_and_oracle(task, model, criterion)
    assert (norms > clip).any() and (norms < clip).any()
    assert set(got) == set(expected)
    if arch.startswith("full"):
        assert "encoder.sentence_encoder.embed_tokens.weight" in got
        assert "encoder.sentence_encoder.embed_positions.weight" in got
        assert "encoder.sentence_encoder.layers.0.self_attn_layer_norm.weight" in got
        assert not any(".lm_head." in n for n in got)
    else:
        assert {n.rpartition(".")[2] for n in got} == {"lora_A", "lora_B", "weight", "bias"}
        assert all("lora_" in n or "classification_heads" in n for n in got)
    # fairseq's attention softmax runs in float32 whatever the model's dtype, so a
    # padded batch and an example alone differ by ~1e-8 relative; a wrong rule is ~1e-2
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-8, rtol=1e-6, msg=name)


@pytest.mark.parametrize("model_args", [FULL, LORA], ids=["full", "lora"])
def test_ghost_and_materialized_give_the_same_update(data, model_args):
    grads = []
    for clipping in ("ghost", "materialize"):
        _, task, model, criterion = make(data, model_args, clip=0.05, extra=("--dp-clipping", clipping))
        grads.append(task_step_grads(task, model, criterion, samples_of(task)))
    assert set(grads[0]) == set(grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-12, rtol=1e-10, msg=name)


def test_dp_freeze_skips_matching_parameters(data):
    freeze = "embed_tokens,embed_positions,layernorm_embedding"
    _, task, model, criterion = make(data, FULL, extra=("--dp-freeze", freeze))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "encoder.sentence_encoder.embed_tokens.weight" in frozen
    assert "encoder.sentence_encoder.layernorm_embedding.bias" in frozen
    got, expected, _, _ = step_and_oracle(task, model, criterion)
    assert set(got) == set(expected) and not any(re.search("embed_", n) for n in got)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-9, rtol=1e-6, msg=name)


@pytest.mark.parametrize("model_args", [FULL, LORA], ids=["full", "lora"])
def test_every_trainable_projection_is_seen(data, model_args):
    """fairseq's attention fast path would skip q/k/v/out_proj: the DP model
    takes the path that calls them, every one is tracked, and a forward that
    skipped one stops the step."""
    _, task, model, criterion = make(data, model_args)
    tracked = {name for name, _, _ in task.recorder.tracked}
    for i in range(2):
        for proj in PROJECTIONS:
            assert f"encoder.sentence_encoder.layers.{i}.{proj}" in tracked
    attention = model.encoder.sentence_encoder.layers[1].self_attn
    attention.skip_embed_dim_check = False  # fairseq's fast path again
    with pytest.raises(RuntimeError, match=r"layers.1.self_attn.[qkv]_proj' to run exactly once.*ran 0 times"):
        task.train_step(samples_of(task)[0], model, criterion, None, 0)


def test_lm_head_is_frozen_and_its_tied_weight_guarded(data):
    """RoBERTa's LM head is unused by sentence prediction: its own parameters
    are frozen; its projection is the token embedding, trained through the
    embedding's rule, so a DP forward that ran the LM head is stopped."""
    _, task, model, criterion = make(data, FULL)
    head = model.encoder.lm_head
    assert head.weight is model.encoder.sentence_encoder.embed_tokens.weight
    assert head.weight.requires_grad
    assert not any(p.requires_grad for n, p in head.named_parameters() if n != "weight")
    features = torch.zeros(2, 32, dtype=torch.float64)
    head(features)  # outside a DP step: allowed
    task.recorder.recording = True
    try:
        with pytest.raises(RuntimeError, match="tied"):
            head(features)
    finally:
        task.recorder.recording = False


def test_parameter_shared_by_two_tracked_modules_is_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight
    with pytest.raises(ValueError, match="tied trainable parameter 0.weight and 1.weight"):
        Recorder(model)


def test_full_finetuning_through_fairseq_trainer_float32(data):
    """Through fairseq's Trainer (float32): the SGD step with lr 1 is minus the
    DP gradient, gnorm is its norm and at most C."""
    cfg, task, model, criterion = make(data, FULL, dtype=torch.float32)
    samples = samples_of(task)
    clip = median_clip(copy.deepcopy(model).double(), criterion, task, samples)
    task.cfg.dp_clip_norm = clip  # fixed when the first update starts
    model0 = copy.deepcopy(model)
    trainer = Trainer(cfg, task, model, criterion)
    with metrics.aggregate(new_root=True) as agg:
        trainer.train_step(samples)
    expected, _ = oracle_update(model0.double(), criterion, task, samples, clip)
    after, before = dict(model.named_parameters()), dict(model0.named_parameters())
    for name, grad in expected.items():
        torch.testing.assert_close(before[name] - after[name].double(), grad, atol=2e-6, rtol=1e-4, msg=name)
    for name, param in before.items():
        if not param.requires_grad:
            assert torch.equal(param, after[name]), name
    full = torch.sqrt(sum(g.pow(2).sum() for g in expected.values()))
    assert float(agg["gnorm"].avg) == pytest.approx(full.item(), rel=1e-4)
    assert float(agg["gnorm"].avg) <= clip * (1 + 1e-5)


def plain_argv(data, sizes=SIZES):
    argv = train_args(data, model=["--arch", "roberta", *sizes])
    argv = [a.replace("dp_sentence_prediction", "sentence_prediction") for a in argv]
    i = argv.index("--dp-clip-norm")
    del argv[i:i + 2]
    i = argv.index("--dp-noise-multiplier")
    del argv[i:i + 2]
    return argv


def test_plain_roberta_checkpoint_loads_into_roberta_lora(data):
    """Plain RoBERTa's state dict loads into roberta_lora (the adapters keep
    their initialization, B = 0) and gives the same outputs."""
    cfg_plain = parse(plain_argv(data))
    torch.manual_seed(3)
    plain = tasks.setup_task(cfg_plain.task).build_model(cfg_plain.model).double().eval()
    cfg, task, lora, _ = make(data, LORA)
    for module in lora.modules():
        if isinstance(module, LoRALinear):
            module.reset_lora_parameters()
    lora.load_state_dict(plain.state_dict(), strict=True, model_cfg=cfg.model)
    lora.eval()
    tokens = batch(task)["net_input"]["src_tokens"]
    head = "sentence_classification_head"
    torch.testing.assert_close(lora(tokens, classification_head_name=head)[0],
                               plain(tokens, classification_head_name=head)[0])


def test_lora_update_changes_the_adapters_and_merges_into_plain_roberta(data, tmp_path):
    """One noisy DP-LoRA update through fairseq's Trainer changes both factors
    and the head and nothing else; the merged checkpoint loads as a plain
    RobertaModel with the same outputs."""
    cfg, task, model, criterion = make(data, LORA, sigma=1.0, dtype=torch.float32)
    cfg.checkpoint.save_dir = str(tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(cfg, task, model, criterion)
    trainer.train_step(samples_of(task))
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == param.requires_grad, name
    assert any("lora_A" in n for n, p in model.named_parameters() if p.requires_grad)
    assert any("lora_B" in n for n, p in model.named_parameters() if p.requires_grad)

    src, dst = str(tmp_path / "lora.pt"), str(tmp_path / "merged.pt")
    trainer.consolidate_optimizer()  # as checkpoint_utils.save_checkpoint does
    trainer.save_checkpoint(src, {})
    merge_lora_checkpoint(src, dst)
    state = torch.load(dst)
    assert not any("lora_" in k for k in state["model"])
    # the ledger leaves the model state, so stock fairseq loads it strictly
    assert "dp_ledger" not in state["model"] and state["dp_ledger"]["dp_ledger"].tolist()[0][2] == 1
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([dst])
    merged = models[0]
    assert type(merged) is RobertaModel
    copy.deepcopy(merged).load_state_dict(state["model"], strict=True)  # a copy has no plugin hooks

    # fairseq-hydra-train saves the model config as a plain dict
    hydra_src, hydra_dst = str(tmp_path / "hydra.pt"), str(tmp_path / "hydra_merged.pt")
    raw = torch.load(src, weights_only=False)
    model_cfg = raw["cfg"]["model"]
    raw["cfg"]["model"] = (OmegaConf.to_container(model_cfg) if OmegaConf.is_config(model_cfg)
                           else dict(vars(model_cfg)))
    torch.save(raw, hydra_src)
    merge_lora_checkpoint(hydra_src, hydra_dst)
    hydra_state = torch.load(hydra_dst, weights_only=False)
    assert hydra_state["cfg"]["model"]["_name"] == "roberta"
    for key, value in state["model"].items():
        assert torch.equal(hydra_state["model"][key], value), key
    model.eval()
    merged.eval()
    tokens = batch(task)["net_input"]["src_tokens"]
    head = "sentence_classification_head"
    torch.testing.assert_close(merged(tokens, classification_head_name=head)[0],
                               model(tokens, classification_head_name=head)[0], atol=1e-5, rtol=1e-5)


def test_mean_pooled_lora_merges_into_roberta_pooled(data, tmp_path):
    cfg, task, model, criterion = make(data, LORA + MEAN + ["--layer-norm-eps", "1e-12"], sigma=1.0,
                                       dtype=torch.float32)
    cfg.checkpoint.save_dir = str(tmp_path)
    trainer = Trainer(cfg, task, model, criterion)
    trainer.train_step(samples_of(task))
    src, dst = str(tmp_path / "lora.pt"), str(tmp_path / "merged.pt")
    trainer.consolidate_optimizer()
    trainer.save_checkpoint(src, {})
    merge_lora_checkpoint(src, dst)
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([dst])
    merged = models[0]
    assert type(merged).__name__ == "RobertaPooledModel"
    assert merged.args.classification_pooling == "mean"
    assert all(m.eps == 1e-12 for m in merged.modules() if isinstance(m, nn.LayerNorm))
    tokens = batch(task)["net_input"]["src_tokens"]
    head = "sentence_classification_head"
    torch.testing.assert_close(merged.eval()(tokens, classification_head_name=head)[0],
                               model.eval()(tokens, classification_head_name=head)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_args", [FULL + ["--dp-clipping", "ghost"], LORA], ids=["full", "lora"])
def test_fairseq_train_runs_and_logs_epsilon(data, model_args, tmp_path, caplog):
    """fairseq-train in-process: a few private updates, ε in the log; for
    LoRA, the last checkpoint merges (command-line entry) into a plain one."""
    argv = train_args(data, "--max-update", "3", "--save-dir", str(tmp_path), "--log-format", "simple",
                      "--log-interval", "1", model=model_args)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        distributed_utils.call_main(parse(argv), train.main)
    messages = [r.getMessage() for r in caplog.records]
    assert any("dp_epsilon=" in m for m in messages)
    assert any("num_updates 3" in m or "num_updates=3" in m for m in messages)
    if "roberta_lora" in model_args:
        merged = str(tmp_path / "merged.pt")
        merge_lora_main([str(tmp_path / "checkpoint_last.pt"), merged])
        models, _, _ = checkpoint_utils.load_model_ensemble_and_task([merged])
        assert type(models[0]) is RobertaModel


def test_lora_size_variants_and_defaults():
    from argparse import Namespace

    from fairseq_dp.models.roberta_lora import (
        roberta_lora_base_architecture,
        roberta_lora_large_architecture,
    )

    base, large = Namespace(), Namespace()
    roberta_lora_base_architecture(base)
    roberta_lora_large_architecture(large)
    assert (base.encoder_layers, base.encoder_embed_dim) == (12, 768)
    assert (large.encoder_layers, large.encoder_embed_dim) == (24, 1024)
    for args in (base, large):
        assert (args.lora_rank, args.lora_alpha, args.lora_targets) == (16, 16.0, "q,k,v,out,fc1,fc2")
