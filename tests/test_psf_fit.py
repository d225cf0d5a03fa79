"""PSF-fit refinement of CCD detections: unbiased, errors that mean what they say, blends shared, seeing found."""

from __future__ import annotations

import numpy as np
import pytest

from skyfm.catalog.psf_fit import background_and_rms, estimate_fwhm, fit_psf_sources
from skyfm.instruments import load_instrument

SCALE = load_instrument("meerlicht").pixel_scale_deg


def _psf(fwhm_arcsec=2.5):
    return load_instrument("meerlicht").band("q").psf_with_fwhm(fwhm_arcsec / 3600.0)


def _scene(rng, n, size=160, flux=(2e3, 2e4), sky=100.0, read=5.0, gain=1.0, psf=None, min_sep=14.0):
    """Point sources on a flat sky with Poisson + read noise (ADU, gain 1); positions kept apart."""
    psf = psf or _psf()
    xs, ys = [], []
    while len(xs) < n:
        x, y = rng.uniform(8, size - 9, 2)
        if all(np.hypot(x - a, y - b) > min_sep for a, b in zip(xs, ys)):
            xs.append(x)
            ys.append(y)
    x, y = np.array(xs), np.array(ys)
    f = rng.uniform(*flux, n)
    r = 12
    mean = np.full((size, size), sky)
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    stamps = psf.stamps(x - ix, y - iy, SCALE, radius_pix=r, oversample=8)
    for k in range(n):
        y0, x0 = iy[k] - r, ix[k] - r
        sl = (slice(max(y0, 0), min(y0 + 2 * r + 1, size)), slice(max(x0, 0), min(x0 + 2 * r + 1, size)))
        st = stamps[k][sl[0].start - y0:sl[0].stop - y0, sl[1].start - x0:sl[1].stop - x0]
        mean[sl] += f[k] * st
    img = rng.poisson(mean * gain) / gain + rng.normal(0, read, mean.shape)
    return img[None].astype(np.float64), x, y, f


def test_fit_is_unbiased_and_its_errors_are_calibrated():
    rng = np.random.default_rng(1)
    pulls_x, pulls_f = [], []
    for _ in range(3):
        img, x, y, f = _scene(rng, 60)
        bg, rms = background_and_rms(img[0])
        start_x, start_y = x + rng.normal(0, 0.3, x.size), y + rng.normal(0, 0.3, y.size)
        fit = fit_psf_sources(img, bg[None], rms[None], [_psf()], SCALE, start_x, start_y, gain=1.0)
        assert fit["ok"].mean() > 0.95
        ok = fit["ok"]
        pulls_x += list(np.hypot(fit["x"] - x, fit["y"] - y)[ok] / fit["pos_err"][ok])
        pulls_f += list(((fit["flux"] - f) / fit["flux_err"])[ok])
    pulls_x, pulls_f = np.array(pulls_x), np.array(pulls_f)
    # 2-D separation / per-axis sigma is Rayleigh: median sqrt(2 ln 2) = 1.177
    assert 1.0 < np.median(pulls_x) < 1.35
    assert abs(np.median(pulls_f)) < 0.35  # a bias of a third of an error bar at most (~0.5% at SNR 60)
    assert 0.60 < np.mean(np.abs(pulls_f) < 1) < 0.76


def test_blended_pair_shares_its_light():
    rng = np.random.default_rng(2)
    psf = _psf(2.5)
    fwhm_pix = psf.fwhm_deg / SCALE
    size = 64
    x = np.array([30.0, 30.0 + 1.6 * fwhm_pix])
    y = np.array([32.2, 31.7])
    f = np.array([2e4, 8e3])
    stamps = psf.stamps(np.zeros(2), np.zeros(2), SCALE, radius_pix=15, oversample=8)
    mean = np.full((size, size), 50.0)
    for k in range(2):
        ix, iy = int(round(x[k])), int(round(y[k]))
        st = psf.stamps(np.array([x[k] - ix]), np.array([y[k] - iy]), SCALE, radius_pix=15, oversample=8)[0]
        mean[iy - 15:iy + 16, ix - 15:ix + 16] += f[k] * st
    img = (rng.poisson(mean) + rng.normal(0, 3, mean.shape))[None]
    bg, rms = background_and_rms(img[0])
    one = fit_psf_sources(img, bg[None], rms[None], [psf], SCALE, x + 0.3, y - 0.2, passes=1)
    two = fit_psf_sources(img, bg[None], rms[None], [psf], SCALE, x + 0.3, y - 0.2, passes=3)
    assert np.all(np.abs(two["flux"] / f - 1) < 0.05)
    assert np.abs(two["flux"] / f - 1).sum() < np.abs(one["flux"] / f - 1).sum()
    assert stamps.shape == (2, 31, 31)


