"""The search of the PSF fit's residual for the sources the detections missed (skyfm.catalog.residual_search)."""

import numpy as np
import pytest

from skyfm.catalog.residual_search import find_residual_sources, significance_map
from skyfm.data.simulate import simulate_patch

FWHM = 2.2  # pixels, as Hubble's


def _gaussian(shape, x0, y0, sigma, flux):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return flux * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma ** 2)) / (2 * np.pi * sigma ** 2)


def test_the_significance_map_is_unit_noise_and_a_gaussian_source_s_matched_filter_snr():
    rng = np.random.default_rng(0)
    rms = np.full((2, 160, 160), 3.0)
    noise = rng.normal(0, 3.0, (2, 160, 160))
    m = significance_map(noise, rms, None, 4.0)
    assert abs(np.std(m[20:-20, 20:-20]) - 1) < 0.08 and abs(np.mean(m[20:-20, 20:-20])) < 0.1
    # a Gaussian of sigma 4 px in both bands: the matched filter's SNR is flux / (rms sqrt(4 pi sigma^2)) per band,
    # sqrt(2) of it for two bands of equal noise
    flux = 400.0
    src = np.stack([_gaussian((160, 160), 80, 80, 4.0, flux)] * 2)
    m = significance_map(src, rms, None, 4.0)
    expect = np.sqrt(2) * flux / (3.0 * np.sqrt(4 * np.pi * 16))
    assert m[80, 80] == pytest.approx(expect, rel=0.02)
    # masked pixels carry no weight (a source under a masked square is not seen), and a pixel far above the noise
    # (a cosmic ray) is clipped to a few sigma
    mask = np.zeros((2, 160, 160), bool)
    mask[:, 60:100, 60:100] = True
    assert abs(significance_map(src, rms, mask, 4.0)[80, 80]) < 1e-6
    spike = np.zeros((1, 160, 160))
    spike[0, 80, 80] = 3.0 * 1000
    assert significance_map(spike, rms[:1], None, 4.0)[80, 80] < 1.0


def test_a_large_masked_region_does_not_turn_the_noise_elsewhere_into_sources():
    # pure noise, the right 60% of the tile masked (a mosaic's no-data edge): the significance is normalised by its
    # scatter where the filters see pixels, not by the zeros of the masked region
    rng = np.random.default_rng(3)
    rms = np.full((1, 256, 256), 5.0)
    image = rng.normal(0, 5.0, (1, 256, 256))
    mask = np.zeros((1, 256, 256), bool)
    mask[:, :, 100:] = True
    found = find_residual_sources(image, rms, mask, FWHM, [], [], min_snr=4.0)
    assert len(found) <= 2 and np.all(found.x < 100)


def test_light_that_peaks_on_masked_pixels_gives_no_source():
    """A bright source whose core is masked (a user's bad-pixel mask, a saturated core, a cosmic-ray hit) leaves a
    ring of wing light around the mask: it is no new source, though the same source unmasked is one."""
    rng = np.random.default_rng(4)
    rms = np.full((1, 96, 96), 5.0)
    image = rng.normal(0, 5.0, (1, 96, 96)) + _gaussian((96, 96), 48.3, 47.6, 3.0, 40000.0)[None]
    assert len(find_residual_sources(image, rms, None, FWHM, [], [], min_snr=5.0)) == 1
    mask = np.zeros((1, 96, 96), bool)
    mask[:, 44:52, 44:52] = True
    assert len(find_residual_sources(image, rms, mask, FWHM, [], [], min_snr=5.0)) == 0


