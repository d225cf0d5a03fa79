"""Pretraining: the recipe, the schedule, a short run, exact resume after SIGKILL, and two processes in sync."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from skyfm.errors import SkyfmError
from skyfm.pretrain import config_from_dict
from skyfm.pretrain.train import checkpoint_dirs, lr_factor, read_metrics

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TINY = {"backbone.depth": 1, "backbone.embed_dim": 64, "tokenizer.codebook_size": 64}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    from skyfm.data.shards import write_simulated_shards

    folder = tmp_path_factory.mktemp("pretrain-shards")
    write_simulated_shards(folder, {"fermi-lat": 8, "meerlicht": 8}, seed=3, patches_per_shard=4, size=32,
                           progress=False)
    return folder


def recipe(shard_dir, **train) -> dict:
    return {
        "model": "skyfm-tiny",
        "model_overrides": TINY,
        "seed": 5,
        "data": {"shards": [str(shard_dir)], "size": 32, "shuffle_buffer": 8,
                 "weights": {"fermi-lat": 1, "meerlicht": 1}},
        "train": {"batch_size": 4, "max_steps": 6, "tokenizer_steps": 3, "warmup_steps": 1, "lr": 2e-3, **train},
        "checkpoint": {"every": 2, "keep": 2},
        "log": {"every": 1, "trackers": ["csv"]},
    }


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def losses(out_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out_dir)]


def test_builtin_recipes_load_and_bad_ones_are_clear_errors(tmp_path):
    from skyfm.pretrain import load_pretrain_config

    assert load_pretrain_config("tiny").model == "skyfm-tiny"
    experiment = load_pretrain_config("tiny-denoise-pixels")  # measured in docs/benchmarks.md, run 3
    assert experiment.model_overrides == {"denoise_loss_weight": 1.0, "backbone": {"pixel_tokens": True}}
    assert experiment.train == load_pretrain_config("tiny").train
    assert load_pretrain_config(REPO / "configs/pretrain/base.yaml").train.mixed_precision == "bf16"
    with pytest.raises(SkyfmError, match="unknown key"):
        config_from_dict({"train": {"batch": 3}, "data": {"shards": ["x"]}})
    with pytest.raises(SkyfmError, match="expected a number"):
        config_from_dict({"train": {"lr": "fast"}, "data": {"shards": ["x"]}})
    with pytest.raises(SkyfmError, match="tokenizer_steps"):
        config_from_dict({"train": {"max_steps": 5, "tokenizer_steps": 9}, "data": {"shards": ["x"]}})
    with pytest.raises(SkyfmError, match="data needs"):
        config_from_dict({})
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(SkyfmError, match="not valid YAML"):
        load_pretrain_config(bad)
    with pytest.raises(SkyfmError, match="not found"):
        load_pretrain_config(tmp_path / "missing.yaml")


def test_learning_rate_warms_up_and_decays_in_each_stage():
    cfg = config_from_dict({"data": {"shards": ["x"]},
                            "train": {"max_steps": 200, "tokenizer_steps": 100, "warmup_steps": 10}})
    f = [lr_factor(s, cfg) for s in range(200)]
    assert f[0] < f[5] < f[9] == pytest.approx(1.0)  # warm-up
    assert f[99] < 0.1 and f[99] >= cfg.train.min_lr_ratio - 1e-9  # decayed at the end of stage 1
    assert f[100] < f[109] == pytest.approx(1.0)  # stage 2 warms up again
    assert np.all(np.diff(f[110:200]) <= 1e-12)  # then only decays


def test_a_short_run_trains_both_stages_and_saves_a_loadable_model(shard_dir, tmp_path):
    import torch

    from skyfm import create_model
    from skyfm.pretrain.train import pretrain

    cfg = config_from_dict(recipe(shard_dir))
    model_dir = pretrain(cfg, tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["stage"] for r in rows] == [1, 1, 1, 2, 2, 2]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert "perplexity" in rows[0] and "accuracy" in rows[-1]
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step_0000004", "step_0000006"]

    model = create_model("skyfm-tiny", pretrained_dir=model_dir, **TINY)
    trained = dict(model.named_parameters())
    fresh = dict(create_model("skyfm-tiny", **TINY).named_parameters())
    changed = {k for k in trained if not torch.equal(trained[k], fresh[k])}
    assert any(k.startswith("tokenizer.") for k in changed) and any(not k.startswith("tokenizer.") for k in changed)


def _run(args, cwd, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_a_killed_run_resumes_with_the_same_batches_and_losses(shard_dir, tmp_path):
    raw = recipe(shard_dir, max_steps=12, tokenizer_steps=5)
    config = write_recipe(tmp_path / "recipe.yaml", raw)
    cmd = [PYTHON, "-m", "skyfm.pretrain", "--config", str(config), "--out"]

    reference = _run(cmd + [str(tmp_path / "reference")], tmp_path)
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    killed = _run(cmd + [str(tmp_path / "killed")], tmp_path)
    deadline = time.time() + 300
    while not (tmp_path / "killed/checkpoints/step_0000006/trainer_state.json").exists():
        assert killed.poll() is None, killed.stdout.read()
        assert time.time() < deadline
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    if (tmp_path / "killed/model").exists():
        pytest.skip("the run finished before it could be killed")  # a machine far faster than this one
    resumed = _run(cmd + [str(tmp_path / "killed")], tmp_path)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    got, want = losses(tmp_path / "killed"), losses(tmp_path / "reference")
    assert [step for step, _ in got] == [step for step, _ in want] == list(range(1, 13))
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in want], rel=1e-6, abs=1e-7)


@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(PYTHON)) is None, reason="needs accelerate")
def test_two_processes_under_accelerate_stay_in_sync(shard_dir, tmp_path):
    config = write_recipe(tmp_path / "recipe.yaml", recipe(shard_dir, max_steps=4, tokenizer_steps=2))
    launch = [os.path.join(os.path.dirname(PYTHON), "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "skyfm.pretrain", "--config", str(config), "--out", str(tmp_path / "ddp")]
    proc = _run(launch, tmp_path)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out
    final = json.loads((tmp_path / "ddp/final_state.json").read_text())
    assert final["world_size"] == 2
    assert len(final["param_checksums"]) == 2
    assert final["ranks_in_sync"], final
    assert [r["step"] for r in read_metrics(tmp_path / "ddp")] == [1, 2, 3, 4]