def test_a_bright_neighbours_wing_is_subtracted_and_its_noise_counted():
    """A star 3.6 FWHM from one 300x brighter, just outside that one's fit box: the bright wing lies across the
    faint star's box as a slope of ~20% of its peak. With the neighbours' models out to WING_FWHM and their light in
    the noise, the faint star's flux comes back within 10% and its box's chi-square near 1; with the fit box alone
    (wing_fwhm=0) its flux came back 3x too high."""
    hubble = load_instrument("hubble")
    psf, scale = hubble.band("F606W").psf, hubble.pixel_scale_deg  # Moffat beta 2.5: heavy wings, 2.2 px FWHM
    size, r = 64, 20
    x, y, f = np.array([28.0, 36.0]), np.array([32.0, 32.4]), np.array([3e6, 1e4])
    mean = np.full((size, size), 20.0)
    for k in range(2):
        ix, iy = int(round(x[k])), int(round(y[k]))
        st = psf.stamps(np.array([x[k] - ix]), np.array([y[k] - iy]), scale, radius_pix=r, oversample=8)[0]
        mean[iy - r:iy + r + 1, ix - r:ix + r + 1] += f[k] * st
    bg, rms = np.full((1, size, size), 20.0), np.full((1, size, size), np.sqrt(20.0 + 9.0))
    flux0 = f[:, None] * np.array([[1.02], [0.8]])  # starting fluxes a little off, as the network's are
    out = {}
    for wing in (0.0, 4.0):
        sep, ratio, chi2 = [], [], []
        for seed in range(6):
            rng = np.random.default_rng(seed)
            img = (rng.poisson(mean) + rng.normal(0, 3, mean.shape))[None]
            fit = fit_psf_sources(img, bg, rms, [psf], scale, x + [0.1, 0.2], y - 0.2, flux0, passes=3, wing_fwhm=wing)
            sep.append(np.hypot(fit["x"][1] - x[1], fit["y"][1] - y[1]))
            ratio.append(fit["flux"][1] / f[1])
            chi2.append(fit["chi2_red"][1])
        out[wing] = np.median(sep), np.median(ratio), np.median(chi2)
    assert abs(out[4.0][1] - 1) < 0.1 and abs(out[0.0][1] - 1) > 0.5
    assert out[4.0][2] < 10 < 100 < out[0.0][2]
    assert out[4.0][0] < 0.7 * out[0.0][0]


def test_estimate_fwhm_finds_the_seeing():
    rng = np.random.default_rng(3)
    true = _psf(2.9)
    img, x, y, f = _scene(rng, 40, size=200, flux=(2e4, 6e4), psf=true, min_sep=22.0)
    bg, rms = background_and_rms(img[0])
    nominal = _psf(2.5).fwhm_deg
    est = estimate_fwhm(img[0], bg, rms, load_instrument("meerlicht").band("q").psf_with_fwhm, nominal, SCALE,
                        x, y, np.full(x.size, 100.0))
    assert est == pytest.approx(true.fwhm_deg, rel=0.05)
    # too few sources: the nominal seeing
    assert estimate_fwhm(img[0], bg, rms, _psf, nominal, SCALE, x[:2], y[:2], np.full(2, 100.0)) == nominal


