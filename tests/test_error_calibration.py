"""Calibrated uncertainties: the per-instrument error scales, their default, where detect applies them, and the
choosers of skyfm.finetune.ship on synthetic matched pairs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from skyfm.data.simulate import simulate_patch
from skyfm.errors import SkyfmError
from skyfm.finetune import ship
from skyfm.heads import SourceDetector
from skyfm.heads.config import DetectorConfig, InstrumentHeadConfig

SCALES = ("flux_err_scale", "pos_err_scale", "fit_flux_err_scale", "fit_pos_err_scale")


@pytest.fixture(scope="module")
def model_dir(untrained_detector):
    return untrained_detector(("fermi-lat", "wise"))


def test_scales_default_to_one_and_old_configs_load_unchanged(model_dir):
    head = InstrumentHeadConfig.for_instrument("wise")
    assert all(getattr(head, k) == 1.0 for k in SCALES)
    assert head.error_scales() == (1.0, 1.0) and head.error_scales(fit=True) == (1.0, 1.0)
    head.fit_pos_err_scale = 2.5
    assert head.error_scales(fit=True) == (1.0, 2.5) and head.error_scales() == (1.0, 1.0)
    cfg = json.loads((model_dir / "config.json").read_text())
    for h in cfg["heads"].values():  # a checkpoint written before the scales existed
        for k in SCALES:
            h.pop(k, None)
    cfg.pop("foundation")
    old = DetectorConfig.from_dict(cfg)
    assert all(getattr(old.heads["fermi-lat"], k) == 1.0 for k in SCALES)
    for bad in (-1.0, 0.0, float("nan"), "x"):
        head.flux_err_scale = bad
        with pytest.raises(SkyfmError, match="flux_err_scale"):
            head.error_scales()


def _rows(cat):
    val = lambda k: np.asarray(getattr(cat[k], "value", cat[k]), dtype=np.float64)  # noqa: E731
    return {k: val(k) for k in ("x", "flux", "flux_err", "pos_err")} | (
        {"ts": val("ts")} if "ts" in cat.colnames else {})


def test_detect_applies_the_network_and_fit_scales(model_dir):
    from skyfm.detect import detect_patch

    p = simulate_patch("fermi-lat", 3, size=48, population="real", center=(20.0, 0.5))
    det = SourceDetector.from_pretrained(model_dir)
    base_net = _rows(detect_patch(p, det, min_score=0.0101, refine=False))
    base_fit = _rows(detect_patch(p, det, min_score=0.0101, refine=True))
    assert len(base_net["x"]) > 0 and np.isfinite(base_fit["ts"]).any()
    head = det.head_config("fermi-lat")
    head.flux_err_scale, head.pos_err_scale, head.fit_flux_err_scale, head.fit_pos_err_scale = 2.0, 3.0, 5.0, 7.0
    net = _rows(detect_patch(p, det, min_score=0.0101, refine=False))
    fit = _rows(detect_patch(p, det, min_score=0.0101, refine=True))
    np.testing.assert_array_equal(net["flux"], base_net["flux"])
    np.testing.assert_allclose(net["flux_err"], 2.0 * base_net["flux_err"], rtol=1e-6)
    np.testing.assert_allclose(net["pos_err"], 3.0 * base_net["pos_err"], rtol=1e-6)
    refined = np.isfinite(fit["ts"])
    np.testing.assert_array_equal(fit["flux"], base_fit["flux"])
    np.testing.assert_allclose(fit["flux_err"][refined], 5.0 * base_fit["flux_err"][refined], rtol=1e-6)
    np.testing.assert_allclose(fit["flux_err"][~refined], 2.0 * base_fit["flux_err"][~refined], rtol=1e-6)
    from skyfm.catalog.table import wcs_pixel_scale_deg

    above_floor = base_fit["pos_err"] > 0.05 * wcs_pixel_scale_deg(p.wcs) * 1.001  # refine floors it at 0.05 px
    assert (refined & above_floor).any()
    np.testing.assert_allclose(fit["pos_err"][refined & above_floor], 7.0 * base_fit["pos_err"][refined & above_floor],
                               rtol=1e-6)
    np.testing.assert_allclose(fit["pos_err"][~refined], 3.0 * base_fit["pos_err"][~refined], rtol=1e-6)
    head.fit_flux_err_floor = 0.2  # a relative systematic error, in quadrature, on the fitted rows only
    floored = _rows(detect_patch(p, det, min_score=0.0101, refine=True))
    np.testing.assert_allclose(floored["flux_err"][refined], np.hypot(5.0 * base_fit["flux_err"][refined],
                                                                      0.2 * np.abs(base_fit["flux"][refined])), rtol=1e-6)
    np.testing.assert_allclose(floored["flux_err"][~refined], 2.0 * base_fit["flux_err"][~refined], rtol=1e-6)


def test_flux_err_scale_gives_68_percent_coverage_on_synthetic_pairs():
    rng = np.random.default_rng(0)
    true = rng.uniform(50, 500, 40000)
    err = np.sqrt(true)
    flux = true + rng.normal(0.0, 2.5 * err)  # the reported errors are 2.5x too small
    k = ship.flux_err_scale(flux, err, true)
    assert k == pytest.approx(2.5, rel=0.02)
    assert ship.flux_coverage(flux, err, true) == pytest.approx(math.erf(0.4 / math.sqrt(2)), abs=0.01)
    assert ship.flux_coverage(flux, err, true, k) == pytest.approx(ship.COVERAGE_68, abs=1e-3)
    err_bad = err.copy()
    err_bad[:10] = np.nan  # non-finite errors are left out
    assert ship.flux_err_scale(flux, err_bad, true) == pytest.approx(k, rel=0.01)
    with pytest.raises(SkyfmError, match="no pair"):
        ship.flux_err_scale([1.0], [0.0], [1.0])
    with pytest.raises(SkyfmError, match="one length"):
        ship.flux_err_scale([1.0, 2.0], [1.0], [1.0])


def test_pos_err_scale_matches_the_2d_gaussian_median_on_synthetic_pairs():
    rng = np.random.default_rng(1)
    sigma = rng.uniform(0.1, 1.0, 40000)
    sep = np.hypot(*rng.normal(0.0, 0.6 * sigma, (2, len(sigma))))  # true per-axis sigma is 0.6x the reported
    k = ship.pos_err_scale(sep, sigma)
    assert k == pytest.approx(0.6, rel=0.02)
    assert np.median(sep / (k * sigma)) == pytest.approx(math.sqrt(2 * math.log(2)), rel=1e-6)
    with pytest.raises(SkyfmError, match="no pair"):
        ship.pos_err_scale([0.1], [np.nan])


def test_factors_multiply_the_current_scales():
    rng = np.random.default_rng(2)
    true = rng.uniform(50, 500, 5000)
    err = np.sqrt(true)
    m = {"flux": true + rng.normal(0.0, 2.0 * err), "flux_err": err, "true_flux": true,
         "sep": np.hypot(*rng.normal(0.0, 0.5, (2, 5000))), "pos_err": np.full(5000, 1.0)}
    out = {}
    ship._factors(m, np.ones(5000, bool), "", {k: 1.5 for k in SCALES}, out)
    assert out["flux_err_scale"] == pytest.approx(1.5 * 2.0, rel=0.05)
    assert out["pos_err_scale"] == pytest.approx(1.5 * 0.5, rel=0.05)
    assert out["flux_cov68_after"] == pytest.approx(ship.COVERAGE_68, abs=0.01)
    few = {}
    ship._factors({k: v[:5] for k, v in m.items()}, np.ones(5, bool), "fit_", {k: 1.5 for k in SCALES}, few)
    assert few["fit_flux_err_scale"] == 1.5 and few["notes"]  # too few matches: the current scale is kept


def test_write_error_scales_into_a_detector_config(model_dir, tmp_path):
    import shutil

    d = tmp_path / "det"
    shutil.copytree(model_dir, d)
    ship.write_error_scales(d, {"fermi-lat": {"flux_err_scale": 1.23456, "fit_flux_err_scale": 3.0, "n_matched": 40}})
    det = SourceDetector.from_pretrained(d)
    head = det.head_config("fermi-lat")
    assert head.flux_err_scale == 1.2346 and head.fit_flux_err_scale == 3.0 and head.pos_err_scale == 1.0
    assert det.head_config("wise").flux_err_scale == 1.0
    with pytest.raises(SkyfmError, match="no head"):
        ship.write_error_scales(d, {"hubble": {"flux_err_scale": 2.0}})
    with pytest.raises(SkyfmError, match="positive"):
        ship.write_error_scales(d, {"wise": {"pos_err_scale": 0.0}})
    # a band subset's calibration goes to its band_subsets entry, beside the thresholds already there
    cfg = json.loads((d / "config.json").read_text())
    cfg["heads"]["wise"]["band_subsets"] = {"W1": {"min_score": 0.5}}
    (d / "config.json").write_text(json.dumps(cfg))
    ship.write_error_scales(d, {"wise": {"band_subset": "W1", "fit_flux_err_scale": 2.5, "fit_flux_err_floor": 0.03,
                                         "fit_flux_err_scale_estbg": 9.0, "n_matched": 40}})
    wise = SourceDetector.from_pretrained(d).head_config("wise")
    assert wise.band_subsets == {"W1": {"min_score": 0.5, "fit_flux_err_scale": 2.5, "fit_flux_err_floor": 0.03}}
    assert wise.fit_flux_err_scale != 2.5  # the head's own terms stay
    w1 = wise.for_bands(["W1"])
    assert (w1.min_score, w1.error_scales(fit=True)[0], w1.error_floors()[0]) == (0.5, 2.5, 0.03)


def test_every_scene_counts_alike():
    rng = np.random.default_rng(4)
    # a crowded scene with 4000 matches whose errors are 3x too small, a field with 200 honest ones
    e = np.ones(4200)
    pulls = np.concatenate([rng.normal(0.0, 3.0, 4000), rng.normal(0.0, 1.0, 200)])
    scenes = np.array(["cluster"] * 4000 + ["field"] * 200, dtype=object)
    w = ship.scene_weights(scenes)
    assert w[:4000].sum() == pytest.approx(1.0) and w[4000:].sum() == pytest.approx(1.0)
    pooled = ship.flux_err_scale(pulls, e, np.zeros(4200))
    balanced = ship.flux_err_scale(pulls, e, np.zeros(4200), weights=w)
    assert pooled == pytest.approx(3.0, rel=0.06) and 1.2 < balanced < 2.6
    assert ship.flux_coverage(pulls, e, np.zeros(4200), balanced, weights=w) == pytest.approx(ship.COVERAGE_68,
                                                                                               abs=0.01)
    v = rng.normal(size=101)
    assert ship.weighted_quantile(v, 0.3) == np.quantile(v, 0.3)
    assert ship.weighted_quantile([1.0, 2.0, 3.0], 0.5, [1.0, 0.0, 1.0]) == 2.0  # zero weight: left out
    rep = ship.weighted_quantile(np.repeat(v[:20], 3), 0.5)  # integer weights ~ repeated values
    assert ship.weighted_quantile(v[:20], 0.5, np.full(20, 3.0)) == pytest.approx(rep, abs=0.2)


def test_error_floors_recover_a_systematic_error():
    """Statistical errors plus an unmodelled systematic one: the floor chooser finds the systematic part."""
    from skyfm.finetune.ship import flux_err_floor, pos_err_floor

    rng = np.random.default_rng(5)
    n = 4000
    stat = rng.uniform(0.01, 0.2, n)  # per-axis statistical position errors, pixels
    sys_pix = 0.08
    total = np.hypot(stat, sys_pix)
    sep = np.hypot(rng.normal(0, total), rng.normal(0, total))
    assert pos_err_floor(sep, stat) == pytest.approx(sys_pix, rel=0.1)
    assert pos_err_floor(sep, 10 * total) == 0.0  # errors already too large: no floor
    flux = rng.uniform(1e3, 1e5, n)
    ferr = np.sqrt(flux)
    true = flux + rng.normal(0, np.hypot(ferr, 0.03 * flux))
    assert flux_err_floor(flux, ferr, true) == pytest.approx(0.03, rel=0.15)
    assert flux_err_floor(flux, 100 * ferr, true) == 0.0


def test_scale_and_floor_split_statistical_and_systematic_errors():
    """Errors too small by 2x plus a 3% bias-like error that grows with flux: one factor cannot cover faint and
    bright sources alike; the scale (from the fainter half) and the floor (for all) recover both."""
    from skyfm.finetune.ship import flux_coverage, flux_err_scale, flux_err_scale_and_floor

    rng = np.random.default_rng(11)
    true = 10 ** rng.uniform(1, 5, 6000)
    stat = np.sqrt(true)
    flux = true + rng.normal(0, np.hypot(2.0 * stat, 0.03 * true))
    k, r = flux_err_scale_and_floor(flux, stat, true)
    assert k == pytest.approx(2.0, rel=0.1) and r == pytest.approx(0.03, rel=0.2)
    new = np.hypot(k * stat, r * np.abs(flux))
    bright = true > np.quantile(true, 0.8)
    assert abs(flux_coverage(flux, new, true) - 0.6827) < 0.01
    assert abs(flux_coverage(flux[bright], new[bright], true[bright]) - 0.6827) < 0.05
    one = flux_err_scale(flux, stat, true)  # a single factor: the bright fifth is under-covered
    assert flux_coverage(flux[bright], one * stat[bright], true[bright]) < 0.55


def test_crowding_is_the_density_of_the_other_detections_per_fwhm2():
    """Detections scattered at random, 0.01 per px^2, seen with a 4-px FWHM: 0.16 per FWHM^2 in the middle and at
    the image's edge alike (the smoothing is normalised by the image's share of it); a lone source has none."""
    from skyfm.catalog.psf_fit import crowding

    rng = np.random.default_rng(2)
    middle, edge = [], []
    for _ in range(4):
        x, y = rng.uniform(0, 400, (2, 1600))
        rho = crowding(x, y, (400, 400), fwhm_pix=4.0)
        middle.append(rho[(np.abs(x - 200) < 100) & (np.abs(y - 200) < 100)])
        edge.append(rho[(x < 10) & (np.abs(y - 200) < 150)])
    assert np.mean(np.concatenate(middle)) == pytest.approx(0.16, rel=0.1)
    assert np.mean(np.concatenate(edge)) == pytest.approx(0.16, rel=0.15)
    alone = crowding(np.array([x[0], 300.0]), np.array([y[0], 300.0]), (400, 400), fwhm_pix=4.0)
    assert alone.max() < 1e-3
    assert crowding(np.zeros(0), np.zeros(0), (10, 10), 3.0).shape == (0,)


def test_crowding_floors_recover_an_error_that_grows_with_crowding():
    """Unsplit companions add a relative flux error proportional to the crowding (here 0.5 per neighbour per
    FWHM^2, on top of a 2% floor): one floor for all over-covers the sparse sources; the crowding floors come out
    near those numbers and cover both halves alike."""
    from skyfm.finetune.ship import crowding_floors, flux_coverage, flux_err_floor

    rng = np.random.default_rng(3)
    n = 8000
    true = 10 ** rng.uniform(3, 5, n)
    stat = np.sqrt(true)
    rho = 10 ** rng.uniform(-2, 0, n)  # a field's 0.01 to a cluster core's 1 per FWHM^2
    flux = true + rng.normal(0, np.hypot(stat, np.hypot(0.02, 0.5 * rho) * true))
    r, c = crowding_floors(flux, stat, true, rho)
    # about the truth (errors relative to the measured flux need a little more where they are large)
    assert 0.45 < c < 0.7 and r < 0.04
    dense = rho >= np.median(rho)
    new = np.hypot(stat, np.hypot(r, c * rho) * np.abs(flux))
    for half in (dense, ~dense):
        assert abs(flux_coverage(flux[half], new[half], true[half]) - 0.6827) < 0.03
    one = np.hypot(stat, flux_err_floor(flux, stat, true) * np.abs(flux))  # one floor for all
    assert flux_coverage(flux[~dense], one[~dense], true[~dense]) > 0.8
    # no crowding in the errors: no crowding floor; crowding the same everywhere: nothing to tell apart
    plain = true + rng.normal(0, np.hypot(stat, 0.03 * true))
    assert crowding_floors(plain, stat, true, rho)[1] < 0.05
    assert crowding_floors(plain, stat, true, np.full(n, 0.1))[1] == 0.0
    assert crowding_floors(flux, 10 * stat, true, rho) == (0.0, 0.0)  # errors already too large: nothing to add


def test_crowding_scales_recover_a_statistical_error_that_grows_with_crowding():
    """Undetected sources add to a counts fit's flux an error proportional to its statistical one, the more the
    denser the field (here x (1 + 20 crowding), on a 3% floor): one scale for all over-covers the sparse half and
    under-covers the dense one; the crowding scales come out near those numbers and cover both halves alike."""
    from skyfm.finetune.ship import crowding_scales, flux_coverage, flux_err_scale_and_floor

    rng = np.random.default_rng(5)
    n = 8000
    true = 10 ** rng.uniform(1.5, 4, n)
    stat = np.sqrt(true)
    rho = 10 ** rng.uniform(-3, -1, n)  # high latitude's 0.001 to the plane's 0.1 per FWHM^2
    flux = true + rng.normal(0, np.hypot((1 + 20 * rho) * stat, 0.03 * true))
    k, c, r = crowding_scales(flux, stat, true, rho)
    assert 0.85 < k < 1.15 and 14 < c < 28 and r < 0.05
    dense = rho >= np.median(rho)
    new = np.hypot(k * (1 + c * rho) * stat, r * np.abs(flux))
    for half in (dense, ~dense):
        assert abs(flux_coverage(flux[half], new[half], true[half]) - 0.6827) < 0.03
    k1, r1 = flux_err_scale_and_floor(flux, stat, true)  # one scale for all
    one = np.hypot(k1 * stat, r1 * np.abs(flux))
    assert flux_coverage(flux[~dense], one[~dense], true[~dense]) > 0.75
    assert flux_coverage(flux[dense], one[dense], true[dense]) < 0.62
    # the errors do not grow with crowding, or the crowding is the same everywhere: no crowding scale
    plain = true + rng.normal(0, np.hypot(stat, 0.03 * true))
    assert crowding_scales(plain, stat, true, rho)[1] < 2.0
    assert crowding_scales(plain, stat, true, np.full(n, 0.01))[1] == 0.0


def test_counts_flux_errors_grow_with_the_crowding_of_the_final_rows(model_dir, tmp_path):
    """Likelihood selection against a background model: column ``crowding`` (the final rows' density per FWHM^2 of
    the sharpest bin) on every row, and with ``fit_flux_err_scale_crowding`` c the fitted fluxes' errors are their
    statistical part times 1 + c crowding, the relative floor in quadrature; the fluxes and, against a background
    estimated from the counts, the errors do not change. The key is written with the other error keys."""
    import shutil
    from dataclasses import replace

    from skyfm.catalog.psf_fit import crowding
    from skyfm.detect import detect_patch
    from skyfm.instruments import load_instrument

    p = simulate_patch("fermi-lat", 5, size=64, population="resampled")
    det = SourceDetector.from_pretrained(model_dir)
    head = det.head_config("fermi-lat")
    head.fit_flux_err_floor = 0.1
    plain = detect_patch(p, det, min_score=0.999)
    blind = detect_patch(replace(p, background_image=None), det, min_score=0.999)
    head.fit_flux_err_scale_crowding = 30.0
    grown = detect_patch(p, det, min_score=0.999)
    assert len(grown) >= 3 and "crowding" in grown.colnames
    rho = np.asarray(grown["crowding"], dtype=float)
    x, y = np.asarray(grown["x"], float), np.asarray(grown["y"], float)
    sharpest = min(b.psf.fwhm_deg for b in load_instrument("fermi-lat").bands) / 0.1  # the highest bin's, 1.06 px
    np.testing.assert_allclose(rho, crowding(x, y, (64, 64), sharpest), rtol=1e-5, atol=1e-7)
    assert (rho > 0).any()
    f, e0, e1 = (np.asarray(grown["flux"], float), np.asarray(plain["flux_err"], float),
                 np.asarray(grown["flux_err"], float))
    np.testing.assert_allclose(f, np.asarray(plain["flux"], float))
    stat = np.sqrt(e0 ** 2 - (0.1 * f) ** 2)
    np.testing.assert_allclose(e1, np.hypot(stat * (1 + 30.0 * rho), 0.1 * np.abs(f)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(detect_patch(replace(p, background_image=None), det,
                                                       min_score=0.999)["flux_err"], float),
                               np.asarray(blind["flux_err"], float))
    d = tmp_path / "det"
    shutil.copytree(model_dir, d)
    ship.write_error_scales(d, {"fermi-lat": {"fit_flux_err_scale_crowding": 12.5}})
    assert SourceDetector.from_pretrained(d).head_config("fermi-lat").flux_scale_per_crowding() == 12.5


def test_ccd_flux_floor_grows_with_the_catalogs_crowding():
    """A crowded MeerLICHT patch: the PSF-fitted fluxes' errors with a crowding floor c are those without it plus
    c x crowding x flux in quadrature, crowding the catalog's column (the densities of the detections)."""
    from skyfm.detect import detect_patch
    from skyfm.heads import load_detector

    det = load_detector()
    head = det.head_config("meerlicht")
    kept = {k: getattr(head, k) for k in ("fit_flux_err_floor", "fit_flux_err_floor_crowding")}
    p = simulate_patch("meerlicht", 11, size=96, scene="crowded")
    try:
        head.fit_flux_err_floor, head.fit_flux_err_floor_crowding = 0.0, 0.0
        plain = detect_patch(p, det)
        head.fit_flux_err_floor_crowding = 1.0
        floored = detect_patch(p, det)
    finally:
        for k, v in kept.items():
            setattr(head, k, v)
    both = np.isin(np.asarray(floored["fit"]), (2, 5))  # PSF fluxes: fitted detections and companions
    assert both.sum() >= 5
    rho = np.asarray(floored["crowding"], dtype=float)
    assert np.isfinite(rho).all() and (rho > 0.02).any()
    f, e0, e1 = _rows(floored)["flux"], _rows(plain)["flux_err"], _rows(floored)["flux_err"]
    np.testing.assert_allclose(e1[both], np.hypot(e0[both], rho[both] * f[both]), rtol=1e-4)
    np.testing.assert_allclose(e1[~both], e0[~both], rtol=1e-6)


