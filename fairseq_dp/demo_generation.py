# Copyright (c) fairseq_dp contributors. MIT license.
"""``make demo-generation``: private text generation, end to end, on a fresh machine.

1. Generates a small table-to-text task (``fairseq_dp.data.restaurants``):
   E2E-like meaning representations (``name[The Old Mill], eatType[pub],
   food[Italian], area[riverside]``) with template sentences, as a "private"
   train/valid set and a test set of attribute combinations that no training
   MR has; and "public" text about other places, with no MR in it.
2. Tokenizes both with GPT-2's BPE through ``fairseq-dp-prepare-lm`` (``--format
   text`` for the public lines, ``--format e2e`` for the private pairs; offline).
3. Pre-trains a tiny GPT-2-shaped ``transformer_lm`` (learned positions,
   ``gelu_accurate``, pre-LayerNorm, tied embedding) on the public text, without
   privacy, with fairseq's own ``language_modeling`` task.
4. Fine-tunes it with DP-LoRA (``--task dp_language_modeling --arch
   transformer_lm_lora``) on the private pairs under a target ε, streaming
   fairseq's progress.
5. Decodes the test MRs with beam search (``fairseq_dp.generate``), prints a few
   MR -> sentence examples and the E2E challenge's corpus BLEU
   (``fairseq_dp.eval_e2e``: mteval-v13a, case-insensitive, multi-reference)
   against the template references, for the fine-tuned model and for the public model before
   fine-tuning, and the privacy spent (ε, δ, σ, updates).

Everything goes under ``--out``; ``results.json`` there holds the numbers.
The guarantee covers the private training pairs; the per-epoch validation
loss on the private validation pairs is printed outside it (as in any
fairseq run), and the reported BLEU is that of ``checkpoint_last.pt``, not
of a checkpoint picked on them.
``--quick`` runs the same steps at a size that takes about a minute (for the
tests); its BLEU means nothing.
"""

import argparse
import contextlib
import json
import os
import sys
import time

from .demo import run, values
from .errors import DPConfigError

PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))

# what the flags default to, and what --quick changes (any flag given on the
# command line wins over both)
FULL = {
    "train_examples": 1200, "valid_examples": 120, "test_mrs": 100, "refs_per_test": 5,
    "public_places": 2000, "pretrain_updates": 200, "pretrain_batch": 8, "pretrain_lr": 5e-3,
    "epochs": 1, "batch_size": 60, "micro_batch": 20, "lr": 1e-2, "beam": 5,
}
QUICK = {
    "train_examples": 100, "valid_examples": 20, "test_mrs": 8, "refs_per_test": 3,
    "public_places": 100, "pretrain_updates": 6, "pretrain_batch": 4,
    "epochs": 1, "batch_size": 50, "micro_batch": 25, "beam": 2,
}


def size_flags(args) -> list:
    """The model's shape, the same for pre-training (``transformer_lm``) and
    fine-tuning (``transformer_lm_lora``): GPT-2's layout at a tiny size."""
    from .models.causal_lm import STOCK_GPT2_FLAGS

    return [
        *STOCK_GPT2_FLAGS, "--decoder-layers", str(args.layers), "--decoder-embed-dim", str(args.width),
        # fairseq's command line makes both 512 whatever the width (extra projections GPT-2 lacks)
        "--decoder-input-dim", str(args.width), "--decoder-output-dim", str(args.width),
        "--decoder-ffn-embed-dim", str(4 * args.width), "--decoder-attention-heads", str(args.heads),
        "--max-target-positions", str(args.positions),
        # a few hundred updates on repetitive text: dropout would only slow them down
        "--dropout", "0", "--attention-dropout", "0",
    ]


def logging_flags(log_file: str) -> list:
    return ["--log-format", "simple", "--log-interval", "1", "--log-file", log_file]


