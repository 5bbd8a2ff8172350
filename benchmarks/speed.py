# Copyright (c) fairseq_dp contributors. MIT license.
"""Seconds per update and peak memory of non-private, RGP and peer DP training.

``python -m benchmarks.speed [--preset minilm|roberta-base|gpt2-cpu|gpt2-small] [--quick] [--json PATH]``

Every method trains the same model shape on the same synthetic batch (fixed
batch size and sequence length, no padding), and every update is a complete
one, as users get it: for the fairseq rows, fairseq's own ``Trainer.train_step``
(forward, backward, the DP step where there is one, gradient norm, optimizer
step); for Opacus, forward, backward, ``DPOptimizer.step``.

Two kinds of preset: sentence classification (``minilm``, ``roberta-base``:
RoBERTa encoders, ``sentence_prediction``) and causal language modeling
(``gpt2-cpu``, ``gpt2-small``: fairseq's ``transformer_lm`` in GPT-2's shape,
``language_modeling`` / ``dp_language_modeling``, every token of every example
in the loss). Each kind has its own rows (``METHODS``, ``LM_METHODS``).

How it measures:

- Each method lives in its own fresh worker process (``spawn``). The parent
  asks the workers for one update at a time, round-robin, so no two updates run
  at once and every measured round times every method under the same machine
  load; the ratios to ``nonprivate_full`` are medians of the per-round ratios,
  which slow drifts in load (other jobs on a shared CPU) cancel out of.
- Peak memory is the worker's own: on a GPU ``torch.cuda.max_memory_allocated``,
  on the CPU the growth of the peak resident set size (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before the model is built) over the resident
  size at that moment. Both count the parameters, gradients, optimizer state
  and activations. A separate process per method is what makes the CPU figure
  correct: memory one method frees stays mapped in the allocator, and another
  method in the same process would reuse it without growing.

A method is one entry in ``METHODS``: a function that builds it in a worker
and returns a step function. Rows for methods this checkout lacks are printed
as skipped, with the reason.
"""

import argparse
import atexit
import dataclasses
import datetime
import json
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "nonprivate_full"
# training-set sizes that set the DP rows' sampling rate q (it does not change the cost)
SST2_TRAIN_SIZE = 67_349
E2E_TRAIN_SIZE = 42_061

CLASSIFICATION, LM = "classification", "lm"
# GPT-2's dictionary in fairseq's layout (fairseq-dp-prepare-lm): fairseq's 4
# specials, then GPT-2 ids 0..50255 (its <|endoftext|> is fairseq's </s>)
GPT2_DICT_SIZE = 50_260
GPT2_POSITIONS = 1024

PRESETS = {
    # all-MiniLM-L6-v2 sizes (the project's CPU model)
    "minilm": dict(kind=CLASSIFICATION, layers=6, hidden=384, heads=12, ffn=1536, vocab=30522, batch=32,
                   seq_len=64),
    "roberta-base": dict(kind=CLASSIFICATION, layers=12, hidden=768, heads=12, ffn=3072, vocab=50265,
                         batch=32, seq_len=128),
    # a GPT-2-shaped LM small enough for 2 CPU cores, with GPT-2's full
    # vocabulary (the output layer is a large share of an LM's cost)
    "gpt2-cpu": dict(kind=LM, layers=4, hidden=256, heads=4, ffn=1024, vocab=GPT2_DICT_SIZE, batch=8,
                     seq_len=64),
    # OpenAI's GPT-2 small (124M); batch 16 x 100 tokens is private-transformers'
    # E2E setting (16 examples per device and step, 64 accumulated, max_len 100)
    "gpt2-small": dict(kind=LM, layers=12, hidden=768, heads=12, ffn=3072, vocab=GPT2_DICT_SIZE, batch=16,
                       seq_len=100),
}
QUICK = dict(batch=8, seq_len=32, warmup=2, steps=5)


