"""Catalog tables, writers, matching, the Poisson likelihood and the metrics."""

import astropy.units as u
import numpy as np
import pytest
from astropy.table import QTable, Table

from skyfm.catalog import build_catalog, match_catalogs, read_catalog, write_catalog
from skyfm.catalog import likelihood as lk
from skyfm.catalog.metrics import (associate, best_f1, cramer_rao_position, detection_metrics, recall_at_precision,
                                   score_sweep)
from skyfm.data.simulate import simulate_patch
from skyfm.errors import SkyfmError
from skyfm.instruments import load_instrument
from skyfm.instruments.psf import PSF


@pytest.fixture(scope="module")
def fermi_patch():
    return simulate_patch("fermi-lat", seed=3, size=48)


def test_build_catalog_columns_units_and_frames(fermi_patch):
    p = fermi_patch
    t = p.truth
    n = len(t)
    cat = build_catalog(np.asarray(t["x"]), np.asarray(t["y"]), pos_err_pix=np.full(n, 0.5),
                        flux=np.asarray(t["flux"]), flux_err=np.ones(n), score=np.linspace(1, 0, n),
                        class_names=["agn", "pulsar", "other"], class_prob=np.tile([0.2, 0.7, 0.1], (n, 1)),
                        extension_deg=np.zeros(n), wcs=p.wcs, instrument="fermi-lat", score_kind="probability")
    assert isinstance(cat, QTable)
    for col in ("x", "y", "glon", "glat", "ra", "dec", "pos_err", "flux", "flux_err", "score", "class",
                "class_prob", "extension"):
        assert col in cat.colnames
        assert cat[col].info.description, col
    assert cat["x"].unit == u.pix and cat["glon"].unit == u.deg and cat["flux"].unit == u.ct
    assert cat["pos_err"].unit == u.deg
    assert np.allclose(cat["pos_err"].value, 0.5 * 0.1)
    assert np.allclose(cat["glon"].value, np.asarray(t["glon"]), atol=1e-8)
    assert np.allclose(cat["glat"].value, np.asarray(t["glat"]), atol=1e-8)
    assert set(cat["class"]) == {"pulsar"} and cat.meta["class_names"] == ["agn", "pulsar", "other"]
    assert cat.meta["frame"] == "galactic"
    ml = simulate_patch("meerlicht", seed=1, size=32, scene="field")
    c2 = build_catalog([3.0], [4.0], flux=[10.0], wcs=ml.wcs, instrument="meerlicht")
    assert "ra" in c2.colnames and "glon" not in c2.colnames and c2["flux"].unit == u.adu
    c3 = build_catalog([1.0], [2.0], pos_err_pix=[0.3])
    assert c3["pos_err"].unit == u.pix and "ra" not in c3.colnames
    with pytest.raises(SkyfmError):
        build_catalog([1.0, 2.0], [1.0])


@pytest.mark.parametrize("ext", ["fits", "ecsv", "vot"])
def test_write_catalog_round_trip_with_regions(tmp_path, fermi_patch, ext):
    t = fermi_patch.truth
    cat = build_catalog(np.asarray(t["x"]), np.asarray(t["y"]), flux=np.asarray(t["flux"]), score=np.asarray(t["snr"]),
                        pos_err_pix=np.full(len(t), 0.2), wcs=fermi_patch.wcs, instrument="fermi-lat",
                        class_names=["a", "b"], class_prob=np.tile([0.6, 0.4], (len(t), 1)),
                        extra={"fit": (np.full(len(t), 2, dtype=np.int8), "int8, as detect writes it")})
    path = write_catalog(cat, tmp_path / f"cat.{ext}")  # int8: FITS read it back as bool, VOTable has none
    back = read_catalog(path)
    assert len(back) == len(cat)
    assert np.array_equal(np.asarray(back["fit"]), np.full(len(t), 2))
    assert np.allclose(u.Quantity(back["x"]).value, cat["x"].value)
    assert np.allclose(u.Quantity(back["glon"]).value, cat["glon"].value)
    if ext != "vot":
        assert back.meta["class_names"] == ["a", "b"]
    reg = (tmp_path / "cat.reg").read_text()
    assert "galactic" in reg and reg.count("circle(") == len(cat) and "text={0" in reg
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"cat.{ext}", "cat.reg"])  # no temp files left
    with pytest.raises(SkyfmError):
        write_catalog(cat, tmp_path / "cat.txt")


def test_region_files_of_large_catalogs_read_back_with_regions(tmp_path):
    from regions import Regions

    from skyfm.catalog import io

    r = np.random.default_rng(0)
    n = io.FAST_REGIONS_ABOVE + 1
    for wcs in (simulate_patch("hubble", seed=1, size=32).wcs, None):
        cat = build_catalog(r.uniform(0, 32, n), r.uniform(0, 32, n), pos_err_pix=np.full(n, 2.0),
                            score=r.uniform(size=n), wcs=wcs, instrument="hubble")
        write_catalog(cat, tmp_path / "big.ecsv")
        regs = Regions.read(str(tmp_path / "big.reg"), format="ds9")
        assert len(regs) == n
        if wcs is None:
            assert regs[5].center.x == pytest.approx(cat["x"][5].value) and regs[5].radius == pytest.approx(2.0)
        else:
            assert regs[5].radius.to_value(u.deg) == pytest.approx(cat["pos_err"][5].to_value(u.deg), rel=1e-6)


def test_match_catalogs_is_one_to_one_and_optimal():
    det = (np.array([0.0, 1.0, 2.0, 10.0]), np.zeros(4))
    truth = (np.array([0.5, 1.6, 30.0]), np.zeros(3))
    d, t, s = match_catalogs(det, truth, 1.0)
    assert len(set(d)) == len(d) and len(set(t)) == len(t) and len(d) == 2
    assert np.all(s <= 1.0)
    # a greedy match would give truth 0 to det 1 (0.5 px) and leave det 0 alone; the optimal one pairs both
    det2 = (np.array([0.0, 0.9]), np.zeros(2))
    truth2 = (np.array([0.45, 1.5]), np.zeros(2))
    d, t, _ = match_catalogs(det2, truth2, 0.7)
    assert list(zip(d, t)) == [(0, 0), (1, 1)]
    assert len(match_catalogs((np.zeros(0), np.zeros(0)), truth, 1.0)[0]) == 0
    tab = Table({"a": [1]})
    with pytest.raises(SkyfmError):
        match_catalogs(tab, truth, 1.0)


