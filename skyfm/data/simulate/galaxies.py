"""Galaxies for the CCD simulator: a population (counts, morphology, sizes, colours) and Sérsic rendering.

Population (reference-band AB magnitudes, see :mod:`skyfm.data.simulate.stars`):

* Counts :data:`GALAXY_COUNTS`: 0.55 per arcmin^2 brighter than r = 20, slope d log N / dm = 0.42 to r = 24 and
  0.32 fainter, as deep r-band counts show (about 30 per arcmin^2 to 24, 300 to 27).
* Morphology: early types (de Vaucouleurs-like, n = 2.5-4, rounder) make 35% of bright galaxies and 15-20% of
  faint ones; discs (n = 0.5-1.5) are thin discs seen at random inclination, axis ratio
  q = sqrt(cos^2 i + q0^2 sin^2 i) with q0 = 0.15.
* Size-magnitude relation: log10(r_e / arcsec) = 0.25 - 0.11 (m - 20) with 0.2 dex scatter (1.8" at r = 20,
  0.6" at 24, 0.25" at 28), r_e being the half-light radius along the major axis.
* Spectra: an old stellar population (a 4400 K black body, which peaks in f_nu near 1.2 micron as old
  populations do) plus, for discs, young stars (a 12 000 K black body making 10-50% of the V-band light) and warm
  dust and PAH emission rising as lambda^2 beyond 2 micron; redshifted with a median z growing from 0.25 at
  r = 20 to 1.2 at r = 28 (0.15 dex scatter). This gives g - r = 0.9 (early) and 0.55 (discs) nearby, 1.3 for
  early types at z = 0.3, r - W1 (AB) from 0 nearby to 2.5 at z = 0.7, W1 - W2 (Vega) 0.1-0.45 and
  W2 - W3 (Vega) 0.2 for early types and 1.7-2.8 for discs, as WISE sees them.

Rendering (:class:`GalaxyRenderer`): each galaxy's Sérsic profile is truncated at min(x99, 8) r_e (the radius
holding 99% of the light, at most 8 r_e as SDSS truncates de Vaucouleurs models) and renormalised, so the
truncated galaxy keeps its total flux. It is laid on a grid ``fine`` times finer than the pixels (chosen so the
PSF FWHM spans >= 3.5 fine pixels: 1 for MeerLICHT and WISE, 2 for Hubble), convolved there with the PSF sampled
at the fine pixel centres, and binned to pixels:

* compact galaxies (half-light minor axis < 1.5 fine pixels) are sampled on a sub-pixel grid aligned with their
  axes and deposited with cloud-in-cell weights, which keeps their centroids exact; the light inside a core of
  1.5 sample spacings gets its analytic share gammainc(2n, b (r/r_e)^(1/n)), so cuspy n = 4 cores are right.
  The deposit broadens them by 1/(12 fine^2) px^2 in variance (< 4% of the PSF's for the shipped instruments);
* resolved galaxies are sampled at the fine pixel centres, except the 3 x 3 fine pixels around the centre, where
  8 x 8 sub-samples per pixel are deposited bilinearly (centroids good to < 0.005 px).

Galaxy shapes are rendered once and shared by all bands; only their fluxes and the PSF change from band to band.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import fft as sp_fft
from scipy.special import gammainc, gammaincinv

from skyfm.data.simulate.stars import REFERENCE_WAVELENGTH_UM, NumberCounts, _log_bnu
from skyfm.instruments.psf import GAUSSIAN_FWHM_PER_SIGMA, PSF

GALAXY_COUNTS = NumberCounts(anchor_mag=20.0, anchor_density=0.55, slopes=(0.42, 0.32), breaks=(24.0,),
                             bright_mag=12.0)
# Half-light radius of a Gaussian in units of its sigma: sqrt(2 ln 2).
HALF_LIGHT_PER_SIGMA = 1.1774
# Largest stamp half-size (pixels): galaxies bigger than this are truncated there (flux kept).
MAX_STAMP_RADIUS_PIX = 64.0
DUST_PIVOT_UM = 3.4
YOUNG_STARS_K = 12000.0


@dataclass
class GalaxyPopulation:
    """Parameters of N galaxies (arrays of shape (N,)).

    Attributes:
        mag: reference-band AB magnitude; r_e_arcsec: half-light radius along the major axis;
        sersic_n: Sérsic index; axis_ratio: b/a; position_angle: degrees east of north;
        old_temperature: black-body temperature of the old stars (K); young_fraction: share of the rest-frame
        V-band light from young stars; dust: warm-dust strength (0 for early types); redshift: z.
    """

    mag: np.ndarray
    r_e_arcsec: np.ndarray
    sersic_n: np.ndarray
    axis_ratio: np.ndarray
    position_angle: np.ndarray
    old_temperature: np.ndarray
    young_fraction: np.ndarray
    dust: np.ndarray
    redshift: np.ndarray

    def colours(self, wavelengths_um: np.ndarray) -> np.ndarray:
        """(N, C) AB colours m_band - m_ref of each galaxy in bands at ``wavelengths_um``."""
        return galaxy_colours(self.old_temperature, self.young_fraction, self.dust, self.redshift, wavelengths_um)


def draw_galaxies(rng: np.random.Generator, mag: np.ndarray) -> GalaxyPopulation:
    """Morphologies, sizes and spectra for galaxies of reference-band magnitudes ``mag``."""
    mag = np.asarray(mag, dtype=np.float64)
    n = mag.size
    early = rng.random(n) < np.clip(0.35 - 0.03 * (mag - 20.0), 0.15, 0.35)
    sersic_n = np.where(early, rng.uniform(2.5, 4.0, n), rng.uniform(0.5, 1.5, n))
    cos_i = rng.random(n)
    disc_q = np.sqrt(cos_i**2 + 0.15**2 * (1.0 - cos_i**2))
    axis_ratio = np.where(early, rng.uniform(0.5, 1.0, n), disc_q)
    log_re = 0.25 - 0.11 * (mag - 20.0) + rng.normal(0.0, 0.2, n)
    r_e = np.clip(10.0**log_re, 0.03, 30.0)
    median_z = 0.25 + 0.12 * np.clip(mag - 20.0, -1.5, None)
    redshift = np.clip(median_z * 10.0 ** rng.normal(0.0, 0.15, n), 0.01, 4.0)
    return GalaxyPopulation(
        mag=mag, r_e_arcsec=r_e, sersic_n=sersic_n, axis_ratio=axis_ratio,
        position_angle=rng.uniform(0.0, 180.0, n), old_temperature=rng.normal(4400.0, 150.0, n),
        young_fraction=np.where(early, rng.uniform(0.0, 0.05, n), rng.uniform(0.1, 0.5, n)),
        dust=np.where(early, 0.0, rng.uniform(0.05, 0.4, n)), redshift=redshift)


def galaxy_colours(old_temperature, young_fraction, dust, redshift, wavelengths_um) -> np.ndarray:
    """(N, C) AB colours m_band - m_ref of redshifted galaxy spectra (see the module docstring).

    Rest frame, f_nu relative to 0.55 micron: (1 - y) B(T_old) + y B(12 000 K) + dust B_old(3.4 um)
    (lambda / 3.4 um)^2, the dust switched on smoothly beyond 2 micron; observed at lambda / (1 + z).
    """
    z = np.asarray(redshift, dtype=np.float64)[:, None]
    lam = np.asarray(wavelengths_um, dtype=np.float64)[None, :] / (1.0 + z)
    ref = np.full_like(z, REFERENCE_WAVELENGTH_UM) / (1.0 + z)
    args = (np.asarray(old_temperature, float)[:, None], np.asarray(young_fraction, float)[:, None],
            np.asarray(dust, float)[:, None])
    return -2.5 * np.log10(_rest_sed(lam, *args) / _rest_sed(ref, *args))


def _rest_sed(lam_um: np.ndarray, t_old: np.ndarray, young: np.ndarray, dust: np.ndarray) -> np.ndarray:
    """Rest-frame f_nu (arbitrary units) of old stars + young stars + warm dust at ``lam_um``."""
    old = _bnu_relative(lam_um, t_old)
    young_light = _bnu_relative(lam_um, np.full_like(t_old, YOUNG_STARS_K))
    switch = 1.0 / (1.0 + (2.0 / lam_um) ** 8)
    warm = dust * _bnu_relative(np.full_like(lam_um, DUST_PIVOT_UM), t_old) * (lam_um / DUST_PIVOT_UM) ** 2 * switch
    return (1.0 - young) * old + young * young_light + warm


def _bnu_relative(lam_um: np.ndarray, t_k: np.ndarray) -> np.ndarray:
    """B_nu(lambda, T) / B_nu(0.55 micron, T)."""
    return 10.0 ** (-0.4 * (_log_bnu(lam_um, t_k) - _log_bnu(np.full_like(lam_um, 0.55), t_k)))


# ----------------------------------------------------------------------------------------------------------------
def sersic_b(n: np.ndarray) -> np.ndarray:
    """The Sérsic b_n that makes r_e the half-light radius: gammainc(2n, b_n) = 1/2."""
    return gammaincinv(2.0 * np.asarray(n, dtype=np.float64), 0.5)


def sersic_enclosed(n: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Fraction of a Sérsic profile's light inside the isophote of semi-major axis ``x`` r_e."""
    n = np.asarray(n, dtype=np.float64)
    return gammainc(2.0 * n, sersic_b(n) * np.asarray(x, dtype=np.float64) ** (1.0 / n))