def test_estimate_fwhm_in_a_crowded_field_subtracts_the_neighbours():
    """Sources 2-3 FWHM apart: none has its box clear, so only the neighbour-subtracted estimate finds the seeing."""
    rng = np.random.default_rng(5)
    true = _psf(2.9)
    img, x, y, f = _scene(rng, 150, size=200, flux=(1e4, 4e4), psf=true, min_sep=11.0)
    bg, rms = background_and_rms(img[0])
    nominal = _psf(2.5).fwhm_deg
    psf_for_fwhm = load_instrument("meerlicht").band("q").psf_with_fwhm
    snr = np.full(x.size, 100.0)
    assert estimate_fwhm(img[0], bg, rms, psf_for_fwhm, nominal, SCALE, x, y, snr, subtract_others=False) == nominal
    start_x, start_y = x + rng.normal(0, 0.2, x.size), y + rng.normal(0, 0.2, y.size)
    est = estimate_fwhm(img[0], bg, rms, psf_for_fwhm, nominal, SCALE, start_x, start_y, snr)
    assert est == pytest.approx(true.fwhm_deg, rel=0.03)


def test_estimate_fwhm_without_star_labels_takes_the_stellar_locus_of_round_sources():
    """With no star / galaxy labels (``skyfm.detect.measure_seeing``) the median width of every bright peak is a
    galaxy's where galaxies outnumber the stars: ``locus`` keeps the narrowest sources' widths, and
    ``max_ellipticity`` leaves out the peaks of a satellite trail, which fit best as a PSF several times too broad."""
    from skyfm.catalog.psf_fit import _ellipticity

    rng = np.random.default_rng(11)
    true, broad = _psf(2.5), _psf(5.0)  # galaxies: round blobs twice the PSF's width
    stars, sx, sy, _ = _scene(rng, 6, size=240, flux=(3e4, 6e4), psf=true, min_sep=30.0)
    galaxies, gx, gy, _ = _scene(rng, 10, size=240, flux=(6e4, 1.2e5), psf=broad, min_sep=30.0)
    keep = np.array([np.min(np.hypot(sx - a, sy - b)) > 30 for a, b in zip(gx, gy)])
    img = stars + galaxies - 100.0  # one sky of 100 ADU, the noise of both images
    x, y = np.r_[sx, gx[keep]], np.r_[sy, gy[keep]]
    bg, rms = background_and_rms(img[0])
    psf_for_fwhm = load_instrument("meerlicht").band("q").psf_with_fwhm
    factors = np.linspace(0.6, 3.0, 25)
    args = (img[0], bg, rms, psf_for_fwhm, true.fwhm_deg, SCALE, x, y, np.full(x.size, 100.0))
    plain = estimate_fwhm(*args, factors=factors, subtract_others=False)
    locus = estimate_fwhm(*args, factors=factors, subtract_others=False, locus=1.25)
    assert plain > 1.5 * true.fwhm_deg and locus == pytest.approx(true.fwhm_deg, rel=0.05)

    r = 7
    off = np.arange(-r, r + 1)
    yy, xx = np.meshgrid(off, off, indexing="ij")
    round_box = np.exp(-0.5 * (xx ** 2 + yy ** 2) / 2.0 ** 2)
    line = np.exp(-0.5 * (xx - 0.3 * yy) ** 2 / 1.5 ** 2)  # a trail crossing the box
    e = _ellipticity(np.stack([round_box, line]), np.ones((2, 2 * r + 1, 2 * r + 1), bool), r)
    assert e[0] < 0.05 and e[1] > 0.45


def test_empty_masked_and_bad_shapes():
    img = np.random.default_rng(4).normal(100, 5, (1, 40, 40))
    bg, rms = np.full((1, 40, 40), 100.0), np.full((1, 40, 40), 5.0)
    out = fit_psf_sources(img, bg, rms, [_psf()], SCALE, [], [])
    assert out["x"].size == 0
    mask = np.ones((40, 40), bool)  # nothing usable: the source stays where it was, flagged
    out = fit_psf_sources(img, bg, rms, [_psf()], SCALE, [20.3], [19.6], mask=mask)
    assert not out["ok"][0] and out["x"][0] == pytest.approx(20.3)
    from skyfm.errors import SkyfmError

    with pytest.raises(SkyfmError, match="PSFs for"):
        fit_psf_sources(img, bg, rms, [_psf(), _psf()], SCALE, [20.0], [20.0])


