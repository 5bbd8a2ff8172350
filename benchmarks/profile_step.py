# Copyright (c) fairseq_dp contributors. MIT license.
"""Where one method's update spends its time: torch.profiler's operator table
for a few updates of a ``benchmarks.speed`` row, built exactly as there.

``python -m benchmarks.profile_step rgp_r1 [--preset minilm|gpt2-cpu|...] [--batch 32] [--seq-len 64]``
"""

import argparse
import logging
import time
import warnings

from .speed import PRESETS, PeakMemory, Settings, method_builder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", help="a benchmarks.speed row, e.g. rgp_r1 or nonprivate_full")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="minilm")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--steps", type=int, default=3, help="profiled updates (after 2 warm-up)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--rows", type=int, default=30, help="operators to show")
    parser.add_argument("--sort", default="self_cpu_time_total")
    parser.add_argument("--shapes", action="store_true", help="one row per operator and input shapes")
    parser.add_argument("--trace", metavar="PATH", help="also write a Chrome trace here")
    args = parser.parse_args(argv)

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    import torch
    from torch.profiler import ProfilerActivity, profile

    if args.threads:
        torch.set_num_threads(args.threads)
    values = dict(PRESETS[args.preset])
    if args.batch:
        values["batch"] = args.batch
    if args.seq_len:
        values["seq_len"] = args.seq_len
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = Settings(preset=args.preset, warmup=2, steps=args.steps, device=device.type,
                        threads=torch.get_num_threads(), **values)
    step, _ = method_builder(args.method, settings.kind)(settings, device, PeakMemory(device))
    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities, record_shapes=args.shapes) as prof:
        for _ in range(args.steps):
            step()
    print(f"{args.method}: {(time.perf_counter() - start) / args.steps:.3f} s per profiled update "
          f"(profiler overhead included)")
    print(prof.key_averages(group_by_input_shape=args.shapes).table(sort_by=args.sort, row_limit=args.rows))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