@dataclasses.dataclass
class Settings:
    preset: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    batch: int
    seq_len: int
    warmup: int
    steps: int
    device: str
    threads: int
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    lr: float = 1e-5
    seed: int = 1
    # which rows and which fairseq task: CLASSIFICATION or LM (from the preset)
    kind: str = CLASSIFICATION


# --------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of this process from ``start()`` on (see the module doc)."""

    def __init__(self, device):
        self.device = device
        self.baseline = 0
        self.exact = True

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # peak RSS := current RSS (Linux >= 4.0)
        except OSError:
            self.exact = False  # VmHWM then includes whatever imports peaked at
        self.baseline = (_proc_status_kib("VmRSS") or 0) * 1024

    def peak_bytes(self) -> int:
        import torch

        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated())
        hwm = _proc_status_kib("VmHWM")
        if hwm is None:
            import resource

            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, hwm * 1024 - self.baseline)


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------- methods
class MethodUnavailable(Exception):
    """This checkout cannot run the method; the row is skipped with the reason."""


def _synthetic_batch(s: Settings, first_token: int, generator):
    import torch

    # <s> ... </s> over the vocabulary past the 4 special symbols; no padding,
    # so every method does exactly batch x seq_len tokens of work
    tokens = torch.randint(4, s.vocab - 1, (s.batch, s.seq_len), generator=generator)
    tokens[:, 0] = first_token
    tokens[:, -1] = 2
    labels = torch.randint(0, 2, (s.batch,), generator=generator)
    return tokens, labels


def _write_fairseq_dicts(s: Settings) -> str:
    """A data directory with just the dictionaries the sentence-prediction task
    loads; the task adds 4 special symbols and ``<mask>``, so the embedding has
    ``s.vocab`` rows."""
    data = tempfile.mkdtemp(prefix="fairseq_dp_bench_")
    atexit.register(shutil.rmtree, data, ignore_errors=True)
    os.makedirs(os.path.join(data, "input0"))
    os.makedirs(os.path.join(data, "label"))
    with open(os.path.join(data, "input0", "dict.txt"), "w") as f:
        f.writelines(f"tok{i} 1\n" for i in range(s.vocab - 5))
    with open(os.path.join(data, "label", "dict.txt"), "w") as f:
        f.write("0 1\n1 1\n")
    return data


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _trainer_step(task, trainer, sample, device) -> Callable[[], dict]:
    """One complete update through fairseq's ``Trainer.train_step``; for our
    DP tasks also the time RGP's power iteration took within it."""
    extras: Dict[str, float] = {}

    def time_power_iteration(dp_trainer):
        """Instrumentation of our own DP trainer's carrier schedule, for the
        power-iteration share; looked up at every update since the task
        builds its trainer at the first update (and may build a new one)."""
        carriers = getattr(dp_trainer, "carriers", None)
        if carriers is None or not carriers.modules or hasattr(carriers, "_bench_timed"):
            return
        compute = carriers.compute

        def timed_compute(update_num):
            _synchronize(device)
            start = time.perf_counter()
            compute(update_num)
            _synchronize(device)
            extras["power_iteration_seconds"] = time.perf_counter() - start

        carriers.compute = timed_compute
        carriers._bench_timed = True

    def step():
        extras.clear()
        time_power_iteration(getattr(task, "dp_trainer", None))
        trainer.train_step([sample])
        return dict(extras)

    return step


def build_fairseq_run(argv: List[str], s: "Settings", device, memory: "PeakMemory", private: bool,
                      dp_args: Optional[List[str]]):
    """(cfg, task, model, criterion) of a fairseq command line plus the settings
    every fairseq row shares (optimizer, batch, seed, device, DP clip and σ);
    peak memory counts from just before the model is built."""
    import torch
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = argv + [
        "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", str(s.lr),
        "--lr-scheduler", "fixed", "--clip-norm", "0", "--batch-size", str(s.batch),
        "--seed", str(s.seed), "--num-workers", "0",
    ]
    if device.type == "cpu":
        argv.append("--cpu")
    if private:
        argv += ["--dp-clip-norm", str(s.clip_norm), "--dp-noise-multiplier",
                 str(s.noise_multiplier), *(dp_args or [])]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    torch.manual_seed(s.seed)
    task = tasks.setup_task(cfg.task)
    memory.start()
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return cfg, task, model, criterion