def truncation_radius(n: np.ndarray) -> np.ndarray:
    """Truncation radius in units of r_e: the 99% light radius, at most 8."""
    n = np.asarray(n, dtype=np.float64)
    return np.minimum((gammaincinv(2.0 * n, 0.99) / sersic_b(n)) ** n, 8.0)


def noise_pixels(psf_noise_pixels: float, psf_fwhm_pix: float, r_e_pix: np.ndarray,
                 axis_ratio: np.ndarray) -> np.ndarray:
    """Noise-equivalent area (pixels) of PSF-convolved galaxies, scaling the PSF's by a Gaussian approximation.

    A Gaussian of widths (sa, sb) convolved with a PSF of width sp has 4 pi sqrt((sp^2 + sa^2)(sp^2 + sb^2)) noise
    pixels; the galaxy's Gaussian has the same half-light radius (sa = r_e / 1.1774, sb = q sa).
    """
    sp2 = (psf_fwhm_pix / GAUSSIAN_FWHM_PER_SIGMA) ** 2
    sa2 = (np.asarray(r_e_pix) / HALF_LIGHT_PER_SIGMA) ** 2
    sb2 = sa2 * np.asarray(axis_ratio) ** 2
    return psf_noise_pixels * np.sqrt((sp2 + sa2) * (sp2 + sb2)) / sp2