def _inject(inst, x0, y0, flux, bkg, shape, rng):
    """Poisson counts of one point source (PSF stamps renormalised as the simulator does) over a flat background."""
    h, w = shape
    wts = lk.powerlaw_band_weights(inst)
    s = inst.pixel_scale_deg
    src = np.zeros((len(bkg), h, w))
    ix, iy = int(round(x0)), int(round(y0))
    for c, b in enumerate(inst.bands):
        r = b.psf.stamp_radius_pix(s)
        st = b.psf.stamps(np.array([x0 - ix]), np.array([y0 - iy]), s, radius_pix=r)[0]
        big = np.zeros((h + 2 * r, w + 2 * r))
        big[iy:iy + 2 * r + 1, ix:ix + 2 * r + 1] = st / st.sum() * flux * wts[c]
        src[c] = big[r:r + h, r:r + w]
    b = np.stack([np.full(shape, v) for v in bkg])
    return rng.poisson(b + src).astype(np.float64), b


def test_point_source_fit_recovers_position_and_flux_with_honest_errors():
    inst = load_instrument("fermi-lat")
    kernels = lk.psf_kernels(inst)
    rng = np.random.default_rng(7)
    bkg = [2.0, 0.5, 0.1, 0.03, 0.01, 0.003]
    pulls_x, pulls_f, ts = [], [], []
    for _ in range(24):
        x0, y0 = 24 + rng.uniform(-0.5, 0.5), 23 + rng.uniform(-0.5, 0.5)
        n, b = _inject(inst, x0, y0, 300.0, bkg, (48, 48), rng)
        fit = lk.fit_point_sources(n, b, kernels, [x0 + 0.4], [y0 - 0.3])
        pulls_x.append((fit["x"][0] - x0) / fit["x_err"][0])
        pulls_f.append((fit["flux"][0] - 300.0) / fit["flux_err"][0])
        ts.append(fit["ts"][0])
    pulls_x, pulls_f = np.array(pulls_x), np.array(pulls_f)
    assert np.all(np.abs(pulls_x) < 4)  # within its pos_err
    assert 0.6 < np.std(pulls_x) < 1.5
    cover = np.mean(np.abs(pulls_f) < 1)
    assert 0.45 < cover < 0.9, cover
    assert abs(np.median(pulls_f)) < 0.6
    assert np.min(ts) > 100


def test_a_fit_crosses_pixel_edges_on_its_way_to_the_source():
    """A source's fit window moves with it a pixel at a time, so the fit compares likelihoods of windows on either
    side of a pixel edge; only sums relative to the model without the source compare there. The plain sums run over
    different pixels, and on a sloped sky the window toward the fainter side lost by the pixels it gave up: fits
    stopped at the edge (44 of the 276 bright isolated sources of 8 Fermi-plane validation cubes sat within 0.003
    px of one, 3 expected). A bright source fitted from across the edge, and from its own pixel, ends on it."""
    inst = load_instrument("fermi-lat")
    kernels = lk.psf_kernels(inst)
    rng = np.random.default_rng(11)
    shape = (80, 80)
    slope = np.exp((np.arange(shape[1]) - 40.0) / 20.0)[None, :] * np.ones(shape)  # brighter to the right
    b = np.stack([v * slope for v in (2.0, 0.5, 0.1, 0.03, 0.01, 0.003)])
    for x0, y0, start in [(40.45, 40.2, (40.8, 40.1)), (40.7, 39.8, (40.2, 40.0))]:
        src, _ = _inject(inst, x0, y0, 2e4, [0.0] * 6, shape, rng)
        n = src + rng.poisson(b)
        near = lk.fit_point_sources(n, b, kernels, [x0], [y0], marginal_errors=False)
        far = lk.fit_point_sources(n, b, kernels, [start[0]], [start[1]], marginal_errors=False)
        assert abs(far["x"][0] - near["x"][0]) < 1e-3 and abs(far["y"][0] - near["y"][0]) < 1e-3, (far, near)
        assert abs(far["x"][0] - x0) < 4 * far["x_err"][0] and abs(far["y"][0] - y0) < 4 * far["y_err"][0]
        assert abs(far["ts"][0] - near["ts"][0]) < 1e-2


def test_a_close_pair_is_fitted_together_with_errors_marginalised_over_the_neighbour(monkeypatch):
    """Two sources of 2000 counts 2 px apart. Fitted one at a time, each with the other held, two passes leave them
    far from the joint maximum (x pulls centred near -2, flux pulls spread by ~5); fitted together after the
    passes, the pulls of x and flux centre on 0 and spread by about 1 with the errors marginalised over the
    neighbour (the conditional ones are too small: flux pulls spread ~3). A lone source's errors are the same
    either way."""
    inst = load_instrument("fermi-lat")
    kernels = lk.psf_kernels(inst)
    wts = lk.powerlaw_band_weights(inst)
    rng = np.random.default_rng(12)
    bkg = np.stack([np.full((48, 48), v) for v in [2.0, 0.5, 0.1, 0.03, 0.01, 0.003]])
    pulls: dict = {}
    for _ in range(24):
        xs = np.array([23.0, 25.0]) + rng.uniform(-0.5, 0.5)
        ys = np.array([24.0, 24.0]) + rng.uniform(-0.5, 0.5)
        n = rng.poisson(lk.add_point_sources(bkg, kernels, xs, ys, np.outer([2000.0, 2000.0], wts))).astype(float)
        for joint, marginal in ((True, True), (True, False), (False, True)):
            monkeypatch.setattr(lk, "JOINT_FIT", joint)
            fit = lk.fit_point_sources(n, bkg, kernels, xs + 0.2, ys - 0.2, marginal_errors=marginal)
            px, pf = pulls.setdefault((joint, marginal), ([], []))
            px.extend((fit["x"] - xs) / fit["x_err"])
            pf.extend((fit["flux"] - 2000.0) / fit["flux_err"])
    x_pulls, flux_pulls = (np.array(v) for v in pulls[True, True])
    assert abs(np.median(x_pulls)) < 0.5 and 0.7 < np.std(x_pulls) < 1.4, (np.median(x_pulls), np.std(x_pulls))
    assert abs(np.median(flux_pulls)) < 0.5 and 0.7 < np.std(flux_pulls) < 1.4, np.std(flux_pulls)
    assert np.std(pulls[True, False][1]) > 2.0  # conditional errors
    assert abs(np.median(pulls[False, True][0])) > 1.5 and np.std(pulls[False, True][1]) > 3.0  # one at a time
    n, b = _inject(inst, 24.2, 23.7, 600.0, [2.0, 0.5, 0.1, 0.03, 0.01, 0.003], (48, 48), rng)
    one = [lk.fit_point_sources(n, b, kernels, [24.0], [24.0], marginal_errors=m) for m in (True, False)]
    assert one[0]["x_err"][0] == one[1]["x_err"][0] and one[0]["pos_err_pix"][0] == one[1]["pos_err_pix"][0]


