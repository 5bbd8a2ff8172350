# Copyright (c) fairseq_dp contributors. MIT license.
"""Seconds per update and peak memory of non-private, RGP and peer DP training.

``python -m benchmarks.speed [--preset minilm|roberta-base] [--quick] [--json PATH]``

Every method trains the same model shape on the same synthetic batch (fixed
batch size and sequence length, no padding), and every update is a complete
one, as users get it: for the fairseq rows, fairseq's own ``Trainer.train_step``
(forward, backward, the DP step where there is one, gradient norm, optimizer
step); for Opacus, forward, backward, ``DPOptimizer.step``.

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
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

BASELINE = "nonprivate_full"
SST2_TRAIN_SIZE = 67_349  # sets RGP's sampling rate; it does not change the cost

PRESETS = {
    # all-MiniLM-L6-v2 sizes (the project's CPU model)
    "minilm": dict(layers=6, hidden=384, heads=12, ffn=1536, vocab=30522, batch=32, seq_len=64),
    "roberta-base": dict(layers=12, hidden=768, heads=12, ffn=3072, vocab=50265, batch=32, seq_len=128),
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


def fairseq_method(arch: str, dp_args: Optional[List[str]] = None, head_only: bool = False):
    """A row trained by fairseq's ``Trainer``: plain ``sentence_prediction`` when
    ``dp_args`` is None, else ``dp_sentence_prediction`` with those flags."""

    def build(s: Settings, device, memory: PeakMemory):
        import torch
        from fairseq import options, tasks
        from fairseq.dataclass.utils import convert_namespace_to_omegaconf
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
            "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", str(s.lr),
            "--lr-scheduler", "fixed", "--clip-norm", "0", "--batch-size", str(s.batch),
            "--seed", str(s.seed), "--num-workers", "0",
        ]
        if device.type == "cpu":
            argv.append("--cpu")
        if private:
            argv += ["--dp-clip-norm", str(s.clip_norm), "--dp-noise-multiplier",
                     str(s.noise_multiplier), *dp_args]
        cfg = convert_namespace_to_omegaconf(
            options.parse_args_and_arch(options.get_training_parser(), argv)
        )
        torch.manual_seed(s.seed)
        task = tasks.setup_task(cfg.task)
        memory.start()
        model = task.build_model(cfg.model)
        criterion = task.build_criterion(cfg.criterion)
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

        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return step, {"trainable_parameters": trainable}

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


METHODS: Dict[str, Callable] = {
    "nonprivate_full": fairseq_method("roberta"),
    "nonprivate_head": fairseq_method("roberta", head_only=True),
    "rgp_r1": fairseq_method("roberta_rgp", ["--rgp-rank", "1"]),
    "rgp_r8": fairseq_method("roberta_rgp", ["--rgp-rank", "8"]),
    "dp_ghost_full": fairseq_method("roberta", ["--dp-clipping", "ghost"]),
    "dp_lora": fairseq_method("roberta_lora", ["--lora-rank", "16"]),
    "opacus_full": opacus_full,
}


def method_builder(name: str) -> Callable:
    if name in METHODS:
        return METHODS[name]
    if name.startswith("rgp_r") and name[5:].isdigit():  # --ranks beyond 1 and 8
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
        step, info = method_builder(name)(settings, device, memory)
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
            extras = step()
            _synchronize(device)
            conn.send((time.perf_counter() - start, extras))
        elif command == "finish":
            conn.send({"peak_memory_bytes": memory.peak_bytes(), "memory_exact": memory.exact})
            return


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
        this_round = {}
        for name in active[shift:] + active[:shift]:
            conn = workers[name][1]
            conn.send("step")
            seconds, extra = conn.recv()
            this_round[name] = seconds
            if round_index >= settings.warmup:
                times[name].append(seconds)
                extras[name].append(extra)
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
        f"{'method':<16} {'s/update':>9} {'ex/s':>8} {'peak MiB':>9} {'time x':>7} {'mem x':>7}  note",
    ]
    for row in result["rows"]:
        if "skipped" in row:
            lines.append(f"{row['method']:<16} {'-':>9} {'-':>8} {'-':>9} {'-':>7} {'-':>7}  skipped: {row['skipped']}")
            continue

        def ratio(v):
            return "-" if v is None else f"{v:.2f}"

        note = ""
        if "power_iteration_fraction" in row:
            note = f"power iteration {100 * row['power_iteration_fraction']:.1f}% of the update"
        lines.append(
            f"{row['method']:<16} {row['seconds_per_update']:>9.3f} {row['examples_per_second']:>8.1f} "
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
                        help="model shape and default batch: minilm (6 x 384, the CPU default) "
                        "or roberta-base (12 x 768, for a GPU)")
    parser.add_argument("--quick", action="store_true",
                        help=f"small batch and few steps ({QUICK}), one thread unless --threads; "
                        "under a minute on 2 CPU cores")
    for field in ("layers", "hidden", "heads", "ffn", "vocab", "batch", "seq_len"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, help=f"override the preset's {field}")
    parser.add_argument("--warmup", type=int, help="unmeasured updates per method first (default 2)")
    parser.add_argument("--steps", type=int, help="measured updates per method (default 5, at least 5)")
    parser.add_argument("--ranks", type=int, nargs="+",
                        help="RGP ranks, one row rgp_r<rank> each (default 1 8)")
    parser.add_argument("--methods", nargs="+", help="only these rows (nonprivate_full is always run)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int,
                        help="torch threads per worker (default: all cores; 1 with --quick)")
    parser.add_argument("--json", metavar="PATH", help="write every figure and the machine description here")
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
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # one thread for --quick: on a shared machine, several threads per worker on
    # busy cores wait on each other and a one-minute smoke test takes several
    threads = args.threads or (1 if args.quick else torch.get_num_threads())
    return Settings(preset=args.preset, device=device, threads=threads, **values)


def main(argv=None) -> None:
    args = parse_args(argv)
    settings = settings_from_args(args)
    ranks = args.ranks or [1, 8]
    methods = []
    for name in METHODS:
        if name == "rgp_r1":  # the RGP rows go where rgp_r1 is in the table
            methods += [f"rgp_r{rank}" for rank in ranks]
        elif not name.startswith("rgp_r"):
            methods.append(name)
    if args.methods:
        unknown = set(args.methods) - set(methods)
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; known: {list(METHODS)}")
        methods = [m for m in methods if m in args.methods or m == BASELINE]
    print(f"settings: {dataclasses.asdict(settings)}", flush=True)
    start = time.time()
    result = run(settings, methods, log=lambda line: print(line, flush=True))
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
