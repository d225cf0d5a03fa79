"""SourceDetector heads: targets, forward shapes, training signal, save / load and bad checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from astropy.table import Table

from skyfm.errors import SkyfmError
from skyfm.foundation import create_model
from skyfm.heads import DetectorConfig, InstrumentHeadConfig, SourceDetector, build_targets, load_detector
from skyfm.heads.localization import find_peaks, merge_close


def tiny_detector(instruments=("meerlicht", "fermi-lat"), seed=0) -> SourceDetector:
    torch.manual_seed(seed)
    fm = create_model("skyfm-tiny", backbone={"depth": 1, "embed_dim": 32, "num_heads": 2})
    return SourceDetector.from_foundation(fm, list(instruments), trunk_channels=16, trunk_depth=1)


def test_targets_put_a_peak_and_offsets_on_each_source():
    head = InstrumentHeadConfig.for_instrument("meerlicht")
    truth = Table({"x": [10.3, 30.0, 50.0], "y": [20.7, 5.0, 50.0], "flux": [100.0, 50.0, 10.0],
                   "flux_band": [[100.0], [50.0], [10.0]], "class": ["star", "galaxy", "star"],
                   "extension": [0.0, 1e-3, 0.0], "snr": [20.0, 8.0, 2.0]})
    cont = np.zeros((1, 64, 64), np.uint8)
    cont[0, 40, 40] = 1
    t = build_targets(truth, (64, 64), head, ["q"], np.array([2.0]), DetectorConfig(), contaminant=cont)
    assert t["heat"][21, 10] == 1.0 and t["heat"][5, 30] == 1.0
    assert (t["heat"] == 1.0).sum() == 2  # the SNR 2 source is not a positive...
    assert t["neg_weight"][50, 50] == 0.0  # ...nor a negative
    assert t["neg_weight"][40, 40] == DetectorConfig().contaminant_weight
    assert t["reg"].sum() == 18
    assert t["dx"][21, 10] == pytest.approx(0.3, abs=1e-5) and t["dy"][21, 10] == pytest.approx(-0.3, abs=1e-5)
    assert t["dx"][21, 11] == pytest.approx(-0.7, abs=1e-5)
    assert t["flux"][21, 10] == pytest.approx(np.log(50.0), rel=1e-5)  # ln(flux / unit)
    assert t["cls"][21, 10] == 0 and t["cls"][5, 30] == 1


def test_forward_shapes_mixed_instruments():
    from skyfm.data.simulate import simulate_patch

    det = tiny_detector().eval()
    patches = [simulate_patch("meerlicht", 1, size=32), simulate_patch("fermi-lat", 2, size=32)]
    batch = det.make_batch(patches)
    with torch.no_grad():
        out = det(batch)
    assert out.heat.shape == (2, 1, 32, 32)
    assert out.band_flux.shape == (2, 6, 2, 32, 32)  # both have 6 bands in their heads
    assert out.class_logits.shape == (2, 3, 32, 32)
    assert float(out.class_logits[0, 2].max()) < -1e3  # the optical head has 2 classes: the third is padding
    assert out.instruments == ["meerlicht", "fermi-lat"]


def test_a_few_steps_lower_the_loss():
    from skyfm.data.simulate import simulate_patch
    from skyfm.finetune.train import collate_targets

    det = tiny_detector(("wise",))
    det.set_backbone_mode("frozen")
    patches = [simulate_patch("wise", s, size=32, scene="crowded") for s in range(4)]
    batch = det.make_batch(patches)
    targets = collate_targets(det, patches, batch)
    opt = torch.optim.Adam([p for p in det.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(25):
        loss = det.loss(det(batch), targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.75 * losses[0]
    assert not any(p.grad is not None for p in det.foundation.parameters())  # frozen really is frozen


def test_backbone_modes_choose_the_trainable_parameters():
    det = tiny_detector()
    det.set_backbone_mode("partial", partial_blocks=1)
    trainable = {n for n, p in det.named_parameters() if p.requires_grad}
    assert any(n.startswith("foundation.backbone.decoder") for n in trainable)
    assert not any(n.startswith("foundation.tokenizer") for n in trainable)
    det.set_backbone_mode("full")
    assert not any(p.requires_grad for p in det.foundation.tokenizer.parameters())
    with pytest.raises(SkyfmError):
        det.set_backbone_mode("lora")


def test_save_load_round_trip_fp32_and_fp16(tmp_path):
    from skyfm.data.simulate import simulate_patch

    det = tiny_detector().eval()
    batch = det.make_batch([simulate_patch("meerlicht", 3, size=32)])
    with torch.no_grad():
        ref = det(batch).heat
    det.save_pretrained(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["format"] == "skyfm-detector" and "foundation" in cfg and "meerlicht" in cfg["heads"]
    again = load_detector(tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(again(batch).heat, ref)
    det.save_pretrained(tmp_path / "h", dtype=torch.float16)
    half = load_detector(tmp_path / "h")
    assert next(half.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(half(batch).heat, ref, atol=0.05)


def test_bad_checkpoints_raise_one_line_errors(tmp_path):
    det = tiny_detector()
    d = det.save_pretrained(tmp_path / "m")
    with pytest.raises(SkyfmError, match="does not exist"):
        load_detector(tmp_path / "nope")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SkyfmError, match="corrupt or truncated"):
        load_detector(d)
    d2 = tiny_detector().save_pretrained(tmp_path / "m2")
    cfg = json.loads((d2 / "config.json").read_text())
    cfg["trunk_channels"] = 24
    (d2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SkyfmError, match="does not match"):
        load_detector(d2)
    (d2 / "config.json").write_text("{not json")
    with pytest.raises(SkyfmError, match="cannot read"):
        load_detector(d2)
    fm_dir = tmp_path / "backbone"
    create_model("skyfm-tiny", backbone={"depth": 1}).save_pretrained(fm_dir)
    with pytest.raises(SkyfmError, match="not a skyfm detector"):
        load_detector(fm_dir)


def test_peaks_split_a_close_pair_and_merge_neighbours():
    yy, xx = np.mgrid[0:32, 0:32]
    heat = np.exp(-((xx - 10) ** 2 + (yy - 10) ** 2) / 2.0) + np.exp(-((xx - 13) ** 2 + (yy - 10) ** 2) / 2.0)
    rows, cols, scores = find_peaks(torch.from_numpy(heat / heat.max()).float(), 0.3)
    assert sorted(cols.tolist()) == [10, 13] and rows.tolist() == [10, 10]
    keep = merge_close(np.array([5.0, 5.4, 9.0]), np.array([5.0, 5.2, 5.0]), np.array([0.9, 0.8, 0.7]), 1.0)
    assert sorted(keep.tolist()) == [0, 2]


def test_a_new_telescope_gets_a_head_from_a_trained_one(tmp_path):
    import yaml

    from skyfm.instruments import builtin_config_dir

    raw = yaml.safe_load((builtin_config_dir() / "wise.yaml").read_text())
    raw["name"] = "my-scope"
    raw["bands"] = raw["bands"][:2]
    (tmp_path / "my-scope.yaml").write_text(yaml.safe_dump(raw))
    det = tiny_detector(("wise",))
    head = det.add_instrument(tmp_path / "my-scope.yaml")
    assert head.name == "my-scope" and head.n_bands == 2
    w_new = det.heads["my-scope"].weight
    w_old = det.heads["wise"].weight
    assert torch.equal(w_new[0], w_old[0])  # the heatmap channel starts from WISE's


def test_class_calibration_functions():
    """fit_logistic recovers a known logistic model; calibrate_class_prob replaces one class's probability where
    its features are finite and shares the rest among the others in the network's proportions."""
    from skyfm.heads.classification import calibrate_class_prob, calibration_features, fit_logistic

    rng = np.random.default_rng(3)
    X = rng.normal(size=(6000, 2))
    y = rng.random(6000) < 1 / (1 + np.exp(-(-0.5 + X @ np.array([2.0, -1.0]))))
    b, c = fit_logistic(X, y, l2=0.0)
    assert abs(b + 0.5) < 0.1 and np.allclose(c, [2.0, -1.0], atol=0.12)
    prob = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.25, 0.25]])
    excess = np.array([4.0, np.nan, 0.0])
    cal = {"class": "b", "intercept": 0.0, "coef": {"net_logit": 1.0, "kron_excess": 1.0}}
    out = calibrate_class_prob(prob, ["a", "b", "c"], cal, excess, np.ones(3), np.ones(3), np.ones(3))
    f = calibration_features(prob[:, 1], excess, np.ones(3), np.ones(3), np.ones(3))
    p_b = 1 / (1 + np.exp(-(f["net_logit"] + f["kron_excess"])))
    assert np.allclose(out[[0, 2], 1], p_b[[0, 2]]) and np.array_equal(out[1], prob[1])
    assert np.allclose(out.sum(axis=1), 1) and np.isclose(out[0, 0] / out[0, 2], 6.0)
    sure = calibrate_class_prob(np.array([[0.0, 1.0, 0.0]]), ["a", "b", "c"], cal, [0.0], [1.0], [1.0], [1.0])
    assert np.isclose(sure.sum(), 1) and np.isclose(sure[0, 0], sure[0, 2]) and sure[0, 1] < 1
    f = calibration_features([0.5], [1.0], [np.nan], [1.0], [100.0])
    assert np.isnan(f["kron_snr"]).all() and np.allclose(f["kron_size"], np.log(10.0))