def test_psf_tables_are_cached_by_kernel_and_equal_fresh_ones(monkeypatch):
    """Tables are cached by the kernel's bytes; with EXACT_TABLES a kernel psf_kernels drew gets its PSF's exact
    stamps at every phase (the centre phase is the kernel itself), any other kernel the spline-shifted ones (so does
    every kernel with EXACT_TABLES off, the default)."""
    monkeypatch.setattr(lk, "EXACT_TABLES", True)
    inst = load_instrument("ctao")
    kernels = lk.psf_kernels(inst)
    a = lk.psf_tables(kernels)
    b = lk.psf_tables([k.copy() for k in kernels])  # equal bytes, other arrays: the same cached tables
    assert all(x is y for x, y in zip(a, b))
    for k, t, band in zip(kernels, a, inst.bands):
        r = (k.shape[0] - 1) // 2
        assert np.array_equal(t.table, lk.PSFTable.from_psf(band.psf, inst.pixel_scale_deg, r).table)
        assert np.array_equal(t.stamp(0.0, 0.0), k)
        assert not t.table.flags.writeable
    bigger = kernels[0] * 2.0
    assert lk.psf_table(bigger) is not a[0]
    assert np.array_equal(lk.psf_table(bigger).table, lk.PSFTable.from_kernel(bigger).table)
    monkeypatch.setattr(lk, "EXACT_TABLES", False)
    spline = lk.psf_tables(kernels)
    assert np.array_equal(spline[0].table, lk.PSFTable.from_kernel(kernels[0]).table)
    assert not np.array_equal(spline[0].table, a[0].table)


def test_fast_point_source_fit_equals_the_band_by_band_reference(monkeypatch):
    """The cached tables + all-bands-at-once stamps give the same fit as fresh copies of the same tables
    interpolated band by band, also for sources whose footprint leaves the image."""
    inst = load_instrument("fermi-lat")
    kernels = lk.psf_kernels(inst)
    rng = np.random.default_rng(3)
    bkg = [2.0, 0.5, 0.1, 0.03, 0.01, 0.003]
    n, b = _inject(inst, 20.3, 17.8, 400.0, bkg, (40, 40), rng)
    n2, _ = _inject(inst, 2.2, 36.6, 250.0, [0.0] * 6, (40, 40), rng)  # a second source near a corner
    n = n + n2
    x0, y0, f0 = [20.0, 2.5, 30.0], [18.2, 36.0, 8.0], [300.0, 200.0, 20.0]
    fast = lk.fit_point_sources(n, b, kernels, x0, y0, f0)
    monkeypatch.setattr(lk, "FAST_STAMPS", False)
    ref = lk.fit_point_sources(n, b, [lk.PSFTable(t.table.copy(), t.radius) for t in lk.psf_tables(kernels)], x0,
                               y0, f0)
    for key in ("x", "y", "flux", "flux_err", "ts", "pos_err_pix", "flux_band"):
        np.testing.assert_allclose(fast[key], ref[key], rtol=1e-9, atol=1e-12, err_msg=key)
    assert fast["ts"][0] > 100 and abs(fast["x"][0] - 20.3) < 0.3


def test_ts_map_of_an_empty_field_is_half_chi2_one_and_finds_a_source():
    inst = load_instrument("fermi-lat")
    kernels = lk.psf_kernels(inst)
    wts = lk.powerlaw_band_weights(inst)
    rng = np.random.default_rng(11)
    bkg = np.stack([np.full((64, 64), v) for v in [3.0, 1.0, 0.3, 0.1, 0.03, 0.01]])
    vals = []
    for _ in range(6):
        ts = lk.ts_map(rng.poisson(bkg).astype(float), bkg, kernels, band_weights=wts)
        vals.append(ts[4:-4:6, 4:-4:6].ravel())  # pixels ~ a PSF apart: nearly independent
    vals = np.concatenate(vals)
    assert np.all(vals >= 0)
    # 0.5 chi2_0 + 0.5 chi2_1: mean 0.5, P(TS > 4) = 0.023
    assert 0.3 < vals.mean() < 0.7, vals.mean()
    assert np.mean(vals > 4) < 0.06
    assert np.mean(vals > 16) < 0.005
    n, b = _inject(inst, 30.3, 33.7, 200.0, [3.0, 1.0, 0.3, 0.1, 0.03, 0.01], (64, 64), rng)
    ts, flux = lk.ts_map(n, b, kernels, band_weights=wts, return_flux=True)
    x, y, v = lk.find_peaks(ts, 25.0, 3.0)
    assert len(x) >= 1 and np.hypot(x[0] - 30.3, y[0] - 33.7) < 1.5
    assert 100 < flux[int(round(y[0])), int(round(x[0]))] < 400
    free = lk.ts_map(n, b, kernels, spectrum="free")
    assert free.max() > 25


