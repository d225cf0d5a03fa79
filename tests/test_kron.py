"""Kron aperture fluxes: a galaxy's total flux where its PSF flux holds a part, a star's unchanged."""

from __future__ import annotations

import numpy as np
from scipy.signal import fftconvolve

from skyfm.catalog.kron import half_light_radius_pix, kron_photometry
from skyfm.catalog.psf_fit import background_and_rms, fit_psf_sources, residual_image
from skyfm.instruments import load_instrument

SCALE = load_instrument("meerlicht").pixel_scale_deg
PSF = load_instrument("meerlicht").band("q").psf_with_fwhm(2.5 / 3600.0)  # 4.5 px FWHM


def _render(x, y, flux, r_e_pix, size, oversample=5):
    """Mean image of point sources (r_e 0) and exponential disks of half-light radius r_e, seen through PSF."""
    fine = np.zeros((size * oversample, size * oversample))
    h = 1.0 / oversample
    centres = (np.arange(size * oversample) + 0.5) * h - 0.5  # pixel coordinates of the fine cells
    ax = np.arange(-12 * oversample, 12 * oversample + 1) * h
    kernel = PSF.profile(np.hypot(ax[:, None], ax[None, :]) * SCALE)
    kernel /= kernel.sum()
    for xs, ys, f, re in zip(x, y, flux, r_e_pix):
        if re == 0:
            iy, ix = np.argmin(np.abs(centres - ys)), np.argmin(np.abs(centres - xs))
            fine[iy, ix] += f
        else:
            disk = np.exp(-1.678 * np.hypot(centres[None, :] - xs, centres[:, None] - ys) / re)
            fine += f * disk / disk.sum()
    fine = fftconvolve(fine, kernel, mode="same")
    return fine.reshape(size, oversample, size, oversample).sum(axis=(1, 3))


def test_a_galaxy_takes_its_total_flux_and_a_star_keeps_its_psf_flux():
    """Stars and exponential disks (half-light radius 0.65-1 FWHM, as field galaxies of a ground-based image): the
    PSF fit holds at most ~0.6 of a disk's flux and the Kron aperture ~0.9 or more; a star's Kron flux is its flux
    within its error and its excess is noise-like, the disks' excess is many sigma."""
    rng = np.random.default_rng(4)
    size, sky = 320, 200.0
    x = np.array([60.0, 160.3, 260.2, 60.5, 160.0, 260.6, 110.2, 210.4])
    y = np.array([60.2, 60.6, 60.1, 260.0, 260.4, 259.7, 160.1, 160.6])
    r_e = np.array([0, 0, 0, 0, 3.0, 4.5, 3.5, 4.0])
    flux = np.array([3e4, 5e4, 2e4, 4e4, 6e4, 8e4, 5e4, 7e4])
    mean = sky + _render(x, y, flux, r_e, size)
    img = (rng.poisson(mean) + rng.normal(0, 5.0, mean.shape))[None].astype(np.float64)
    bg, rms = background_and_rms(img[0])
    fit = fit_psf_sources(img, bg[None], rms[None], [PSF], SCALE, x, y, gain=1.0, passes=2)
    resid = residual_image(img, bg[None], rms[None], [PSF], SCALE, fit)
    kron = kron_photometry(resid, rms[None], [PSF], SCALE, fit["x"], fit["y"], fit["flux_band"], gain=1.0)
    star, galaxy = r_e == 0, r_e > 0
    assert np.all(fit["flux"][galaxy] / flux[galaxy] < 0.6)  # what the PSF holds of a disk
    assert np.all(np.abs(kron["flux"][star] / flux[star] - 1) < 3 * kron["flux_err"][star] / flux[star] + 0.01)
    assert np.all(np.abs(kron["excess"][star]) < 3)
    assert np.all(kron["excess"][galaxy] > 8)
    assert np.all((kron["flux"][galaxy] / flux[galaxy] > 0.85) & (kron["flux"][galaxy] / flux[galaxy] < 1.05))
    size_pix = half_light_radius_pix(kron["r1"], kron["r1_psf"])
    assert np.all(size_pix[star] < 1.5) and np.all((size_pix[galaxy] > 0.5 * r_e[galaxy]))
    assert np.all(np.isfinite(kron["flux"])) and kron["flux_err"].min() > 0