def test_spectral_classifier_functions():
    """fit_multinomial tells hard cut-off spectra from soft straight ones by the shape of their significance across
    the bins, whatever their brightness; spectral_class_prob applies it where the fluxes are finite (the
    network's probabilities elsewhere); a head checks the classifier's shapes."""
    from skyfm.errors import SkyfmError
    from skyfm.heads.classification import fit_multinomial, spectral_class_prob, spectral_features
    from skyfm.heads.config import InstrumentHeadConfig

    rng = np.random.default_rng(5)
    shapes = np.array([[5.0, 3.0, 2.0, 1.0, 0.5, 0.2], [0.5, 2.0, 4.0, 3.0, 0.5, 0.0]])  # soft / cut off, in sigma
    y = rng.integers(0, 2, 4000)
    bright = np.exp(rng.uniform(0.0, 2.5, 4000))[:, None]
    F = shapes[y] * bright + rng.normal(size=(4000, 6))
    X = spectral_features(F, np.ones_like(F), ["shape", "snr"])
    assert X.shape == (4000, 7) and np.isfinite(X).all()
    mean, scale = X.mean(0), X.std(0)
    coef, intercept = fit_multinomial((X - mean) / scale, y, 2, l2=1.0)
    classifier = {"features": ["shape", "snr"], "mean": mean, "scale": scale, "coef": coef, "intercept": intercept}
    net = np.tile([0.9, 0.1], (4000, 1))
    called = spectral_class_prob(net, classifier, F, np.ones_like(F)).argmax(1)
    assert np.mean(called == y) > 0.9 and np.mean(called[y == 1] == 1) > 0.85
    F[0] = np.nan  # an unmeasured row keeps the network's probabilities
    assert np.array_equal(spectral_class_prob(net[:2], classifier, F[:2], np.ones((2, 6)))[0], net[0])
    head = InstrumentHeadConfig.for_instrument("fermi-lat")
    head.spectral_classifier = {"features": ["shape", "snr"], "mean": [0.0] * 7, "scale": [1.0] * 7,
                                "coef": [[0.0, 0.0, 0.0]] * 7, "intercept": [0.0, 0.0, 0.0]}
    assert head.spectral_classifier_terms() is head.spectral_classifier
    head.spectral_classifier["coef"] = [[0.0, 0.0]] * 7  # two classes' columns for three classes
    with pytest.raises(SkyfmError, match="spectral_classifier should hold"):
        head.spectral_classifier_terms()