@pytest.mark.parametrize("bands", [1, 3, 6])
def test_the_position_step_s_closed_form_schur_complement_is_the_pseudo_inverse_s(bands):
    """The fit's position step inverts the (flux, sky offset) block band by band in closed form: the same as the
    pseudo-inverse of the whole block, also for a source with a band that has no usable pixel."""
    from skyfm.catalog.psf_fit import _normal_equations, _position_schur

    rng = np.random.default_rng(bands)
    n, k = 40, 9
    P = rng.random((n, bands, k, k))
    wgt = rng.random((n, bands, k, k))
    wgt[3, 0] = 0.0  # source 3 sees nothing in band 0
    A, _ = _normal_equations(P, rng.normal(size=P.shape), rng.normal(size=P.shape), rng.random((n, bands)) * 100,
                             wgt, rng.normal(size=P.shape))
    lin = slice(2, None)
    expected = A[:, :2, :2] - A[:, :2, lin] @ np.linalg.pinv(A[:, lin, lin]) @ A[:, lin, :2]
    np.testing.assert_allclose(_position_schur(A, bands), expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())


def test_saturated_core_is_masked_and_the_wings_give_the_flux():
    from types import SimpleNamespace

    from skyfm.detect import saturation_mask

    rng = np.random.default_rng(6)
    psf = _psf(2.5)
    img, x, y, f = _scene(rng, 1, size=64, flux=(4e6, 4e6), psf=psf)
    level = 60000.0
    clipped = np.minimum(img, level)
    mask = saturation_mask(clipped, SimpleNamespace(noise={"saturation": level}))
    assert mask.shape == clipped.shape and 1 < (clipped >= level).sum() < mask.sum()
    assert not saturation_mask(clipped, SimpleNamespace(noise={})).any()
    bg, rms = np.full((1, 64, 64), 100.0), np.full((1, 64, 64), 11.0)
    blind = fit_psf_sources(clipped, bg, rms, [psf], SCALE, x + 0.2, y - 0.2)
    masked = fit_psf_sources(clipped, bg, rms, [psf], SCALE, x + 0.2, y - 0.2, mask=mask)
    assert abs(masked["flux"][0] / f[0] - 1) < 0.05
    assert abs(blind["flux"][0] / f[0] - 1) > 0.1  # the clipped core pulls the blind fit down (19% here)


def test_chi2_is_about_one_for_a_good_fit_and_large_beside_an_undetected_neighbour():
    """The reduced chi-square (which detect uses to widen a fit's errors) tells a well-modelled star from one with
    an unmodelled neighbour: isolated stars sit near 1; the same stars with a neighbour of half their flux at
    0.8 FWHM, not in the source list, are well above it and their fluxes are off by more than the Fisher errors."""
    rng = np.random.default_rng(4)
    img, x, y, f = _scene(rng, 30, flux=(1e4, 2e4), min_sep=30.0, size=200)
    bg, rms = background_and_rms(img[0])
    clean = fit_psf_sources(img, bg[None], rms[None], [_psf()], SCALE, x, y, gain=1.0)
    assert clean["ok"].all() and 0.8 < np.median(clean["chi2_red"]) < 1.3
    # a neighbour at 0.8 FWHM (about 3.6 px here) with half the flux, painted in but not fitted
    fwhm_pix = 2.5 / 3600.0 / SCALE
    psf, r = _psf(), 12
    nx, ny = x + 0.8 * fwhm_pix, y.copy()
    ix, iy = np.rint(nx).astype(int), np.rint(ny).astype(int)
    stamps = psf.stamps(nx - ix, ny - iy, SCALE, radius_pix=r, oversample=8)
    blended = img.copy()
    for k in range(len(x)):
        y0, x0 = iy[k] - r, ix[k] - r
        if y0 >= 0 and x0 >= 0 and y0 + 2 * r + 1 <= 200 and x0 + 2 * r + 1 <= 200:
            blended[0, y0:y0 + 2 * r + 1, x0:x0 + 2 * r + 1] += 0.5 * f[k] * stamps[k]
    fit = fit_psf_sources(blended, bg[None], rms[None], [_psf()], SCALE, x, y, gain=1.0)
    ok = fit["ok"]
    assert ok.mean() > 0.8
    assert np.median(fit["chi2_red"][ok]) > 2.5 * np.median(clean["chi2_red"])
    pulls = np.abs(fit["flux"] - f)[ok] / fit["flux_err"][ok]
    assert np.median(pulls) > 2  # the Fisher errors alone would claim too much ...
    widened = pulls / np.sqrt(np.maximum(fit["chi2_red"][ok], 1.0))
    assert np.median(widened) < 0.6 * np.median(pulls)  # ... the chi-square widening takes much of that back