def _confused_pairs(rng, n: int):
    """A sparse half and a confused half (a cluster) of measured fluxes whose errors are hypot(0.6 x stat, 0.8 x
    confusion): (cluster mask, stat, confusion, true, measured)."""
    cluster = np.arange(n) >= n // 2
    stat = rng.uniform(5, 20, n)
    conf = np.where(cluster, rng.uniform(20, 60, n), rng.uniform(0, 2, n))
    true = rng.uniform(100, 1000, n)
    return cluster, stat, conf, true, true + rng.normal(0, np.hypot(0.6 * stat, 0.8 * conf))


def test_confusion_error_terms_recover_a_statistical_and_a_confusion_part():
    """Rows whose error is 0.6 x their statistical error and 0.8 x the confusion in quadrature, in a sparse scene
    (little confusion) and a cluster (much): the terms come back near those numbers and both scenes are covered at
    68%, which no single factor on the statistical error achieves; without confusion in the errors its weight stays
    near 0."""
    from skyfm.finetune.ship import confusion_error_terms, flux_coverage, flux_err_scale

    rng = np.random.default_rng(5)
    n = 4000
    cluster, stat, conf, true, flux = _confused_pairs(rng, n)
    scene = np.where(cluster, "cluster", "field")
    a, b = confusion_error_terms(flux, stat, true, conf, strata=scene)
    assert abs(a - 0.6) < 0.08 and abs(b - 0.8) < 0.08
    new = np.hypot(a * stat, b * conf)
    for s in (cluster, ~cluster):
        assert abs(flux_coverage(flux[s], new[s], true[s]) - 0.6827) < 0.02
    one = flux_err_scale(flux, stat, true) * stat  # one factor: the field over-covered, the cluster under
    assert flux_coverage(flux[~cluster], one[~cluster], true[~cluster]) > 0.9
    assert flux_coverage(flux[cluster], one[cluster], true[cluster]) < 0.55
    # no strata given: the halves of confusion / error tell the two apart as well
    a2, b2 = confusion_error_terms(flux, stat, true, conf)
    assert abs(a2 - a) < 0.1 and abs(b2 - b) < 0.1
    plain = true + rng.normal(0, 1.5 * stat)
    a3, b3 = confusion_error_terms(plain, stat, true, conf, strata=scene)
    assert abs(a3 - 1.5) < 0.1 and b3 < 0.1