def pretrain_command(data: str, out: str, args) -> list:
    """fairseq's own ``language_modeling``, no privacy: the public model."""
    return [
        sys.executable, "-m", "fairseq_cli.train", data, "--user-dir", PLUGIN_DIR,
        "--cpu", "--num-workers", "0", "--seed", str(args.seed),
        "--task", "language_modeling", "--arch", "transformer_lm", *size_flags(args),
        # blocks of consecutive lines: the model learns to read across </s>,
        # which is how the fine-tuned model reads "</s> MR </s> sentence"
        "--tokens-per-sample", str(args.positions), "--sample-break-mode", "none",
        "--criterion", "cross_entropy", "--optimizer", "adam", "--adam-betas", "(0.9,0.98)",
        "--lr", str(args.pretrain_lr), "--lr-scheduler", "polynomial_decay",
        "--warmup-updates", str(max(1, args.pretrain_updates // 6)),
        "--total-num-update", str(args.pretrain_updates), "--max-update", str(args.pretrain_updates),
        "--batch-size", str(args.pretrain_batch), "--clip-norm", "1.0",
        # fairseq validates and saves checkpoint_last.pt when --max-update stops it
        "--save-dir", os.path.join(out, "public_lm"), "--no-epoch-checkpoints",
        *logging_flags(os.path.join(out, "pretrain.log")),
    ]


def finetune_command(data: str, restore: str, out: str, args) -> list:
    """DP-LoRA on the private pairs: only the adapters train, under the target ε."""
    return [
        sys.executable, "-m", "fairseq_cli.train", data, "--user-dir", PLUGIN_DIR,
        "--cpu", "--num-workers", "0", "--seed", str(args.seed),
        "--task", "dp_language_modeling", "--criterion", "dp_language_modeling",
        "--arch", "transformer_lm_lora", *size_flags(args),
        "--lora-rank", str(args.lora_rank), "--lora-alpha", str(args.lora_alpha),
        "--lora-targets", args.lora_targets,
        "--finetune-from-model", restore, "--tokens-per-sample", str(args.positions),
        "--optimizer", "adam", "--adam-betas", "(0.9,0.999)", "--lr", str(args.lr),
        "--lr-scheduler", "polynomial_decay", "--warmup-updates", str(args.warmup), "--clip-norm", "0",
        "--batch-size", str(args.micro_batch), "--update-freq", str(args.batch_size // args.micro_batch),
        "--max-epoch", str(args.epochs),
        "--dp-clip-norm", str(args.clip_norm), "--dp-target-epsilon", str(args.epsilon),
        "--dp-delta", str(args.delta), "--dp-accountant", "prv",
        "--save-dir", os.path.join(out, "checkpoints"), "--no-epoch-checkpoints",
        *logging_flags(os.path.join(out, "train.log")),
    ]


def write_data(out: str, args) -> dict:
    """The generated private CSVs and public text, and their binaries."""
    from .data.restaurants import write_private_csvs, write_public_text
    from .prepare_lm import prepare

    raw = os.path.join(out, "data")
    csvs = write_private_csvs(os.path.join(raw, "private"), args.train_examples, args.valid_examples,
                              args.test_mrs, args.refs_per_test, seed=args.seed)
    # the public text has a seed of its own: it must not be drawn from the private stream
    public_train = write_public_text(os.path.join(raw, "public", "train.txt"), args.public_places,
                                     seed=args.seed + 1000)
    public_valid = write_public_text(os.path.join(raw, "public", "valid.txt"), max(20, args.public_places // 50),
                                     seed=args.seed + 2000)
    print(f"[demo] generated {args.train_examples} private training pairs, {args.valid_examples} valid pairs and "
          f"{args.test_mrs} unseen test MRs ({args.refs_per_test} references each) in {raw}/private; "
          f"public text about {args.public_places} other places in {raw}/public", flush=True)

    def log(line):
        print("[demo]   " + line, flush=True)

    bins = {"public": os.path.join(out, "public-bin"), "private": os.path.join(out, "private-bin")}
    prepare("text", public_train, bins["public"], valid=[public_valid], max_length=args.positions, log=log)
    prepare("e2e", csvs["train"], bins["private"], valid=[csvs["valid"]], max_length=args.positions, log=log)
    print(f"[demo] tokenized with GPT-2's BPE into {bins['public']} and {bins['private']}", flush=True)
    return {**csvs, **bins}


def decode(checkpoint: str, data: str, prompts, args):
    from .generate import GenerationSettings, load_generator

    settings = GenerationSettings(beam=args.beam, lenpen=args.lenpen, no_repeat_ngram_size=args.no_repeat_ngram,
                                  max_new_tokens=args.max_new_tokens)
    # "pair" for the public model too: both read "</s> MR </s>" and stop at </s>
    # (the public model's own data was plain text, which would make it "</s> MR")
    generator = load_generator(checkpoint, data=data, settings=settings, prompt_style="pair")
    return generator.generate(prompts, batch_size=32)


def write_lines(path: str, lines) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("demo_output", "generation"),
                   help="where the data, checkpoints, logs and hypotheses go")
    p.add_argument("--quick", action="store_true",
                   help="every size small (about a minute; for the tests): the steps run, the scores mean nothing")
    d = p.add_argument_group("data (defaults: full size / --quick)")
    d.add_argument("--train-examples", type=int, help=f"private training pairs ({FULL['train_examples']} / "
                   f"{QUICK['train_examples']})")
    d.add_argument("--valid-examples", type=int, help="private validation pairs")
    d.add_argument("--test-mrs", type=int, help="test MRs, each an attribute combination no training MR has")
    d.add_argument("--refs-per-test", type=int, help="reference sentences per test MR")
    d.add_argument("--public-places", type=int, help="places the public text describes (2 to 4 lines each)")
    m = p.add_argument_group("model")
    # the layers cost little next to the 50k-token output layer, whose cost grows with the width
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--width", type=int, default=64, help="embedding width (the FFN is 4x)")
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--positions", type=int, default=128, help="learned positions, the longest example")
    t = p.add_argument_group("pre-training (public, not private)")
    t.add_argument("--pretrain-updates", type=int)
    t.add_argument("--pretrain-batch", type=int, help="blocks of --positions tokens per update")
    t.add_argument("--pretrain-lr", type=float)
    f = p.add_argument_group("DP-LoRA fine-tuning (private)")
    f.add_argument("--epsilon", type=float, default=8.0, help="target ε")
    f.add_argument("--delta", type=float, default=1e-5)
    f.add_argument("--epochs", type=int)
    f.add_argument("--batch-size", type=int, help="expected logical batch (Poisson sampling)")
    f.add_argument("--micro-batch", type=int)
    f.add_argument("--lr", type=float, help="peak learning rate (linear warm-up, then linear decay to 0)")
    f.add_argument("--warmup", type=int, default=1, help="warm-up updates")
    f.add_argument("--clip-norm", type=float, default=1.0, help="per-example gradient norm bound C")
    f.add_argument("--lora-rank", type=int, default=8)
    f.add_argument("--lora-alpha", type=float, default=16.0)
    f.add_argument("--lora-targets", default="q,k,v,out,fc1,fc2",
                   help="the matrices that get adapters, from q,k,v,out,fc1,fc2")
    g = p.add_argument_group("decoding")
    g.add_argument("--beam", type=int)
    g.add_argument("--lenpen", type=float, default=1.0)
    g.add_argument("--no-repeat-ngram", type=int, default=4, help="no n-gram of this size twice in a sentence")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--examples", type=int, default=5, help="MR -> sentence examples to print")
    g.add_argument("--skip-public-bleu", action="store_true",
                   help="do not decode with the public model (the contrast before fine-tuning)")
    p.add_argument("--seed", type=int, default=1, help="data and fairseq seed (the DP noise is secret randomness)")
    # measured on a shared 2-core machine: 2 threads were 1.5-2x slower to train and
    # 12x slower to decode than 1 whenever other jobs kept a core busy
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for training and decoding (default 1). More help only on cores that "
                   "nothing else uses: a thread that waits for a busy core stalls every small matrix product")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    for key, value in {**FULL, **(QUICK if args.quick else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("train_examples", "valid_examples", "test_mrs", "refs_per_test", "public_places", "layers",
                 "width", "heads", "positions", "pretrain_updates", "pretrain_batch", "epochs", "batch_size",
                 "micro_batch", "lora_rank", "beam", "max_new_tokens", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.batch_size % args.micro_batch:
        p.error("--batch-size must be a multiple of --micro-batch")
    return args


@contextlib.contextmanager
def thread_limit(threads):
    """``threads`` for the fairseq processes (OMP_NUM_THREADS) and for decoding
    in this one, restored afterwards (``main`` also runs inside the tests)."""
    import torch

    old_env, old_torch = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old_torch)
        if old_env is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = old_env


def main(argv=None):
    args = parse_args(argv)
    try:
        with thread_limit(args.threads):
            return run_demo(args)
    except DPConfigError as e:
        # a user mistake: its message alone, no traceback
        print(f"demo_generation: error: {e}", file=sys.stderr)
        sys.exit(2)


def run_demo(args):
    start = time.time()
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise DPConfigError(f"--out {args.out} is a file; give a directory (created if missing)")
    os.makedirs(args.out, exist_ok=True)
    timings = {}

    paths = write_data(args.out, args)
    timings["data"] = time.time() - start

    t = time.time()
    pre = run(pretrain_command(paths["public"], args.out, args))
    public_lm = os.path.join(args.out, "public_lm", "checkpoint_last.pt")
    timings["pretrain"] = time.time() - t
    public_loss = values(pre, "valid", "loss")
    print(f"[demo] public model: {public_lm} (valid loss {public_loss[-1] if public_loss else 'n/a'} "
          f"bits/token after {args.pretrain_updates} updates)", flush=True)

    t = time.time()
    lines = run(finetune_command(paths["private"], public_lm, args.out, args))
    timings["finetune"] = time.time() - t
    epsilon, sigma, updates = (values(lines, "train", key) for key in ("dp_epsilon", "dp_sigma", "num_updates"))
    if not epsilon:
        sys.exit("[demo] the fine-tuning run logged no training epoch (see train.log)")
    checkpoint = os.path.join(args.out, "checkpoints", "checkpoint_last.pt")

    from .eval_e2e import mteval_bleu, read_e2e_references

    t = time.time()
    mrs, refs = read_e2e_references(paths["test"])
    hyps = decode(checkpoint, paths["private"], mrs, args)
    write_lines(os.path.join(args.out, "hyps.txt"), hyps)
    # the E2E challenge's BLEU (fairseq-dp-eval-e2e's), on the 0-100 scale
    bleu = 100 * mteval_bleu(hyps, refs)
    public_bleu = None
    if not args.skip_public_bleu:
        public_hyps = decode(public_lm, paths["public"], mrs, args)
        write_lines(os.path.join(args.out, "hyps_public.txt"), public_hyps)
        public_bleu = 100 * mteval_bleu(public_hyps, refs)
    timings["generate"] = time.time() - t

    print(f"\n[demo] {min(args.examples, len(mrs))} of the {len(mrs)} test MRs (attribute combinations "
          "unseen in training) and the fine-tuned model's sentence:", flush=True)
    for mr, hyp in list(zip(mrs, hyps))[: args.examples]:
        print(f"  {mr}\n    -> {hyp}")
    result = {
        "bleu": bleu, "public_bleu": public_bleu, "epsilon": epsilon[-1], "delta": args.delta,
        "target_epsilon": args.epsilon, "sigma": sigma[-1], "updates": int(updates[-1]),
        "train_examples": args.train_examples, "test_mrs": len(mrs), "refs_per_test": args.refs_per_test,
        "seconds": {k: round(v, 1) for k, v in timings.items()}, "total_seconds": round(time.time() - start, 1),
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    contrast = "" if public_bleu is None else f" (the public model before fine-tuning: {public_bleu:.1f})"
    print(
        f"\n[demo] BLEU on {len(mrs)} unseen test MRs, {args.refs_per_test} references each: {bleu:.1f}{contrast}.\n"
        f"[demo] privacy: ε = {epsilon[-1]} at δ = {args.delta} (target ε = {args.epsilon}), "
        f"σ = {sigma[-1]}, {int(updates[-1])} updates of expected batch {args.batch_size} "
        f"over {args.train_examples} private examples.\n"
        f"[demo] done in {result['total_seconds']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in result['seconds'].items())}).\n"
        f"[demo] fine-tuned checkpoint: {checkpoint}; public model: {public_lm}\n"
        f"[demo] hypotheses: {os.path.join(args.out, 'hyps.txt')}; numbers: {os.path.join(args.out, 'results.json')}; "
        f"training log: {os.path.join(args.out, 'train.log')}",
        flush=True,
    )
    return result


if __name__ == "__main__":
    main()