def test_each_band_fits_its_own_box():
    """WISE W1 (4.4 px FWHM) beside W4 (8.7 px): a star with an unmodelled neighbour 12 px away (outside W1's own box,
    inside the broad band's) is pulled less when every band fits a box of 1.5 of its own FWHM than with one common
    box of the broad band's size (not to zero: the neighbour's Moffat wings still reach the sharp band's box)."""
    wise = load_instrument("wise")
    scale = wise.pixel_scale_deg
    psfs = [wise.band("W1").psf, wise.band("W4").psf]
    rng = np.random.default_rng(5)
    size, r, n = 80, 20, 12
    shifts_own, shifts_common = [], []
    for _ in range(n):
        x, y = 40 + rng.uniform(-0.5, 0.5), 40 + rng.uniform(-0.5, 0.5)
        angle = rng.uniform(0, 2 * np.pi)
        nx, ny = x + 12 * np.cos(angle), y + 12 * np.sin(angle)
        img = np.zeros((2, size, size))
        for c, (psf, flux) in enumerate(zip(psfs, (2e4, 2e3))):
            for sx, sy, f in ((x, y, flux), (nx, ny, 0.6 * flux)):
                ix, iy = int(round(sx)), int(round(sy))
                img[c, iy - r:iy + r + 1, ix - r:ix + r + 1] += f * psf.stamps(np.array([sx - ix]), np.array([sy - iy]),
                                                                                 scale, radius_pix=r, oversample=8)[0]
        img += rng.normal(0, 2.0, img.shape)
        bg, rms = np.zeros_like(img), np.full_like(img, 2.0)
        own = fit_psf_sources(img, bg, rms, psfs, scale, [x], [y], gain=1e6)
        common = fit_psf_sources(img, bg, rms, psfs, scale, [x], [y], gain=1e6,
                                 radius_pix=int(np.ceil(1.5 * psfs[1].fwhm_deg / scale)))
        shifts_own.append(np.hypot(own["x"][0] - x, own["y"][0] - y))
        shifts_common.append(np.hypot(common["x"][0] - x, common["y"][0] - y))
    assert np.median(shifts_own) < 0.75 * np.median(shifts_common)


def test_blank_flux_scatter_is_the_sky_noise_on_a_clean_sky_and_grows_with_confusion():
    """On white noise the PSF fluxes at blank places scatter as the fit's sky-only error says; where faint
    undetected stars crowd (the left half here) they scatter more, and the right half does not see it."""
    from skyfm.catalog.psf_fit import blank_flux_scatter, fit_radius_pix

    rng = np.random.default_rng(5)
    psf, size, sigma = _psf(), 256, 10.0
    noise = rng.normal(0, sigma, (1, size, size))
    r = fit_radius_pix([psf], SCALE)
    P = psf.stamps(np.zeros(1), np.zeros(1), SCALE, radius_pix=r, oversample=8)[0]
    expected = sigma / np.sqrt((P ** 2).sum() - P.sum() ** 2 / P.size)  # weighted LSQ with a free sky offset
    x, y = np.array([20.0, 236.0]), np.array([128.0, 128.0])
    _, clean = blank_flux_scatter(noise, np.full((1, size, size), sigma), [psf], SCALE, x, y)
    assert np.allclose(clean, expected, rtol=0.12)
    # faint stars (each ~2x the sky-only flux error, far below detection) over the left 128 columns
    n = 1200
    sx, sy = rng.uniform(0, 120, n), rng.uniform(0, size - 1, n)
    crowded = noise.copy()
    k = 12
    stamps = psf.stamps(sx - np.rint(sx), sy - np.rint(sy), SCALE, radius_pix=k, oversample=4)
    pad = np.zeros((size + 2 * k, size + 2 * k))
    for s, ix, iy in zip(stamps, np.rint(sx).astype(int), np.rint(sy).astype(int)):
        pad[iy:iy + 2 * k + 1, ix:ix + 2 * k + 1] += 2 * expected * s
    crowded[0] += pad[k:-k, k:-k]
    _, conf = blank_flux_scatter(crowded, np.full((1, size, size), sigma), [psf], SCALE, x, y)
    assert conf[0] > 1.5 * expected
    assert abs(conf[1] / expected - 1) < 0.12


