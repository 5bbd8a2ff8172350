"""The shipped Hydra configs run in the working directory and leave no .hydra/;
a calibrated run's log has its plan lines and no opacus RDP-order warning."""

import glob
import os
import subprocess
import sys

import pytest
import yaml

from helpers import PLUGIN_DIR, data_dir

REPO = os.path.dirname(PLUGIN_DIR)
CONFIGS = sorted(glob.glob(os.path.join(PLUGIN_DIR, "config", "*.yaml")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_logs_into_the_working_directory_without_dot_hydra(path):
    with open(path) as f:
        hydra = yaml.safe_load(f)["hydra"]
    assert hydra["run"]["dir"] == "."
    assert hydra["output_subdir"] is None


def test_rgp_sst2_config_runs_in_place(tmp_path_factory):
    data = data_dir(tmp_path_factory, n_train=256, n_valid=32)
    work = tmp_path_factory.mktemp("work")
    overrides = [
        f"task.data={data}", f"common.user_dir={PLUGIN_DIR}", "common.cpu=true",
        # tiny sizes; everything else as shipped (target ε, accountant, sampling)
        "dataset.batch_size=8", "optimization.update_freq=[2]", "optimization.max_epoch=1",
        "task.max_positions=64", "model._name=roberta_rgp", "+model.encoder_layers=2",
        "+model.encoder_embed_dim=32", "+model.encoder_ffn_embed_dim=48",
        "+model.encoder_attention_heads=4", "checkpoint.no_save=true", "dataset.num_workers=0",
        f"checkpoint.save_dir={tmp_path_factory.mktemp('checkpoints')}",
    ]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.hydra_train", "--config-dir", os.path.join(PLUGIN_DIR, "config"),
         "--config-name", "rgp_sst2", *overrides],
        cwd=work, capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(work)) == ["hydra_train.log"]  # no .hydra/, no outputs/DATE/TIME/
    with open(work / "hydra_train.log") as f:
        log = f.read().splitlines()
    plan = [i for i, line in enumerate(log) if "DP: N=256 examples" in line]
    first_update = [i for i, line in enumerate(log) if "num_updates=" in line or "num_updates " in line]
    assert plan and first_update and plan[0] < first_update[0]
    # the σ calibration (PRV) no longer prints opacus's RDP-order warning
    assert "Optimal order" not in result.stdout + result.stderr