def test_unfitted_terms_are_chosen_on_the_network_error_whatever_the_head_carried():
    """The calibration of the refined rows that keep the network's flux takes the carried terms out of the
    catalog's errors: heads that carried different terms get the same answer, PSF-fitted rows and rows without a
    confusion (saturated stars) are left out of it."""
    from types import SimpleNamespace

    rng = np.random.default_rng(8)
    n = 3000
    cluster, stat, conf, true, flux = _confused_pairs(rng, n)
    fitted = rng.random(n) < 0.2
    conf_col = np.where(rng.random(n) < 0.05, np.nan, conf)
    answers = []
    for a0, b0 in ((1.0, 0.0), (3.0, 0.5)):
        head = SimpleNamespace(unfitted_flux_error_terms=lambda a0=a0, b0=b0: (a0, b0))
        err = np.where(fitted, 1e9, np.hypot(a0 * stat, b0 * conf))  # fitted rows: nonsense that must not count
        m = {"flux": flux, "flux_err": err, "true_flux": true, "confusion": conf_col, "fit": fitted,
             "scene": np.where(cluster, "cluster", "field").astype(object)}
        out = {}
        ship._unfitted_flux_errors(m, head, out)
        assert out["unfitted_n_matched"] == int((~fitted & np.isfinite(conf_col)).sum())
        answers.append((out["unfitted_flux_err_scale"], out["unfitted_flux_err_confusion"]))
        assert abs(out["unfitted_flux_cov68_after"] - 0.6827) < 0.02
    assert answers[0] == pytest.approx(answers[1], rel=1e-6)
    assert abs(answers[0][0] - 0.6) < 0.08 and abs(answers[0][1] - 0.8) < 0.08