def test_the_exact_ts_map_fits_the_model_as_it_is_under_the_kernel_beside_a_bright_source():
    """A source of 2e5 counts in the model and a faint one (TS ~ 170) 9 px away: the exact map's TS at every pixel
    is the likelihood fitted directly (one amplitude, the model pixel by pixel), its peaks >= 16 are the faint
    source alone; the approximation of a model constant over the kernel counts the bright source's light as the
    test source's and puts TS in the thousands all around it."""
    from scipy.optimize import minimize_scalar

    inst = load_instrument("fermi-lat")
    kernels = lk.psf_kernels(inst)
    wts = lk.powerlaw_band_weights(inst)
    rng = np.random.default_rng(3)
    level = [20.0, 4.0, 0.4, 0.1, 0.03, 0.01]
    _, flat = _inject(inst, 30.0, 30.0, 0.0, level, (60, 60), rng)
    bright = lk.add_point_sources(flat, kernels, np.array([24.3]), np.array([30.6]),
                                  2e5 * wts[None])
    faint = lk.add_point_sources(np.zeros_like(flat), kernels, np.array([33.0]), np.array([30.0]),
                                 700.0 * wts[None])
    n = rng.poisson(bright + faint).astype(float)
    ts, flux = lk.ts_map(n, bright, kernels, band_weights=wts, return_flux=True)
    w = wts / wts.sum()

    def fitted(ix, iy):
        parts = []
        for c, k in enumerate(kernels):
            k = np.asarray(k)
            r = (k.shape[0] - 1) // 2
            y0, x0 = iy - r, ix - r
            ys, xs = slice(max(y0, 0), min(iy + r + 1, 60)), slice(max(x0, 0), min(ix + r + 1, 60))
            kk = k[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] * w[c]
            parts.append((n[c][ys, xs], bright[c][ys, xs], kk))
        res = minimize_scalar(lambda a: -sum((m * np.log1p(a * kk / bb) - a * kk).sum() for m, bb, kk in parts),
                              bounds=(0.0, 1e5), method="bounded", options={"xatol": 1e-4})
        return max(-2.0 * res.fun, 0.0), res.x

    for ix, iy in [(33, 30), (32, 31), (28, 30), (20, 25), (24, 30), (45, 40)]:
        ref, amp = fitted(ix, iy)
        if ts[iy, ix] >= lk.TS_MAP_SCREEN:  # fitted; below the screen the score test's TS, a faint source's
            assert abs(ts[iy, ix] - ref) < 1e-3 * max(ref, 1.0), (ix, iy, ts[iy, ix], ref)
            assert abs(flux[iy, ix] - amp) < 1e-2 * max(amp, 1.0)
        else:
            assert ref < 2.5, (ix, iy, ref)
    assert ts[30, 33] > 30
    x, y, _ = lk.find_peaks(ts, 16.0, 2.0)
    assert len(x) == 1 and np.hypot(x[0] - 33.0, y[0] - 30.0) < 1.5
    approximate = lk.ts_map(n, bright, kernels, band_weights=wts, method="approximate")
    assert approximate.max() > 1000 and len(lk.find_peaks(approximate, 16.0, 2.0)[0]) > 1
    with pytest.raises(SkyfmError, match="method"):
        lk.ts_map(n, bright, kernels, method="fast")


def test_likelihood_weights_discount_bins_where_a_few_percent_of_the_model_outweigh_its_noise():
    """On a flat background B the weight is 1 / (1 + eps^2 B / sum K^2), edges included; a bright broad bin (the
    plane's lowest) weighs little, a sparse sharp one about 1; eps 0 weighs all alike."""
    inst = load_instrument("fermi-lat")
    kernels = lk.psf_kernels(inst)
    bkg = np.stack([np.full((40, 40), v) for v in [100.0, 20.0, 2.0, 0.2, 0.05, 0.01]])
    w = lk.likelihood_weights(bkg, kernels, 0.03)
    for c, k in enumerate(kernels):
        b_eff = bkg[c, 0, 0] / np.sum(np.asarray(k) ** 2)
        np.testing.assert_allclose(w[c], 1.0 / (1.0 + 0.03**2 * b_eff), rtol=1e-6)
    assert w[0].max() < 0.1 and w[3:].min() > 0.99
    np.testing.assert_allclose(lk.likelihood_weights(bkg, kernels, 0.0), 1.0)
    with pytest.raises(SkyfmError, match="epsilon"):
        lk.likelihood_weights(bkg, kernels, -0.1)


def test_a_weighted_ts_map_is_the_weighted_sum_of_the_bins_and_ts_band_sums_to_ts(monkeypatch):
    inst = load_instrument("fermi-lat")
    kernels = lk.psf_kernels(inst)
    wts = lk.powerlaw_band_weights(inst)
    rng = np.random.default_rng(5)
    n, b = _inject(inst, 20.3, 21.7, 300.0, [3.0, 1.0, 0.3, 0.1, 0.03, 0.01], (40, 40), rng)
    for method in ("exact", "approximate"):
        plain = lk.ts_map(n, b, kernels, band_weights=wts, method=method)
        np.testing.assert_allclose(lk.ts_map(n, b, kernels, band_weights=wts, weights=np.ones_like(b), method=method),
                                   plain)
        with monkeypatch.context() as m:  # the exact map fits every pixel: the same pixels, weighted or not
            m.setattr(lk, "TS_MAP_SCREEN", 0.0)
            half = lk.ts_map(n, b, kernels, band_weights=wts, weights=np.full_like(b, 0.5), method=method)
            full = lk.ts_map(n, b, kernels, band_weights=wts, method=method)
            np.testing.assert_allclose(half, 0.5 * full, rtol=1e-5, atol=1e-6)
            free = lk.ts_map(n, b, kernels, spectrum="free", weights=np.full_like(b, 0.25), method=method)
            np.testing.assert_allclose(free, 0.25 * lk.ts_map(n, b, kernels, spectrum="free", method=method),
                                       rtol=1e-5, atol=1e-6)
    with pytest.raises(SkyfmError, match="weights"):
        lk.ts_map(n, b, kernels, weights=np.ones((6, 4, 4)))
    fit = lk.fit_point_sources(n, b, kernels, [20.0], [21.5])
    assert fit["ts_band"].shape == (1, 6) and fit["ts"][0] > 25
    np.testing.assert_allclose(fit["ts_band"].sum(axis=1), fit["ts"], rtol=1e-6)


