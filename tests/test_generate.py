"""``fairseq-dp-generate``: beam search / sampling from a causal LM, the prompt
conditioning but not scored.

The oracles are independent of the generator's machinery (attention cache,
SequenceGenerator, the prompt reader): the model's own full forward pass on
the whole sequence, recomputed from scratch at every step (a greedy loop with
the no-repeat-ngram rule written out again), the summed log-probabilities of
a hypothesis from that forward pass, the DP criterion's validation loss of an
example, and a merged LoRA checkpoint against the unmerged one.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

from fairseq_dp.errors import DPConfigError
from fairseq_dp.generate import GenerationSettings, Generator, read_prompts

from helpers import PLUGIN_DIR, TINY_LM, build, lm_data_dir, lm_train_args, randomize_lora_b

MAX_NEW = 10


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny random LM (float64, weights scaled up so its choices are not ties)."""
    data = lm_data_dir(tmp_path_factory, n_train=32, n_valid=8)
    cfg, task, model, criterion = build(lm_train_args(data, "--max-target-positions", "40"), dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return task, model.eval(), criterion


def full_log_probs(model, tokens):
    """(len, V): the model's next-token log-probabilities, one full forward pass."""
    with torch.no_grad():
        return model.get_normalized_probs(model(torch.tensor([tokens])), log_probs=True)[0]


def oracle_greedy(model, d, seq, max_new, min_new=1, ngram=0):
    """Greedy decoding by recomputing the whole sequence at every step."""
    tokens, out = list(seq), []
    for step in range(max_new + 1):
        lp = full_log_probs(model, tokens)[-1].clone()
        for special in (d.pad(), d.unk(), d.bos()):
            lp[special] = -math.inf
        if step < min_new:
            lp[d.eos()] = -math.inf
        if step == max_new:
            break
        if ngram:
            for i in range(len(out) - ngram + 1):
                if out[i : i + ngram - 1] == out[len(out) - ngram + 1 :]:
                    lp[out[i + ngram - 1]] = -math.inf
        t = int(lp.argmax())
        if t == d.eos():
            break
        out.append(t)
        tokens.append(t)
    return out


def oracle_score(model, seq, generated, lenpen):
    """fairseq's hypothesis score from one forward pass over the whole text:
    Σ log p(generated tokens and the final </s>) / (their number) ** lenpen."""
    eos = seq[0]
    full = list(seq) + list(generated) + [eos]
    lp = full_log_probs(model, full[:-1])
    total = sum(float(lp[len(seq) - 1 + i, full[len(seq) + i]]) for i in range(len(generated) + 1))
    return total / (len(generated) + 1) ** lenpen


def prompts_of(d, *lengths):
    """Conditioning sequences ``</s> w.. </s>`` of the given prompt lengths."""
    words = [d.index(s) for s in d.symbols[d.nspecial:]]
    return [[d.eos()] + words[3 * i : 3 * i + n] + [d.eos()] for i, n in enumerate(lengths)]


def generator(model, d, style="pair", **settings):
    base = dict(beam=1, lenpen=1.0, no_repeat_ngram_size=0, max_new_tokens=MAX_NEW)
    base.update(settings)
    return Generator(model, d, None, GenerationSettings(**base), style)


def test_greedy_equals_recomputing_the_whole_sequence_each_step(lm):
    task, model, _ = lm
    d = task.dictionary
    seqs = prompts_of(d, 1, 3, 3, 6, 2)
    results = generator(model, d).search(seqs, batch_size=2)
    for seq, (ids, score) in zip(seqs, results):
        assert ids == oracle_greedy(model, d, seq, MAX_NEW)
        assert score == pytest.approx(oracle_score(model, seq, ids, 1.0), abs=1e-5)
    # a control: the prompt matters (else the cache could be ignored unnoticed)
    assert len({tuple(ids) for ids, _ in results}) > 1


def test_no_repeat_ngram_covers_the_continuation_and_scores_stay_the_models(lm):
    task, model, _ = lm
    d = task.dictionary
    seqs = prompts_of(d, 2, 4)
    for n in (1, 2, 3):
        results = generator(model, d, no_repeat_ngram_size=n).search(seqs)
        for seq, (ids, score) in zip(seqs, results):
            assert ids == oracle_greedy(model, d, seq, MAX_NEW, ngram=n)
            grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
            assert len(grams) == len(set(grams))
            # blocked tokens take no mass from the others: the score is the model's
            assert score == pytest.approx(oracle_score(model, seq, ids, 1.0), abs=1e-5)
    # a control: without the rule this model repeats itself
    plain = generator(model, d).search(seqs)
    assert any(len(set(ids)) < len(ids) for ids, _ in plain)


def test_beam_search_scores_length_penalty_and_batching(lm):
    task, model, _ = lm
    d = task.dictionary
    seqs = prompts_of(d, 1, 3, 3, 5, 4, 2)
    g = generator(model, d, beam=5, lenpen=0.8, no_repeat_ngram_size=2)
    together = g.search(seqs, batch_size=4)
    alone = [g.search([s], batch_size=1)[0] for s in seqs]
    assert [ids for ids, _ in together] == [ids for ids, _ in alone]
    greedy = generator(model, d, lenpen=0.8, no_repeat_ngram_size=2).search(seqs)
    for seq, (ids, score), (gids, _) in zip(seqs, together, greedy):
        assert score == pytest.approx(oracle_score(model, seq, ids, 0.8), abs=1e-5)
        # beam search never returns worse than the greedy hypothesis, by the same score
        assert score >= oracle_score(model, seq, gids, 0.8) - 1e-6


def test_min_new_tokens_and_stop_tokens(lm):
    task, model, _ = lm
    d = task.dictionary
    seqs = prompts_of(d, 2, 3, 4)
    results = generator(model, d, min_new_tokens=4, max_new_tokens=6).search(seqs)
    for seq, (ids, _) in zip(seqs, results):
        assert ids == oracle_greedy(model, d, seq, 6, min_new=4)
        assert 4 <= len(ids) <= 6
    # stop tokens: the hypothesis ends right after the first one (kept), at no extra cost
    free = generator(model, d).search(seqs)
    stop = free[0][0][1]
    g = generator(model, d)
    g.wrapped.decoder.stop_ids = torch.tensor([stop])
    for seq, (ids, score), (fids, _) in zip(seqs, g.search(seqs), free):
        if stop in fids:
            assert ids == fids[: fids.index(stop) + 1]
            # the forced </s> adds 0 to the summed log-probability (and 1 to the length)
            full = oracle_score(model, seq, ids, 1.0) * (len(ids) + 1)
            lp_eos = float(full_log_probs(model, list(seq) + ids)[-1, d.eos()])
            assert score * (len(ids) + 1) == pytest.approx(full - lp_eos, abs=1e-5)
        else:
            assert ids == fids


def test_text_style_continues_the_prompt(lm):
    task, model, _ = lm
    d = task.dictionary
    seqs = [s[:-1] for s in prompts_of(d, 2, 5)]  # "</s> w w": no separator
    results = generator(model, d, style="text").search(seqs)
    for seq, (ids, _) in zip(seqs, results):
        assert ids == oracle_greedy(model, d, seq, MAX_NEW)


def test_sampling_is_seeded_and_follows_the_model(lm):
    task, model, _ = lm
    d = task.dictionary
    seqs = prompts_of(d, 2, 3) * 3
    a = generator(model, d, sampling=True, seed=5).search(seqs)
    b = generator(model, d, sampling=True, seed=5).search(seqs)
    c = generator(model, d, sampling=True, seed=6).search(seqs)
    assert a == b and a != c
    # top-k 1 is greedy
    k1 = generator(model, d, sampling=True, top_k=1).search(seqs[:2])
    assert [ids for ids, _ in k1] == [oracle_greedy(model, d, s, MAX_NEW) for s in seqs[:2]]


@pytest.mark.parametrize("arch", [
    ["--arch", "transformer_lm_lora", *TINY_LM[2:], "--lora-targets", "q,v,fc1"],
    ["--arch", "transformer_lm_rgp", *TINY_LM[2:], "--rgp-rank", "2"],
], ids=["lora", "rgp"])
def test_swapped_layers_are_read_on_the_cached_path(tmp_path_factory, arch):
    """LoRA and RGP swap q, v, ... for their own modules; the cached path (one
    token a call) must go through them exactly as the full forward pass does."""
    data = lm_data_dir(tmp_path_factory, n_train=16, n_valid=8, name="swapped")
    cfg, task, model, _ = build(lm_train_args(data, *arch), dtype=torch.float64)
    if "transformer_lm_lora" in arch:
        randomize_lora_b(model, std=0.5)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.eval()
    d = task.dictionary
    seqs = prompts_of(d, 2, 4, 4)
    results = generator(model, d, beam=3, no_repeat_ngram_size=2).search(seqs)
    for seq, (ids, score) in zip(seqs, results):
        assert score == pytest.approx(oracle_score(model, seq, ids, 1.0), abs=1e-5)
    greedy = generator(model, d).search(seqs)
    assert [ids for ids, _ in greedy] == [oracle_greedy(model, d, s, MAX_NEW) for s in seqs]


def test_the_cached_path_gives_the_validation_loss(lm):
    """Teacher-forcing a validation example's target through the generator's
    own model pieces (prompt reader, cache hand-over, continuation decoder)
    sums to the DP criterion's loss for that example."""
    task, model, criterion = lm
    task.load_dataset("valid")
    d = task.dictionary
    g = generator(model, d)
    for i in range(3):
        sample = task.dataset("valid").collater([task.dataset("valid")[i]])
        with torch.no_grad():
            loss, _, _ = criterion(model, sample, reduce=True)
        # the model reads </s> prompt </s> target and predicts target </s>
        tokens = sample["net_input"]["src_tokens"][0].tolist() + [d.eos()]
        sep = tokens.index(d.eos(), 1)
        context, target = tokens[: sep + 1], tokens[sep + 1 :]
        wrapped = g.wrapped
        enc = wrapped.encoder(torch.tensor([context[:-1]]), torch.tensor([context[-1]]))
        state, total = {}, 0.0
        prefix = [d.eos()]
        for t in target:
            out = wrapped.decoder(torch.tensor([prefix]), encoder_out=enc, incremental_state=state)
            lp = wrapped.get_normalized_probs((out[0][:, -1:], out[1]), log_probs=True)
            total -= float(lp[0, -1, t])
            prefix.append(t)
        # fairseq's attention softmax runs in float32 even for a float64 model
        assert total == pytest.approx(float(loss), rel=1e-6)


def test_read_prompts_formats_and_mistakes(tmp_path):
    csv_file = tmp_path / "e2e.csv"
    csv_file.write_text('mr,ref\n"name[A], food[B]",one\n"name[C]",two\n"name[A], food[B]",three\n')
    assert read_prompts(str(csv_file), "e2e") == ["name[A], food[B]", "name[C]"]
    test_file = tmp_path / "test.csv"
    test_file.write_text('MR\n"name[X]"\n')
    assert read_prompts(str(test_file), "e2e") == ["name[X]"]
    tsv = tmp_path / "p.tsv"
    tsv.write_text("a b\tc\nd\te\n")
    assert read_prompts(str(tsv), "tsv") == ["a b", "d"]
    with pytest.raises(DPConfigError, match="no such file"):
        read_prompts(str(tmp_path / "missing.csv"), "e2e")
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,target\nx,y\n")
    with pytest.raises(DPConfigError, match="'mr' column"):
        read_prompts(str(bad), "e2e")
    for settings, message in (
        (dict(beam=0), "--beam"),
        (dict(sampling=True, beam=4), "one continuation"),
        (dict(min_new_tokens=9, max_new_tokens=4), "--min-new-tokens"),
        (dict(top_p=0.9), "only apply with --sampling"),
    ):
        with pytest.raises(DPConfigError, match=message):
            GenerationSettings(**settings).check()


# ------------------------------------- the command line on real checkpoints

PAIRS = [
    ("name[The Mill], food[Italian]", "The Mill serves Italian food."),
    ("name[Aromi], area[riverside]", "Aromi is by the riverside."),
    ("name[Zizzi], eatType[pub]", "Zizzi is a pub."),
    ("name[Cotto], food[French], area[city centre]", "Cotto serves French food in the city centre."),
] * 4


def run_cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A plain transformer_lm trained 3 DP updates, a LoRA one from it, and the merge."""
    root = tmp_path_factory.mktemp("gen_cli")
    csv_path = root / "train.csv"
    with open(csv_path, "w") as f:
        f.write("mr,ref\n" + "".join(f'"{mr}","{ref}"\n' for mr, ref in PAIRS))
    from fairseq_dp.prepare_lm import prepare

    prepare("e2e", str(csv_path), str(root / "bin"), valid=[str(csv_path)], log=lambda *a: None)
    common = [str(root / "bin"), "--user-dir", PLUGIN_DIR, "--cpu", "--task", "dp_language_modeling",
              "--criterion", "dp_language_modeling", "--tokens-per-sample", "48", "--optimizer", "adam",
              "--lr", "3e-2", "--lr-scheduler", "fixed", "--batch-size", "8", "--max-update", "3",
              "--dp-clip-norm", "1.0", "--dp-delta", "1e-3", "--dp-noise-multiplier", "0.5",
              "--no-epoch-checkpoints", "--num-workers", "0", "--log-format", "simple",
              "--max-target-positions", "64"]
    done = run_cli("-m", "fairseq_cli.train", *common, *TINY_LM, "--share-decoder-input-output-embed",
                   "--save-dir", str(root / "plain"),
                   cwd=str(root))
    assert done.returncode == 0, done.stderr[-3000:]
    lora = ["--arch", "transformer_lm_lora", *TINY_LM[2:], "--lora-targets", "q,v",
            "--finetune-from-model", str(root / "plain" / "checkpoint_last.pt")]
    done = run_cli("-m", "fairseq_cli.train", *common, *lora, "--save-dir", str(root / "lora"), cwd=str(root))
    assert done.returncode == 0, done.stderr[-3000:]
    from fairseq_dp.merge_lora import merge_lora_checkpoint

    merge_lora_checkpoint(str(root / "lora" / "checkpoint_last.pt"), str(root / "merged.pt"))
    return root, csv_path


def test_cli_lora_and_merged_checkpoints_give_the_same_hypotheses(trained):
    root, csv_path = trained
    outputs = {}
    for name in ("lora/checkpoint_last.pt", "merged.pt"):
        out = root / (name.replace("/", "_") + ".txt")
        done = run_cli("-m", "fairseq_dp.generate", str(root / name), str(csv_path), "--output", str(out),
                       "--beam", "3", "--max-new-tokens", "8", "--no-progress", cwd=str(root))
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[name] = out.read_text().splitlines()
        assert len(outputs[name]) == 4  # one line per distinct MR
    assert outputs["lora/checkpoint_last.pt"] == outputs["merged.pt"]


def test_cli_mistakes_get_a_message(trained, tmp_path):
    from fairseq_dp.generate import main

    root, csv_path = trained
    ckpt = str(root / "plain" / "checkpoint_last.pt")
    for args, message in (
        ([str(tmp_path / "none.pt"), str(csv_path)], "no such checkpoint"),
        ([ckpt, str(csv_path), "--data", str(tmp_path)], "has no dict.txt"),
        ([ckpt, str(tmp_path / "none.csv")], "no such file"),
        ([ckpt, str(csv_path), "--sampling", "--beam", "3"], "one continuation"),
        ([ckpt, str(csv_path), "--stop-token", "riverside restaurant"], "exactly one"),
    ):
        with pytest.raises(DPConfigError, match=message):
            main(args)
    # on the command line: the message alone, no traceback
    done = run_cli("-m", "fairseq_dp.generate", ckpt, str(csv_path), "--data", str(tmp_path), cwd=str(tmp_path))
    assert done.returncode != 0 and "has no dict.txt" in done.stderr
    assert "Traceback" not in done.stderr