def test_refined_rows_that_keep_the_network_flux_carry_the_confusion():
    """A crowded MeerLICHT patch: the refined rows that keep the network's flux (fit < 2, not saturated) have the
    error hypot(a / flux_err_scale x the network's, b x flux_confusion) with the head's unfitted terms (a, b);
    PSF-fitted rows are untouched, and every refined row reports its confusion (flux units)."""
    from skyfm.detect import detect_patch
    from skyfm.heads import load_detector

    det = load_detector()
    head = det.head_config("meerlicht")
    kept = {k: getattr(head, k) for k in ("unfitted_flux_err_scale", "unfitted_flux_err_confusion")}
    p = simulate_patch("meerlicht", 11, size=96, scene="crowded")
    try:
        head.unfitted_flux_err_scale, head.unfitted_flux_err_confusion = None, 0.0  # as the network gives them
        plain = detect_patch(p, det)
        head.unfitted_flux_err_scale, head.unfitted_flux_err_confusion = 2.0 * head.flux_err_scale, 0.7
        terms = detect_patch(p, det)
    finally:
        for k, v in kept.items():
            setattr(head, k, v)
    conf = np.asarray(terms["flux_confusion"].value, dtype=float)
    assert terms["flux_confusion"].unit == terms["flux"].unit
    unfitted = (np.asarray(terms["fit"]) < 2) & np.isfinite(conf)
    assert unfitted.sum() >= 3 and (np.asarray(terms["fit"]) == 2).sum() >= 5
    assert (conf[np.isfinite(conf)] > 0).all()
    e0, e1 = _rows(plain)["flux_err"], _rows(terms)["flux_err"]
    np.testing.assert_allclose(e1[unfitted], np.hypot(2.0 * e0[unfitted], 0.7 * conf[unfitted]), rtol=1e-4)
    np.testing.assert_allclose(e1[~unfitted], e0[~unfitted], rtol=1e-6)