def fairseq_method(arch: str, dp_args: Optional[List[str]] = None, head_only: bool = False):
    """A row trained by fairseq's ``Trainer``: plain ``sentence_prediction`` when
    ``dp_args`` is None, else ``dp_sentence_prediction`` with those flags."""

    def build(s: Settings, device, memory: PeakMemory):
        import torch
        from fairseq.models import ARCH_MODEL_REGISTRY
        from fairseq.trainer import Trainer

        import fairseq_dp

        if arch not in ARCH_MODEL_REGISTRY:
            raise MethodUnavailable(f"--arch {arch} is not registered in this checkout")
        private = dp_args is not None
        argv = [
            _write_fairseq_dicts(s), "--user-dir", os.path.dirname(fairseq_dp.__file__),
            "--task", "dp_sentence_prediction" if private else "sentence_prediction",
            "--criterion", "dp_sentence_prediction" if private else "sentence_prediction",
            "--arch", arch, "--encoder-layers", str(s.layers), "--encoder-embed-dim", str(s.hidden),
            "--encoder-ffn-embed-dim", str(s.ffn), "--encoder-attention-heads", str(s.heads),
            "--num-classes", "2", "--max-positions", str(max(512, s.seq_len)),
            "--init-token", "0", "--separator-token", "2",
        ]
        cfg, task, model, criterion = build_fairseq_run(argv, s, device, memory, private, dp_args)
        if head_only:
            for name, param in model.named_parameters():
                param.requires_grad_(name.startswith("classification_heads."))
        if private:
            task.configure_privacy(SST2_TRAIN_SIZE)
        trainer = Trainer(cfg, task, model, criterion)

        tokens, labels = _synthetic_batch(
            s, task.source_dictionary.bos(), torch.Generator().manual_seed(s.seed)
        )
        sample = {
            "id": torch.arange(s.batch),
            "nsentences": s.batch,
            "ntokens": s.batch * s.seq_len,
            "net_input": {"src_tokens": tokens, "src_lengths": torch.full((s.batch,), s.seq_len)},
            "target": labels,
        }
        return _trainer_step(task, trainer, sample, device), {"trainable_parameters": _trainable(model)}

    return build


def opacus_full(s: Settings, device, memory: PeakMemory):
    """Opacus per-example DP-SGD (``GradSampleModule`` hooks, ``DPOptimizer``) on
    a plain PyTorch post-LayerNorm encoder of the same shape as fairseq's
    RoBERTa. Every parameter but the token and position embeddings is trained:
    instantiating per-example embedding gradients (batch x vocab x hidden floats)
    is what DP users of Opacus avoid, and freezing them only makes the peer faster."""
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from .opacus_model import PostLNEncoderClassifier

    torch.manual_seed(s.seed)
    memory.start()
    model = PostLNEncoderClassifier(
        vocab=s.vocab, max_positions=max(512, s.seq_len), layers=s.layers, hidden=s.hidden,
        heads=s.heads, ffn=s.ffn, num_classes=2,
    ).to(device)
    model.embed_tokens.weight.requires_grad_(False)
    model.embed_positions.weight.requires_grad_(False)
    model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = DPOptimizer(
        torch.optim.Adam(params, lr=s.lr, betas=(0.9, 0.98)),
        noise_multiplier=s.noise_multiplier,
        max_grad_norm=s.clip_norm,
        expected_batch_size=s.batch,
        loss_reduction="mean",
    )
    tokens, labels = _synthetic_batch(s, 0, torch.Generator().manual_seed(s.seed))
    tokens, labels = tokens.to(device), labels.to(device)

    def step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(tokens), labels)
        loss.backward()
        optimizer.step()
        return {}

    return step, {"trainable_parameters": sum(p.numel() for p in params)}


