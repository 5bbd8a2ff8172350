"""benchmarks/sst2_minilm.py: every method's command is one fairseq parses, with
the recipe's settings and the benchmark's shared ones (data, epochs budget,
pooling, δ); LP-FT's probe spends the noise of one run over all the updates,
so the pair stays within the target ε (checked with an independent PRV
accountant); the plan, the aggregate over seeds and the README table. The
benchmark's accuracy figures are not asserted here."""

import argparse

import pytest
from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

from benchmarks import sst2_minilm as bench

from helpers import parse

N_TRAIN = 67349


@pytest.fixture
def args(tmp_path):
    return argparse.Namespace(work_dir=str(tmp_path), epochs=2, delta=1e-5, log_interval=10, keep_epsilon=8.0,
                              seeds=[1, 2, 3], other_seeds=1, epsilons=[8.0, 3.0, 1.0], methods=bench.METHODS,
                              threads=1)


@pytest.fixture
def paths(tmp_path):
    return {"bin": str(tmp_path / "bin"), "model": str(tmp_path / "model.pt"), "n_train": N_TRAIN}


def flag(cmd, name):
    return cmd[cmd.index(name) + 1] if name in cmd else None


def reference_epsilon(history, delta):
    mechanisms = [PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=s)
                  for s, q, _ in history]
    accountant = PRVAccountant(prvs=mechanisms, max_self_compositions=[n for _, _, n in history],
                               eps_error=0.05, delta_error=delta / 1000)
    # (lower, estimate, upper): the estimate, within eps_error of the true ε
    return accountant.compute_epsilon(delta=delta, num_self_compositions=[n for _, _, n in history])[1]