def test_diffuse_sources_are_found_where_no_detection_stands_and_nowhere_else():
    """A faint diffuse galaxy (every pixel below the noise) is found near its centre; one holding a detection, a
    satellite trail across the image, cosmic-ray spikes and a point source's misfit core are not."""
    rng = np.random.default_rng(1)
    H = W = 256
    rms = np.full((1, H, W), 5.0)
    image = rng.normal(0, 5.0, (1, H, W))
    image[0] += _gaussian((H, W), 60.3, 70.6, 6.0, 2500.0)  # peak 11 ADU per pixel: 2 sigma; total SNR ~ 24
    image[0] += _gaussian((H, W), 190.0, 60.0, 6.0, 2500.0)  # the same, where a detection stands
    yy, xx = np.mgrid[:H, :W]
    image[0] += 8.0 * np.exp(-((yy - 0.4 * xx - 150) ** 2) / 8.0)  # a trail: 1.6 sigma, 3 px wide, across
    ys, xs = rng.integers(0, H, 40), rng.integers(0, W, 40)
    image[0, ys, xs] += 500.0  # cosmic rays, left in
    image[0] += _gaussian((H, W), 200.0, 200.0, 0.7, 600.0) - _gaussian((H, W), 200.0, 200.0, 0.9, 600.0)
    det_x, det_y = np.array([190.0, 200.0]), np.array([61.0, 200.0])
    found = find_residual_sources(image, rms, None, FWHM, det_x, det_y, min_snr=6.0)
    assert len(found) == 1
    assert np.hypot(found.x[0] - 60.3, found.y[0] - 70.6) < 1.5
    assert found.snr[0] > 10 and found.sigma_pix[0] > 2.0
    # no detections at all: the second galaxy is found too
    both = find_residual_sources(image, rms, None, FWHM, [], [], min_snr=6.0)
    assert len(both) >= 2 and np.min(np.hypot(both.x - 190, both.y - 60)) < 1.5


def test_a_footprint_with_two_peaks_is_split_and_a_detection_s_own_light_is_not(monkeypatch):
    """Two diffuse galaxies whose footprints touch are two sources, not one; a galaxy whose footprint runs into the
    light a detected star's model left is found beside it; a single galaxy's noisy footprint and the star's leftover
    light give no second source."""
    rng = np.random.default_rng(7)
    H = W = 200
    rms = np.full((1, H, W), 5.0)
    image = rng.normal(0, 5.0, (1, H, W))
    image[0] += _gaussian((H, W), 50.0, 60.0, 5.0, 3000.0) + _gaussian((H, W), 68.0, 60.0, 5.0, 2500.0)
    image[0] += _gaussian((H, W), 140.0, 140.0, 5.0, 3000.0)  # alone
    image[0] += _gaussian((H, W), 140.0, 40.0, 5.0, 2500.0)  # beside a detected star (its misfit light below)
    image[0] += _gaussian((H, W), 126.0, 40.0, 2.0, 600.0)
    found = find_residual_sources(image, rms, None, FWHM, [126.0], [40.0], min_snr=6.0)
    truth = np.array([[50.0, 60.0], [68.0, 60.0], [140.0, 140.0], [140.0, 40.0]])
    dist = np.hypot(found.x[:, None] - truth[:, 0], found.y[:, None] - truth[:, 1])
    assert len(found) == 4 and np.all(dist.min(axis=0) < 2.0)
    # without the deblending the pair is one source and the galaxy beside the star none
    import skyfm.catalog.residual_search as rs

    monkeypatch.setattr(rs, "DEBLEND_CONTRAST", 1e9)
    assert len(find_residual_sources(image, rms, None, FWHM, [126.0], [40.0], min_snr=6.0)) == 2


def test_without_the_trail_rule_the_trail_would_be_found(monkeypatch):
    """The trail of the test above is significant: only the footprint rule keeps it out."""
    import skyfm.catalog.residual_search as ds

    rng = np.random.default_rng(1)
    H = W = 256
    image = rng.normal(0, 5.0, (1, H, W))
    yy, xx = np.mgrid[:H, :W]
    image[0] += 8.0 * np.exp(-((yy - 0.4 * xx - 150) ** 2) / 8.0)
    rms = np.full((1, H, W), 5.0)
    assert len(ds.find_residual_sources(image, rms, None, FWHM, [], [], min_snr=6.0)) == 0
    monkeypatch.setattr(ds, "MAX_ELONGATION", 1e9)
    assert len(ds.find_residual_sources(image, rms, None, FWHM, [], [], min_snr=6.0)) >= 1


