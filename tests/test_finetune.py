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


# ------------------------------------------------------------------------------------------------- LoRA backbone
def _wise_batch(det, n=2):
    from skyfm.data.simulate import simulate_patch

    return det.make_batch([simulate_patch("wise", 70 + i, size=32, scene="crowded") for i in range(n)])


def _tiny_detector(backbone_dir):
    from skyfm.foundation.model import FoundationModel
    from skyfm.heads import SourceDetector

    torch.manual_seed(1)
    return SourceDetector.from_foundation(FoundationModel.from_pretrained(backbone_dir), ["wise"], trunk_channels=16)


def _outputs(det, batch):
    with torch.no_grad():
        out = det.eval()(batch)
    return torch.cat([out.heat, out.offset, out.flux, out.class_logits], dim=1)


def test_lora_parameter_counts(backbone_dir):
    from skyfm.finetune import load_finetune_config
    from skyfm.finetune.train import set_trainable

    counts = {}
    for mode in ("frozen", "lora", "full"):
        cfg = load_finetune_config(None, backbone=mode, **{"data.instruments": {"wise": {}}})
        counts[mode] = set_trainable(_tiny_detector(backbone_dir), cfg)
    heads = counts["frozen"]["trainable"]
    assert counts["frozen"]["backbone"] == 0 and counts["lora"]["heads"] == counts["full"]["heads"] == heads
    # one block, D = 32, rank 8: qkv (32 -> 96) and proj (32 -> 32) each get A (8 x 32) and B (out x 8)
    assert counts["lora"]["backbone"] == counts["lora"]["lora"] == 8 * (32 + 96) + 8 * (32 + 32)
    assert counts["lora"]["trainable"] < counts["full"]["trainable"]


