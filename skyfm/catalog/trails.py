"""Satellite trails: straight ridges of light across a CCD image, found so that ``skyfm detect`` drops the
detections a trail breaks into.

A trail is a straight line with the PSF's line-spread profile across it, often far brighter than the stars (the
detector then fires along its flanks, not on its centre line). :func:`find_trails` looks for it in the image:

1. the bands' background-subtracted images in noise units are averaged into blocks (``block`` px, by default
   two PSF FWHMs and at least 4 px), and for every line (1-degree steps, one block apart) the *median* of the
   blocks along it is taken: a median along a line through a star field is the sky between the stars, whatever
   stars it crosses, while a trail lifts the whole line (a Radon transform with a median instead of a sum);
2. a line is a trail when its median exceeds the medians of the parallel lines 3 to 6 blocks to either side
   (the larger of the two sides) by ``min_excess`` noise sigma per pixel, by ``min_sigmas`` times the median's
   own noise and by ``min_sigmas`` times the scatter of that excess over all lines of the image (crowded
   fields scatter it far beyond the pixel noise), over at least ``min_length`` px and half the image's side;
   candidates are taken brightest first (at most ``max_candidates``);
3. at full resolution the candidate's centre is refined and its half-width measured (the offsets where the
   median profile across it stays above ``edge_sigma`` noise sigma, plus one FWHM), and it must be lit from
   end to end: in each quarter of its length the median along it rises ``min_excess`` sigma above the mean
   of the medians beside it (a satellite crosses the whole image; a bleed column, a cluster's core or a
   galaxy lifts a line only where they are), and narrow: the median profile across it at most ``max_width``
   PSF FWHM wide at half its peak (:data:`MAX_WIDTH_FWHM`; a moving point source leaves the PSF's width, while
   the light of a cluster or a bright star's halo along a line is broad). A trail found is masked out and the
   search repeated, up to ``max_trails``.

Faint trails (a few noise sigma per pixel) do not stand out of a crowded field's line medians, yet a detector
still fires along them. :func:`trails_through_detections` finds them from those detections: each that looks like a
piece of a line (:func:`detection_lineness`: the light along one direction through it, on both sides) proposes
its line, and a line that several of them lie on is kept when it is narrow, stands out of its parallel lines'
scatter (a chance row of a crowded field's stars does not) and is lit from end to end.

:func:`on_trail` marks the detections within a trail's half-width; ``skyfm detect`` drops them, except those
where :func:`point_sources_on_trail` sees a point source of its own standing above the trail or a peak along it
(a star the trail crosses), and in a many-band image those that another band, which the trail does not cross,
shows (:func:`point_source_snr`; each band is searched on its own). Saturated stars and their bleed columns are
straight ridges too: ``skyfm detect`` leaves them out of the search (``mask``).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np

ANGLE_STEP_DEG = 1.0
RAY_ANGLES = 36  # detection_lineness: directions (5 degrees apart)
RAY_REACH_FWHM = (1.5, 6.0)  # detection_lineness: the part of each ray whose median is taken, in PSF FWHMs
SUPPORT_DISTANCE_FWHM = 0.75  # trails_through_detections: detections on a proposed line, within this
SUPPORT_ANGLE_DEG = 10.0  # trails_through_detections: ... and their directions within this of the line's
NARROW_SIDE_FWHM = 2.0  # trails_through_detections: lit end to end against the lines this far beside it
MIN_PARALLEL_SIGMAS = 5.0  # trails_through_detections: the line's narrow excess over its parallels' scatter
PEAK_STEP_FWHM = 1.5  # point_sources_on_trail: a peak along the trail, against the trail this far along each side
PEAK_MODEL_ERROR = 0.05  # point_sources_on_trail: ... with this share of the trail's light added to the noise
# find_trails: the widest profile across a trail, at half its peak, in PSF FWHM. Validation (runs/exp40/width.py:
# 600 Hubble F606W patches with no trail, 160 MeerLICHT and F606W patches each crossed by one): the 104 drawn trails
# found are 0.9-1.4 FWHM wide (90%; three at 2.3, 3.2 and 4.5), the 3 false ones, lines through a cluster and the
# halos of its saturated stars, 2.3, 2.7 and 14. A trail missed keeps its rows, a false one drops true stars
MAX_WIDTH_FWHM = 2.0


@dataclass
class Trail:
    """A straight trail: the points (x, y) with ``x cos(theta) + y sin(theta) = rho`` (pixels, radians)."""

    theta: float
    rho: float
    excess: float  # the line's median over the brighter side's, in noise sigma per pixel
    half_width: float  # px: where the trail stays above edge_sigma, plus one PSF FWHM

    def distance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Perpendicular distance (px) of the points (x, y) from the trail's line."""
        return np.abs(np.asarray(x) * np.cos(self.theta) + np.asarray(y) * np.sin(self.theta) - self.rho)