# --------------------------------------------------------------- LM methods
def _write_lm_dict(s: Settings) -> str:
    """A dp_language_modeling / language_modeling data directory with just
    the dictionary (the rows are fed their batch directly): ``s.vocab - 4``
    lines ``"{i} 1"`` as ``fairseq-dp-prepare-lm`` writes GPT-2's (GPT-2 ids as
    decimal strings), after which fairseq's 4 specials make ``s.vocab`` rows."""
    data = tempfile.mkdtemp(prefix="fairseq_dp_bench_lm_")
    atexit.register(shutil.rmtree, data, ignore_errors=True)
    with open(os.path.join(data, "dict.txt"), "w") as f:
        f.writelines(f"{i} 1\n" for i in range(s.vocab - 4))
    return data


def _lm_batch(s: Settings, eos: int, generator):
    """Plain-text examples as ``dp_language_modeling`` collates them: the item
    is ``tokens + [eos]`` (``seq_len`` tokens in all, no padding), the input
    ``[eos] + item[:-1]``, the target the item, every position in the loss."""
    import torch

    item = torch.randint(4, s.vocab, (s.batch, s.seq_len), generator=generator)
    item[:, -1] = eos
    source = torch.cat([torch.full((s.batch, 1), eos), item[:, :-1]], dim=1)
    return source, item


def gpt2_shape_flags(s: Settings) -> List[str]:
    """fairseq ``transformer_lm`` flags for GPT-2's shape at the preset's sizes.
    ``--decoder-input-dim`` / ``--decoder-output-dim`` always: fairseq's command
    line otherwise makes them 512 whatever ``--decoder-embed-dim`` is (and adds
    projection matrices GPT-2 does not have)."""
    return [
        "--decoder-layers", str(s.layers), "--decoder-embed-dim", str(s.hidden),
        "--decoder-input-dim", str(s.hidden), "--decoder-output-dim", str(s.hidden),
        "--decoder-ffn-embed-dim", str(s.ffn), "--decoder-attention-heads", str(s.heads),
        "--decoder-learned-pos", "--no-scale-embedding", "--activation-fn", "gelu_accurate",
        "--decoder-normalize-before", "--dropout", "0.1", "--attention-dropout", "0.1",
        "--tokens-per-sample", str(s.seq_len), "--max-target-positions", str(max(GPT2_POSITIONS, s.seq_len)),
    ]


def lm_method(arch: str, dp_args: Optional[List[str]] = None, tied: bool = True,
              model_args: Optional[List[str]] = None):
    """A causal-LM row trained by fairseq's ``Trainer``: fairseq's own
    ``language_modeling`` task and ``cross_entropy`` criterion when ``dp_args``
    is None, else ``dp_language_modeling`` (task and criterion) with those
    flags. ``tied``: the output projection shares the token embedding (GPT-2);
    ``model_args``: the architecture's own flags (LoRA's, RGP's)."""

    def build(s: Settings, device, memory: PeakMemory):
        import torch
        from fairseq.models import ARCH_MODEL_REGISTRY
        from fairseq.trainer import Trainer

        import fairseq_dp

        if arch not in ARCH_MODEL_REGISTRY:
            raise MethodUnavailable(f"--arch {arch} is not registered in this checkout")
        private = dp_args is not None
        argv = [
            _write_lm_dict(s), "--user-dir", os.path.dirname(fairseq_dp.__file__),
            "--task", "dp_language_modeling" if private else "language_modeling",
            "--criterion", "dp_language_modeling" if private else "cross_entropy",
            "--arch", arch, *gpt2_shape_flags(s),
            *(["--share-decoder-input-output-embed"] if tied else []), *(model_args or []),
        ]
        cfg, task, model, criterion = build_fairseq_run(argv, s, device, memory, private, dp_args)
        decoder = model.decoder
        if tied != (decoder.output_projection.weight is decoder.embed_tokens.weight):
            raise RuntimeError(f"{arch}: the output projection is {'not ' if tied else ''}tied "
                               "to the token embedding, against this row's definition")
        if private:
            task.configure_privacy(E2E_TRAIN_SIZE)
        trainer = Trainer(cfg, task, model, criterion)

        source, target = _lm_batch(s, task.source_dictionary.eos(), torch.Generator().manual_seed(s.seed))
        sample = {
            "id": torch.arange(s.batch),
            "nsentences": s.batch,
            "ntokens": s.batch * s.seq_len,
            "net_input": {"src_tokens": source, "src_lengths": torch.full((s.batch,), s.seq_len)},
            "target": target,
        }
        return _trainer_step(task, trainer, sample, device), {"trainable_parameters": _trainable(model)}

    return build


