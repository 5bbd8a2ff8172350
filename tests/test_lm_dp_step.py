"""The whole DP step of ``dp_language_modeling`` (float64, dropout 0, noise 0,
padded examples of different lengths, prompt tokens masked from the loss, two
micro-batches, a clip norm that clips about half the examples) against a loop
that runs each example alone through the plain model with autograd."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from fairseq.logging import metrics
from fairseq.trainer import Trainer

from fairseq_dp.carriers import CarrierSchedule
from fairseq_dp.errors import DPConfigError
from fairseq_dp.modules import LoRALinear, LowRankLinear

from helpers import LM_SIZES, TINY_LM, batch, build, lm_data_dir, lm_train_args, per_example_oracle, \
    randomize_lora_b, task_step_grads

B_MICRO, UPDATE_FREQ = 4, 2
NO_DROPOUT = ["--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0"]
TIED = ["--share-decoder-input-output-embed"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return lm_data_dir(tmp_path_factory, n_train=64, n_valid=16)


def make(data, model=TINY_LM, sigma=0.0, dtype=torch.float64, extra=()):
    argv = lm_train_args(
        data, "--weight-decay", "0", "--lr", "1", "--update-freq", str(UPDATE_FREQ), *NO_DROPOUT, *extra,
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
    for s in samples:
        assert (s["net_input"]["src_tokens"] == pad).any(), "want padding"
        assert (s["target"] == pad).sum() > (s["net_input"]["src_tokens"] == pad).sum(), "want masked prompts"
    return samples


def carriers_now(task, model):
    """RGP's carriers of update 0, as the DP step computes them."""
    low_rank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    if not low_rank:
        return {}
    CarrierSchedule(low_rank, seed=task.cfg.seed, power_iters=getattr(model.args, "rgp_power_iters", 1),
                    source=getattr(model.args, "rgp_carrier_source", "weight")).compute(0)
    return {n: (m.left.clone(), m.right.clone()) for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def oracle_update(model0, criterion, task, samples, clip, carriers):
    return per_example_oracle(model0, criterion, task, samples, clip, B_MICRO * UPDATE_FREQ, carriers)


def check_step(task, model, criterion, cfg):
    samples = samples_of(task)
    carriers = carriers_now(task, model)
    _, norms = oracle_update(model, criterion, task, samples, math.inf, carriers)
    clip = norms.median().item()
    task.cfg.dp_clip_norm = clip  # fixed when the first update starts
    model0 = copy.deepcopy(model)
    got = task_step_grads(task, model, criterion, samples)
    expected, norms = oracle_update(model0, criterion, task, samples, clip, carriers)
    assert (norms > clip).any() and (norms < clip).any()
    assert set(got) == set(expected)
    for name, grad in expected.items():
        # fairseq's attention softmax runs in float32 (utils.softmax casts), so a
        # padded example's activations differ from its unpadded run by ~1e-7
        torch.testing.assert_close(got[name], grad, atol=1e-7, rtol=1e-5, msg=name)


FULL_UNTIED = TINY_LM
FULL_TIED = [*TINY_LM, *TIED]


@pytest.mark.parametrize("clipping", ["ghost", "materialize"])
@pytest.mark.parametrize("model_args,extra", [
    (FULL_UNTIED, ()),
    (FULL_TIED, ("--untie-output-embedding",)),
    (FULL_TIED, ()),
], ids=["full", "full_untied_by_flag", "full_tied"])
def test_full_finetuning_step_matches_per_example_loop(data, model_args, extra, clipping):
    cfg, task, model, criterion = make(data, model_args, extra=(*extra, "--dp-clipping", clipping))
    decoder = model.decoder
    tied = decoder.output_projection.weight is decoder.embed_tokens.weight
    assert tied == ("--untie-output-embedding" not in extra and model_args is FULL_TIED)
    check_step(task, model, criterion, cfg)


LORA_LM = ["--arch", "transformer_lm_lora", *LM_SIZES, "--lora-rank", "4", "--lora-alpha", "8",
           "--lora-targets", "q,v,fc1"]
RGP_LM = ["--arch", "transformer_lm_rgp", *LM_SIZES, "--rgp-rank", "2"]


@pytest.mark.parametrize("model_args", [LORA_LM, RGP_LM], ids=["lora", "rgp"])
def test_lora_and_rgp_steps_match_per_example_loop(data, model_args):
    cfg, task, model, criterion = make(data, model_args)
    kinds = {type(m) for m in model.modules()}
    assert (LoRALinear if model_args is LORA_LM else LowRankLinear) in kinds
    check_step(task, model, criterion, cfg)


def test_tied_embedding_gets_its_noise_once(data):
    """With clipping out of the way (C huge, one example) the noisy gradient
    minus the clean one is the noise: the tied weight's has std σC/B, as every
    other parameter's, not √2 times that."""
    cfg, task, model, criterion = make(data, FULL_TIED, sigma=1.0, extra=("--dp-clip-norm", "1e6"))
    noisy = task_step_grads(task, model, criterion, [batch(task, size=B_MICRO)])
    cfg, task, model, criterion = make(data, FULL_TIED, sigma=0.0, extra=("--dp-clip-norm", "1e6"))
    clean = task_step_grads(task, model, criterion, [batch(task, size=B_MICRO)])
    std = 1e6 / (B_MICRO * UPDATE_FREQ)
    tied = (noisy["decoder.embed_tokens.weight"] - clean["decoder.embed_tokens.weight"]).std().item()
    other = (noisy["decoder.layers.0.fc1.weight"] - clean["decoder.layers.0.fc1.weight"]).std().item()
    assert tied == pytest.approx(std, rel=0.02) and other == pytest.approx(std, rel=0.05)


def test_weight_shared_without_a_rule_is_refused_with_the_flag_to_use(data):
    cfg, task, model, criterion = make(data, FULL_UNTIED)
    from fairseq_dp.recording import Recorder

    model.decoder.layers[0].fc2.weight = model.decoder.layers[1].fc2.weight
    with pytest.raises(DPConfigError, match="--untie-output-embedding"):
        Recorder(model)


def test_prompt_tokens_are_masked_and_the_loss_is_the_targets_log_likelihood(data):
    """The criterion's loss of one example equals −Σ log p(target token) over
    the positions after the prompt, computed from the model's logits here."""
    cfg, task, model, criterion = make(data)
    model.eval()
    dataset = task.dataset("train")
    eos = task.source_dictionary.eos()
    for i in range(4):
        item = dataset.tokens[i].long()
        start = int(dataset.loss_start[i])
        assert start > 0 and item[start - 1] == eos  # prompt, separator, then the target
        one = dataset.collater([dataset[i]])
        tokens = torch.cat([item.new_tensor([eos]), item[:-1]]).unsqueeze(0)
        assert torch.equal(one["net_input"]["src_tokens"], tokens)
        logits = model(tokens)[0][0]
        logp = F.log_softmax(logits.double(), dim=-1)
        expected = -logp[torch.arange(start, len(item)), item[start:]].sum()
        loss, sample_size, _ = criterion(model, one)
        torch.testing.assert_close(loss, expected, rtol=1e-7, atol=1e-7)
        assert sample_size == len(item) - start


def test_fairseq_trainer_update_gnorm_is_at_most_the_clip_norm(data):
    """Through fairseq's Trainer (float32): gnorm is the norm of the gradient
    the optimizer receives, at most C when σ = 0."""
    cfg, task, model, criterion = make(data, dtype=torch.float32, extra=("--dp-clip-norm", "0.05"))
    trainer = Trainer(cfg, task, model, criterion)
    with metrics.aggregate(new_root=True) as agg:
        trainer.train_step(samples_of(task))
    assert 0 < agg["gnorm"].avg <= 0.05 + 1e-6
