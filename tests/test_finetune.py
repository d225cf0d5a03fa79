"""Fine-tuning: a new telescope from a YAML file, resume, the CLI, user image + catalog pairs."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import yaml

from skyfm.cli import main
from skyfm.foundation import create_model
from skyfm.instruments import builtin_config_dir

TINY = {"backbone": {"depth": 1, "embed_dim": 32, "num_heads": 2}}


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("backbone")
    torch.manual_seed(0)
    create_model("skyfm-tiny", **TINY).save_pretrained(d)
    return d


@pytest.fixture
def telescope(tmp_path):
    """A telescope no one has: WISE's YAML with a new name, two bands and a wider PSF."""
    raw = yaml.safe_load((builtin_config_dir() / "wise.yaml").read_text())
    raw["name"] = "my-telescope"
    raw["description"] = "an invented two-band infrared telescope"
    raw["fits"] = {"telescop": ["MYTEL"]}
    raw["bands"] = raw["bands"][:2]
    for b in raw["bands"]:
        b["psf"] = {"model": "gaussian", "fwhm": "9 arcsec"}
    path = tmp_path / "my-telescope.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_finetune_a_new_telescope_and_resume(tmp_path, telescope, backbone_dir):
    from skyfm.finetune import finetune, load_finetune_config
    from skyfm.heads import load_detector

    cfg = load_finetune_config(None, init=str(backbone_dir), backbone="frozen",
                               **{"data.instruments": {str(telescope): {"weight": 1.0}}, "data.size": 32,
                                  "data.batch_size": 2, "train.steps": 4, "log": {"every": 1},
                                  "checkpoint": {"every": 2, "keep": 2}, "detector": {"trunk_channels": 16}})
    run = tmp_path / "run"
    finetune(cfg, run, max_steps=2, progress=False)
    assert [r["step"] for r in _rows(run)] == ["1", "2"]
    model_dir = finetune(cfg, run, progress=False)  # resumes at step 2
    rows = _rows(run)
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"] and rows[0]["instrument"] == "my-telescope"
    det = load_detector(model_dir)
    head = det.head_config("my-telescope")
    assert head.bands == ["W1", "W2"] and head.kind == "ccd"
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    from skyfm.finetune.train import export_checkpoint

    exported = load_detector(export_checkpoint(run))  # the last checkpoint as a model folder
    assert exported.config.training["stopped_at_step"] == 4
    for a, b in zip(exported.state_dict().values(), det.state_dict().values()):
        assert torch.equal(a, b)


def test_finetune_cli_with_partial_backbone(tmp_path, telescope, backbone_dir, capsys):
    out = tmp_path / "ft"
    rc = main(["finetune", "--instrument", str(telescope), "--init", str(backbone_dir), "--out", str(out),
               "--steps", "2", "--batch-size", "2", "--size", "32", "--backbone", "partial"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "model" / "model.safetensors").is_file() and len(_rows(out)) >= 1


def test_finetune_on_user_pairs(tmp_path, backbone_dir, capsys):
    from skyfm.data import write_patch
    from skyfm.data.simulate import simulate_patch

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for i in range(2):
        p = simulate_patch("wise", 40 + i, size=48, scene="crowded")
        write_patch(p, pairs / f"img{i}.fits")
        t = p.truth["x", "y", "flux", "class"]
        t.write(pairs / f"img{i}_truth.ecsv", format="ascii.ecsv")
    out = tmp_path / "ftp"
    rc = main(["finetune", "--instrument", "wise", "--pairs", str(pairs), "--init", str(backbone_dir),
               "--out", str(out), "--steps", "2", "--batch-size", "2", "--size", "32", "--backbone", "frozen"])
    assert rc == 0, capsys.readouterr().err
    assert float(_rows(out)[-1]["n_targets"]) > 0


def test_finetune_errors_are_one_line(tmp_path, capsys):
    rc = main(["finetune", "--instrument", "wise", "--out", str(tmp_path / "x")])
    assert rc == 1 and "--init" in capsys.readouterr().err
    rc = main(["finetune", "--instrument", "nosuchscope", "--init", "scratch", "--out", str(tmp_path / "y"),
               "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "nosuchscope" in err