def test_fit_errors_are_chosen_on_their_statistical_part(model_dir):
    """The fits' scales and floors come from the catalog's errors with the current scale and floors (the crowding's
    too) taken out: a detector that carried other values gets the same answer, and the answer covers 68% of the
    fluxes and puts the median separation at 1.1774 errors; calibrate_errors leaves the detector passed in as it was."""
    from types import SimpleNamespace

    det = SourceDetector.from_pretrained(model_dir)
    head = det.head_config("wise")
    head.fit_flux_err_floor, head.fit_pos_err_floor = 0.3, 0.2
    res = ship.calibrate_errors(det, "default", n=1, size=64, instruments=["wise"])["wise"]
    assert (head.fit_flux_err_floor, head.fit_pos_err_floor) == (0.3, 0.2)
    if res["fit_n_matched"] < ship.MIN_MATCHES:  # an untrained head finds few: the values there are are kept
        assert res["fit_flux_err_floor"] == 0.3
    rng = np.random.default_rng(2)
    n = 4000
    flux = 10 ** rng.uniform(1, 5, n)
    stat = np.sqrt(flux)
    true = flux + rng.normal(0, np.hypot(2.0 * stat, 0.05 * flux))
    pos_stat = 1.0 / stat  # pixels: 0.003 .. 0.3
    sep = np.hypot(*rng.normal(0, np.hypot(1.5 * pos_stat, 0.02), (2, n)))
    crowd = 10 ** rng.uniform(-2, 0, n)  # detections per FWHM^2 (the errors above do not grow with it)
    answers = []
    for scale, floor, per_crowding in ((1.0, 0.0, 0.0), (3.0, 0.3, 0.5)):  # what the catalogs carried
        carried = SimpleNamespace(kind="ccd", error_scales=lambda fit=True, estimated=False, s=scale: (s, s),
                                  error_floors=lambda estimated=False, f=floor: (f, f / 10),
                                  flux_floor_per_crowding=lambda c=per_crowding: c)
        flux_floor = np.hypot(floor, per_crowding * crowd)
        m = {"flux": flux, "flux_err": np.hypot(scale * stat, flux_floor * flux), "true_flux": true, "sep": sep,
             "pos_err": np.hypot(scale * pos_stat, floor / 10), "fit": np.ones(n, bool), "fit_pos": np.ones(n, bool),
             "crowding": crowd, "scene": np.full(n, "field", dtype=object)}
        out = {}
        ship._fit_flux_errors(m, m["fit"], carried, out)
        ship._fit_pos_errors(m, carried, out)
        answers.append(out)
    for key in ("fit_flux_err_scale", "fit_flux_err_floor", "fit_flux_err_floor_crowding", "fit_pos_err_scale",
                "fit_pos_err_floor"):
        assert answers[0][key] == pytest.approx(answers[1][key], rel=1e-6, abs=1e-9), key
    out = answers[0]
    assert out["fit_flux_err_scale"] == pytest.approx(2.0, rel=0.15)
    assert out["fit_flux_err_floor_crowding"] < 0.03  # no crowding in these errors: (almost) none found
    one = {}  # one floor for all asked for: the crowding term the head carried goes to 0
    ship._fit_flux_errors(m, m["fit"], carried, one, crowding=False)
    assert one["fit_flux_err_floor_crowding"] == 0.0
    assert one["fit_flux_err_scale"] == pytest.approx(answers[1]["fit_flux_err_scale"], rel=1e-6)
    assert one["fit_flux_cov68_after"] == pytest.approx(0.6827, abs=0.01)
    assert out["fit_flux_cov68_after"] == pytest.approx(0.6827, abs=0.01)
    assert out["fit_pos_err_floor"] > 0
    assert out["fit_median_sep_over_pos_err_after"] == pytest.approx(ship.MEDIAN_2D, rel=0.01)
    # counts fits: the crowding grows the statistical part (1 + c crowding), which is taken out as well
    counts = []
    for scale, floor, per_crowding in ((1.0, 0.0, 0.0), (3.0, 0.3, 40.0)):
        carried = SimpleNamespace(kind="counts", error_scales=lambda fit=True, estimated=False, s=scale: (s, s),
                                  error_floors=lambda estimated=False, f=floor: (f, f / 10),
                                  flux_scale_per_crowding=lambda c=per_crowding: c)
        m_counts = {**m, "flux_err": np.hypot(scale * (1 + per_crowding * crowd) * stat, floor * flux)}
        out = {}
        ship._fit_flux_errors(m_counts, m["fit"], carried, out)
        counts.append(out)
    for key in ("fit_flux_err_scale", "fit_flux_err_floor", "fit_flux_err_scale_crowding"):
        assert counts[0][key] == pytest.approx(counts[1][key], rel=1e-6, abs=1e-9), key
    assert counts[0]["fit_flux_err_scale_crowding"] < 2.0 and "fit_flux_err_floor_crowding" not in counts[0]
    assert counts[0]["fit_flux_cov68_after"] == pytest.approx(0.6827, abs=0.01)