def test_the_refinement_adds_the_diffuse_galaxies_the_detections_missed():
    """A Hubble field with only its bright sources detected: with the head's ``residual_search`` the refinement adds
    rows (``fit`` 4) at the true sources it was not given, the diffuse galaxies among them, with their Kron fluxes
    and a galaxy's class; without it, none; a malformed setting is a one-line error."""
    import copy

    from skyfm.detect import get_detector, refine_ccd_tile
    from skyfm.errors import SkyfmError
    from skyfm.instruments import load_instrument

    inst = load_instrument("hubble")
    p = simulate_patch("hubble", 47, size=320, scene="field")
    t = p.truth
    snr, flux = np.asarray(t["snr"], float), np.asarray(t["flux"], float)
    given = snr >= 40
    n = int(given.sum())
    d = {"x": np.asarray(t["x"], float)[given], "y": np.asarray(t["y"], float)[given], "pos_err": np.full(n, 0.5),
         "score": np.ones(n), "class_prob": np.tile([0.5, 0.5], (n, 1)), "extension": np.zeros(n),
         "flux": flux[given], "flux_band": np.asarray(t["flux_band"], float)[given],
         "flux_err": flux[given] * 0.1, "flux_band_err": np.asarray(t["flux_band"], float)[given] * 0.1,
         "fit": np.zeros(n, np.int8)}
    for k in ("fit_chi2", "crowding", "flux_confusion", "flux_kron", "flux_kron_err", "kron_excess", "kron_size"):
        d[k] = np.full(n, np.nan)
    head = copy.deepcopy(get_detector(None).head_config("hubble"))
    head.residual_search, head.kron_centroid = None, False  # finds at their PSF positions whatever flux they take
    off = refine_ccd_tile(dict(d), p, inst, head)
    assert len(off["x"]) == n and not np.any(off["fit"] == 4)
    head.residual_search = {"min_snr": 5.0, "intercept": -1.0, "slope": 1.0}
    on = refine_ccd_tile(dict(d), p, inst, head)
    new = on["fit"] == 4
    assert np.array_equal(on["x"][:n], off["x"]) and set(on) == set(off)
    fx, fy = on["x"][new], on["y"][new]
    missed = ~given & (snr >= 3)
    dist = np.hypot(fx[:, None] - np.asarray(t["x"])[missed], fy[:, None] - np.asarray(t["y"])[missed])
    real = dist.min(axis=1) <= 2.0
    assert new.sum() >= 4 and real.mean() >= 0.6
    galaxies = missed & (np.asarray(t["class"]) == "galaxy") & (snr >= 15)
    found = dist[:, galaxies[missed]].min(axis=0) <= 2.0
    assert found.sum() >= 2
    ratio = on["flux"][new][real] / flux[missed][dist.argmin(axis=1)[real]]
    assert 0.5 < np.median(ratio) < 2.0
    # score 1 / (1 + exp(1 - ln snr)), snr >= min_snr 5
    assert np.all((on["score"][new] >= 1 / (1 + np.exp(1.0 - np.log(5.0))) - 1e-12) & (on["score"][new] < 1))
    settled = ~on["kron_cut"][new]  # not pending a measurement across tiles (detect_tiles)
    assert np.median(on["class_prob"][new, 1]) > 0.5 and np.all(np.isfinite(on["flux_err"][new][settled]))
    # kron_excess_min: below it a find whose PSF fit converged keeps the PSF flux, at or above it the Kron flux
    fluxes = {}
    for rule in (-1e9, 1e9):
        head.residual_search = {"min_snr": 5.0, "intercept": -1.0, "slope": 1.0, "kron_excess_min": rule}
        r = refine_ccd_tile(dict(d), p, inst, head)
        assert np.array_equal(r["x"], on["x"])  # the same finds
        fluxes[rule] = r["flux"][new], r["flux_kron"][new], r["kron_cut"][new]
    # every find its Kron flux, but those whose aperture runs off the tile: their PSF flux (if any) and no Kron
    # measurement, for detect_tiles to settle
    flux, kron, cut = fluxes[-1e9]
    assert np.array_equal(flux[~cut], kron[~cut]) and np.all(np.isnan(kron[cut])) and cut.sum() < len(cut) / 2
    assert np.mean(fluxes[1e9][0] != fluxes[1e9][1]) > 0.5  # mostly PSF fluxes
    head.residual_search = {"min_snr": -1.0, "intercept": 0.0, "slope": 1.0}
    with pytest.raises(SkyfmError, match="residual_search should be"):
        refine_ccd_tile(dict(d), p, inst, head)