def opacus_lm(grad_sample_mode: str):
    """Opacus 1.6 ``PrivacyEngine.make_private`` on :class:`PreLNCausalLM`
    (``opacus_lm.py``), every parameter trained as in ``dp_full_ghost``, with
    ``grad_sample_mode`` ``"ghost"`` (ghost clipping: two backward passes,
    ghost norms for Linear and Embedding, per-example gradients of the
    LayerNorms) or ``"hooks"`` (per-example gradients of every parameter).
    Same batch, Adam, σ and C as the DP rows; an example's loss is the sum
    over its tokens (``loss_reduction="sum"``), as in ``dp_language_modeling``.
    ``poisson_sampling=False``: the loader is only there because
    ``make_private`` wants one; every update gets the same fixed batch."""

    def build(s: Settings, device, memory: PeakMemory):
        import torch
        from opacus import PrivacyEngine

        from .opacus_lm import PreLNCausalLM

        torch.manual_seed(s.seed)
        memory.start()
        model = PreLNCausalLM(
            vocab=s.vocab, max_positions=max(GPT2_POSITIONS, s.seq_len), layers=s.layers,
            hidden=s.hidden, heads=s.heads, ffn=s.ffn,
        ).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=s.lr, betas=(0.9, 0.98))
        source, target = _lm_batch(s, 2, torch.Generator().manual_seed(s.seed))
        source, target = source.to(device), target.to(device)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(source, target), batch_size=s.batch)
        criterion = torch.nn.CrossEntropyLoss(reduction="sum")
        private = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
            noise_multiplier=s.noise_multiplier, max_grad_norm=s.clip_norm, loss_reduction="sum",
            poisson_sampling=False, grad_sample_mode=grad_sample_mode,
        )
        if grad_sample_mode == "ghost":
            # make_private returns (model, optimizer, criterion, loader) in this mode:
            # the criterion wraps the two backward passes into loss.backward()
            model, optimizer, criterion, _ = private
        else:
            model, optimizer, _ = private
        shape = (s.batch, s.seq_len)

        def step():
            model.train()
            optimizer.zero_grad(set_to_none=True)
            logits = model(source)
            if grad_sample_mode == "ghost":
                # shape: the per-token losses are summed per example (the privacy unit)
                loss = criterion(logits.reshape(-1, s.vocab), target.reshape(-1), shape=shape)
            else:
                loss = criterion(logits.reshape(-1, s.vocab), target.reshape(-1))
            loss.backward()
            optimizer.step()
            return {}

        return step, {"trainable_parameters": _trainable(model)}

    return build


METHODS: Dict[str, Callable] = {
    "nonprivate_full": fairseq_method("roberta"),
    "nonprivate_head": fairseq_method("roberta", head_only=True),
    "rgp_r1": fairseq_method("roberta_rgp", ["--rgp-rank", "1"]),
    "rgp_r8": fairseq_method("roberta_rgp", ["--rgp-rank", "8"]),
    "dp_ghost_full": fairseq_method("roberta", ["--dp-clipping", "ghost"]),
    "dp_lora": fairseq_method("roberta_lora", ["--lora-rank", "16"]),
    "opacus_full": opacus_full,
}