def test_estimate_background_of_a_flat_field_with_a_source():
    inst = load_instrument("fermi-lat")
    kernels = lk.psf_kernels(inst)
    rng = np.random.default_rng(2)
    n, b = _inject(inst, 40.0, 40.0, 3000.0, [5.0, 2.0, 0.5, 0.2, 0.05, 0.02], (80, 80), rng)
    for kw in ({}, {"n_iter": 3, "mask_sigma": 3.0, "smoothing_fwhm": 2.0}):
        est = lk.estimate_background(n, kernels, **kw)
        ratio = est[:3].mean(axis=(1, 2)) / b[:3].mean(axis=(1, 2))
        assert np.all(np.abs(ratio - 1) < 0.15), (kw, ratio)
        far = est[:2, :15, :15].mean(axis=(1, 2)) / b[:2, :15, :15].mean(axis=(1, 2))
        assert np.all(np.abs(far - 1) < 0.1), (kw, far)


def test_power_law_weights_of_a_subset_of_bins_use_those_bins_exposures():
    inst = load_instrument("fermi-lat")
    kev = np.array([[b.energy[0].to_value("keV"), b.energy[1].to_value("keV")] for b in inst.bands])
    full = lk.powerlaw_band_weights(inst, 2.2)
    np.testing.assert_allclose(lk.powerlaw_band_weights(inst, 2.2, kev), full)
    sub = lk.powerlaw_band_weights(inst, 2.2, kev[2:5])
    np.testing.assert_allclose(sub, full[2:5] / full[2:5].sum())


def test_known_sources_are_left_out_of_the_estimated_background():
    """Under a bright source the plain estimate (a high-pass filter) holds much of the source; with the source's
    position given it stays near the true background, and a fit against it recovers the flux."""
    inst = load_instrument("fermi-lat")
    kernels = lk.psf_kernels(inst)
    rng = np.random.default_rng(3)
    n, b = _inject(inst, 40.0, 40.0, 3000.0, [5.0, 2.0, 0.5, 0.2, 0.05, 0.02], (80, 80), rng)
    plain = lk.estimate_background(n, kernels)
    masked = lk.estimate_background(n, kernels, sources=([40.0], [40.0]))
    at = (slice(0, 3), slice(37, 44), slice(37, 44))
    assert plain[at].sum() > 2.0 * b[at].sum()  # the low bins' wide PSF: the source more than doubles it
    assert abs(masked[at].sum() / b[at].sum() - 1) < 0.15  # its far wings (beyond 2 r68) still count
    fits = {name: lk.fit_point_sources(n, bg, kernels, [40.0], [40.0])["flux"][0]
            for name, bg in (("plain", plain), ("masked", masked), ("true", b))}
    assert fits["plain"] < 0.6 * 3000.0 and fits["masked"] > 0.85 * 3000.0 and fits["true"] > 0.9 * 3000.0


def test_light_the_background_model_lacks_is_added_before_the_fit():
    """A sky 40% above its diffuse model (what unresolved sources do): the fit against the model takes the missing
    light under the PSF for the source's (flux about doubled); against the model plus the smoothed residual of a
    first fit it agrees with the fit against the true background."""
    inst = load_instrument("fermi-lat")
    kernels = lk.psf_kernels(inst)
    n, b = _inject(inst, 40.0, 40.0, 1000.0, 1.4 * np.array([5.0, 2.0, 0.5, 0.2, 0.05, 0.02]), (96, 96),
                   np.random.default_rng(0))
    model = b / 1.4
    first = lk.fit_point_sources(n, model, kernels, [40.0], [40.0])
    fixed = lk.add_unresolved(n, model, kernels, first["x"], first["y"], first["flux_band"])
    again = lk.fit_point_sources(n, fixed, kernels, first["x"], first["y"], first["flux"])
    true = lk.fit_point_sources(n, b, kernels, [40.0], [40.0])
    assert first["flux"][0] > 1.6 * true["flux"][0]
    assert abs(again["flux"][0] / true["flux"][0] - 1) < 0.03 and abs(again["ts"][0] / true["ts"][0] - 1) < 0.03
    np.testing.assert_allclose(fixed[:3].mean(axis=(1, 2)), b[:3].mean(axis=(1, 2)), rtol=0.03)  # the sparse bins: noise
    with pytest.raises(SkyfmError, match="background shape"):
        lk.add_unresolved(n, model[:, :10], kernels, [], [], np.zeros((0, 6)))


def test_flux_errors_of_overlapping_sources_are_marginalised_over_each_other():
    """Two equal sources 4 px apart (the lowest bin's PSF FWHM is 7.6 px): the fluxes the fit gives scatter about
    twice as much as the errors conditional on the neighbour say; the reported errors, marginalised over the
    neighbour, come within 25% of the scatter. Far apart, the errors are each source's own."""
    inst = load_instrument("fermi-lat")
    kernels = lk.psf_kernels(inst)
    bkg = np.array([5.0, 2.0, 0.5, 0.2, 0.05, 0.02])
    for sep, lo, hi in ((4.0, 0.75, 1.25), (30.0, 0.8, 1.3)):
        fluxes, errors = [], []
        for seed in range(30):
            rng = np.random.default_rng(seed)
            n1, b = _inject(inst, 40.0, 48.0, 600.0, bkg, (96, 96), rng)
            n2, _ = _inject(inst, 40.0 + sep, 48.0, 600.0, 0 * bkg, (96, 96), rng)
            fit = lk.fit_point_sources(n1 + n2, b, kernels, [40.0, 40.0 + sep], [48.0, 48.0])
            fluxes.append(fit["flux"][0])
            errors.append(fit["flux_err"][0])
        assert lo < np.median(errors) / np.std(fluxes) < hi, (sep, np.median(errors), np.std(fluxes))
    one = lk.fit_point_sources(n1 + n2, b, kernels, [40.0], [48.0])  # the last seed, the far source left out
    assert fit["flux_err"][0] == pytest.approx(one["flux_err"][0], rel=0.01)


