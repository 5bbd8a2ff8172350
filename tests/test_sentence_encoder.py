"""``--classification-pooling`` and ``--layer-norm-eps`` of the plugin's models:
the heads' input against each example run alone without padding, and ``cls``
against fairseq's own RoBERTa."""

import pytest
import torch
from fairseq.models.roberta import RobertaModel

from helpers import batch, build, data_dir, train_args

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