def test_the_shipped_ccd_heads_search_their_residuals_with_valid_settings():
    from skyfm.detect import get_detector
    from skyfm.errors import SkyfmError

    det = get_detector(None)
    for name, head in det.config.heads.items():
        terms = head.residual_search_terms()
        if head.kind == "ccd":
            # the score never falls with significance (benchmarks/choose_residual_search.py: slope 0 at the least)
            assert terms is not None and terms["min_snr"] >= 3 and terms["slope"] >= 0, name
        else:
            assert terms is None, name  # counts cubes have their likelihood selection
    head = det.head_config("hubble")
    saved = head.residual_search
    try:
        head.residual_search = {"min_snr": 4, "intercept": 0, "slope": 1}
        assert head.residual_search_terms() == {"min_snr": 4.0, "intercept": 0.0, "slope": 1.0,
                                                "flux_err_floor": 0.0, "kron_excess_min": 2.0, "pos_err_scale": 1.0}
        head.residual_search = {"min_snr": 4, "intercept": 0, "slope": 1, "pos_err_scale": 0}
        with pytest.raises(SkyfmError, match="pos_err_scale"):
            head.residual_search_terms()
    finally:
        head.residual_search = saved


def test_detect_patch_keeps_the_finds_above_its_threshold_also_where_the_network_found_nothing():
    """Through ``detect_patch``: finds are catalog rows with ``fit`` 4 and a score at or above the threshold in use;
    a tile where the network found nothing is searched too."""
    import copy

    from skyfm.detect import _no_rows, detect_patch, get_detector, refine_ccd_tile
    from skyfm.instruments import load_instrument

    det = copy.deepcopy(get_detector(None))
    head = det.head_config("hubble")
    head.residual_search = {"min_snr": 5.0, "intercept": -1.0, "slope": 1.0}
    p = simulate_patch("hubble", 31, size=320, scene="field")
    cat = detect_patch(p, det, min_score=0.3)
    finds = np.asarray(cat["fit"]) == 4
    assert finds.sum() >= 3 and np.all(np.asarray(cat["score"])[finds] >= 0.3)
    assert "residual image" in cat["fit"].description
    high = detect_patch(p, det, min_score=0.8)
    assert np.all(np.asarray(high["score"])[np.asarray(high["fit"]) == 4] >= 0.8)
    assert (np.asarray(high["fit"]) == 4).sum() < finds.sum()
    alone = refine_ccd_tile(_no_rows(p.n_bands, 2), p, load_instrument("hubble"), head)
    assert len(alone["x"]) >= 3 and np.all(alone["fit"] == 4)


def test_detect_cli_turns_the_search_off_on_request(tmp_path, capsys):
    """``skyfm detect --no-residual-search``: the same catalog less its ``fit`` 4 rows; the cached detector keeps
    its heads' settings."""
    from skyfm.catalog import read_catalog
    from skyfm.cli import main
    from skyfm.data.fits_io import write_patch
    from skyfm.detect import get_detector

    src = tmp_path / "hst.fits"
    write_patch(simulate_patch("hubble", 31, size=320, scene="field"), src)
    fits = {}
    for flags in ((), ("--no-residual-search",)):
        out = tmp_path / f"cat{len(flags)}.ecsv"
        assert main(["detect", str(src), "--out", str(out), *flags]) == 0, capsys.readouterr().err
        fits[flags] = np.asarray(read_catalog(out)["fit"])
    on, off = fits[()], fits[("--no-residual-search",)]
    assert (on == 4).sum() >= 3 and not np.any(off == 4)
    assert (on != 4).sum() == len(off)
    assert get_detector(None).head_config("hubble").residual_search is not None


