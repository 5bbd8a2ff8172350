"""Every documented way to load a checkpoint trained (or merged) with the
plugin predicts what ``fairseq-validate`` measures on the same checkpoint.

The oracle is ``fairseq-validate`` itself, run as a subprocess: its accuracy
and loss on the valid split. Each loading path (fairseq's
``RobertaModel.from_pretrained``, the plugin's classes' ``from_pretrained``)
then predicts the same split as a user would: sentences encoded with the
checkpoint's dictionary and batched with padding by fairseq's
``collate_tokens``. Logits are compared with the validation code path (the
criterion's call of the model) run in-process.
"""

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils
from fairseq.data.data_utils import collate_tokens
from fairseq.distributed import utils as distributed_utils
from fairseq.models.roberta import RobertaModel
from fairseq.models.roberta.model import RobertaClassificationHead
from fairseq_cli import train

from fairseq_dp.models.roberta_lora import RobertaLoRAModel
from fairseq_dp.models.roberta_pooled import RobertaPooledModel
from fairseq_dp.models.roberta_rgp import RobertaRGPModel

from helpers import PLUGIN_DIR, data_dir, parse, train_args

HEAD = "sentence_classification_head"
SIZES = ["--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "48",
         "--encoder-attention-heads", "4"]
# (arch flags, merge LoRA afterwards, the plugin class a user would call)
CASES = {
    # RGP on a MiniLM-style arch: mean pooling, BERT's LayerNorm epsilon
    "rgp_minilm_mean": (["--arch", "roberta_rgp_minilm", *SIZES], False, RobertaRGPModel),
    # DP-LoRA, merged by fairseq_dp.merge_lora into roberta_pooled_minilm
    "lora_minilm_merged": (["--arch", "roberta_lora_minilm", *SIZES, "--lora-rank", "2"], True,
                           RobertaPooledModel),
    # an unmerged LoRA checkpoint loads too
    "lora_minilm": (["--arch", "roberta_lora_minilm", *SIZES, "--lora-rank", "2"], False, RobertaLoRAModel),
    # DP full fine-tuning of fairseq's own RoBERTa: first-token head
    "roberta_cls": (["--arch", "roberta", *SIZES], False, RobertaPooledModel),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 40 dev examples: accuracies are multiples of 2.5 %, exact at fairseq's 1 decimal
    return data_dir(tmp_path_factory, n_train=128, n_valid=40)


def run(cmd, cwd):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def train_checkpoint(data, model_flags, save_dir) -> str:
    argv = train_args(
        data, "--max-epoch", "2", "--save-dir", str(save_dir), "--no-epoch-checkpoints",
        "--lr", "3e-3", "--log-format", "simple", "--disable-validation",
        model=model_flags, noise=("--dp-noise-multiplier", "0.3"),
    )
    distributed_utils.call_main(parse(argv), train.main)
    return os.path.join(save_dir, "checkpoint_last.pt")


def fairseq_validate(data, path, cwd):
    out = run([sys.executable, "-m", "fairseq_cli.validate", data, "--path", path, "--user-dir", PLUGIN_DIR,
               "--cpu", "--task", "dp_sentence_prediction", "--criterion", "dp_sentence_prediction",
               "--batch-size", "8", "--valid-subset", "valid",
               "--num-workers", "0"], cwd)
    line = next(l for l in out.splitlines() if "valid on 'valid' subset" in l)
    return (float(re.search(r"accuracy ([0-9.]+)", line).group(1)),
            float(re.search(r"\| loss ([0-9.]+)", line).group(1)))


def user_batches(hub, data, size=8):
    """The dev split as a user of the hub interface feeds it: each line of text
    encoded with the checkpoint's dictionary, <s> in front and </s> at the end
    (what hub.encode produces after BPE), padded into batches."""
    with open(os.path.join(data, "raw", "valid.input0")) as f:
        lines = [line.strip() for line in f]
    with open(os.path.join(data, "raw", "valid.label")) as f:
        labels = [line.strip() for line in f]
    vocab = hub.task.source_dictionary
    label_dict = hub.task.label_dictionary
    encoded = [torch.cat([torch.tensor([vocab.bos()]), vocab.encode_line(line, append_eos=True,
                                                                          add_if_not_exist=False).long()])
               for line in lines]
    targets = torch.tensor([label_dict.index(lab) - label_dict.nspecial for lab in labels])
    for start in range(0, len(encoded), size):
        yield collate_tokens(encoded[start:start + size], pad_idx=vocab.pad()), targets[start:start + size]


def validation_path_logits(path, data, tokens):
    """The model as fairseq-validate loads it, called as its criterion does."""
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
    model = models[0].eval()
    with torch.no_grad():
        logits, _ = model(tokens, features_only=True, classification_head_name=HEAD)
    return logits


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, data, tmp_path_factory):
    flags, merge, plugin_class = CASES[request.param]
    save_dir = tmp_path_factory.mktemp(request.param)
    path = train_checkpoint(data, flags, save_dir)
    if merge:
        merged = os.path.join(save_dir, "merged.pt")
        run([sys.executable, "-m", "fairseq_dp.merge_lora", path, merged], save_dir)
        path = merged
    accuracy, loss = fairseq_validate(data, path, save_dir)
    return request.param, path, plugin_class, accuracy, loss


@pytest.mark.parametrize("loader", ["fairseq", "plugin"])
def test_hub_predictions_equal_fairseq_validate(checkpoint, data, loader):
    name, path, plugin_class, val_accuracy, val_loss = checkpoint
    cls = RobertaModel if loader == "fairseq" else plugin_class
    hub = cls.from_pretrained(os.path.dirname(path), checkpoint_file=os.path.basename(path),
                              data_name_or_path=data, bpe=None)
    hub.eval()
    if name == "lora_minilm_merged":
        # stock RoBERTa would read the first token: merge_lora names the plugin's pooled arch
        assert isinstance(hub.model, RobertaPooledModel) and hub.model.args.classification_pooling == "mean"
    all_logits, all_targets, all_tokens = [], [], []
    with torch.no_grad():
        for tokens, targets in user_batches(hub, data):
            assert (tokens == hub.task.source_dictionary.pad()).any() or len(targets) == 1
            all_logits.append(hub.predict(HEAD, tokens, return_logits=True))
            all_targets.append(targets)
            all_tokens.append(tokens)
    logits, targets = torch.cat(all_logits), torch.cat(all_targets)
    accuracy = 100.0 * (logits.argmax(-1) == targets).double().mean().item()
    # fairseq's loss: summed NLL over the examples / their number, in bits
    loss = F.cross_entropy(logits.double(), targets, reduction="mean").item() / torch.log(torch.tensor(2.0)).item()
    assert round(accuracy, 1) == val_accuracy, (name, accuracy, val_accuracy)
    assert loss == pytest.approx(val_loss, abs=1.5e-3), (name, loss, val_loss)

    expected = torch.cat([validation_path_logits(path, data, t) for t in all_tokens])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)

    if "mean" in name or "minilm" in name:
        # not vacuous: what fairseq's hub used to compute (the first token) differs
        with torch.no_grad():
            first = torch.cat([RobertaClassificationHead.forward(hub.model.classification_heads[HEAD],
                                                                 hub.extract_features(t)) for t in all_tokens])
        assert (first - logits).abs().max() > 1e-3