# DP-LoRA as Yu et al.'s GPT-2 recipe: rank 4, alpha 32, adapters on q and v
LM_LORA_ARGS = ["--lora-rank", "4", "--lora-alpha", "32", "--lora-targets", "q,v"]
LM_METHODS: Dict[str, Callable] = {
    # GPT-2 as users train it without privacy: output projection tied to the embedding
    "nonprivate_full": lm_method("transformer_lm"),
    # the model of dp_full_ghost and the Opacus rows without privacy: its own
    # output weight (vocab x hidden more parameters, gradients, Adam state)
    "nonprivate_full_untied": lm_method("transformer_lm", tied=False),
    "nonprivate_lora": lm_method("transformer_lm_lora", model_args=[*LM_LORA_ARGS, "--non-private-baseline"]),
    "dp_lora": lm_method("transformer_lm_lora", [], model_args=LM_LORA_ARGS),
    "dp_full_ghost": lm_method("transformer_lm", ["--dp-clipping", "ghost"], tied=False),
    "rgp_r1": lm_method("transformer_lm_rgp", [], model_args=["--rgp-rank", "1"]),
    "rgp_r8": lm_method("transformer_lm_rgp", [], model_args=["--rgp-rank", "8"]),
    "opacus_ghost": opacus_lm("ghost"),
    "opacus_hooks": opacus_lm("hooks"),
}


def methods_of(kind: str) -> Dict[str, Callable]:
    return LM_METHODS if kind == LM else METHODS


def method_builder(name: str, kind: str = CLASSIFICATION) -> Callable:
    table = methods_of(kind)
    if name in table:
        return table[name]
    if name.startswith("rgp_r") and name[5:].isdigit():  # --ranks beyond 1 and 8
        if kind == LM:
            return lm_method("transformer_lm_rgp", [], model_args=["--rgp-rank", name[5:]])
        return fairseq_method("roberta_rgp", ["--rgp-rank", name[5:]])
    raise KeyError(name)


# --------------------------------------------------------------- workers
def _worker(conn, name: str, settings: Settings) -> None:
    import logging
    import warnings

    # fairseq's set-up logs and deprecation warnings would drown the table
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    memory = PeakMemory(device)
    try:
        step, info = method_builder(name, settings.kind)(settings, device, memory)
    except MethodUnavailable as e:
        conn.send(("unavailable", str(e)))
        return
    except Exception as e:  # the parent reports it and goes on with the others
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", info))
    while True:
        command = conn.recv()
        if command == "step":
            _synchronize(device)
            start = time.perf_counter()
            try:
                extras = step()
            except Exception as e:  # e.g. out of memory: the other rows go on
                conn.send(("failed", f"{type(e).__name__}: {e}"))
                return
            _synchronize(device)
            conn.send((time.perf_counter() - start, extras))
        elif command == "finish":
            conn.send({"peak_memory_bytes": memory.peak_bytes(), "memory_exact": memory.exact})
            return


def commit() -> str:
    """The checkout's commit, ``+dirty`` when tracked files differ from it."""
    try:
        sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def machine_description(settings: Settings) -> dict:
    import torch

    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": settings.threads,
        "device": settings.device,
        "load_average_start": list(os.getloadavg()),
    }
    try:
        import fairseq
        import opacus

        info["fairseq"] = fairseq.__version__
        info["opacus"] = opacus.__version__
    except ImportError:
        pass
    if settings.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return info