def test_ccd_fit_errors_grow_with_the_square_root_of_chi2_and_keep_the_blank_scatter(monkeypatch):
    """The PSF-fitted rows of a CCD catalog carry their Fisher errors times sqrt(max(1, fit_chi2)) (scale 1, no
    floor and no blend term here): against the same run with every chi-square forced to 1, the errors differ by exactly that (the
    blank-place scatter set to 0). Flux errors are at least that scatter: set far above them, it is what they are."""
    import skyfm.catalog.psf_fit as psf_fit
    from skyfm.detect import detect_patch
    from skyfm.heads import load_detector

    det = load_detector()
    head = det.head_config("meerlicht")
    kept = {k: getattr(head, k) for k in ("fit_flux_err_scale", "fit_pos_err_scale", "fit_flux_err_floor",
                                          "fit_pos_err_floor", "fit_flux_err_floor_crowding", "fit_flux_err_blend")}
    blank = [0.0]

    def constant_scatter(resid, rms, psfs, scale, x, y, **kwargs):
        return np.full((len(x), len(psfs)), blank[0]), np.full(len(x), blank[0])

    monkeypatch.setattr(psf_fit, "blank_flux_scatter", constant_scatter)
    try:
        head.fit_flux_err_scale, head.fit_pos_err_scale, head.fit_flux_err_floor, head.fit_pos_err_floor = 1, 1, 0, 0
        head.fit_flux_err_floor_crowding = head.fit_flux_err_blend = 0.0
        p = simulate_patch("meerlicht", 11, size=96, scene="crowded")
        widened = detect_patch(p, det)
        blank[0] = 1e7  # ADU: far above any Fisher error of these stars
        floored = detect_patch(p, det)
        blank[0] = 0.0
        fit = psf_fit.fit_psf_sources

        def chi2_one(*args, **kwargs):
            out = fit(*args, **kwargs)
            return out | {"chi2_red": np.ones(len(out["x"]))}

        monkeypatch.setattr(psf_fit, "fit_psf_sources", chi2_one)
        plain = detect_patch(p, det)
    finally:
        for k, v in kept.items():
            setattr(head, k, v)
    chi2 = np.asarray(widened["fit_chi2"], dtype=float)
    fitted = np.asarray(widened["fit"]) >= 1
    assert fitted.sum() >= 5 and (chi2[fitted] > 1.5).any()  # a crowded field: some fits leave residuals
    np.testing.assert_array_equal(np.asarray(plain["fit"]), np.asarray(widened["fit"]))
    w, q = _rows(widened), _rows(plain)
    np.testing.assert_allclose(w["pos_err"][fitted], np.sqrt(np.maximum(chi2[fitted], 1.0)) * q["pos_err"][fitted],
                               rtol=1e-5)
    both = np.asarray(widened["fit"]) == 2
    assert both.any()
    np.testing.assert_allclose(w["flux_err"][both], np.sqrt(np.maximum(chi2[both], 1.0)) * q["flux_err"][both],
                               rtol=1e-5)
    assert w["flux_err"][both].max() < 1e6
    np.testing.assert_allclose(_rows(floored)["flux_err"][both], 1e7, rtol=1e-5)
    np.testing.assert_allclose(_rows(floored)["pos_err"], w["pos_err"], rtol=1e-6)  # positions: not its business