# ----------------------------------------------------------------------------------------------------------------
class GalaxyRenderer:
    """Sérsic galaxies on a padded, ``fine``-times oversampled grid, ready to be given fluxes and PSFs per band.

    Galaxies whose half-light minor axis spans at least :data:`RESOLVED_FINE_PIX` fine pixels are sampled at the
    fine pixel centres (a dense stamp each); smaller ones on a sub-pixel grid aligned with their axes and
    deposited with cloud-in-cell weights, all at once. Either way each galaxy's light sums to 1 per unit flux.

    Args:
        x, y: (N,) centres in image pixels (0-based; may lie outside the image).
        r_e_pix: (N,) half-light radii along the major axis, pixels.
        sersic_n, axis_ratio, position_angle_deg: (N,) shape; position angle east of north, with north = +y and
            east = -x (a north-up, east-left TAN image).
        image_shape: (H, W) of the image.
        pad: pixels of margin around the image on the rendering grid (>= the largest PSF kernel radius, so light
            scattered into the image from the margin is kept).
        fine: sub-pixels per pixel side of the rendering grid.
    """

    def __init__(self, x, y, r_e_pix, sersic_n, axis_ratio, position_angle_deg, image_shape: tuple[int, int],
                 pad: int, fine: int = 1):
        self.image_shape = tuple(int(s) for s in image_shape)
        self.pad = int(pad)
        self.fine = int(fine)
        h, w = self.image_shape
        self.grid_shape = ((h + 2 * self.pad) * self.fine, (w + 2 * self.pad) * self.fine)
        # Compact galaxies: flat fine-grid index, weight and galaxy of every cloud-in-cell contribution.
        self._compact = (np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64))
        # Resolved galaxies: (galaxy, row0, col0, unit-flux stamp) on the fine grid.
        self._resolved: list[tuple[int, int, int, np.ndarray]] = []
        x, y, r_e, n, q, pa = (np.atleast_1d(np.asarray(a, dtype=np.float64))
                               for a in (x, y, r_e_pix, sersic_n, axis_ratio, position_angle_deg))
        if x.size == 0:
            return
        # At least one fine pixel, so that the tiniest galaxies still get a few samples.
        r_trunc = np.clip(r_e * truncation_radius(n), 1.0 / self.fine, MAX_STAMP_RADIUS_PIX)
        params = _Shapes(x, y, r_e, n, sersic_b(n), q, np.deg2rad(pa), r_trunc, sersic_enclosed(n, r_trunc / r_e))
        resolved = q * r_e * self.fine >= RESOLVED_FINE_PIX
        self._compact = self._render_compact(params, np.flatnonzero(~resolved))
        for i in np.flatnonzero(resolved):
            stamp = self._render_resolved(params, int(i))
            if stamp is not None:
                self._resolved.append(stamp)

    def _render_compact(self, s: "_Shapes", which: np.ndarray):
        """Cloud-in-cell contributions of galaxies ``which``, sampled on grids aligned with their axes."""
        k = self.fine
        if which.size == 0:
            return self._compact
        g = s.take(which)
        # Spacings fill every fine pixel and resolve each axis, but need not resolve structure finer than half a
        # fine pixel: the PSF (>= 3.5 fine pixels FWHM) washes it out, and the core's light is analytic anyway.
        h_along = np.minimum(1.0 / k, np.maximum(g.r_e / 3.0, 0.5 / k))
        h_across = np.minimum(1.0 / k, np.maximum(g.q * g.r_e / 3.0, 0.5 / k))
        half_a = np.ceil(g.r_trunc / h_along).astype(np.int64)
        half_b = np.ceil(g.q * g.r_trunc / h_across).astype(np.int64)
        n_a = 2 * half_a + 1
        counts = n_a * (2 * half_b + 1)
        gid = np.repeat(np.arange(which.size), counts)
        local = np.arange(gid.size) - np.repeat(np.cumsum(counts) - counts, counts)
        along = (local % n_a[gid] - half_a[gid]) * h_along[gid]
        across = (local // n_a[gid] - half_b[gid]) * h_across[gid]
        dx, dy = _axes_to_pixels(along, across, g.pa[gid])
        r_ell = np.sqrt(along**2 + (across / g.q[gid]) ** 2)
        weight = _unit_weights(r_ell, gid, g, r_core=1.5 * h_along)
        return self._cloud_in_cell(g.x[gid] + dx, g.y[gid] + dy, weight, which[gid])

    def _cloud_in_cell(self, xs, ys, weight, galaxy):
        """Flat fine-grid indices, weights and galaxy ids of the bilinear deposits of weighted samples (deposits
        that fall off the grid get weight 0)."""
        k, p = self.fine, self.pad
        gh, gw = self.grid_shape
        keep = weight > 0
        xs, ys, weight, galaxy = xs[keep], ys[keep], weight[keep], galaxy[keep]
        # Continuous fine-grid index of a position: fine pixel f has its centre at x = (f + 0.5) / k - 0.5 - pad.
        fx = (xs + p + 0.5) * k - 0.5
        fy = (ys + p + 0.5) * k - 0.5
        ix, iy = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
        tx, ty = fx - ix, fy - iy
        index = np.empty((4, xs.size), dtype=np.int64)
        share = np.empty((4, xs.size))
        corners = [(0, 1.0 - ty, 0, 1.0 - tx), (0, 1.0 - ty, 1, tx), (1, ty, 0, 1.0 - tx), (1, ty, 1, tx)]
        for j, (ddy, wy, ddx, wx) in enumerate(corners):
            r, c = iy + ddy, ix + ddx
            on_grid = (r >= 0) & (r < gh) & (c >= 0) & (c < gw)
            index[j] = np.where(on_grid, r * gw + c, 0)
            share[j] = np.where(on_grid, weight * wy * wx, 0.0)
        return index.ravel(), share.ravel(), np.tile(galaxy, 4)

    def _render_resolved(self, s: "_Shapes", i: int):
        """Galaxy ``i`` sampled at the centres of the fine pixels around it, or None when it misses the grid."""
        k, p = self.fine, self.pad
        g = s.take(np.array([i]))
        sin_pa, cos_pa = np.sin(g.pa[0]), np.cos(g.pa[0])
        # Half-extents (fine pixels) of the box around the truncation ellipse.
        reach = g.r_trunc[0] * k
        half_x = int(np.ceil(reach * np.hypot(sin_pa, g.q[0] * cos_pa))) + 1
        half_y = int(np.ceil(reach * np.hypot(cos_pa, g.q[0] * sin_pa))) + 1
        fx0, fy0 = (g.x[0] + p + 0.5) * k - 0.5, (g.y[0] + p + 0.5) * k - 0.5
        col0, row0 = int(np.floor(fx0)) - half_x, int(np.floor(fy0)) - half_y
        gh, gw = self.grid_shape
        r0, r1 = max(row0, 0), min(row0 + 2 * half_y + 2, gh)
        c0, c1 = max(col0, 0), min(col0 + 2 * half_x + 2, gw)
        if r0 >= r1 or c0 >= c1:
            return None
        # Samples cover the whole box, also off the grid, so that the galaxy's light is normalised as a whole.
        dx = ((col0 + np.arange(2 * half_x + 2)) - fx0)[None, :] / k  # pixels from the centre
        dy = ((row0 + np.arange(2 * half_y + 2)) - fy0)[:, None] / k
        along = -dx * sin_pa + dy * cos_pa
        across = -dx * cos_pa - dy * sin_pa
        r_ell = np.sqrt(along**2 + (across / g.q[0]) ** 2)
        # The profile at the fine pixel centres (the midpoint rule: the light varies smoothly across a pixel) ...
        stamp = np.where(r_ell <= g.r_trunc[0], _profile(r_ell, g.r_e[0], g.n[0], g.b[0]), 0.0)
        # ... except in the 3 x 3 fine pixels around the centre, where a cusp may peak within one pixel: there,
        # 8 x 8 sub-samples per pixel, deposited bilinearly so that their light keeps its sub-pixel position.
        m = CORE_SUBSAMPLES
        cc, rc = int(np.rint(fx0)) - col0, int(np.rint(fy0)) - row0  # the block's central pixel, stamp indices
        stamp[rc - 1 : rc + 2, cc - 1 : cc + 2] = 0.0
        sub = (np.arange(3 * m) + 0.5) / m - 1.5  # sub-sample offsets from the block's centre, fine pixels
        sx = (cc + sub)[None, :]
        sy = (rc + sub)[:, None]
        sdx, sdy = (sx - (fx0 - col0)) / k, (sy - (fy0 - row0)) / k
        s_along = -sdx * sin_pa + sdy * cos_pa
        s_across = -sdx * cos_pa - sdy * sin_pa
        s_r = np.sqrt(s_along**2 + (s_across / g.q[0]) ** 2)
        s_w = np.where(s_r <= g.r_trunc[0], _profile(s_r, g.r_e[0], g.n[0], g.b[0]), 0.0) / m**2
        # Bilinear weights reach one pixel beyond the block: deposit into the 5 x 5 pixels around it.
        _bilinear_add(stamp[rc - 2 : rc + 3, cc - 2 : cc + 3], np.broadcast_to(sx - cc + 2, s_w.shape).ravel(),
                      np.broadcast_to(sy - rc + 2, s_w.shape).ravel(), s_w.ravel())
        stamp /= stamp.sum()
        return i, r0, c0, stamp[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0]

    def image(self, flux: np.ndarray, psf: PSF, pixel_scale_deg: float) -> np.ndarray:
        """The (H, W) image of all galaxies with total fluxes ``flux`` (N,), convolved with ``psf``, per pixel."""
        h, w = self.image_shape
        index, weight, galaxy = self._compact
        if index.size == 0 and not self._resolved:
            return np.zeros((h, w))
        flux = np.asarray(flux, dtype=np.float64)
        gh, gw = self.grid_shape
        grid = np.bincount(index, weights=weight * flux[galaxy], minlength=gh * gw).astype(np.float64).reshape(gh, gw)
        for i, r0, c0, stamp in self._resolved:
            grid[r0 : r0 + stamp.shape[0], c0 : c0 + stamp.shape[1]] += flux[i] * stamp
        conv = convolve_with_psf(grid, psf, pixel_scale_deg / self.fine)
        k, p = self.fine, self.pad
        image = conv[p * k : (p + h) * k, p * k : (p + w) * k]
        if k > 1:  # sum k x k fine pixels into each pixel, one axis at a time (faster than both at once)
            image = image.reshape(h * k, w, k).sum(axis=2).reshape(h, k, w).sum(axis=1)
        return np.clip(image, 0.0, None)


# Galaxies whose half-light minor axis spans this many fine pixels are sampled at fine pixel centres.
RESOLVED_FINE_PIX = 1.5
# Sub-samples per fine-pixel side in the 3 x 3 fine pixels around a resolved galaxy's centre.
CORE_SUBSAMPLES = 8


@dataclass
class _Shapes:
    """Per-galaxy rendering parameters (arrays): centre, r_e, n, b_n, q, PA (rad), truncation radius and the
    fraction of the light inside it."""

    x: np.ndarray
    y: np.ndarray
    r_e: np.ndarray
    n: np.ndarray
    b: np.ndarray
    q: np.ndarray
    pa: np.ndarray
    r_trunc: np.ndarray
    frac_trunc: np.ndarray

    def take(self, which: np.ndarray) -> "_Shapes":
        return _Shapes(*(getattr(self, f)[which] for f in self.__dataclass_fields__))


def _axes_to_pixels(along: np.ndarray, across: np.ndarray, pa_rad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets along the major / minor axes to (dx, dy) pixels: the major axis points along (-sin PA, cos PA),
    PA running from north (+y) through east (-x)."""
    sin_pa, cos_pa = np.sin(pa_rad), np.cos(pa_rad)
    return -along * sin_pa - across * cos_pa, along * cos_pa - across * sin_pa


def _profile(r_ell: np.ndarray, r_e: float, n: float, b: float) -> np.ndarray:
    """The Sérsic surface brightness at elliptical radius ``r_ell``, up to a constant: exp(-b (r / r_e)^(1/n))."""
    return np.exp(-b * (r_ell / r_e) ** (1.0 / n))


def _bilinear_add(image: np.ndarray, x: np.ndarray, y: np.ndarray, weight: np.ndarray) -> None:
    """Add point weights at (x, y) (array index coordinates) to ``image`` with bilinear (cloud-in-cell) weights."""
    ix, iy = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    tx, ty = x - ix, y - iy
    h, w = image.shape
    added = np.zeros(h * w)
    for ddy, wy in ((0, 1.0 - ty), (1, ty)):
        for ddx, wx in ((0, 1.0 - tx), (1, tx)):
            added += np.bincount((iy + ddy) * w + (ix + ddx), weights=weight * wy * wx, minlength=h * w)
    image += added.reshape(h, w)


def _unit_weights(r_ell: np.ndarray, gid: np.ndarray, g: _Shapes, r_core: np.ndarray) -> np.ndarray:
    """Weights of samples at elliptical radii ``r_ell`` of galaxies ``gid`` (indices into ``g``), summing to 1
    per galaxy.

    Samples beyond the truncation radius get nothing; the light inside ``r_core`` (per galaxy) gets its analytic
    share of the truncated profile, so cuspy cores need no finer sampling.
    """
    n_g = g.x.size
    inside = r_ell <= g.r_trunc[gid]
    weight = np.where(inside, np.exp(-g.b[gid] * (r_ell / g.r_e[gid]) ** (1.0 / g.n[gid])), 0.0)
    r_core = np.minimum(r_core, g.r_trunc)
    core = r_ell < r_core[gid]  # always holds the central sample
    frac_core = sersic_enclosed(g.n, r_core / g.r_e)
    w_core = np.bincount(gid, weights=weight * core, minlength=n_g)
    w_rest = np.bincount(gid, weights=weight * (inside & ~core), minlength=n_g)
    scale_core = frac_core / np.where(w_core > 0, w_core, 1.0)
    scale_rest = np.where(w_rest > 0, (g.frac_trunc - frac_core) / np.where(w_rest > 0, w_rest, 1.0), 0.0)
    weight *= np.where(core, scale_core[gid], scale_rest[gid])
    total = np.bincount(gid, weights=weight, minlength=n_g)
    return weight / np.where(total > 0, total, 1.0)[gid]


@lru_cache(maxsize=64)
def fine_psf_kernel(psf: PSF, pixel_scale_deg: float) -> np.ndarray:
    """The PSF sampled at pixel centres of a grid with ``pixel_scale_deg`` pixels, normalised to sum 1.

    Point samples, not pixel integrals: the grid it convolves is later binned to the detector's pixels, which
    integrates over them (the grid is fine enough, FWHM >= 3.5 of its pixels, for point samples to be exact).
    """
    radius = psf.stamp_radius_pix(pixel_scale_deg, max_radius_pix=512)
    kernel = psf.stamps(np.zeros(1), np.zeros(1), pixel_scale_deg, radius, oversample=1)[0]
    kernel /= kernel.sum()
    kernel.setflags(write=False)
    return kernel


@lru_cache(maxsize=16)
def _kernel_spectrum(psf: PSF, pixel_scale_deg: float, grid_shape: tuple[int, int]):
    """The kernel's real FFT on a grid big enough for a linear convolution of ``grid_shape``, and its radius."""
    kernel = fine_psf_kernel(psf, pixel_scale_deg)
    r = kernel.shape[0] // 2
    full = tuple(_fft_length(s + 2 * r) for s in grid_shape)
    return sp_fft.rfft2(kernel, s=full), full, r


def _fft_length(n: int) -> int:
    """A transform length >= n that is a multiple of 32 with small prime factors: pocketfft is several times
    slower on odd lengths such as 625 = 5^4 than on 640 = 2^7 5."""
    m = -(-n // 32) * 32
    while sp_fft.next_fast_len(m, real=True) != m:
        m += 32
    return m


def convolve_with_psf(grid: np.ndarray, psf: PSF, pixel_scale_deg: float) -> np.ndarray:
    """Linear convolution of ``grid`` with the point-sampled PSF (same shape, centred); the kernel's transform is
    cached, so a fixed PSF costs two FFTs per image."""
    spectrum, full, r = _kernel_spectrum(psf, pixel_scale_deg, grid.shape)
    out = sp_fft.irfft2(sp_fft.rfft2(grid, s=full) * spectrum, s=full)
    return out[r : r + grid.shape[0], r : r + grid.shape[1]]


def fine_factor(psf_fwhm_pix: float) -> int:
    """Sub-pixels per side so that the PSF FWHM spans at least 3.5 of them (1 for well-sampled PSFs)."""
    return int(np.clip(np.ceil(3.5 / psf_fwhm_pix), 1, 4))
