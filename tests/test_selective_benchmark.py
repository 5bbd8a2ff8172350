"""benchmarks/selective_pretraining.py: every fine-tuning row's command is one
fairseq parses, with the settings the benchmark promises (same data, epochs
and length for every row; DP rows at their total target ε and the benchmark's
δ; the pre-trained rows start from their own checkpoint), and the README
table is built from the JSON. The full benchmark's figures are not asserted."""

import pytest

from benchmarks.selective_pretraining import INITS, build_parser, finetune_command, row_name, table

from helpers import parse


@pytest.fixture
def args(tmp_path):
    a = build_parser().parse_args(["--workdir", str(tmp_path / "work")])
    a.pretrained = {"selected": "/w/pretrain_selected/checkpoints/checkpoint_last.pt",
                    "random": "/w/pretrain_random/checkpoints/checkpoint_last.pt"}
    return a


def flag(cmd, name):
    return cmd[cmd.index(name) + 1] if name in cmd else None


@pytest.mark.parametrize("init", list(INITS) + ["minilm"])
@pytest.mark.parametrize("eps", [1.0, 8.0, None])
def test_rows_parse_and_share_the_settings(args, init, eps, tmp_path):
    cmd = finetune_command(args, str(tmp_path), init, eps, str(tmp_path / "save"), 67349)
    assert cmd[1:3] == ["-m", "fairseq_cli.train"]
    cfg = parse(cmd[3:])  # fairseq's own parser: no unknown or malformed flag
    assert cfg.optimization.max_epoch == args.epochs and cfg.task.data == str(tmp_path)
    assert flag(cmd, "--finetune-from-model") == args.pretrained.get(init, flag(cmd, "--finetune-from-model"))
    if init == "minilm":
        assert flag(cmd, "--finetune-from-model") == str(tmp_path / "work" / "minilm" / "model.pt")
    if init == "none":
        assert "--finetune-from-model" not in cmd and "--restore-file" not in cmd
    if eps is None:
        assert cfg.task._name == "sentence_prediction" and "--dp-target-epsilon" not in cmd
    else:
        assert cfg.task._name == "dp_sentence_prediction"
        assert float(flag(cmd, "--dp-target-epsilon")) == eps and float(flag(cmd, "--dp-delta")) == args.delta
        batch = int(flag(cmd, "--batch-size")) * int(flag(cmd, "--update-freq"))
        assert batch == args.dp_batch


def test_table_from_results():
    rows = {
        row_name("selected", 8.0): {"init": "selected", "private": True, "accuracy_final": 71.2, "epsilon": 7.95},
        row_name("selected", None): {"init": "selected", "private": False, "accuracy_final": 80.1},
        row_name("minilm", 8.0): {"init": "minilm", "private": True, "accuracy_final": 78.3, "epsilon": 7.94,
                                  "recorded": "copied"},
    }
    text = table({"settings": {"epsilons": [1.0, 3.0, 8.0]}, "rows": rows})
    lines = text.splitlines()
    assert lines[0].startswith("| model | ε = 1 | ε = 3 | ε = 8 | non-private |")
    assert "| tiny, selected pre-training | – | – | 71.2 % (ε 7.95) | 80.1 % |" in lines
    assert any(line.startswith("| all-MiniLM-L6-v2") and "78.3 % (ε 7.94)*" in line for line in lines)
    assert not any("random pre-training" in line for line in lines)  # no measured row, no line