def test_template_total_weights_each_band_by_what_it_tells():
    from skyfm.detect import _template_total, colour_template

    template = np.array([0.6, 0.27, 0.12, 0.01])
    truth = np.array([1000.0, 2000.0])
    err = np.array([[50.0, 60.0, 600.0, 900.0]] * 2)
    clean = truth[:, None] * template
    total, total_err = _template_total(clean, err, template)
    assert np.allclose(total, truth)
    noisy = clean + np.array([0.0, 0.0, 0.0, 2000.0])  # a W4-like band: noise far above the source's light there
    biased_sum = noisy.sum(axis=1)
    total, total_err = _template_total(noisy, err, template)
    assert np.all(np.abs(total - truth) < 0.05 * truth) and np.all(biased_sum > 1.9 * truth)
    assert np.all(total_err < np.sqrt((err ** 2).sum(axis=1)))  # more precise than the plain sum
    rng = np.random.default_rng(3)
    bright = rng.uniform(500, 5000, 40)[:, None] * template  # well-measured detections of the image's colours
    errs = np.array([[20.0, 25.0, 300.0, 500.0]] * 40)
    noisy = bright + rng.normal(0, 1, bright.shape) * errs
    got = colour_template({"flux": [noisy[:20], noisy[20:]], "err": [errs[:20], errs[20:]]})
    assert np.allclose(got, template, atol=0.03)
    wild = noisy.copy()
    wild[0] = [-3e6, -1e6, 7e6, 2e8]  # one failed fit (a saturated star): a ratio of sums would be that fit alone
    assert np.allclose(colour_template({"flux": [wild], "err": [errs]}), template, atol=0.03)
    assert colour_template({"flux": [noisy[:5]], "err": [errs[:5]]}) is None  # too few detections
    assert colour_template({"flux": [noisy[:, :1]], "err": [errs[:, :1]]}) is None  # one band: the sum is the total
    assert colour_template({}) is None


def test_the_search_leaves_the_edges_of_flagged_cosmic_rays_out(monkeypatch):
    """On a single-band Hubble image L.A.Cosmic flags a hit's core; its edge pixels made the residual search's
    matched filter peak there (3 of 5 finds on this image): the pixels next to a flagged one are out of the search."""
    import skyfm.detect as sd
    from skyfm.catalog.cosmics import cosmic_ray_mask
    from skyfm.detect import detect_patch, get_detector
    from skyfm.instruments import load_instrument

    p = simulate_patch("hubble", 7000, size=256, bands=["f606w"])
    hy, hx = np.nonzero(cosmic_ray_mask(np.asarray(p.data, float), load_instrument("hubble"))[0])

    # the network in bfloat16, as on the machine the margin was chosen on, whatever this CPU's "auto" gives: in float32
    # (a CPU without native bf16) its peaks differ a little and one find lands 1.47 px from a hit's edge pixel
    def finds_on_hits():
        cat = detect_patch(p, get_detector(None), precision="bf16")
        found = np.asarray(cat["fit"]) == 4
        x, y = np.asarray(cat["x"], float)[found], np.asarray(cat["y"], float)[found]
        return int(found.sum()), sum(np.min(np.hypot(hx - a, hy - b)) <= 1.5 for a, b in zip(x, y))

    # the margin alone: the light-share test (Run 30), which drops finds on hits too, off
    monkeypatch.setattr(sd, "COSMIC_RAY_LIGHT_MAX", np.inf)
    finds, on_hits = finds_on_hits()
    assert finds >= 1 and on_hits == 0
    monkeypatch.setattr(sd, "COSMIC_RAY_SEARCH_MARGIN", 0)
    assert finds_on_hits()[1] >= 2
