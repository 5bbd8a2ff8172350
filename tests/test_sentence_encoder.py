"""``--classification-pooling`` and ``--layer-norm-eps`` of the plugin's models:
the heads' input against each example run alone without padding, and ``cls``
against fairseq's own RoBERTa."""

import argparse
import os

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.models.roberta import RobertaHubInterface, RobertaModel
from fairseq.models.roberta.model import RobertaClassificationHead
from fairseq.trainer import Trainer
from omegaconf import open_dict

from fairseq_dp.errors import DPConfigError
from fairseq_dp.models.roberta_pooled import RobertaPooledModel

from helpers import PLUGIN_DIR, batch, build, data_dir, train_args

SIZES = ["--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "48",
         "--encoder-attention-heads", "4"]
NO_DROPOUT = ["--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0",
              "--pooler-dropout", "0"]
ARCHS = {"roberta_rgp": [], "roberta_lora": ["--lora-rank", "2"], "roberta_pooled": []}
HEAD = "sentence_classification_head"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return data_dir(tmp_path_factory, n_train=32, n_valid=8)


def make(data, arch, *extra):
    argv = train_args(data, *NO_DROPOUT, *extra, model=["--arch", arch, *SIZES, *ARCHS[arch]],
                      noise=("--dp-noise-multiplier", "0"))
    _, task, model, _ = build(argv)
    return task, model.eval()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_mean_pooled_logits_equal_each_example_alone(data, arch):
    task, model = make(data, arch, "--classification-pooling", "mean")
    sample = batch(task, size=8)
    tokens = sample["net_input"]["src_tokens"]
    pad = task.source_dictionary.pad()
    assert (tokens == pad).any(), "want padding"
    with torch.no_grad():
        logits, _ = model(tokens, classification_head_name=HEAD)
        for row, row_logits in zip(tokens, logits):
            alone = row[row != pad].unsqueeze(0)
            states, _ = model(alone, features_only=True)
            # oracle: the head applied to the plain mean of an unpadded example's states
            expected = model.classification_heads[HEAD](states.mean(dim=1, keepdim=True))
            torch.testing.assert_close(row_logits, expected[0], atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("arch", ["roberta_pooled", "roberta_lora"])
def test_cls_pooling_is_fairseq_roberta(data, arch):
    task, model = make(data, arch)
    assert model.args.classification_pooling == "cls"
    tokens = batch(task, size=8)["net_input"]["src_tokens"]
    with torch.no_grad():
        got, _ = model(tokens, classification_head_name=HEAD)
        expected, _ = RobertaModel.forward(model, tokens, classification_head_name=HEAD)
        mean = model.classification_heads[HEAD](model(tokens, features_only=True)[0].mean(1, keepdim=True))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert not torch.allclose(got, mean)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_layer_norm_eps_reaches_every_layer_norm(data, arch):
    _, model = make(data, arch, "--layer-norm-eps", "1e-12")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-12 for m in norms)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_bad_layer_norm_eps_is_refused(data, arch):
    with pytest.raises(ValueError, match="--layer-norm-eps must be > 0"):
        make(data, arch, "--layer-norm-eps", "0")


def save_checkpoint(data, arch_args, path):
    argv = train_args(data, *NO_DROPOUT, model=arch_args, noise=("--dp-noise-multiplier", "0"))
    cfg, task, model, criterion = build(argv, dtype=torch.float32)
    cfg.checkpoint.save_dir = os.path.dirname(path)
    trainer = Trainer(cfg, task, model, criterion)
    trainer.consolidate_optimizer()  # as checkpoint_utils.save_checkpoint does
    trainer.save_checkpoint(path, {})
    return task, model.eval()


@pytest.mark.parametrize("loader", [RobertaModel, RobertaPooledModel], ids=["fairseq", "plugin"])
def test_hub_interface_predict_reads_the_pooling(data, tmp_path, loader):
    """fairseq's RobertaHubInterface.predict applies the head to
    extract_features itself; a mean-pooling head must still pool over the
    non-padding tokens, from fairseq's RobertaModel.from_pretrained as from the
    plugin's class, on a padded batch."""
    path = str(tmp_path / "pooled.pt")
    task, model = save_checkpoint(data, ["--arch", "roberta_pooled", *SIZES, "--classification-pooling", "mean"], path)
    hub = loader.from_pretrained(str(tmp_path), checkpoint_file="pooled.pt", data_name_or_path=data,
                                 bpe=None, user_dir=PLUGIN_DIR)
    assert type(hub) is RobertaHubInterface  # fairseq's own, unchanged
    hub.eval()
    tokens = batch(task, size=8)["net_input"]["src_tokens"]
    pad = task.source_dictionary.pad()
    assert (tokens == pad).any(), "want padding"
    with torch.no_grad():
        got = hub.predict(HEAD, tokens, return_logits=True)
        # oracle: each example alone, unpadded, its states averaged by hand
        expected = []
        for row in tokens:
            states, _ = model(row[row != pad].unsqueeze(0), features_only=True)
            expected.append(model.classification_heads[HEAD](states.mean(dim=1, keepdim=True))[0])
        first_token = RobertaClassificationHead.forward(hub.model.classification_heads[HEAD],
                                                        hub.extract_features(tokens))
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first_token, got, atol=1e-4)


def test_mean_head_refuses_states_without_their_padding_mask(data):
    task, model = make(data, "roberta_pooled", "--classification-pooling", "mean")
    tokens = batch(task, size=4)["net_input"]["src_tokens"]
    with torch.no_grad():
        states, _ = model(tokens, features_only=True)
        with pytest.raises(DPConfigError, match="without their padding mask"):
            model.classification_heads[HEAD](states.clone())


def test_checkpoint_from_before_the_option_keeps_first_token_pooling(data, tmp_path):
    """roberta_rgp_minilm now defaults to mean pooling; a checkpoint saved without the
    key was trained on the first token and must load that way."""
    path, old = str(tmp_path / "new.pt"), str(tmp_path / "old.pt")
    save_checkpoint(data, ["--arch", "roberta_rgp_minilm", *SIZES], path)
    state = torch.load(path, weights_only=False)
    assert state["cfg"]["model"].classification_pooling == "mean"
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([path])
    assert models[0].args.classification_pooling == "mean"
    model_cfg = state["cfg"]["model"]  # fairseq-train saves the model's Namespace
    if isinstance(model_cfg, argparse.Namespace):
        delattr(model_cfg, "classification_pooling")
    else:
        with open_dict(model_cfg):
            del model_cfg["classification_pooling"]
    torch.save(state, old)
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([old])
    assert models[0].args.classification_pooling == "cls"