def test_apertures_off_the_image_or_masked_give_no_flux_and_no_source_is_fine():
    rng = np.random.default_rng(5)
    img = 100.0 + _render(np.array([3.0, 50.0]), np.array([50.0, 50.0]), np.array([2e4, 2e4]), np.zeros(2), 100)
    img = (img + rng.normal(0, 3.0, img.shape))[None]
    rms = np.full_like(img, 3.0)
    mask = np.zeros(img.shape[1:], bool)
    mask[40:60, 40:60] = True
    kron = kron_photometry(img - 100.0, rms, [PSF], SCALE, [3.0, 50.0], [50.0, 50.0], np.zeros((2, 1)), mask=mask)
    assert np.isnan(kron["flux"]).all()  # one half off the image, one masked
    # only the one off the image is "cut": on a tile of a larger image, a wider cut-out would measure it
    assert kron["cut"].tolist() == [True, False]
    empty = kron_photometry(img - 100.0, rms, [PSF], SCALE, [], [], np.zeros((0, 1)))
    assert empty["flux"].shape == (0,)


def test_masked_pixels_in_an_aperture_take_their_mirror_through_the_centre():
    """Two dead columns beside each of two galaxies (7% of the aperture, under MAX_OUTSIDE_SHARE): left out, they
    cost the Kron flux ~14% of its light (the columns lie near the centre); their mirror images through the centre
    (SExtractor's MASK_TYPE CORRECT) give the flux measured without them within 1%."""
    rng = np.random.default_rng(6)
    x, y = np.array([40.3, 120.6]), np.array([60.2, 60.7])
    flux, r_e = np.array([6e4, 6e4]), np.array([3.5, 4.0])
    img = (_render(x, y, flux, r_e, 160) + rng.normal(0, 3.0, (160, 160)))[None]
    rms = np.full_like(img, 3.0)
    mask = np.zeros((160, 160), bool)
    for xc in np.rint(x).astype(int):
        mask[:, [xc - 4, xc + 2]] = True
    clean = kron_photometry(img, rms, [PSF], SCALE, x, y, np.zeros((2, 1)))
    dead = kron_photometry(np.where(mask, -200.0, img), rms, [PSF], SCALE, x, y, np.zeros((2, 1)), mask=mask)
    assert np.all(np.abs(dead["flux"] / clean["flux"] - 1) < 0.01)
    assert np.all(np.abs(clean["flux"] / flux - 1) < 0.05)


def test_the_windowed_centroid_places_faint_large_galaxies_closer_than_the_psf_fit():
    """Faint exponential disks twice the PSF's width: a PSF fit sees only their flat core, and noise moves it; the
    windowed centroid weighs more of their light and lands closer to the true centres (median offset at most 0.8
    of the fit's), its error (SExtractor's formula, which leaves out the window's own movement) between 0.4 and 2
    times its scatter; stars stay at their centres."""
    rng = np.random.default_rng(7)
    size, sky, n = 400, 200.0, 36
    gx, gy = np.meshgrid(np.arange(6) * 64 + 40.0, np.arange(6) * 64 + 40.0)
    x = gx.ravel() + rng.uniform(-0.5, 0.5, n)
    y = gy.ravel() + rng.uniform(-0.5, 0.5, n)
    r_e = np.where(np.arange(n) % 6 == 0, 0.0, 8.0)  # one star in six
    flux = np.where(r_e > 0, 1.2e4, 6e3)
    mean = sky + _render(x, y, flux, r_e, size)
    img = (rng.poisson(mean) + rng.normal(0, 5.0, mean.shape))[None].astype(np.float64)
    bg, rms = background_and_rms(img[0])
    fit = fit_psf_sources(img, bg[None], rms[None], [PSF], SCALE, x + 0.3, y - 0.3, gain=1.0, passes=2)
    resid = residual_image(img, bg[None], rms[None], [PSF], SCALE, fit)
    kron = kron_photometry(resid, rms[None], [PSF], SCALE, fit["x"], fit["y"], fit["flux_band"], gain=1.0)
    disk, star = r_e > 0, r_e == 0
    off_fit = np.hypot(fit["x"] - x, fit["y"] - y)
    off_win = np.hypot(kron["x_win"] - x, kron["y_win"] - y)
    assert np.isfinite(off_win).all()
    assert np.median(off_win[disk]) < 0.8 * np.median(off_fit[disk])
    per_axis = np.median(off_win[disk]) / 1.1774  # the median offset of a 2-D Gaussian of sigma s is 1.18 s
    assert 0.4 < np.median(kron["pos_err_win"][disk]) / per_axis < 2.0
    assert np.median(off_win[star]) < 0.3 and np.median(off_fit[star]) < 0.3