def test_blank_flux_scatter_leaves_masked_places_out():
    """Places whose pixels are all masked measure nothing (their 0 would shrink the scatter); an image masked
    everywhere adds no scatter at all."""
    from skyfm.catalog.psf_fit import blank_flux_scatter

    rng = np.random.default_rng(6)
    psf, size, sigma = _psf(), 192, 10.0
    noise = rng.normal(0, sigma, (1, size, size))
    rms = np.full((1, size, size), sigma)
    x, y = np.array([96.0]), np.array([96.0])
    _, open_sky = blank_flux_scatter(noise, rms, [psf], SCALE, x, y, cell=size)
    mask = np.zeros((size, size), bool)
    mask[:, : size // 2] = True  # half the image masked (a bleed region, a chip gap)
    _, half = blank_flux_scatter(noise, rms, [psf], SCALE, x, y, mask=mask, cell=size)
    assert abs(half[0] / open_sky[0] - 1) < 0.15
    _, none = blank_flux_scatter(noise, rms, [psf], SCALE, x, y, mask=np.ones((size, size), bool), cell=size)
    assert none[0] == 0.0


def _glow(size, amplitude, width, centre):
    yy, xx = np.indices((size, size))
    return amplitude * np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * width ** 2))


def test_background_follows_nebulosity_and_leaves_a_flat_sky_alone():
    """A glow a few mesh boxes wide (nebulosity) left the 64-px mesh ~10 rms under its peak; the finer mesh of the
    compact-masked sky follows it. On a flat sky the maps are the coarse mesh's, bit for bit."""
    rng = np.random.default_rng(7)
    img, *_ = _scene(rng, 40, size=256, flux=(2e3, 2e4), min_sep=20.0)
    coarse, rms = background_and_rms(img[0], extended=False)
    flat_bg, flat_rms = background_and_rms(img[0])
    assert np.array_equal(flat_bg, coarse) and np.array_equal(flat_rms, rms)
    sigma = float(np.median(rms))
    glow = _glow(256, 15 * sigma, 30.0, (140, 110))
    nebula = img[0] + glow
    before, _ = background_and_rms(nebula, extended=False)
    after, after_rms = background_and_rms(nebula)
    truth = coarse + glow
    core = glow > 5 * sigma
    assert np.median(np.abs(before - truth)[core]) > 4 * sigma  # the coarse mesh misses it
    assert np.median(np.abs(after - truth)[core]) < 0.5 * sigma
    assert np.median(after_rms) < 1.1 * sigma  # the glow's slope does not count as noise
    far = glow < 0.01 * sigma
    assert np.median(np.abs(after - coarse)[far]) < 0.1 * sigma
    # light taken away is no nebula: a corner of dead pixels (a WISE W3 tile's pulled the fine mesh 28 rms down)
    dead = img[0].copy()
    dead[-20:, -20:] = 0.0
    assert np.array_equal(background_and_rms(dead)[0], background_and_rms(dead, extended=False)[0])


def test_the_rms_of_a_steep_gradient_is_the_noise_about_it():
    """A box's rms is the scatter about one level: a 30-sigma slope across the image, 3.75 sigma across each 64-px
    box, had inflated it 1.5x (and every SNR deflated); it is measured again about the sky where the sky changes by
    more than an rms across a box."""
    rng = np.random.default_rng(11)
    img, *_ = _scene(rng, 30, size=256, flux=(2e3, 2e4), min_sep=20.0)
    _, flat_rms = background_and_rms(img[0])
    sigma = float(np.median(flat_rms))
    slope = 15.0 * sigma * np.arange(256)[None, :] / 255.0  # 3.75 sigma per 64 px
    back, rms = background_and_rms(img[0] + slope)
    assert abs(np.median(rms) / sigma - 1.0) < 0.08
    assert np.median(np.abs(back - slope - background_and_rms(img[0])[0])) < 0.2 * sigma