def test_confusion_variance_is_zero_on_a_modelled_sky_and_grows_with_undetected_sources():
    inst = load_instrument("fermi-lat")
    kernels = lk.psf_kernels(inst)
    rng = np.random.default_rng(5)
    bkg = np.array([5.0, 2.0, 0.5, 0.2, 0.05, 0.02])
    b = np.stack([np.full((160, 160), v) for v in bkg])
    clean = rng.poisson(b).astype(np.float64)
    # 400 sources of 40 counts each, none of them in the model (each a TS of about 4 at the lowest bins' PSF)
    faint = lk.add_point_sources(np.zeros_like(b), kernels, rng.uniform(0, 160, 400), rng.uniform(0, 160, 400),
                                 np.outer(np.full(400, 40.0), lk.powerlaw_band_weights(inst)))
    confused = rng.poisson(b + faint).astype(np.float64)
    at = ([80.0], [80.0])
    poisson = lk.fit_point_sources(clean, b, kernels, *at, [100.0], marginal_errors=False)["flux_err"][0] ** 2
    band0, total0 = lk.confusion_variance(clean, b, kernels, *at)
    band1, total1 = lk.confusion_variance(confused, b + faint.mean(axis=(1, 2), keepdims=True), kernels, *at)
    assert total0[0] < 0.15 * poisson  # a sky its model explains: (almost) nothing beyond Poisson
    assert total1[0] > poisson and total1[0] > 10 * total0[0]
    assert band0.shape == (1, 6) and np.all(band1[0, :2] > band0[0, :2])


def test_detection_metrics_counts_faint_matches_as_neither():
    truth = Table({"x": [10.0, 20.0, 30.0, 40.0], "y": [10.0, 20.0, 30.0, 40.0], "snr": [50.0, 8.0, 3.0, 6.0],
                   "flux": [100.0, 50.0, 10.0, 40.0]})
    det = Table({"x": [10.2, 30.1, 60.0], "y": [10.1, 29.8, 60.0], "score": [0.9, 0.8, 0.7]})
    m = detection_metrics(det, truth, 1.0)
    assert (m["tp"], m["fp"], m["fn"], m["neither"]) == (1, 1, 2, 1)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(1 / 3)
    snr_bins = {(b["lo"], b["hi"]): b for b in m["per_snr"]}
    assert snr_bins[(3.0, 5.0)]["found"] == 1
    sw = score_sweep(det, truth, 1.0)
    best = best_f1(sw)
    assert best["threshold"] == pytest.approx(0.9) and best["precision"] == 1.0
    r = recall_at_precision(sw, 0.9, (3.0, 5.0))
    assert r["recall"] == 1.0 and r["threshold"] == pytest.approx(0.8)


def test_cramer_rao_matches_the_analytic_limit():
    scale = 1.0 / 3600
    psf = PSF.gaussian(fwhm_deg=6 * scale)  # sigma = 2.55 px: well sampled
    sigma = 6 / 2.3548
    crb = cramer_rao_position(psf, [1e4], 0.0, scale)
    assert crb[0] == pytest.approx(sigma / np.sqrt(1e4), rel=0.05)  # background-free Poisson: sigma / sqrt(N)
    with_bkg = cramer_rao_position(psf, [1e4], 100.0, scale, gain=1.0, read_noise=5.0)
    assert with_bkg[0] > crb[0]


def test_associate_within_the_95_percent_ellipse():
    cat = build_catalog([0, 1, 2], [0, 0, 0])
    cat["glon"] = [10.0, 10.05, 12.0] * u.deg
    cat["glat"] = [0.0, 0.0, 0.0] * u.deg
    ref = Table({"Source_Name": ["4FGL A", "4FGL B"], "GLON": [10.0, 11.0], "GLAT": [0.0, 0.0],
                 "RAJ2000": [0.0, 0.0], "DEJ2000": [0.0, 0.0],
                 "Conf_95_SemiMajor": [0.08, 0.05], "Conf_95_SemiMinor": [0.08, 0.05], "Conf_95_PosAng": [0.0, 0.0]})
    del ref["RAJ2000"], ref["DEJ2000"]
    out = associate(cat, ref)
    assert list(out["assoc_name"]) == ["4FGL A", "4FGL A", ""]
    assert out["assoc_sep"][0].to_value(u.deg) == pytest.approx(0.0, abs=1e-9)


def test_association_with_4fgl_dr2(shared_data):
    ref_path = shared_data / "fermi" / "gll_psc_v27.fit"
    if not ref_path.is_file():
        pytest.skip("no 4FGL-DR2 file")
    from skyfm.catalog.metrics import read_reference

    ref = read_reference(ref_path)
    cat = build_catalog([0.0], [0.0])
    cat["ra"] = [float(ref["RAJ2000"][100])] * u.deg
    cat["dec"] = [float(ref["DEJ2000"][100])] * u.deg
    out = associate(cat, ref_path)
    assert out["assoc_name"][0] == str(ref["Source_Name"][100]).strip()


def test_score_sweep_of_an_image_without_true_sources_counts_every_detection_as_unmatched():
    det = Table({"x": [3.0, 10.0], "y": [4.0, 12.0], "score": [0.9, 0.5]})
    truth = Table({"x": np.zeros(0), "y": np.zeros(0), "snr": np.zeros(0)})
    sweep = score_sweep(det, truth, radius_pix=2.0)
    assert list(sweep["score"]) == [0.9, 0.5]
    assert np.isnan(sweep["match_snr"]).all() and (sweep["match_truth"] == -1).all()


def test_an_empty_ecsv_catalog_reads_back(tmp_path):
    """astropy cannot read the empty multi-dimensional columns it writes; read_catalog must still work."""
    import astropy.units as u
    import numpy as np
    from astropy.table import QTable

    from skyfm.catalog import read_catalog, write_catalog

    t = QTable({"x": np.zeros(0) * u.pix, "y": np.zeros(0) * u.pix, "class_prob": np.zeros((0, 2)),
                "flux_band": np.zeros((0, 3)) * u.adu})
    t.meta["class_names"] = ["star", "galaxy"]
    path = tmp_path / "empty.ecsv"
    write_catalog(t, path)
    back = read_catalog(path)
    assert len(back) == 0 and back["class_prob"].shape == (0, 2) and back["flux_band"].unit == u.adu
    assert back.meta["class_names"] == ["star", "galaxy"]