def run(settings: Settings, methods: List[str], log=print) -> dict:
    ctx = mp.get_context("spawn")
    workers = {}
    for name in methods:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, name, settings), daemon=True)
        proc.start()
        workers[name] = (proc, parent)
    machine = machine_description(settings)

    rows, notes, active = {}, {}, []
    for name, (proc, conn) in workers.items():
        try:
            status, payload = conn.recv()
        except EOFError:  # the worker died (out of memory, a crash in native code)
            status, payload = "error", f"the worker process exited with code {proc.exitcode}"
        if status == "ready":
            active.append(name)
            rows[name] = {"method": name, **payload}
        else:
            notes[name] = payload
            proc.join()
            log(f"skipped {name}: {payload}")

    times = {name: [] for name in active}
    extras = {name: [] for name in active}
    total_rounds = settings.warmup + settings.steps
    for round_index in range(total_rounds):
        # rotate the order so no method always runs right after the same one
        shift = round_index % max(len(active), 1)
        this_round, failed = {}, []
        for name in active[shift:] + active[:shift]:
            proc, conn = workers[name]
            conn.send("step")
            try:
                seconds, extra = conn.recv()
            except EOFError:  # killed in the step (out of memory, a crash in native code)
                proc.join()
                seconds, extra = "failed", f"the worker process exited with code {proc.exitcode}"
            if seconds == "failed":
                notes[name] = f"failed in update {round_index + 1}: {extra}"
                log(f"dropped {name}: {notes[name]}")
                failed.append(name)
                continue
            this_round[name] = seconds
            if round_index >= settings.warmup:
                times[name].append(seconds)
                extras[name].append(extra)
        for name in failed:
            workers[name][0].join()
            active.remove(name)
            del times[name], extras[name]
            rows.pop(name)
        warmup = " (warm-up)" if round_index < settings.warmup else ""
        log(f"round {round_index + 1}/{total_rounds}{warmup}: "
            + ", ".join(f"{n} {this_round[n]:.3f}s" for n in active))
    for name in active:
        proc, conn = workers[name]
        conn.send("finish")
        rows[name].update(conn.recv())
        proc.join()
    machine["load_average_end"] = list(os.getloadavg())

    base_times = times.get(BASELINE)
    for name in active:
        row = rows[name]
        median = statistics.median(times[name])
        row["seconds_per_update"] = median
        row["examples_per_second"] = settings.batch / median
        row["seconds_per_update_min"] = min(times[name])
        row["seconds_per_update_all"] = times[name]
        if base_times:
            row["time_ratio"] = statistics.median(t / b for t, b in zip(times[name], base_times))
            base_memory = rows[BASELINE]["peak_memory_bytes"]
            row["memory_ratio"] = row["peak_memory_bytes"] / base_memory if base_memory else None
        else:
            row["time_ratio"] = row["memory_ratio"] = None
        power = [e["power_iteration_seconds"] for e in extras[name] if "power_iteration_seconds" in e]
        if power:
            row["power_iteration_seconds"] = statistics.median(power)
            row["power_iteration_fraction"] = statistics.median(
                p / t for p, t in zip(power, times[name])
            )
    ordered = [rows[n] for n in methods if n in rows]
    empty = dict.fromkeys(("seconds_per_update", "examples_per_second", "peak_memory_bytes",
                           "time_ratio", "memory_ratio"))
    skipped = [{"method": n, **empty, "skipped": notes[n]} for n in methods if n in notes]
    return {
        "machine": machine,
        "settings": dataclasses.asdict(settings),
        "rows": ordered + skipped,
    }