def test_lora_merge_keeps_outputs_and_loads_without_adapters(tmp_path, backbone_dir):
    from skyfm.finetune.lora import apply_lora, is_lora_parameter, merge_lora
    from skyfm.heads import load_detector

    det = _tiny_detector(backbone_dir)
    plain_keys = list(det.state_dict())
    batch = _wise_batch(det)
    base = _outputs(det, batch)
    assert apply_lora(det, rank=4, alpha=8, targets=["qkv", "proj", "fc1", "fc2"]) == 4
    assert torch.allclose(_outputs(det, batch), base, atol=1e-6)  # B = 0: the pretrained backbone exactly
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in det.named_parameters():
            if is_lora_parameter(name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    adapted = _outputs(det, batch)
    assert (adapted - base).abs().max() > 1e-3  # the adapters change the detector
    assert merge_lora(det) == 4
    assert list(det.state_dict()) == plain_keys
    assert torch.allclose(_outputs(det, batch), adapted, atol=1e-5)
    loaded = load_detector(det.save_pretrained(tmp_path / "merged"))
    assert torch.allclose(_outputs(loaded, batch), adapted, atol=1e-5)


def test_finetune_lora_trains_only_adapters_and_heads_and_resumes(tmp_path, telescope, backbone_dir):
    from safetensors.torch import load_file

    from skyfm.finetune import finetune, load_finetune_config
    from skyfm.finetune.train import build_detector, checkpoint_dirs, export_checkpoint, set_trainable
    from skyfm.foundation.model import FoundationModel
    from skyfm.heads import load_detector
    from skyfm.instruments import load_instrument

    cfg = load_finetune_config(None, init=str(backbone_dir), backbone="lora",
                               **{"data.instruments": {str(telescope): {"weight": 1.0}}, "data.size": 32,
                                  "data.batch_size": 2, "train.steps": 4, "train.backbone_lr": 1e-2,
                                  "log": {"every": 1}, "checkpoint": {"every": 2, "keep": 2},
                                  "detector": {"trunk_channels": 16}})
    run = tmp_path / "run"
    finetune(cfg, run, max_steps=2, progress=False)
    model_dir = finetune(cfg, run, progress=False)  # resumes at step 2 from a checkpoint holding the adapters
    assert [r["step"] for r in _rows(run)] == ["1", "2", "3", "4"]
    straight = finetune(cfg, tmp_path / "straight", progress=False)  # the same run without the interruption
    state = load_file(str(checkpoint_dirs(run)[-1] / "model.safetensors"))
    for k, v in load_file(str(checkpoint_dirs(tmp_path / "straight")[-1] / "model.safetensors")).items():
        assert torch.equal(state[k], v), k

    # the backbone's base weights are bit-identical to the pretrained ones; the adapters and heads moved (the
    # fixture's never-used codebook is k-means-initialised by its first forward pass, in every mode: not compared)
    pretrained = FoundationModel.from_pretrained(backbone_dir).state_dict()
    base = {k.removeprefix("foundation.").replace(".base_layer.", "."): v for k, v in state.items()
            if k.startswith("foundation.") and ".lora_" not in k}
    assert base.keys() == pretrained.keys()
    compared = [k for k in pretrained if not k.startswith("tokenizer.quantizer.")]
    assert any(".qkv." in k for k in compared) and len(compared) > 0.9 * len(pretrained)
    for k in compared:
        assert torch.equal(base[k], pretrained[k]), k
    lora_b = [v for k, v in state.items() if ".lora_B." in k]
    assert len(lora_b) == 2 and all(v.abs().max() > 0 for v in lora_b)

    # model/ is merged: ordinary keys, loads with load_detector and matches the unmerged adapters' outputs
    merged = load_detector(model_dir)
    assert not any(".lora_" in k or ".base_layer." in k for k in merged.state_dict())
    qkv = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(merged.state_dict()["foundation." + qkv], pretrained[qkv])  # W + (alpha / r) B A
    unmerged = build_detector(cfg, [load_instrument(str(telescope))])
    set_trainable(unmerged, cfg)
    unmerged.load_state_dict(state, strict=True)
    from skyfm.data.simulate import simulate_patch

    batch = merged.make_batch([simulate_patch(load_instrument(str(telescope)), 5 + i, size=32) for i in range(2)])
    expected = _outputs(unmerged, batch)
    assert torch.allclose(_outputs(merged, batch), expected, atol=1e-5)
    assert torch.allclose(_outputs(load_detector(straight), batch), expected, atol=1e-5)
    assert torch.allclose(_outputs(load_detector(export_checkpoint(run)), batch), expected, atol=1e-5)


def test_lora_config_errors_are_one_line(tmp_path, capsys):
    from skyfm.errors import SkyfmError
    from skyfm.finetune import load_finetune_config

    rc = main(["finetune", "--instrument", "wise", "--init", "scratch", "--out", str(tmp_path / "x"),
               "--backbone", "lora", "--lora-rank", "0", "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "lora.rank" in err
    for bad, word in [({"targets": ["qkv", "attn"]}, "lora.targets"), ({"alpha": 0}, "lora.alpha"),
                      ({"dropout": 1.0}, "lora.dropout"), ({"rnak": 4}, "rnak")]:
        with pytest.raises(SkyfmError, match=word):
            load_finetune_config(None, backbone="lora", lora=bad, **{"data.instruments": {"wise": {}}})


def test_lora_recipe_defaults_and_old_recipes(tmp_path):
    import json

    from skyfm.finetune import load_finetune_config
    from skyfm.finetune.train import _recipe

    path = tmp_path / "r.yaml"
    path.write_text("backbone: lora\nlora:\ndata: {instruments: {wise: {}}}\n")  # an empty lora: section
    cfg = load_finetune_config(path, **{"lora.rank": 4})
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets) == (4, 16.0, 0.0, ["qkv", "proj"])
    old = cfg.to_dict()
    del old["lora"]  # a run recorded before the lora section existed still resumes with the defaults
    (tmp_path / "recipe.json").write_text(json.dumps(old))
    assert _recipe(tmp_path / "recipe.json") == {**cfg.to_dict(), "lora": load_finetune_config(path).to_dict()["lora"]}