def _inject_gaussian(inst, x0, y0, flux, r68_pix, bkg, shape, rng):
    """Poisson counts of a radial Gaussian source (68% radius ``r68_pix`` before the PSF) seen through each bin's
    PSF, over a flat background."""
    from scipy.signal import fftconvolve

    h, w = shape
    wts = lk.powerlaw_band_weights(inst)
    sigma = r68_pix / 1.5096
    yy, xx = np.mgrid[0:h, 0:w]
    shape_img = np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / sigma**2)
    shape_img /= shape_img.sum()
    src = np.zeros((len(bkg), h, w))
    for c, b in enumerate(inst.bands):
        r = b.psf.stamp_radius_pix(inst.pixel_scale_deg)
        st = b.psf.stamps(np.zeros(1), np.zeros(1), inst.pixel_scale_deg, radius_pix=r)[0]
        src[c] = fftconvolve(shape_img, st / st.sum(), mode="same") * flux * wts[c]
    b = np.stack([np.full(shape, v) for v in bkg])
    return rng.poisson(np.clip(b + src, 0, None)).astype(np.float64), b


def test_extension_test_joins_the_pieces_of_an_extended_source_and_leaves_point_sources_alone():
    """A Gaussian source of r68 0.5 deg (5 px; the sharpest bin's PSF r68 is 0.1 deg) that point fits break into
    pieces comes back as one extended source of about its size and flux, its pieces gone; a point source of the
    same counts is not made extended."""
    from skyfm.catalog.extended import extension_test

    inst = load_instrument("fermi-lat")
    kernels = lk.psf_kernels(inst)
    bkg = np.array([5.0, 2.0, 0.5, 0.2, 0.05, 0.02])
    n, b = _inject_gaussian(inst, 48.0, 48.0, 4000.0, 5.0, bkg, (96, 96), np.random.default_rng(3))
    starts = np.array([[48.0, 48.0], [53.0, 48.0], [43.0, 48.0], [48.0, 53.0], [48.0, 43.0]])
    fit = lk.fit_point_sources(n, b, kernels, starts[:, 0], starts[:, 1])
    assert np.sum(fit["ts"] >= 25) >= 3  # the point fits see several significant pieces
    res = extension_test(n, b, kernels, fit["x"], fit["y"], fit["flux_band"], fit["ts"])
    found = res["kept"] & (res["ts"] >= 25)  # what the selection keeps
    ext = np.flatnonzero(found & (res["extension_pix"] > 0))
    assert len(ext) == 1 and 2.5 <= res["extension_pix"][ext[0]] <= 9.0 and res["ts_ext"][ext[0]] > 0
    assert np.hypot(res["x"][ext[0]] - 48, res["y"][ext[0]] - 48) < 1.0
    assert abs(res["flux_band"][ext[0]].sum() / 4000.0 - 1) < 0.15
    assert found.sum() <= 2  # the pieces gone (one may stay on the noise)

    n, b = _inject(inst, 48.0, 48.0, 4000.0, bkg, (96, 96), np.random.default_rng(3))
    fit = lk.fit_point_sources(n, b, kernels, [48.0], [48.0])
    res = extension_test(n, b, kernels, fit["x"], fit["y"], fit["flux_band"], fit["ts"])
    assert res["kept"].all() and not res["changed"].any() and res["extension_pix"][0] == 0


def _extended_scene(rng):
    """A Gaussian of r68 3 deg (30 px; the Cygnus cocoon's size, beyond the size grid's 1.3 deg) with 60000
    counts and a point source of 3000 counts 12 px from its centre, over a flat background; the starts are its
    centre, eight pieces on a ring of 15 px, and the point source."""
    inst = load_instrument("fermi-lat")
    bkg = np.array([5.0, 2.0, 0.5, 0.2, 0.05, 0.02])
    n, b = _inject_gaussian(inst, 80.0, 80.0, 60000.0, 30.0, bkg, (160, 160), rng)
    point, _ = _inject(inst, 92.0, 80.0, 3000.0, 0 * bkg, (160, 160), rng)
    t = np.linspace(0, 2 * np.pi, 8, endpoint=False) + 0.3
    xs = np.r_[80.0, 80.0 + 15 * np.cos(t), 92.0]
    ys = np.r_[80.0, 80.0 + 15 * np.sin(t), 80.0]
    return inst, n + point, b, xs, ys


def test_extension_test_grows_its_size_grid_for_a_source_larger_than_it():
    """The Gaussian comes back as one extended source of about its size (the grid grows past its 1.3 deg while
    larger sizes fit better) and flux, the pieces gone and the point source inside it kept. Before, the pieces came
    out as five extended rows of the grid's 1.3 deg (one on the point source, with its light); with the grid grown
    alone, as two (a piece outside the first one's reach kept its light and grew into a second)."""
    from skyfm.catalog.extended import extension_test

    inst, n, b, xs, ys = _extended_scene(np.random.default_rng(11))
    kernels = lk.psf_kernels(inst)
    fit = lk.fit_point_sources(n, b, kernels, xs, ys)
    assert np.sum(fit["ts"] >= 25) >= 6  # the point fits see many significant pieces
    res = extension_test(n, b, kernels, fit["x"], fit["y"], fit["flux_band"], fit["ts"])
    found = res["kept"] & (res["ts"] >= 25)
    ext = np.flatnonzero(found & (res["extension_pix"] > 0))
    assert len(ext) == 1 and 22.0 <= res["extension_pix"][ext[0]] <= 40.0
    assert np.hypot(res["x"][ext[0]] - 80, res["y"][ext[0]] - 80) < 3.0
    assert abs(res["flux_band"][ext[0]].sum() / 60000.0 - 1) < 0.15
    pt = np.flatnonzero(found & (res["extension_pix"] == 0))
    assert len(pt) <= 2 and np.min(np.hypot(res["x"][pt] - 92, res["y"][pt] - 80)) < 1.0


