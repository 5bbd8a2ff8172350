"""Shared helpers: tiny generated data and in-process fairseq set-up."""

import os

import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import fairseq_dp  # noqa: F401  (registers the plugin)
from fairseq_dp.data.synthetic import make_synthetic_dataset

PLUGIN_DIR = os.path.dirname(os.path.abspath(fairseq_dp.__file__))

TINY_MODEL = [
    "--arch", "roberta_rgp", "--encoder-layers", "2", "--encoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "48", "--encoder-attention-heads", "4",
]


def data_dir(tmp_path_factory, n_train=256, n_valid=64, name="data"):
    path = tmp_path_factory.mktemp(name)
    return make_synthetic_dataset(str(path), n_train=n_train, n_valid=n_valid)


def train_args(data, *extra, model=TINY_MODEL, noise=("--dp-noise-multiplier", "1.0")):
    return [
        data, "--user-dir", PLUGIN_DIR, "--cpu", "--task", "dp_sentence_prediction",
        "--criterion", "dp_sentence_prediction", "--num-classes", "2", "--init-token", "0",
        "--separator-token", "2", "--max-positions", "64", *model,
        "--optimizer", "adam", "--lr", "1e-3", "--lr-scheduler", "fixed", "--batch-size", "8",
        "--seed", "1", "--num-workers", "0", "--dp-clip-norm", "1.0", *noise, *extra,
    ]


def parse(argv):
    parser = options.get_training_parser()
    return convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv))


def build(argv, dtype=torch.float64, load_train=True):
    """(cfg, task, model, criterion) for a training command line, in-process."""
    cfg = parse(argv)
    torch.manual_seed(cfg.common.seed)  # as fairseq_cli.train does: same init every build
    task = tasks.setup_task(cfg.task)
    if load_train:
        task.load_dataset("train")
    model = task.build_model(cfg.model).to(dtype)
    criterion = task.build_criterion(cfg.criterion)
    return cfg, task, model, criterion


def batch(task, split="train", size=8, start=0):
    dataset = task.dataset(split)
    return dataset.collater([dataset[i] for i in range(start, start + size)])


def task_step_grads(task, model, criterion, samples):
    """What fairseq's Trainer does around task.train_step: sum micro-batches,
    divide by ``(summed sample size or 1)`` (in the model's dtype; the
    Trainer's own grad-norm code only takes float32)."""
    for p in model.parameters():
        p.grad = None
    size = sum(task.train_step(s, model, criterion, None, 0)[1] for s in samples)
    return {n: p.grad / (size or 1.0) for n, p in model.named_parameters() if p.requires_grad}


def each_example(task, samples):
    """Every example of the micro-batches, collated alone (the oracles' loop)."""
    dataset = task.dataset("train")
    for sample in samples:
        for i in range(sample["nsentences"]):
            yield dataset.collater([dataset[int(sample["id"][i])]])


# ---------------------------------------------------------------- language modeling
LM_SIZES = [
    "--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "48",
    "--decoder-attention-heads", "4", "--decoder-input-dim", "32", "--decoder-output-dim", "32",
]
# GPT-2's shape: learned positions, no embedding scale, tanh GELU, pre-LayerNorm
GPT2_SHAPE = ["--decoder-learned-pos", "--no-scale-embedding", "--activation-fn", "gelu_accurate",
              "--decoder-normalize-before"]
TINY_LM = ["--arch", "transformer_lm", *LM_SIZES, *GPT2_SHAPE]


def lm_data_dir(tmp_path_factory, n_train=128, n_valid=32, prompts=True, name="lmdata"):
    from fairseq_dp.data.synthetic import make_synthetic_lm_dataset

    path = tmp_path_factory.mktemp(name)
    return make_synthetic_lm_dataset(str(path), n_train=n_train, n_valid=n_valid, prompts=prompts)


def lm_train_args(data, *extra, model=TINY_LM, noise=("--dp-noise-multiplier", "1.0")):
    return [
        data, "--user-dir", PLUGIN_DIR, "--cpu", "--task", "dp_language_modeling",
        "--criterion", "dp_language_modeling", "--tokens-per-sample", "32", *model,
        "--optimizer", "adam", "--lr", "1e-3", "--lr-scheduler", "fixed", "--batch-size", "8",
        "--seed", "1", "--num-workers", "0", "--dp-clip-norm", "1.0", "--dp-delta", "1e-3",
        *noise, *extra,
    ]


# ------------------------------------------------- the shared per-example oracle
def per_example_oracle(model0, criterion, task, samples, clip, expected_batch, carriers=None):
    """Σ_i clip(g_i) / B, every example of ``samples`` run alone through a copy
    of ``model0`` with autograd: g_i is the gradient of the example's loss for
    every trainable parameter or, for an RGP matrix (a LowRankLinear named in
    ``carriers`` with its carriers (L, R)), its carrier gradients G_i Rᵀ and
    Lᵀ G_i, whose clipped sums are projected back as the DP step does.
    Returns (gradients by parameter name, per-example norms)."""
    import copy

    from fairseq_dp.modules import LowRankLinear

    carriers = carriers or {}
    model = copy.deepcopy(model0).train()
    named = dict(model.named_modules())
    for module in named.values():
        if isinstance(module, LowRankLinear):
            module.clear_carriers()  # the plain nn.Linear path: autograd forms G_i
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def carried(name):
        return name.rpartition(".")[0] in carriers and name.endswith(".weight")

    total, norms = {}, []
    for one in each_example(task, samples):
        model.zero_grad()
        loss, _, _ = criterion(model, one)
        loss.backward()
        privatized = {}
        for name, param in trainable:
            grad = param.grad.clone() if param.grad is not None else torch.zeros_like(param)
            if carried(name):
                module_name = name.rpartition(".")[0]
                L, R = carriers[module_name]
                privatized[module_name + ".left"] = grad @ R.t()
                privatized[module_name + ".right"] = L.t() @ grad
            else:
                privatized[name] = grad
        norm = torch.sqrt(sum(v.pow(2).sum() for v in privatized.values()))
        norms.append(norm)
        factor = min(1.0, clip / (norm.item() + 1e-6))
        for k, v in privatized.items():
            total[k] = total.get(k, 0) + factor * v
    grads = {}
    for name, param in trainable:
        if carried(name):
            module_name = name.rpartition(".")[0]
            L, R = carriers[module_name]
            dL, dR = total[module_name + ".left"], total[module_name + ".right"]
            grads[name] = (L @ dR + dL @ R - L @ L.t() @ dL @ R) / expected_batch
        else:
            grads[name] = total[name] / expected_batch
    return grads, torch.stack(norms)


def randomize_lora_b(model, std=0.1):
    """LoRA's B starts at 0, which would make every ∇A zero: a test of the
    adapters' gradients needs B ≠ 0."""
    from fairseq_dp.modules import LoRALinear

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(std=std)