def noise_units(image: np.ndarray) -> np.ndarray:
    """(H, W): the bands' background-subtracted images in noise units, averaged and rescaled to unit noise."""
    from skyfm.instruments.scaling import robust_background

    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 2:
        image = image[None]
    planes = []
    for band in image:
        finite = np.isfinite(band)
        if finite.sum() < 16:
            continue
        sky, sigma = robust_background(band)
        planes.append(np.where(finite, (band - sky) / max(sigma, 1e-12), 0.0))
    if not planes:
        return np.zeros(image.shape[1:])
    return np.sum(planes, axis=0) / np.sqrt(len(planes))


def _line_points(shape: tuple[int, int], theta: float, rho: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t, x, y): the points of the line (theta, rho) 1 px apart (t: the position along it) inside an image of
    ``shape``."""
    h, w = shape
    c, s = np.cos(theta), np.sin(theta)
    t = np.arange(-np.hypot(h, w), np.hypot(h, w), 1.0)
    x, y = rho * c - t * s, rho * s + t * c
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    return t[inside], x[inside], y[inside]


def _shifted_samples(z: np.ndarray, x: np.ndarray, y: np.ndarray, theta: float, offset: float) -> np.ndarray:
    """``z`` at the nearest pixels of the points (x, y) moved ``offset`` px along the line's normal (those that
    stay inside the image)."""
    h, w = z.shape
    xi = np.rint(x + offset * np.cos(theta)).astype(int)
    yi = np.rint(y + offset * np.sin(theta)).astype(int)
    ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    return z[yi[ok], xi[ok]]


def _line_medians(z: np.ndarray, theta: float, rho: float, offsets: np.ndarray) -> tuple[np.ndarray, int]:
    """Median of ``z`` along the line (theta, rho) shifted by each offset (px), nearest-pixel samples 1 px apart
    over the part of the line inside the image; returns (medians, samples per line)."""
    _, x0, y0 = _line_points(z.shape, theta, rho)
    out = np.full(len(offsets), np.nan)
    for i, o in enumerate(offsets):
        values = _shifted_samples(z, x0, y0, theta, o)
        values = values[np.isfinite(values)]  # masked pixels (saturated, a trail already found) do not count
        if values.size >= 8:
            out[i] = float(np.median(values))
    return out, len(x0)


def _block_mean(z: np.ndarray, block: int) -> np.ndarray:
    h, w = (z.shape[0] // block) * block, (z.shape[1] // block) * block
    return z[:h, :w].reshape(h // block, block, w // block, block).mean(axis=(1, 3))


RADON_CACHE_BYTES = 32 * 2**20  # _radon_indices keeps the sample indices of line grids up to this size (4 grids)


@functools.lru_cache(maxsize=4)
def _radon_indices(h: int, w: int, thetas: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """(indices (n_theta, n_rho, n_t) into an (h, w) image's flattened pixels, h * w for a point outside it;
    rho values): the nearest pixels of every line of :func:`_radon_median`. Every tile of an image, and every band
    of a tile, has the same grid, so they are worked out once (None where they would take more than
    ``RADON_CACHE_BYTES``)."""
    rho_c = _radon_rhos(h, w)
    if len(thetas) * rho_c.size**2 * 4 > RADON_CACHE_BYTES:
        return None
    out = np.stack([_line_grid_indices(h, w, theta, rho_c) for theta in thetas]).astype(np.int32)
    out.setflags(write=False)
    return out, rho_c


def _radon_rhos(h: int, w: int) -> np.ndarray:
    """The lines' offsets (px, 1 px apart) about the centre of an (h, w) image, so that every line crosses it."""
    half = float(np.ceil(np.hypot(h, w) / 2.0))
    return np.arange(-half, half + 1.0)


def _line_grid_indices(h: int, w: int, theta: float, rho_c: np.ndarray) -> np.ndarray:
    """(n_rho, n_t): flattened indices of the nearest pixels of the lines (theta, rho about the image centre),
    samples 1 px apart; ``h * w`` where a sample is off the image."""
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    c, s = np.cos(theta), np.sin(theta)
    t = rho_c  # the same half-length along the lines as across
    xs = np.rint(cx + rho_c[:, None] * c - t[None, :] * s).astype(np.int64)  # (n_rho, n_t)
    ys = np.rint(cy + rho_c[:, None] * s + t[None, :] * c).astype(np.int64)
    inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    return np.where(inside, ys * w + xs, h * w)