def format_table(result: dict) -> str:
    lines = [
        f"{'method':<22} {'s/update':>9} {'ex/s':>8} {'peak MiB':>9} {'time x':>7} {'mem x':>7}  note",
    ]
    for row in result["rows"]:
        if "skipped" in row:
            lines.append(f"{row['method']:<22} {'-':>9} {'-':>8} {'-':>9} {'-':>7} {'-':>7}  skipped: {row['skipped']}")
            continue

        def ratio(v):
            return "-" if v is None else f"{v:.2f}"

        note = ""
        if "power_iteration_fraction" in row:
            note = f"power iteration {100 * row['power_iteration_fraction']:.1f}% of the update"
        lines.append(
            f"{row['method']:<22} {row['seconds_per_update']:>9.3f} {row['examples_per_second']:>8.1f} "
            f"{row['peak_memory_bytes'] / 2**20:>9.0f} {ratio(row['time_ratio']):>7} "
            f"{ratio(row['memory_ratio']):>7}  {note}"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Seconds per update and peak memory of non-private, RGP and peer DP "
        "fine-tuning on the same model shape and batch.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="minilm",
                        help="model shape, task and default batch: minilm (RoBERTa 6 x 384, "
                        "sentence classification, the CPU default), roberta-base (12 x 768, for a GPU), "
                        "gpt2-cpu (causal LM in GPT-2's shape, 4 x 256, GPT-2's vocabulary, batch "
                        "8 x 64, for a CPU) or gpt2-small (GPT-2 small, 12 x 768, batch 16 x 100, "
                        "for a GPU)")
    parser.add_argument("--quick", action="store_true",
                        help=f"small batch and few steps ({QUICK}), one thread unless --threads; "
                        "under a minute on 2 CPU cores")
    for field in ("layers", "hidden", "heads", "ffn", "vocab", "batch", "seq_len"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, help=f"override the preset's {field}")
    parser.add_argument("--warmup", type=int, help="unmeasured updates per method first (default 2)")
    parser.add_argument("--steps", type=int, help="measured updates per method (default 5, at least 5)")
    parser.add_argument("--ranks", type=int, nargs="+",
                        help="RGP ranks, one row rgp_r<rank> each (default 1 8)")
    parser.add_argument("--methods", nargs="+",
                        help="only these rows (nonprivate_full is always run); the preset's kind "
                        f"decides which exist: classification {list(METHODS)}, language model "
                        f"{list(LM_METHODS)}")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int,
                        help="torch threads per worker (default: all cores; 1 with --quick)")
    parser.add_argument("--json", metavar="PATH",
                        help="write every figure, the command, the commit and the machine description here")
    parser.add_argument("--note", help="free text kept in the JSON (e.g. what the checkout had that "
                        "its commit does not say)")
    return parser.parse_args(argv)


def settings_from_args(args) -> Settings:
    import torch

    values = dict(PRESETS[args.preset])
    values.update(warmup=2, steps=5)
    if args.quick:
        values.update(QUICK)
    for field in ("layers", "hidden", "heads", "ffn", "vocab", "batch", "seq_len", "warmup", "steps"):
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    if values["steps"] < 5:
        raise SystemExit("--steps must be at least 5 (the medians need them)")
    if values["warmup"] < 0:
        raise SystemExit("--warmup must be >= 0")
    if values["hidden"] % values["heads"]:
        raise SystemExit("--hidden must be a multiple of --heads")
    if values["vocab"] < 8:
        raise SystemExit("--vocab must be at least 8 (the dictionary's 4 or 5 special symbols come first)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # one thread for --quick: on a shared machine, several threads per worker on
    # busy cores wait on each other and a one-minute smoke test takes several
    threads = args.threads or (1 if args.quick else torch.get_num_threads())
    return Settings(preset=args.preset, device=device, threads=threads, **values)


def main(argv=None) -> None:
    args = parse_args(argv)
    settings = settings_from_args(args)
    ranks = args.ranks or [1, 8]
    table = methods_of(settings.kind)
    methods = []
    for name in table:
        if name == "rgp_r1":  # the RGP rows go where rgp_r1 is in the table
            methods += [f"rgp_r{rank}" for rank in ranks]
        elif not name.startswith("rgp_r"):
            methods.append(name)
    if args.methods:
        unknown = set(args.methods) - set(methods)
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)} for --preset {settings.preset}; "
                             f"known: {methods}")
        methods = [m for m in methods if m in args.methods or m == BASELINE]
    print(f"settings: {dataclasses.asdict(settings)}", flush=True)
    start = time.time()
    header = {
        "command": "python -m benchmarks.speed " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if args.note:
        header["note"] = args.note
    result = {**header, **run(settings, methods, log=lambda line: print(line, flush=True))}
    result["machine"]["wall_seconds"] = round(time.time() - start, 1)
    print()
    print(format_table(result))
    m = result["machine"]
    print(f"\n{m['cpu_model']}, {m['cpus_available']} cores, {settings.threads} torch threads, "
          f"device {settings.device}; load average {m['load_average_start'][0]:.2f} at start, "
          f"{m['load_average_end'][0]:.2f} at end; {m['wall_seconds']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
