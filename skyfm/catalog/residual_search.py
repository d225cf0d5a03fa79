"""A second look, in the PSF fit's residual image, for the sources the network passed over: faint or diffuse.

The network's heatmap was trained on patches of stars and compact galaxies; on Hubble fields, where a galaxy's
half-light radius is 5-40 pixels (2-20 PSF FWHM) and its light is spread below the noise of any one pixel, it
finds a third of the galaxies of SNR >= 5, and on sparse MeerLICHT fields it stops short of the faint stars and
galaxies its threshold leaves (``docs/benchmarks.md``, Run 18). SExtractor finds such sources by filtering the
image with a kernel of their size; this module does that on the residual image of the PSF fit (the detected
sources' models subtracted):

1. The residual of each band, in units of its pixels' noise, is clipped to +-:data:`PIXEL_CLIP` sigma (a cosmic
   ray, a hot pixel or a bright star's misfit core is a few pixels far above the noise, a diffuse galaxy is many
   pixels at or below it), and matched-filtered with Gaussians of :data:`KERNEL_FWHM` PSF FWHM: the bands' sum at
   inverse variance, masked pixels given no weight, as a significance map (a source's SNR at each place).
2. The map is divided by its own robust scatter (1.4826 MAD, over the pixels some band sees), so that the light of
   undetected faint sources (confusion, strong at the large scales in crowded fields) counts as noise.
3. Connected regions above :data:`REGION_SNR` are the candidates' footprints. A region longer than
   :data:`MAX_REGION_FWHM` PSF FWHM and elongated beyond :data:`MAX_ELONGATION` is a satellite trail or a bleed
   column: no source. The highest peak of a region that holds no detection is a new source if it reaches
   ``min_snr``. Any other local maximum that reaches ``min_snr`` (a region's lower peak, or a peak in a region that
   holds a detection: the detection's outer light, or a neighbour blended with it) is one only where it is
   deblended, as SExtractor splits a footprint: it stands :data:`DEBLEND_CONTRAST` above the saddle that joins it
   to a higher peak or to the disc of :data:`DEBLEND_MIN_SEPARATION` FWHM around a detection (two galaxies whose
   footprints touch; a galaxy beside a detected star; not the outskirts of a detected galaxy, whose light rises
   towards it). Each source sits at its peak, sub-pixel by a parabola through the peak and its neighbours.

The caller (:func:`skyfm.detect.refine_ccd_tile`) PSF-fits the new sources and measures them in Kron apertures
(:func:`skyfm.catalog.kron.kron_photometry`); the head's ``residual_search`` says which flux each keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PIXEL_CLIP = 5.0  # residual pixels are clipped to +- this many sigma before filtering
KERNEL_FWHM = (2.0, 4.0)  # matched-filter Gaussians, FWHM in PSF FWHM (galaxies of r_e ~ 1-5 FWHM)
REGION_SNR = 2.5  # a candidate's footprint: the connected pixels above this significance
MAX_REGION_FWHM = 40.0  # footprints longer than this (PSF FWHM) ...
MAX_ELONGATION = 5.0  # ... and more elongated than this (major / minor axis) are trails, not galaxies
DEBLEND_CONTRAST = 2.0  # a footprint's lower peak is a source of its own when it stands this far above its saddle
DEBLEND_FRACTION = 0.2  # ... or this share of its own significance, if more (a bright source's noise is its own)
DEBLEND_MIN_SEPARATION = 2.0  # ... and not joined above it to the disc of this many PSF FWHM around a detection


@dataclass
class ResidualSources:
    """New sources found by :func:`find_residual_sources` (arrays of shape (N,)): ``x``, ``y`` (pixels), ``snr``
    (the peak of the normalised significance map), ``sigma_pix`` (the matched filter's Gaussian sigma at which the
    peak is highest)."""

    x: np.ndarray
    y: np.ndarray
    snr: np.ndarray
    sigma_pix: np.ndarray

    def __len__(self) -> int:
        return int(self.x.size)


def significance_map(resid, rms, mask, sigma_pix: float, with_coverage: bool = False):
    """(H, W) matched-filter significance of a Gaussian source of ``sigma_pix`` at every pixel: the bands' residual
    at inverse variance, clipped to +-PIXEL_CLIP sigma per pixel, masked pixels left out (0 where the filter
    reaches no unmasked pixel). ``with_coverage``: also the (H, W) bool of the pixels it does reach."""
    from scipy.ndimage import gaussian_filter

    resid = np.asarray(resid, dtype=np.float64)
    C, H, W = resid.shape
    rms = np.broadcast_to(np.asarray(rms, dtype=np.float64), resid.shape)
    bad = np.zeros(resid.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), resid.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = np.where(bad | ~(rms > 0) | ~np.isfinite(resid), 0.0, 1.0 / rms ** 2)  # (C, H, W)
        clipped = np.clip(np.nan_to_num(resid / rms), -PIXEL_CLIP, PIXEL_CLIP) * rms
    # sum K w r / sqrt(sum K^2 w), K a unit Gaussian; K^2 is a Gaussian of sigma / sqrt(2) over 4 pi sigma^2
    num = sum(gaussian_filter(weight[c] * clipped[c], sigma_pix, mode="constant") for c in range(C))
    den = sum(gaussian_filter(weight[c], sigma_pix / np.sqrt(2.0), mode="constant") for c in range(C))
    den = den / (4.0 * np.pi * sigma_pix ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        sig = np.where(den > 0, num / np.sqrt(den), 0.0)
    return (sig, den > 0) if with_coverage else sig


def _robust_scatter(values: np.ndarray) -> float:
    v = values[np.isfinite(values)]
    if v.size < 16:
        return 1.0
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def normalised_significance(sig: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """A :func:`significance_map` over its robust scatter at the pixels it ``covered`` (its ``with_coverage``
    output): a tile's no-data region (a mosaic's edge, a masked block) is 0 there, and would shrink the scatter and
    turn the noise of the rest into sources."""
    return sig / max(_robust_scatter(sig[covered]), 1e-6)


def _subpixel_peak(m: np.ndarray, iy: int, ix: int) -> tuple[float, float]:
    """The peak of a parabola through (iy, ix) and its neighbours along each axis (at most half a pixel away)."""
    H, W = m.shape
    out = []
    for axis, (i, n) in enumerate(((iy, H), (ix, W))):
        if 0 < i < n - 1:
            lo = m[iy - 1, ix] if axis == 0 else m[iy, ix - 1]
            hi = m[iy + 1, ix] if axis == 0 else m[iy, ix + 1]
            curv = lo - 2 * m[iy, ix] + hi
            out.append(i + (float(np.clip(0.5 * (lo - hi) / curv, -0.5, 0.5)) if curv < 0 else 0.0))
        else:
            out.append(float(i))
    return out[1], out[0]


def _stands_apart(best: np.ndarray, box: tuple, iy: int, ix: int, near_detection: np.ndarray) -> bool:
    """Whether the peak at (iy, ix) of the significance map ``best`` stands DEBLEND_CONTRAST (or DEBLEND_FRACTION
    of itself) above the saddle that joins it to a higher peak or to ``near_detection`` (bool, H x W): at that
    level its connected light (within ``box``, its footprint's slices) holds neither."""
    from scipy.ndimage import label

    level = best[iy, ix] - max(DEBLEND_CONTRAST, DEBLEND_FRACTION * best[iy, ix])
    if level <= REGION_SNR:  # joined to the rest of its footprint above the level
        return False
    above, _ = label(best[box] >= level)
    own = above == above[iy - box[0].start, ix - box[1].start]
    return bool(best[box][own].max() <= best[iy, ix] and not near_detection[box][own].any())


def _is_trail(ys: np.ndarray, xs: np.ndarray, fwhm_pix: float) -> bool:
    """A footprint long and thin: a satellite trail, a bleed column."""
    if ys.size < 3:
        return False
    cov = np.cov(np.stack([xs, ys]).astype(float))
    lo, hi = np.sqrt(np.clip(np.linalg.eigvalsh(cov), 1e-12, None))
    length = 2 * np.sqrt(3.0) * hi  # a uniform bar of this length has this standard deviation
    return length > MAX_REGION_FWHM * fwhm_pix and hi > MAX_ELONGATION * lo


def find_residual_sources(resid, rms, mask, fwhm_pix: float, x, y, *, min_snr: float) -> ResidualSources:
    """Sources in the residual image that no detection stands for (module docstring).

    Args:
        resid: (C, H, W) image minus background minus the detections' models
            (:func:`~skyfm.catalog.psf_fit.residual_image`).
        rms: (C, H, W) background rms. mask: (C, H, W) or (H, W) bool of pixels to leave out, or None; a region
            whose light peaks on a pixel masked in every band gives no source.
        fwhm_pix: the PSF's FWHM (pixels); the matched filters scale with it.
        x, y: (N,) the detections (pixels): a peak joined to one above its saddle, or near one, is no new source.
        min_snr: the smallest normalised peak significance of a new source.
    """
    from scipy.ndimage import distance_transform_edt, find_objects, label, maximum_filter

    resid = np.asarray(resid, dtype=np.float64)
    H, W = resid.shape[1:]
    mask = None if mask is None else np.asarray(mask, bool)
    maps, sigmas = [], []
    for k in KERNEL_FWHM:
        sigma = k * fwhm_pix / 2.3548
        maps.append(normalised_significance(*significance_map(resid, rms, mask, sigma, with_coverage=True)))
        sigmas.append(sigma)
    maps = np.stack(maps)  # (S, H, W)
    best = maps.max(axis=0)
    which = maps.argmax(axis=0)
    regions, n_regions = label(best >= REGION_SNR)
    if n_regions == 0:
        return ResidualSources(*(np.zeros(0) for _ in range(4)))
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    inside = (x >= 0) & (x <= W - 1) & (y >= 0) & (y <= H - 1)
    det_iy, det_ix = np.rint(y[inside]).astype(int), np.rint(x[inside]).astype(int)
    taken = np.zeros(n_regions + 1, bool)
    taken[regions[det_iy, det_ix]] = True
    # a detection's own leftover light (the wings of a galaxy fitted as a point, a star's misfit core) rises towards
    # it: peaks whose light joins this disc above their saddle are its, however far out on a large galaxy they lie
    near_detection = np.zeros((H, W), bool)
    if det_iy.size:
        near_detection[det_iy, det_ix] = True
        near_detection = distance_transform_edt(~near_detection) <= DEBLEND_MIN_SEPARATION * fwhm_pix
    flat = best.ravel()
    boxes = find_objects(regions)
    # no data where the light peaks (a masked star, a saturated core, a cosmic-ray hit): no source to place there
    unseen = np.zeros((H, W), bool) if mask is None else np.broadcast_to(mask, resid.shape).all(axis=0)
    trails = {}

    def is_trail(region: int) -> bool:
        if region not in trails:
            py, px = np.nonzero(regions[boxes[region - 1]] == region)
            trails[region] = _is_trail(py + boxes[region - 1][0].start, px + boxes[region - 1][1].start, fwhm_pix)
        return trails[region]

    peaks = []
    # the highest pixel of each free footprint (the first of its pixels in descending order) is its source
    lab = regions.ravel()
    order = np.flatnonzero(lab > 0)  # only the regions' pixels sorted: a tile's few percent, not all of it
    order = order[np.argsort(-flat[order], kind="stable")]
    regions_first, first = np.unique(lab[order], return_index=True)
    free_top = np.zeros(H * W, bool)
    for region, pos in zip(regions_first, first):
        if taken[region]:
            continue
        i = order[pos]
        free_top[i] = True
        iy, ix = divmod(int(i), W)
        if flat[i] < min_snr or unseen[iy, ix] or is_trail(region):
            continue
        peaks.append((iy, ix))
    # any other local maximum that reaches min_snr (a footprint's lower peak, or a peak of one that holds a
    # detection) is a source of its own where it is deblended (module docstring)
    radius = max(1, int(round(sigmas[0])))
    local = (best >= min_snr) & (regions > 0) & ~free_top.reshape(H, W) & ~unseen
    local &= best == maximum_filter(best, size=2 * radius + 1)
    for iy, ix in zip(*np.nonzero(local)):
        region = regions[iy, ix]
        if near_detection[iy, ix] or is_trail(region):
            continue
        if _stands_apart(best, boxes[region - 1], iy, ix, near_detection):
            peaks.append((iy, ix))
    xs, ys, snrs, sig = [], [], [], []
    for iy, ix in peaks:
        sx, sy = _subpixel_peak(best, iy, ix)
        xs.append(sx)
        ys.append(sy)
        snrs.append(float(best[iy, ix]))
        sig.append(sigmas[int(which[iy, ix])])
    return ResidualSources(*(np.asarray(v, float) for v in (xs, ys, snrs, sig)))


__all__ = ["ResidualSources", "find_residual_sources", "significance_map"]