def test_a_background_estimated_from_the_counts_has_its_own_fit_scales(model_dir, tmp_path):
    """The _estbg scales and floor apply to the fit against an estimated background only; unset, the model's."""
    import shutil
    from dataclasses import replace

    from skyfm.detect import detect_patch

    p = simulate_patch("fermi-lat", 3, size=48, population="real", center=(20.0, 0.5))
    blind = replace(p, background_image=None)
    det = SourceDetector.from_pretrained(model_dir)
    head = det.head_config("fermi-lat")
    assert head.error_scales(fit=True, estimated=True) == (1.0, 1.0) and head.error_floors(True) == (0.0, 0.0)
    base_est = _rows(detect_patch(blind, det, min_score=0.0101))
    base_model = _rows(detect_patch(p, det, min_score=0.0101, selection="network"))
    head.fit_flux_err_scale = 2.0  # the estimate falls back to the model's scale while it has none of its own
    assert head.error_scales(fit=True, estimated=True) == (2.0, 1.0)
    head.fit_flux_err_scale_estbg, head.fit_pos_err_scale_estbg, head.fit_flux_err_floor_estbg = 3.0, 4.0, 0.1
    assert head.error_scales(fit=True, estimated=True) == (3.0, 4.0) and head.error_floors(True) == (0.1, 0.0)
    est = _rows(detect_patch(blind, det, min_score=0.0101))
    model = _rows(detect_patch(p, det, min_score=0.0101, selection="network"))
    fitted = np.isfinite(base_est["ts"])
    assert fitted.any()
    np.testing.assert_allclose(est["flux_err"][fitted], np.hypot(3.0 * base_est["flux_err"][fitted],
                                                                 0.1 * np.abs(base_est["flux"][fitted])), rtol=1e-6)
    fitted_m = np.isfinite(base_model["ts"])
    np.testing.assert_allclose(model["flux_err"][fitted_m], 2.0 * base_model["flux_err"][fitted_m], rtol=1e-6)
    d = tmp_path / "det"
    shutil.copytree(model_dir, d)
    ship.write_error_scales(d, {"fermi-lat": {"fit_flux_err_scale_estbg": 2.5, "fit_flux_err_floor_estbg": 0.05}})
    written = SourceDetector.from_pretrained(d).head_config("fermi-lat")
    assert (written.fit_flux_err_scale_estbg, written.fit_flux_err_floor_estbg) == (2.5, 0.05)
    assert written.fit_pos_err_scale_estbg is None and written.error_scales(fit=True, estimated=True) == (2.5, 1.0)