def test_fit_pair_recovers_two_sources_closer_than_the_psf():
    """Two sources 1.5 px apart (the sharpest bin's PSF FWHM is ~2 px) with 3:1 counts: the joint fit from starts
    off their axis finds both positions within 0.3 px and their counts within 20%."""
    from skyfm.catalog.split import fit_pair

    inst = load_instrument("fermi-lat")
    kernels = lk.psf_kernels(inst)
    bkg = np.array([2.0, 1.0, 0.3, 0.1, 0.03, 0.01])
    n1, b = _inject(inst, 40.0, 40.0, 6000.0, bkg, (80, 80), np.random.default_rng(5))
    n2, _ = _inject(inst, 41.5, 40.0, 2000.0, 0 * bkg, (80, 80), np.random.default_rng(6))
    n = n1 + n2
    fb = np.outer([0.6, 0.4], lk.powerlaw_band_weights(inst)) * 8000.0
    fit = fit_pair(n, b, lk.psf_tables(kernels), [40.2, 41.0], [39.5, 40.6], fb)
    order = np.argsort(-fit["flux"])
    assert np.hypot(fit["x"][order[0]] - 40.0, fit["y"][order[0]] - 40.0) < 0.3
    assert np.hypot(fit["x"][order[1]] - 41.5, fit["y"][order[1]] - 40.0) < 0.3
    assert abs(fit["flux"][order[0]] / 6000.0 - 1) < 0.2 and abs(fit["flux"][order[1]] / 2000.0 - 1) < 0.2
    assert np.all(fit["ts"] > 25)


def _blend(y2: float, seed: int):
    """Fermi-LAT counts of a source of 5000 counts at (40, 40) and, apart, of one of 2500 at (40, y2) over a flat
    background: (instrument, kernels, counts of the first with the background, counts of the second, background)."""
    inst = load_instrument("fermi-lat")
    bkg = np.array([2.0, 1.0, 0.3, 0.1, 0.03, 0.01])
    rng = np.random.default_rng(seed)
    n1, b = _inject(inst, 40.0, 40.0, 5000.0, bkg, (80, 80), rng)
    n2, _ = _inject(inst, 40.0, y2, 2500.0, 0 * bkg, (80, 80), rng)
    return inst, lk.psf_kernels(inst), n1, n2, b


def test_split_test_splits_a_blend_but_not_a_point_source_nor_an_extended_one():
    """A blend fitted as one source comes apart into its two; a single point source of the same counts, and a
    Gaussian source of r68 3 px (which two points fit better than one), stay one row (the extended one only
    because the pair must beat one extended source too)."""
    from skyfm.catalog.split import split_test

    inst, kernels, n1, n2, b = _blend(42.0, 11)
    bkg = b[:, 0, 0]
    one = lk.fit_point_sources(n1 + n2, b, kernels, [40.0], [41.0])
    res = split_test(n1 + n2, b, kernels, one["x"], one["y"], one["flux_band"], one["ts"])
    assert len(res["x"]) == 2 and res["changed"].all() and res["ts_split"][0] >= 25
    assert np.hypot(res["x"][0] - 40.0, res["y"][0] - 40.0) < 0.5  # the brighter keeps the row
    assert np.hypot(res["x"][1] - 40.0, res["y"][1] - 42.0) < 0.5
    assert list(res["parent"]) == [0, 0]

    single = lk.fit_point_sources(n1, b, kernels, [40.0], [40.0])
    res = split_test(n1, b, kernels, single["x"], single["y"], single["flux_band"], single["ts"])
    assert len(res["x"]) == 1 and not res["changed"].any()

    n, b = _inject_gaussian(inst, 40.0, 40.0, 7500.0, 3.0, bkg, (80, 80), np.random.default_rng(12))
    blob = lk.fit_point_sources(n, b, kernels, [40.0], [40.0])
    res = split_test(n, b, kernels, blob["x"], blob["y"], blob["flux_band"], blob["ts"])
    assert len(res["x"]) == 1 and not res["changed"].any()
    bare = split_test(n, b, kernels, blob["x"], blob["y"], blob["flux_band"], blob["ts"], extension_check=False)
    assert len(bare["x"]) >= 2  # the check is what keeps it one


def test_apply_split_test_gives_the_fainter_of_a_blend_a_row_of_its_own():
    """detect.apply_split_test on a blend fitted as one row: two rows, each near its source, the new one with the
    class and network score of the row it came from, both fitted again (finite errors, TS >= 25) and carrying
    ts_split; rows with nothing to split keep their values and get ts_split NaN."""
    import skyfm.detect as D

    inst, kernels, n1, n2, b = _blend(42.5, 21)
    n = n1 + n2
    c = len(inst.bands)
    rows = {"x": np.array([40.0]), "y": np.array([41.0]), "flux": np.array([7500.0]), "flux_err": np.full(1, np.nan),
            "flux_band": np.full((1, c), 7500.0 / c), "flux_band_err": np.full((1, c), np.nan),
            "pos_err": np.full(1, np.nan), "score": np.array([0.8]), "class_prob": np.array([[0.6, 0.3, 0.1]]),
            "extension": np.zeros(1)}
    rows = D.refine_counts(rows, n, inst, None, b, unresolved=False)
    out = D.apply_split_test(rows, n, b, kernels, inst, None, None, None, False, 25.0)
    assert len(out["x"]) == 2 and np.all(np.isfinite(out["ts_split"])) and np.all(out["ts"] >= 25)
    assert np.hypot(out["x"][0] - 40.0, out["y"][0] - 40.0) < 0.5
    assert np.hypot(out["x"][1] - 40.0, out["y"][1] - 42.5) < 0.5
    assert np.allclose(out["class_prob"][1], [0.6, 0.3, 0.1]) and out["score"][1] == 0.8
    assert np.all(np.isfinite(out["flux_err"])) and np.all(np.isfinite(out["pos_err"]))
    assert out["flux"][0] == pytest.approx(5000.0, rel=0.15) and out["flux"][1] == pytest.approx(2500.0, rel=0.2)

    single = D.refine_counts({k: v.copy() for k, v in rows.items() if k in ("x", "y", "flux", "flux_err", "flux_band",
                              "flux_band_err", "pos_err", "score", "class_prob", "extension")}, n1, inst, None, b,
                             unresolved=False)
    kept = D.apply_split_test(single, n1, b, kernels, inst, None, None, None, False, 25.0)
    assert len(kept["x"]) == 1 and np.isnan(kept["ts_split"][0]) and kept["x"][0] == single["x"][0]