@pytest.mark.parametrize("method", bench.METHODS)
@pytest.mark.parametrize("eps", [8.0, 1.0])
def test_every_method_parses_with_its_recipe(args, paths, method, eps):
    recipe = bench.RECIPES[method]
    run = bench.Run(args, method, recipe, None if not recipe.private else eps, 2, paths)
    stages = run.stages()
    assert len(stages) == (2 if recipe.lp_updates else 1)
    cfg = parse(stages[-1][1][3:])  # after `python -m fairseq_cli.train`
    assert cfg.model.arch == recipe.arch
    assert cfg.model.classification_pooling == "mean"
    assert cfg.common.seed == 2
    if not recipe.lp_updates:
        assert cfg.checkpoint.restore_file == paths["model"]
    assert cfg.optimization.lr == [recipe.lr]
    per_epoch = bench.updates_per_epoch(N_TRAIN, recipe)
    assert cfg.lr_scheduler.total_num_update == args.epochs * per_epoch - recipe.lp_updates
    if recipe.private:
        assert cfg.task._name == "dp_sentence_prediction"
        assert cfg.task.dp_target_epsilon == eps and cfg.task.dp_delta == 1e-5
        assert cfg.task.dp_clip_norm == recipe.clip and cfg.optimization.clip_norm == 0
        assert cfg.dataset.batch_size * cfg.optimization.update_freq[0] == recipe.batch
        assert cfg.optimization.max_update == args.epochs * per_epoch - recipe.lp_updates
        # the plugin's own count of Poisson draws per epoch
        assert per_epoch == -(-N_TRAIN // recipe.batch)
    else:
        assert cfg.task._name == "sentence_prediction" and cfg.optimization.max_epoch == args.epochs
    # final checkpoints are kept for the non-private and the ε = 8 runs only
    assert cfg.checkpoint.no_save == (recipe.private and eps != 8.0)


def test_lp_ft_probe_then_fine_tuning_within_the_target(args, paths):
    recipe = bench.apply_overrides(bench.RECIPES, ["DP full.lp_updates=20", "DP full.lp_lr=0.01"])["DP full"]
    assert recipe.lp_updates == 20 and recipe.lp_lr == 0.01 and bench.RECIPES["DP full"].lp_updates == 10
    run = bench.Run(args, "DP full", recipe, 3.0, 1, paths)
    (s1, probe), (s2, finetune) = run.stages()
    p_cfg, f_cfg = parse(probe[3:]), parse(finetune[3:])
    # the probe trains the head only, for its updates, with a fixed σ
    assert p_cfg.task.dp_freeze.split(",")[0] == bench.ENCODER
    assert p_cfg.optimization.max_update == 20 and p_cfg.optimization.lr == [0.01]
    assert p_cfg.task.dp_target_epsilon is None
    sigma = p_cfg.task.dp_noise_multiplier
    # then full fine-tuning from the probe's checkpoint for the rest of the budget,
    # its σ calibrated by the plugin counting the probe's ledger
    total = args.epochs * bench.updates_per_epoch(N_TRAIN, recipe)
    assert f_cfg.checkpoint.restore_file == p_cfg.checkpoint.save_dir + "/checkpoint_last.pt"
    assert f_cfg.optimization.max_update == total - 20 and f_cfg.task.dp_target_epsilon == 3.0
    # σ of one run over all the updates: the probe at that σ leaves the
    # fine-tuning room for σ no larger than it would have been anyway
    q = recipe.batch / N_TRAIN
    assert 3.0 * 0.97 <= reference_epsilon([(sigma, q, total)], 1e-5) <= 3.0 + 0.05


def test_overrides_are_checked():
    with pytest.raises(SystemExit, match="METHOD.FIELD=VALUE"):
        bench.apply_overrides(bench.RECIPES, ["DP-LoRA.learning_rate=1"])
    with pytest.raises(SystemExit, match="METHOD.FIELD=VALUE"):
        bench.apply_overrides(bench.RECIPES, ["LoRA.lr=1"])
    with pytest.raises(SystemExit, match="not a valid lr"):
        bench.apply_overrides(bench.RECIPES, ["DP-LoRA.lr=fast"])
    assert bench.apply_overrides(bench.RECIPES, ["RGP.rgp_rank=4"])["RGP"].rgp_rank == 4


def test_plan_runs_every_seed_at_the_kept_epsilon(args):
    jobs = bench.plan(args)
    assert jobs[:3] == [("non-private", None, s) for s in (1, 2, 3)]  # the longest first
    for method in bench.METHODS[1:]:
        assert [(e, s) for m, e, s in jobs if m == method] == [(8.0, 1), (8.0, 2), (8.0, 3), (3.0, 1), (1.0, 1)]


def result_with(runs):
    return {"settings": {"delta": 1e-5, "train_examples": N_TRAIN, "epochs": 1, "max_length": 64}, "runs": runs}


def run_entry(method, eps, seed, acc, sigma=0.5):
    return {"method": method, "target_epsilon": eps, "seed": seed, "accuracy_final": acc, "epsilon": eps and eps - 0.05,
            "sigma": sigma if eps else None, "updates": 68, "recipe": vars(bench.RECIPES[method]).copy()}


def test_aggregate_and_readme_table(tmp_path):
    runs = [run_entry("DP-LoRA", 8.0, s, a) for s, a in [(1, 80.0), (2, 82.0), (3, 84.0)]]
    runs += [run_entry("non-private", None, 1, 88.4), run_entry("DP-LoRA", 3.0, 1, 79.5)]
    summary = {(g["method"], g["target_epsilon"]): g for g in bench.aggregate(runs)}
    lora8 = summary[("DP-LoRA", 8.0)]
    assert lora8["accuracy_mean"] == 82.0 and lora8["accuracy_sd"] == 2.0 and lora8["seeds"] == [1, 2, 3]
    assert summary[("DP-LoRA", 3.0)]["accuracy_sd"] is None
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench.TABLE_BEGIN}\nold\n{bench.TABLE_END}\nafter\n")
    bench.write_readme(result_with(runs), str(readme))
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("after\n")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[2].startswith("| non-private | ∞ | 88.4 %")
    assert rows[3].startswith("| DP-LoRA | 7.95 | 82.0 ± 2.0 % | 3 | 80.0 / 82.0 / 84.0 |")
    assert rows[4].startswith("| DP-LoRA | 2.95 | 79.5 % | 1 |")


def test_the_readme_table_is_the_recorded_one():
    import json
    import os

    with open(bench.DEFAULT_OUT) as f:
        expected = bench.table(json.load(f))
    with open(bench.README) as f:
        text = f.read()
    between = text.split(bench.TABLE_BEGIN, 1)[1].split(bench.TABLE_END, 1)[0].strip()
    assert between == expected, f"rerun: python {os.path.relpath(bench.__file__)} --readme"