def test_matched_errors_calibrate_psf_fits_only_on_psf_fit_rows():
    """``fit`` 2 rows are the fit's flux, 1-3 its position; Kron rows (3) keep only the position and the residual
    search's rows (4), with error terms of their own, are left out."""
    from astropy.table import QTable

    from skyfm.instruments import load_instrument

    p = simulate_patch("meerlicht", 5, size=128, scene="crowded")
    t = p.truth[np.asarray(p.truth["snr"], float) >= 5][:4]
    assert len(t) == 4
    cat = QTable({"x": np.asarray(t["x"], float), "y": np.asarray(t["y"], float),
                  "flux": np.asarray(t["flux"], float), "flux_err": np.ones(4), "pos_err": np.full(4, 0.3),
                  "fit": np.array([1, 2, 3, 4], np.int8)})
    m = ship.matched_errors(cat, p, load_instrument("meerlicht"))
    assert len(m["flux"]) == 3  # the fit-4 row left out
    assert list(m["fit"]) == [False, True, False] and list(m["fit_pos"]) == [True, True, True]


def test_calibrate_errors_on_images_of_some_bands(model_dir, monkeypatch):
    """``bands``: the validation patches hold those bands, the head's terms for them are the current ones, and the
    result names its ``band_subsets`` key; a band the head lacks is a clear error."""
    from skyfm.finetune import data as fdata

    det = SourceDetector.from_pretrained(model_dir)
    det.head_config("wise").band_subsets = {"W1": {"fit_flux_err_scale": 4.0}}
    seen = []
    real = fdata.validation_patches

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.extend(p.bands for p in out)
        return out

    monkeypatch.setattr(fdata, "validation_patches", spy)
    res = ship.calibrate_errors(det, "default", n=1, size=64, instruments=["wise"], bands=["W1"])["wise"]
    assert res["band_subset"] == "W1" and seen == [["W1"]]
    if res["fit_n_matched"] < ship.MIN_MATCHES:  # too few matches: the subset's current scale is kept
        assert res["fit_flux_err_scale"] == 4.0
    with pytest.raises(SkyfmError, match="no band 'V'"):
        ship.calibrate_errors(det, "default", n=1, size=64, instruments=["wise"], bands=["V"])


def test_fitted_rows_flux_errors_grow_with_their_neighbours_light():
    """A crowded MeerLICHT patch: with the head's blend weight k, the rows that take the PSF fit's flux (fit 2, and
    the companions, 5) carry hypot(their error without it, k x flux_blend); other rows are untouched,
    and flux_blend is the overlapping light of the detected neighbours (flux units)."""
    from skyfm.catalog.psf_fit import neighbour_light
    from skyfm.detect import detect_patch
    from skyfm.heads import load_detector

    det = load_detector()
    head = det.head_config("meerlicht")
    kept = head.fit_flux_err_blend
    p = simulate_patch("meerlicht", 11, size=96, scene="crowded")
    try:
        head.fit_flux_err_blend = 0.0
        plain = detect_patch(p, det)
        head.fit_flux_err_blend = 0.4
        blended = detect_patch(p, det)
    finally:
        head.fit_flux_err_blend = kept
    assert blended["flux_blend"].unit == blended["flux"].unit
    fit = np.asarray(blended["fit"])
    light = np.asarray(blended["flux_blend"].value, dtype=float)
    f = np.asarray(blended["flux"].value, dtype=float)
    takes_fit = (fit == 2) | (fit == 5)
    assert takes_fit.sum() >= 5 and (light[takes_fit] > 0.1 * np.abs(f[takes_fit])).sum() >= 3
    e0, e1 = _rows(plain)["flux_err"], _rows(blended)["flux_err"]
    grown = np.hypot(e0, 0.4 * light)
    np.testing.assert_allclose(e1[takes_fit], grown[takes_fit], rtol=1e-4)
    np.testing.assert_allclose(e1[~takes_fit], e0[~takes_fit], rtol=1e-6)
    # the light itself: two stars 1 FWHM apart overlap by exp(-2 ln 2) = 1/4; one over 3 FWHM away not at all;
    # negative fluxes count as none
    two = neighbour_light([10.0, 14.0, 40.0], [10.0, 10.0, 10.0], [[100.0, 10.0], [50.0, -5.0], [80.0, 8.0]], 4.0)
    np.testing.assert_allclose(two, [[12.5, 0.0], [25.0, 2.5], [0.0, 0.0]], rtol=1e-6)


def test_blend_weight_is_chosen_on_the_blended_rows():
    """Synthetic matches whose errors miss a term 0.3 L: the chooser finds about 0.3 from the blended rows
    (L >= 0.1 |F|) and then they cover 68%; with nothing missing it chooses 0."""
    from types import SimpleNamespace

    rng = np.random.default_rng(4)
    n = 6000
    flux = 10 ** rng.uniform(2, 5, n)
    light = flux * 10 ** rng.uniform(-3, 1, n)
    stat = np.sqrt(flux) * 2.0
    extra = 0.3 * light
    true = flux + rng.normal(0, np.hypot(stat, extra))
    m = {"flux": flux, "flux_err": stat, "true_flux": true, "blend": light, "fit": np.ones(n, bool),
         "companion": np.zeros(n, bool)}
    head = SimpleNamespace(blend_flux_error_weight=lambda: 0.0)
    out = {}
    ship._blend_flux_errors(m, head, out)
    assert out["fit_flux_err_blend"] == pytest.approx(0.3, rel=0.1)
    assert out["blend_flux_cov68_before_after"][1] == pytest.approx(ship.COVERAGE_68, abs=0.01)
    honest = dict(m, flux_err=np.hypot(stat, extra))
    out = {}
    ship._blend_flux_errors(honest, SimpleNamespace(blend_flux_error_weight=lambda: 0.0), out)
    assert out["fit_flux_err_blend"] < 0.15  # honest errors: no more than noise asks for
