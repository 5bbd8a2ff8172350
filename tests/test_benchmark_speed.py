"""The speed benchmark's machinery, not its figures: peak memory against a
known allocation, a tiny run's JSON for each kind of preset (every row, ratios
from the recorded times), and that the Opacus peer of the language-model rows
computes what fairseq's ``transformer_lm`` computes. Speed itself is never
asserted here."""

import json
import os
import statistics
import sys

import pytest
import torch

from benchmarks.speed import LM_METHODS, PeakMemory, Settings, main

TOP_LEVEL = {"command", "commit", "date", "machine", "settings", "rows"}

BYTES = 200 * 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_memory_counts_a_freed_allocation():
    memory = PeakMemory(torch.device("cpu"))
    memory.start()
    block = torch.ones(BYTES // 4)  # ones, not empty: pages count once written
    del block
    peak = memory.peak_bytes()
    assert memory.exact
    assert BYTES <= peak < BYTES + 64 * 2**20, peak


def test_tiny_run_writes_every_row(tmp_path, capsys):
    path = tmp_path / "speed.json"
    main([
        "--layers", "1", "--hidden", "16", "--heads", "2", "--ffn", "32", "--vocab", "64",
        "--batch", "4", "--seq-len", "8", "--warmup", "0", "--steps", "5", "--threads", "1",
        "--ranks", "1", "2", "--methods", "rgp_r1", "rgp_r2", "dp_ghost_full", "dp_lora", "opacus_full",
        "--json", str(path),
    ])
    result = json.loads(path.read_text())
    assert set(result) == TOP_LEVEL
    assert result["command"].startswith("python -m benchmarks.speed --layers 1")
    assert result["settings"]["batch"] == 4 and result["machine"]["cpu_count"] >= 1
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == ["nonprivate_full", "rgp_r1", "rgp_r2", "dp_ghost_full", "dp_lora", "opacus_full"]
    check_measured_rows(rows, batch=4)
    assert 0 < rows["rgp_r1"]["power_iteration_fraction"] < 1
    assert "power_iteration_fraction" not in rows["opacus_full"]
    out = capsys.readouterr().out
    assert "rgp_r2" in out and "dp_ghost_full" in out


def check_measured_rows(rows, batch):
    """Every measured row's figures follow from its recorded update times and
    peak memory, as ratios to nonprivate_full's."""
    base = rows["nonprivate_full"]
    for name, row in rows.items():
        if "skipped" in row:
            continue
        times = row["seconds_per_update_all"]
        assert len(times) == 5 and row["seconds_per_update"] == statistics.median(times)
        assert row["examples_per_second"] == pytest.approx(batch / row["seconds_per_update"])
        paired = statistics.median(t / b for t, b in zip(times, base["seconds_per_update_all"]))
        assert row["time_ratio"] == pytest.approx(paired)
        assert row["peak_memory_bytes"] > 0
        assert row["memory_ratio"] == pytest.approx(row["peak_memory_bytes"] / base["peak_memory_bytes"])


TINY_LM = dict(layers=1, hidden=16, heads=2, ffn=32, vocab=64)


def test_tiny_language_model_run_writes_every_row(tmp_path, capsys):
    """The causal-LM preset's rows on a tiny shape: each is measured, or
    skipped with the reason (the LoRA and RGP archs when this checkout does
    not register them)."""
    path = tmp_path / "speed_lm.json"
    main([
        "--preset", "gpt2-cpu", "--quick", *(f"--{k}={v}" for k, v in TINY_LM.items()),
        "--batch", "3", "--seq-len", "6", "--warmup", "0", "--ranks", "1", "--note", "tiny",
        "--json", str(path),
    ])
    result = json.loads(path.read_text())
    assert set(result) == TOP_LEVEL | {"note"}
    assert result["settings"]["kind"] == "lm" and result["settings"]["vocab"] == 64
    rows = {row["method"]: row for row in result["rows"]}
    expected = [n for n in LM_METHODS if n != "rgp_r8"]
    assert sorted(rows) == sorted(expected)
    for name, row in rows.items():
        if "skipped" in row:
            # only an architecture this checkout lacks is a reason to skip
            assert name in ("nonprivate_lora", "dp_lora", "rgp_r1"), (name, row["skipped"])
            assert "is not registered in this checkout" in row["skipped"]
    for always in ("nonprivate_full", "nonprivate_full_untied", "dp_full_ghost", "opacus_ghost", "opacus_hooks"):
        assert "skipped" not in rows[always], (always, rows[always].get("skipped"))
    check_measured_rows(rows, batch=3)
    # the same trainable parameters: the untied GPT-2 of dp_full_ghost and Opacus,
    # which has one more vocabulary x hidden matrix than tied GPT-2
    untied = rows["nonprivate_full_untied"]["trainable_parameters"]
    for name in ("dp_full_ghost", "opacus_ghost", "opacus_hooks"):
        assert rows[name]["trainable_parameters"] == untied, name
    assert untied - rows["nonprivate_full"]["trainable_parameters"] == 64 * 16
    for name in ("nonprivate_lora", "dp_lora", "rgp_r1"):
        if "skipped" not in rows[name]:
            assert rows[name]["trainable_parameters"] < rows["nonprivate_full"]["trainable_parameters"]
    if "skipped" not in rows["rgp_r1"]:
        assert 0 < rows["rgp_r1"]["power_iteration_fraction"] < 1
    out = capsys.readouterr().out
    assert "opacus_ghost" in out and "dp_full_ghost" in out


def test_opacus_peer_computes_fairseq_transformer_lm(tmp_path):
    """With fairseq's weights copied in, the Opacus rows' model gives the
    logits of fairseq's ``transformer_lm`` built from the benchmark's GPT-2
    flags (untied), so both sides time the same function."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    import fairseq_dp
    from benchmarks.opacus_lm import PreLNCausalLM
    from benchmarks.speed import GPT2_POSITIONS, _lm_batch, _write_lm_dict, gpt2_shape_flags

    s = Settings(preset="gpt2-cpu", layers=2, hidden=32, heads=4, ffn=48, vocab=70, batch=3, seq_len=10,
                 warmup=0, steps=5, device="cpu", threads=1, kind="lm")
    argv = [_write_lm_dict(s), "--user-dir", os.path.dirname(fairseq_dp.__file__), "--task", "language_modeling",
            "--arch", "transformer_lm", *gpt2_shape_flags(s), "--cpu"]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    torch.manual_seed(0)
    task = tasks.setup_task(cfg.task)
    assert len(task.source_dictionary) == s.vocab
    fairseq_lm = task.build_model(cfg.model).eval()
    decoder = fairseq_lm.decoder
    # --decoder-input-dim / --decoder-output-dim given: no projections GPT-2 lacks
    assert decoder.project_in_dim is None and decoder.project_out_dim is None
    assert decoder.output_projection.weight is not decoder.embed_tokens.weight

    peer = PreLNCausalLM(vocab=s.vocab, max_positions=max(GPT2_POSITIONS, s.seq_len), layers=s.layers,
                         hidden=s.hidden, heads=s.heads, ffn=s.ffn).eval()
    weights = {name.replace("decoder.", "", 1).replace("self_attn.", ""): value
               for name, value in fairseq_lm.state_dict().items() if not name.endswith(".version")}
    peer.load_state_dict(weights, strict=True)  # the same parameters, name for name

    source, _ = _lm_batch(s, task.source_dictionary.eos(), torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = fairseq_lm(source)[0]
        got = peer(source)
    assert got.shape == (s.batch, s.seq_len, s.vocab)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
