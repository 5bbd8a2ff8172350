"""Seconds per micro-batch step of DP full fine-tuning (ghost, materialize),
DP-LoRA and RGP against the same model's non-private forward + backward.

    python scripts/bench_clipping_modes.py [--layers 6 --dim 384 --batch 64 --steps 5]

Numbers, not a test. On a shared machine wall time varies with the load, so
the process's CPU time is printed too (with ``--threads 1`` it is the work
done, whatever else runs). The data is
the generated task of ``fairseq_dp.data.synthetic`` (short sentences, small
vocabulary), so the embedding table is small next to a real one.
"""

import argparse
import statistics
import tempfile
import time

import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import fairseq_dp
from fairseq_dp.data.synthetic import make_synthetic_dataset

PLUGIN = fairseq_dp.__path__[0]


def setup(data, arch, extra, batch, dp=True):
    argv = [data, "--user-dir", PLUGIN, "--cpu", "--task", "dp_sentence_prediction" if dp else "sentence_prediction",
            "--criterion", "dp_sentence_prediction" if dp else "sentence_prediction",
            "--num-classes", "2", "--init-token", "0", "--separator-token", "2", "--max-positions", "128",
            "--optimizer", "adam", "--lr", "1e-3", "--batch-size", str(batch), "--seed", "1",
            "--dropout", "0", "--attention-dropout", "0", *arch, *extra]
    if dp:
        argv += ["--dp-noise-multiplier", "1.0", "--dp-clip-norm", "1.0"]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    torch.manual_seed(1)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    dataset = task.dataset("train")
    sample = dataset.collater([dataset[i] for i in range(batch)])
    return task, model, criterion, sample


def time_steps(step, steps):
    """Median wall and CPU seconds per step."""
    step()  # warm-up
    wall, cpu = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = ["--encoder-layers", str(args.layers), "--encoder-embed-dim", str(args.dim),
             "--encoder-ffn-embed-dim", str(4 * args.dim), "--encoder-attention-heads", str(args.heads)]
    data = make_synthetic_dataset(tempfile.mkdtemp(), n_train=max(256, args.batch), n_valid=16)
    rows = [
        ("non-private full fine-tuning", ["--arch", "roberta", *sizes], [], False),
        ("DP full, --dp-clipping ghost", ["--arch", "roberta", *sizes], ["--dp-clipping", "ghost"], True),
        ("DP full, --dp-clipping materialize", ["--arch", "roberta", *sizes], ["--dp-clipping", "materialize"], True),
        ("DP-LoRA r=16 (ghost)", ["--arch", "roberta_lora", *sizes, "--lora-rank", "16"], [], True),
        ("RGP r=1", ["--arch", "roberta_rgp", *sizes, "--rgp-rank", "1"], [], True),
    ]
    results = []
    for name, arch, extra, dp in rows:
        task, model, criterion, sample = setup(data, arch, extra, args.batch, dp)
        model.train()
        if dp:
            def step():
                for q in model.parameters():
                    q.grad = None
                task.train_step(sample, model, criterion, None, 0)
        else:
            def step():
                model.zero_grad(set_to_none=True)
                loss, _, _ = criterion(model, sample)
                loss.backward()
        wall, cpu = time_steps(step, args.steps)
        results.append((name, wall, cpu))
        tokens = sample["net_input"]["src_tokens"].shape
        print(f"{name:38s} wall {wall:7.3f} s/step  cpu {cpu:7.3f} s/step  "
              f"(batch {tokens[0]} x {tokens[1]} tokens)", flush=True)
    _, base_wall, base_cpu = results[0]
    print("\nrelative to non-private:")
    for name, wall, cpu in results:
        print(f"{name:38s} wall {wall / base_wall:5.2f}x  cpu {cpu / base_cpu:5.2f}x")


if __name__ == "__main__":
    main()