def _radon_median(z: np.ndarray, thetas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median of ``z`` (NaN: ignored) along every line (theta, rho), rho in 1-pixel steps: (medians (n_theta,
    n_rho), finite samples per line, rho values). Lines with fewer than 8 samples are NaN."""
    h, w = z.shape
    cached = _radon_indices(h, w, tuple(float(t) for t in thetas))
    rho_c = cached[1] if cached is not None else _radon_rhos(h, w)
    flat = np.append(np.asarray(z, dtype=np.float64).ravel(), np.nan)  # the last: every point off the image
    med = np.full((len(thetas), len(rho_c)), np.nan)
    count = np.zeros((len(thetas), len(rho_c)), dtype=np.int32)
    chunk = max(1, int(2**20 // (8 * rho_c.size**2)))  # angles sorted at once: about 1 MB (faster than more)
    for start in range(0, len(thetas), chunk):
        angles = range(start, min(start + chunk, len(thetas)))
        index = (cached[0][angles.start:angles.stop] if cached is not None else
                 np.stack([_line_grid_indices(h, w, float(thetas[i]), rho_c) for i in angles]))
        values = np.sort(flat[index], axis=2)  # (angles, n_rho, n_t); NaNs (outside, masked) sort last
        n = np.isfinite(values).sum(axis=2)
        lo = np.take_along_axis(values, (np.maximum(n - 1, 0) // 2)[..., None], axis=2)[..., 0]
        hi = np.take_along_axis(values, np.minimum(n // 2, values.shape[2] - 1)[..., None], axis=2)[..., 0]
        med[angles.start:angles.stop] = np.where(n >= 8, 0.5 * (lo + hi), np.nan)
        count[angles.start:angles.stop] = n
    return med, count, rho_c


def find_trails(image: np.ndarray, fwhm_pix: float, *, mask: np.ndarray | None = None, block: int | None = None,
                min_excess: float = 5.0, min_sigmas: float = 8.0, min_length: float = 64.0, edge_sigma: float = 3.0,
                max_trails: int = 4, max_candidates: int = 12, noise: np.ndarray | None = None,
                max_width: float = MAX_WIDTH_FWHM) -> list[Trail]:
    """Trails across ``image`` ((C, H, W) or (H, W), data units, sky included); see the module docstring.

    ``fwhm_pix``: the PSF FWHM in pixels (blocks of about two FWHMs, at least 4 px, and the width margin).
    ``mask``: (H, W) bool, pixels to leave out (saturated stars and their bleed columns, which are straight
    ridges too, and their halos: :func:`skyfm.detect.drop_trail_detections` passes the saturated pixels grown by
    two FWHM and a disc around each star that grows with its saturated core).
    ``noise``: ``image`` already in noise units (:func:`noise_units`), when the caller has it.
    """
    z = noise_units(image) if noise is None else noise
    if mask is not None:
        z = np.where(np.asarray(mask, bool), np.nan, z)
    h, w = z.shape
    fwhm = max(float(fwhm_pix), 1.0)
    block = int(block or max(4, 2 * round(fwhm)))
    if min(h, w) < 8 * block:
        return []
    thetas = np.deg2rad(np.arange(0.0, 180.0, ANGLE_STEP_DEG))
    hb, wb = h // block, w // block
    cxb, cyb = (wb - 1) / 2.0, (hb - 1) / 2.0
    yy, xx = np.mgrid[0:h, 0:w]
    trails: list[Trail] = []
    score, rhos = _line_scores(_block_mean(z, block), thetas, block, min_excess, min_sigmas,
                               max(min_length, 0.5 * min(h, w)))
    for _ in range(max_candidates):
        if len(trails) >= max_trails or score is None or not np.isfinite(score).any():
            break
        it, ir = np.unravel_index(int(np.argmax(score)), score.shape)
        theta, excess = float(thetas[it]), float(score[it, ir])
        # block coordinates (about the block grid's centre) -> pixels (about the image's origin)
        rho_blocks = rhos[ir] + cxb * np.cos(theta) + cyb * np.sin(theta)
        rho = float(rho_blocks * block + 0.5 * (block - 1) * (np.cos(theta) + np.sin(theta)))
        trail = _refine(z, theta, rho, fwhm, block, edge_sigma, excess)
        if _lit_end_to_end(z, trail, min_excess) and _profile_width(z, trail) <= max_width * fwhm:
            trails.append(trail)
            # look again without it
            z = np.where(trail.distance(xx, yy) <= trail.half_width + block, np.nan, z)
            score, rhos = _line_scores(_block_mean(z, block), thetas, block, min_excess, min_sigmas,
                                       max(min_length, 0.5 * min(h, w)))
        else:  # a partial ridge (a bleed column, a cluster's core, a galaxy): not this line nor its neighbours
            near_theta = np.abs(((thetas - theta + np.pi / 2) % np.pi) - np.pi / 2) <= np.deg2rad(3.0)
            score[np.ix_(near_theta, np.abs(rhos - rhos[ir]) <= 2)] = -np.inf
    return trails


def _line_scores(zb: np.ndarray, thetas: np.ndarray, block: int, min_excess: float, min_sigmas: float,
                 min_length: float) -> tuple[np.ndarray | None, np.ndarray]:
    """(excess of every trail-like line (n_theta, n_rho), -inf for the others; rho about the block grid's
    centre, in blocks)."""
    med, count, rhos = _radon_median(zb, thetas)
    sides = [_nanmedian(np.stack([np.roll(med, sign * k, axis=1) for k in range(3, 7)]), axis=0)
             for sign in (-1, 1)]  # lines off the image are NaN: so are their sides' medians
    floor = np.fmax(sides[0], sides[1])
    noise = 1.2533 / (block * np.sqrt(np.maximum(count, 1)))  # a block mean has noise 1 / block
    excess = med - floor
    long_enough = (count * block >= min_length) & np.isfinite(excess)
    if not long_enough.any():
        return None, rhos
    # crowded fields scatter line medians far beyond the pixel noise: measure the scatter over all lines
    values = excess[long_enough]
    scatter = 1.4826 * float(np.median(np.abs(values - np.median(values))))
    good = long_enough & (excess >= min_excess) & (excess >= min_sigmas * noise) & (excess >= min_sigmas * scatter)
    return np.where(good, excess, -np.inf), rhos


def _nanmedian(values: np.ndarray, axis: int) -> np.ndarray:
    """``np.nanmedian(values, axis)`` (NaN where every value is), without its per-slice warnings and masked
    arrays: on the many short slices of :func:`_line_scores` and :func:`_lineness` those cost more than the
    medians."""
    ordered = np.sort(np.moveaxis(values, axis, -1), axis=-1)  # NaNs last
    n = np.isfinite(ordered).sum(axis=-1)
    lo = np.take_along_axis(ordered, (np.maximum(n - 1, 0) // 2)[..., None], axis=-1)[..., 0]
    hi = np.take_along_axis(ordered, np.minimum(n // 2, ordered.shape[-1] - 1)[..., None], axis=-1)[..., 0]
    return np.where(n > 0, 0.5 * (lo + hi), np.nan)


def _lit_end_to_end(z: np.ndarray, trail: "Trail", min_excess: float, segments: int = 4,
                    side: float | None = None) -> bool:
    """Whether the trail's ridge runs across the whole image: in each of ``segments`` equal stretches of the
    line, the median along it is ``min_excess`` sigma above the median beside it (3 half-widths away and more,
    the mean of the two sides: a ridge rises above both, the edge of a cluster or a gradient only above one).
    A satellite crosses the whole image; a bleed column, a cluster's core or a galaxy lifts the
    line only where it is. ``side``: how far beside (px; the default 3 half-widths); nearer, a line must also
    be narrow: a line through the middle of a diffuse glow (a cluster's unresolved stars) is brighter than the
    lines far beside it all along its length, but not than those a few pixels away."""
    t, x0, y0 = _line_points(z.shape, trail.theta, trail.rho)
    if t.size < 8 * segments:
        return False
    bounds = np.linspace(t.min(), t.max() + 1e-9, segments + 1)
    side = 3.0 * max(trail.half_width, 2.0) if side is None else side
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        stretch = (t >= lo) & (t < hi)
        values = {}
        for name, offsets in (("on", (-1.0, 0.0, 1.0)), ("left", (-side, -1.5 * side, -2.0 * side)),
                              ("right", (side, 1.5 * side, 2.0 * side))):
            v = np.concatenate([_shifted_samples(z, x0[stretch], y0[stretch], trail.theta, o) for o in offsets])
            v = v[np.isfinite(v)]
            values[name] = float(np.median(v)) if v.size >= 4 else np.nan
        sides = [v for v in (values["left"], values["right"]) if np.isfinite(v)]
        beside = float(np.mean(sides)) if sides else 0.0  # the mean: a ridge rises above both, an edge does not
        if not np.isfinite(values["on"]) or values["on"] - beside < min_excess:
            return False
    return True


def _profile_width(z: np.ndarray, trail: "Trail", reach: float = 30.0) -> float:
    """The width (px) of the median profile across ``trail`` at half its peak: the offsets within ``reach`` px,
    in half-pixel steps, where the median along the line is at least half the highest."""
    offsets = np.arange(-reach, reach + 0.25, 0.5)
    profile, _ = _line_medians(z, trail.theta, trail.rho, offsets)
    if not np.isfinite(profile).any():
        return np.inf
    peak = float(np.nanmax(profile))
    return 0.5 * float(np.sum(profile >= 0.5 * peak))


def _refine(z: np.ndarray, theta: float, rho: float, fwhm: float, block: int, edge_sigma: float,
            excess: float) -> "Trail":
    """The trail at full resolution: the angle (within a degree, quarter-degree steps, about the line's point
    nearest the image centre) and offset (within a block) whose median along the line is highest, and the
    half-width (module docstring)."""
    h, w = z.shape
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    d = cx * np.cos(theta) + cy * np.sin(theta) - rho
    px, py = cx - d * np.cos(theta), cy - d * np.sin(theta)  # the line's point nearest the image centre
    offsets = np.arange(-float(block), block + 0.5, 0.5)
    best = (-np.inf, theta, rho)
    for dtheta in np.deg2rad(np.arange(-1.0, 1.01, 0.25)):
        th = theta + dtheta
        r0 = px * np.cos(th) + py * np.sin(th)
        prof, _ = _line_medians(z, th, r0, offsets)
        if np.isfinite(prof).any() and np.nanmax(prof) > best[0]:
            best = (float(np.nanmax(prof)), th, r0 + float(offsets[int(np.nanargmax(prof))]))
    _, theta, rho = best
    if not 0.0 <= theta < np.pi:  # the same line with the angle in [0, pi): the normal and rho flip
        theta, rho = theta % np.pi, -rho
    reach = np.arange(0.0, 64.0, 1.0)
    half = 0.0
    for sign in (-1.0, 1.0):
        side, _ = _line_medians(z, theta, rho, sign * reach)
        above = np.isfinite(side) & (side >= edge_sigma)
        k = int(np.argmin(above)) if not above.all() else len(reach)  # first offset below edge_sigma
        half = max(half, float(reach[k - 1]) if k > 0 else 0.0)
    return Trail(float(theta), float(rho), float(excess), half + fwhm)


def detection_lineness(image: np.ndarray, x: np.ndarray, y: np.ndarray, fwhm_pix: float, *,
                       mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """How much each detection (x, y) looks like a piece of a line of light: (N,) line-ness, (N,) its direction
    (radians, in [0, pi)).

    In the PSF-smoothed image in units of its own robust scatter, the median along each of ``RAY_ANGLES`` directions
    through the point, ``RAY_REACH_FWHM`` out on either side (past the point's own PSF), is taken per side; the
    line-ness is the smaller side's median in the best direction less the median over directions of both sides'
    mean. A trail lifts both sides along itself and no other direction; a star's neighbours in a crowded field
    lift one side of a few directions; a galaxy's halo or a gradient lifts every direction alike.
    """
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.size == 0:
        return np.zeros(0), np.zeros(0)
    return _lineness(noise_units(image), x, y, fwhm_pix, mask)


def _lineness(z: np.ndarray, x: np.ndarray, y: np.ndarray, fwhm_pix: float,
              mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`detection_lineness` of the points (x, y) (1-D float arrays) in the noise-unit image ``z``."""
    from scipy import ndimage

    if mask is not None:
        z = np.where(np.asarray(mask, bool), 0.0, z)
    smooth = ndimage.gaussian_filter(z, max(float(fwhm_pix), 1.0) / 2.3548)
    smooth = smooth / max(1.4826 * float(np.median(np.abs(smooth - np.median(smooth)))), 1e-12)
    if mask is not None:
        smooth[np.asarray(mask, bool)] = np.nan
    h, w = smooth.shape
    angles = np.linspace(0.0, np.pi, RAY_ANGLES, endpoint=False)  # (A,)
    reach = np.arange(RAY_REACH_FWHM[0] * fwhm_pix, RAY_REACH_FWHM[1] * fwhm_pix, 1.0)  # (K,)
    medians = np.full((x.size, angles.size, 2), np.nan)  # (N, A, side)
    for side, sign in enumerate((-1.0, 1.0)):
        xs = np.rint(x[:, None, None] + sign * reach * np.cos(angles)[:, None]).astype(int)  # (N, A, K)
        ys = np.rint(y[:, None, None] + sign * reach * np.sin(angles)[:, None]).astype(int)
        inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
        values = np.where(inside, smooth[np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)], np.nan)
        enough = np.isfinite(values).sum(axis=2) >= 4  # rays off the image or on masked pixels: NaN
        medians[..., side] = np.where(enough, _nanmedian(values, axis=2), np.nan)
    both = medians.min(axis=2)  # (N, A): NaN where a side is
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        level = _nanmedian(np.nanmean(medians, axis=2), axis=1)  # (N,)
    ok = np.isfinite(both).any(axis=1) & np.isfinite(level)
    best = np.argmax(np.where(np.isfinite(both), both, -np.inf), axis=1)
    lineness = np.where(ok, both[np.arange(x.size), best] - level, 0.0)
    return lineness, angles[best]


def trails_through_detections(image: np.ndarray, x: np.ndarray, y: np.ndarray, fwhm_pix: float, *,
                              mask: np.ndarray | None = None, known: list[Trail] | tuple = (),
                              min_lineness: float = 3.0, min_support: int = 4,
                              min_excess: float = 1.5, noise: np.ndarray | None = None) -> list[Trail]:
    """Trails found from the detections they break into: faint trails that :func:`find_trails`' image-wide
    search does not see through a crowded field (whose line medians scatter far beyond the pixel noise) still
    make a detector fire along them.

    Detections with :func:`detection_lineness` of at least ``min_lineness`` propose the line through themselves
    in their direction; a line that ``min_support`` of them (themselves included) lie on (within
    ``SUPPORT_DISTANCE_FWHM``, their directions within ``SUPPORT_ANGLE_DEG``) is fitted through them, refined and
    kept when it stands out of its parallel lines (:func:`_stands_out`) and is lit from end to end by
    ``min_excess`` noise sigma (as :func:`find_trails`' candidates are) over the lines ``NARROW_SIDE_FWHM`` beside
    it (the line must be narrow: a line through a cluster's diffuse glow is not). ``min_excess`` 1.5: on
    validation patches (``docs/benchmarks.md``, Run 32) the trails drawn had 1.66 to 36 in their faintest quarter,
    a chance row of a crowded field's stars 1.08. Lines near one of ``known`` are skipped. ``image``, ``mask`` and
    ``noise`` as for :func:`find_trails`.
    """
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.size < min_support:
        return []
    z = noise_units(image) if noise is None else noise
    lineness, direction = _lineness(z, x, y, fwhm_pix, mask)
    candidates = np.flatnonzero(lineness >= min_lineness)
    if candidates.size < min_support:
        return []
    if mask is not None:
        z = np.where(np.asarray(mask, bool), np.nan, z)
    fwhm = max(float(fwhm_pix), 1.0)
    trails: list[Trail] = []
    free = np.ones(x.size, dtype=bool)
    for j in candidates[np.argsort(-lineness[candidates])]:
        if not free[j]:
            continue
        theta = (direction[j] + np.pi / 2) % np.pi  # the line's normal
        rho = x[j] * np.cos(theta) + y[j] * np.sin(theta)
        turn = np.abs(((direction[candidates] - direction[j]) + np.pi / 2) % np.pi - np.pi / 2)
        near = Trail(theta, rho, 0.0, 0.0).distance(x[candidates], y[candidates]) <= SUPPORT_DISTANCE_FWHM * fwhm
        support = candidates[near & (turn <= np.deg2rad(SUPPORT_ANGLE_DEG)) & free[candidates]]
        if support.size < min_support:
            continue
        theta, rho = _fit_line(x[support], y[support])
        if any(_same_line(theta, rho, t, fwhm) for t in (*known, *trails)):
            free[support] = False
            continue
        trail = _refine(z, theta, rho, fwhm, max(2, int(round(fwhm))), 3.0, float(np.median(lineness[support])))
        if _stands_out(z, trail, fwhm) and _lit_end_to_end(z, trail, min_excess, side=NARROW_SIDE_FWHM * fwhm):
            trails.append(trail)
            free[trail.distance(x, y) <= trail.half_width] = False
        else:
            free[support] = False
    return trails


def _stands_out(z: np.ndarray, trail: Trail, fwhm: float) -> bool:
    """Whether the line's narrow excess (its median less the mean of the medians ``NARROW_SIDE_FWHM`` to either
    side) is ``MIN_PARALLEL_SIGMAS`` times the scatter of the same excess of the parallel lines 4-12 FWHM away:
    in a cluster every line crosses stars, and a line of them, a few pixels from the next, is no trail."""
    side = max(1, int(round(NARROW_SIDE_FWHM * fwhm)))
    reach = int(round(12 * fwhm)) + side
    offsets = np.arange(-reach, reach + 1, dtype=float)
    medians, _ = _line_medians(z, trail.theta, trail.rho, offsets)
    excess = medians[side:-side] - 0.5 * (medians[:-2 * side] + medians[2 * side:])  # at offsets[side:-side]
    centre = offsets[side:-side]
    parallel = excess[(np.abs(centre) >= 4 * fwhm) & np.isfinite(excess)]
    here = excess[np.abs(centre) <= 1.0]
    if parallel.size < 8 or not np.isfinite(here).any():
        return False
    scatter = 1.4826 * float(np.median(np.abs(parallel - np.median(parallel))))
    return float(np.nanmax(here)) - float(np.median(parallel)) >= MIN_PARALLEL_SIGMAS * scatter


def _fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(theta, rho) of the total-least-squares line through the points, theta in [0, pi)."""
    cx, cy = float(np.mean(x)), float(np.mean(y))
    _, vectors = np.linalg.eigh(np.cov(np.c_[x - cx, y - cy].T))
    nx, ny = vectors[:, 0]  # the normal: the direction of least spread
    theta = float(np.arctan2(ny, nx)) % np.pi
    return theta, cx * np.cos(theta) + cy * np.sin(theta)


def _same_line(theta: float, rho: float, trail: Trail, fwhm: float) -> bool:
    """Whether (theta, rho) is ``trail`` again: within 3 degrees, and its point nearest the origin's projection
    within the trail's half-width plus a FWHM of it."""
    turn = abs(((theta - trail.theta) + np.pi / 2) % np.pi - np.pi / 2)
    px, py = rho * np.cos(theta), rho * np.sin(theta)
    return turn <= np.deg2rad(3.0) and float(trail.distance(px, py)) <= trail.half_width + fwhm


def on_trail(x: np.ndarray, y: np.ndarray, trails: list[Trail]) -> np.ndarray:
    """(N,) bool: which points (x, y) lie within a trail's half-width of any of ``trails``."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    hit = np.zeros(x.shape, dtype=bool)
    for trail in trails:
        hit |= trail.distance(x, y) <= trail.half_width
    return hit


def point_sources_on_trail(image: np.ndarray, trails: list[Trail], x: np.ndarray, y: np.ndarray, fwhm_pix: float,
                           *, min_snr: float = 3.0, peak_snr: float = 5.0, mask: np.ndarray | None = None,
                           noise: np.ndarray | None = None) -> np.ndarray:
    """(N,) bool: which points (x, y) hold a point source of their own above the trails they lie on.

    The image is matched-filtered (a Gaussian of ``fwhm_pix``); at each point on a trail the filtered value is
    compared with the filtered values all along the trail at the same offset across it: their median is what
    the trail itself gives there (its flanks, its photon noise, wherever along its length), their scatter the
    noise, and a point source of its own must stand ``min_snr`` times that scatter above the median. A star
    under a trail passes; the detections a trail's flanks break into look like every other point of the flank.

    In a crowded field that scatter is the field's stars, and a star under the trail rarely stands 3 of it above
    the median; so a point also passes where it is a peak *along* the trail (:func:`_peaks_along_trail`): its
    filtered value stands ``peak_snr`` noise sigma above the mean of the values ``PEAK_STEP_FWHM`` FWHMs along
    the trail on either side, which hold the same trail light and not the star's. ``image``, ``mask`` and
    ``noise`` as for :func:`find_trails`.
    """
    from scipy import ndimage

    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    out = np.zeros(x.shape, dtype=bool)
    if not trails or x.size == 0:
        return out
    z = noise_units(image) if noise is None else noise
    if mask is not None:
        z = np.where(np.asarray(mask, bool), np.nan, z)
    filtered = ndimage.gaussian_filter(np.nan_to_num(z, nan=0.0), max(float(fwhm_pix), 1.0) / 2.3548)
    if mask is not None:
        filtered[np.asarray(mask, bool)] = np.nan
    h, w = z.shape
    for trail in trails:
        _, x0, y0 = _line_points(z.shape, trail.theta, trail.rho)
        rows = np.flatnonzero(trail.distance(x, y) <= trail.half_width)
        out[rows] |= _peaks_along_trail(z, filtered, trail, x[rows], y[rows], fwhm_pix, peak_snr)
        for j in rows:
            ix, iy = int(np.clip(round(x[j]), 0, w - 1)), int(np.clip(round(y[j]), 0, h - 1))
            offset = x[j] * np.cos(trail.theta) + y[j] * np.sin(trail.theta) - trail.rho
            along = _shifted_samples(filtered, x0, y0, trail.theta, offset)
            along = along[np.isfinite(along)]
            if along.size < 16 or not np.isfinite(filtered[iy, ix]):
                continue
            level = float(np.median(along))
            scatter = 1.4826 * float(np.median(np.abs(along - level)))
            out[j] |= filtered[iy, ix] - level >= min_snr * max(scatter, 1e-12)
    return out


def point_source_snr(image: np.ndarray, x: np.ndarray, y: np.ndarray, fwhm_pix: float, *,
                     noise: np.ndarray | None = None) -> np.ndarray:
    """(N,) the matched-filter SNR of a point source at (x, y) in a one-band ``image`` (H, W): the image in noise
    units (its robust sky and scatter), filtered by a Gaussian of ``fwhm_pix``, read at the nearest pixel, over
    the filtered noise. NaN where a pixel is not finite. ``noise`` as for :func:`find_trails`.

    Tried as well and not kept (``docs/benchmarks.md`` "Run 33"): the light above the mean of two points 1.5 FWHM
    away, the lowest over four directions (a ridge does not stand out along itself): in crowded six-band fields
    a neighbour in one direction hid too many stars."""
    from scipy import ndimage

    z = noise_units(image) if noise is None else noise
    bad = ~np.isfinite(np.asarray(image, dtype=np.float64).reshape(z.shape))
    sigma_filter = max(float(fwhm_pix), 1.0) / 2.3548
    filtered = ndimage.gaussian_filter(np.where(bad, 0.0, z), sigma_filter) * (2.0 * np.sqrt(np.pi) * sigma_filter)
    filtered[bad] = np.nan
    h, w = z.shape
    ix = np.clip(np.rint(np.asarray(x, dtype=np.float64)), 0, w - 1).astype(int)
    iy = np.clip(np.rint(np.asarray(y, dtype=np.float64)), 0, h - 1).astype(int)
    return filtered[iy, ix]


def _peaks_along_trail(z: np.ndarray, filtered: np.ndarray, trail: Trail, x: np.ndarray, y: np.ndarray,
                       fwhm_pix: float, min_snr: float) -> np.ndarray:
    """(N,) bool: which points (x, y) on ``trail`` are peaks along it in ``filtered`` (``z`` matched-filtered by
    a Gaussian of ``fwhm_pix``).

    The trail's light at a point is taken as the mean of the filtered image ``PEAK_STEP_FWHM`` FWHMs along the
    trail on either side (one where the other is off the image; a glint's slow change along the trail cancels to
    first order; a star's light there is 4% of its peak), read by bilinear interpolation at the point's exact
    offset (nearest pixels would step across a bright trail's steep flank). The noise: the pixel noise
    (pixel-to-pixel differences of ``z`` along the point's line, 1.5 to 4 FWHM away) through the filter, and in
    quadrature ``PEAK_MODEL_ERROR`` of the trail's light there, for what a straight, smooth trail model misses of
    a real one.
    """
    from scipy import ndimage

    c, s = np.cos(trail.theta), np.sin(trail.theta)
    step = PEAK_STEP_FWHM * fwhm_pix
    sigma_filter = max(float(fwhm_pix), 1.0) / 2.3548
    along_x, along_y = -s, c  # the unit vector along the trail
    points = ndimage.map_coordinates(filtered, [np.concatenate([y, y - step * along_y, y + step * along_y]),
                                                np.concatenate([x, x - step * along_x, x + step * along_x])],
                                     order=1, cval=np.nan).reshape(3, -1)  # (3, N): the point, behind, ahead
    sides = np.isfinite(points[1:])  # off the image or masked: the other side alone
    light = np.where(sides, points[1:], 0.0).sum(axis=0) / np.maximum(sides.sum(axis=0), 1)  # (N,)
    t_line, x_line, y_line = _line_points(z.shape, trail.theta, trail.rho)
    out = np.zeros(x.shape, dtype=bool)
    for j in range(x.size):
        if not (np.isfinite(points[0, j]) and sides[:, j].any()):
            continue
        offset = x[j] * c + y[j] * s - trail.rho
        t_j = x[j] * along_x + y[j] * along_y
        # the point's own light (within PEAK_STEP_FWHM along) left out: its profile is no noise
        near = (np.abs(t_line - t_j) <= 4.0 * fwhm_pix) & (np.abs(t_line - t_j) >= step)
        raw = _shifted_samples(z, x_line[near], y_line[near], trail.theta, offset)
        raw = raw[np.isfinite(raw)]
        if raw.size < 8:
            continue
        pixel_noise = 1.4826 * float(np.median(np.abs(np.diff(raw)))) / np.sqrt(2.0)
        noise = np.hypot(pixel_noise / (2.0 * np.sqrt(np.pi) * sigma_filter), PEAK_MODEL_ERROR * max(light[j], 0.0))
        out[j] = points[0, j] - light[j] >= min_snr * max(noise, 1e-12)
    return out


__all__ = ["Trail", "detection_lineness", "find_trails", "noise_units", "on_trail", "point_source_snr",
           "point_sources_on_trail", "trails_through_detections"]
