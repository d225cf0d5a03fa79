"""Things in CCD images that are not astrophysical sources, each flagged in the contaminant mask.

Every function works on one band's image in electrons and marks the pixels it touches with its bit of
:data:`skyfm.data.patch.CONTAMINANT_BITS`:

* cosmic rays (``cosmic_ray``): sharp tracks and worms of charge, 1-3 pixels wide, never PSF-convolved;
* satellite trails (``satellite_trail``): a straight line across the image with the PSF's line-spread profile;
* hot pixels (``hot_pixel``): single pixels with extra dark charge;
* saturated pixels and bleed trails (``saturated``, ``bleed_trail``): charge beyond the full well spills along
  the column, up and down, conserving charge, as in a real CCD;
* dead pixels and bad columns (``bad_pixel``): no signal.

Rates come from the instrument YAML's ``contaminants`` section (:class:`ContaminantRates`). Cosmic rays, trails
and hot pixels add light (electrons) before the Poisson draw; bleeding happens in the wells after it, before
readout; dead pixels read zero. Bands are separate exposures, so each band gets its own contaminants.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy.special import gammaln

from skyfm.data.patch import CONTAMINANT_BITS
from skyfm.errors import SkyfmError
from skyfm.instruments.psf import PSF

# A contaminant is marked where it adds more than this many sky-noise sigmas to a pixel.
MASK_THRESHOLD_SIGMA = 0.5
# Satellite-trail probabilities in the YAML are quoted for a patch this many pixels across.
TRAIL_REFERENCE_SIZE_PIX = 256


@dataclass(frozen=True)
class ContaminantRates:
    """Per-exposure rates of contaminants, from the YAML ``contaminants`` section (all keys optional).

    Attributes:
        cosmic_rays_per_mpix: cosmic-ray events per megapixel per exposure.
        cosmic_ray_electrons: median charge of one event, electrons (log-normal, 0.3 dex).
        cosmic_ray_length_pix: mean projected track length, pixels (exponential; 1-40).
        satellite_trail_probability: chance that a 256-pixel-wide patch is crossed by a trail.
        hot_pixel_fraction: fraction of pixels that are hot.
        bad_pixel_fraction: fraction of pixels that are dead.
        bad_columns_per_mpix: partly dead columns per megapixel.
        bright_star_probability: chance that a patch holds a star bright enough to saturate and bleed.
    """

    cosmic_rays_per_mpix: float = 0.0
    cosmic_ray_electrons: float = 2000.0
    cosmic_ray_length_pix: float = 3.0
    satellite_trail_probability: float = 0.0
    hot_pixel_fraction: float = 0.0
    bad_pixel_fraction: float = 0.0
    bad_columns_per_mpix: float = 0.0
    bright_star_probability: float = 0.0

    @classmethod
    def from_config(cls, config: dict, source: str = "instrument") -> "ContaminantRates":
        """Rates from a YAML ``contaminants`` mapping; unknown keys and bad values raise a one-line SkyfmError."""
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in (config or {}).items():
            if key not in known:
                raise SkyfmError(f"{source}: 'contaminants.{key}' is not a known contaminant rate; "
                                 f"use one of {', '.join(sorted(known))}")
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise SkyfmError(f"{source}: 'contaminants.{key}' should be a number, got {value!r}") from None
            if not np.isfinite(v) or v < 0 or (key.endswith(("probability", "fraction")) and v > 1):
                raise SkyfmError(f"{source}: 'contaminants.{key}' should be a non-negative number"
                                 f"{' at most 1' if key.endswith(('probability', 'fraction')) else ''}, got {value!r}")
            values[key] = v
        return cls(**values)


# ----------------------------------------------------------------------------------------------------------------
def add_cosmic_rays(rng: np.random.Generator, electrons: np.ndarray, mask: np.ndarray, rates: ContaminantRates,
                    sigma_e: float) -> int:
    """Add cosmic-ray tracks to ``electrons`` (H, W) in place and mark them; returns the number of events.

    Each event crosses the depleted silicon at a random angle: a straight track of exponentially distributed
    projected length (a point for near-normal incidence), or, for one in five, a curling "worm" of a low-energy
    electron. Its charge (log-normal about ``cosmic_ray_electrons``) is laid along the track in quarter-pixel
    steps with 30% fluctuations and deposited with bilinear weights: sharp, 1-3 pixels wide.
    """
    h, w = electrons.shape
    n = rng.poisson(rates.cosmic_rays_per_mpix * h * w / 1e6)
    if n == 0:
        return 0
    step = 0.25
    length = np.clip(rng.exponential(rates.cosmic_ray_length_pix, n), 0.0, 40.0)
    n_steps = np.maximum(1, np.ceil(length / step).astype(np.int64))
    event = np.repeat(np.arange(n), n_steps)
    first = np.concatenate([[0], np.cumsum(n_steps)[:-1]])
    # Direction: fixed for straight tracks, a random walk for worms.
    worm = rng.random(n) < 0.2
    turn = rng.normal(0.0, 0.35, event.size) * worm[event]
    angle = rng.uniform(0.0, 2.0 * np.pi, n)[event] + _cumsum_by_group(turn, first)
    x = rng.uniform(-0.5, w - 0.5, n)[event] + _cumsum_by_group(step * np.cos(angle), first)
    y = rng.uniform(-0.5, h - 0.5, n)[event] + _cumsum_by_group(step * np.sin(angle), first)
    charge = 10.0 ** rng.normal(np.log10(rates.cosmic_ray_electrons), 0.3, n)
    per_step = charge[event] / n_steps[event] * rng.lognormal(0.0, 0.3, event.size)
    track = _bilinear_deposit(x, y, per_step, (h, w))
    electrons += track
    mask[track > MASK_THRESHOLD_SIGMA * sigma_e] |= CONTAMINANT_BITS["cosmic_ray"]
    return int(n)


def _cumsum_by_group(values: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Running sums of ``values`` that restart at each group start index in ``first`` (exclusive of the start)."""
    c = np.cumsum(values)
    starts = np.repeat(c[first], np.diff(np.append(first, values.size)))
    return c - starts


def _bilinear_deposit(x: np.ndarray, y: np.ndarray, weight: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Spread point charges onto the four nearest pixel centres (cloud in cell); charges off the image are lost."""
    h, w = shape
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    tx, ty = x - x0, y - y0
    out = np.zeros(h * w)
    for dy, wy in ((0, 1.0 - ty), (1, ty)):
        for dx, wx in ((0, 1.0 - tx), (1, tx)):
            r, c = y0 + dy, x0 + dx
            ok = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            out += np.bincount(r[ok] * w + c[ok], weights=(weight * wy * wx)[ok], minlength=h * w)
    return out.reshape(h, w)


# ----------------------------------------------------------------------------------------------------------------
def trail_probability(rates: ContaminantRates, shape: tuple[int, int]) -> float:
    """Chance that an image of ``shape`` is crossed by a trail: it grows with the image's width, not its area."""
    return 1.0 - (1.0 - rates.satellite_trail_probability) ** (max(shape) / TRAIL_REFERENCE_SIZE_PIX)


def add_satellite_trail(rng: np.random.Generator, electrons: np.ndarray, mask: np.ndarray, psf: PSF,
                        pixel_scale_deg: float, sigma_e: float, full_well_e: float) -> dict:
    """Add one satellite trail across ``electrons`` (H, W) in place and mark it; returns its parameters.

    The trail is a straight line through a random point at a random angle with the PSF's line-spread profile
    across it (a satellite moves during the exposure, so only the PSF spreads it sideways), integrated over
    2 x 2 sub-pixels. Its peak is log-uniform from 1 sky sigma to the full well, modulated along its length by
    a slow glint as the satellite tumbles.
    """
    h, w = electrons.shape
    x0, y0 = rng.uniform(0, w - 1), rng.uniform(0, h - 1)
    phi = rng.uniform(0.0, np.pi)
    peak = 10.0 ** rng.uniform(np.log10(sigma_e), np.log10(full_well_e))
    period, phase = rng.uniform(50.0, 500.0), rng.uniform(0.0, 2.0 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    profile = np.zeros((h, w))
    for sx in (-0.25, 0.25):
        for sy in (-0.25, 0.25):
            d = (xx + sx - x0) * np.sin(phi) - (yy + sy - y0) * np.cos(phi)
            profile += 0.25 * line_spread(psf, np.abs(d) * pixel_scale_deg)
    along = (xx - x0) * np.cos(phi) + (yy - y0) * np.sin(phi)
    glint = 1.0 + 0.3 * np.sin(2.0 * np.pi * along / period + phase)
    trail = peak / line_spread(psf, np.array(0.0)) * profile * glint
    electrons += trail
    mask[trail > MASK_THRESHOLD_SIGMA * sigma_e] |= CONTAMINANT_BITS["satellite_trail"]
    return {"x": x0, "y": y0, "angle_deg": float(np.degrees(phi)), "peak_e": float(peak)}


def line_spread(psf: PSF, d_deg: np.ndarray) -> np.ndarray:
    """The PSF integrated along a line, at perpendicular distance ``d_deg``: per degree, integrating to 1.

    Gaussian: a Gaussian of the same sigma. Moffat with width alpha and index beta:
    Gamma(beta - 1/2) / (sqrt(pi) alpha Gamma(beta - 1)) (1 + d^2 / alpha^2)^(1/2 - beta).
    """
    d2 = np.asarray(d_deg, dtype=np.float64) ** 2 / psf.width_deg**2
    if psf.model == "gaussian":
        return np.exp(-0.5 * d2) / (np.sqrt(2.0 * np.pi) * psf.width_deg)
    norm = np.exp(gammaln(psf.beta - 0.5) - gammaln(psf.beta - 1.0)) / (np.sqrt(np.pi) * psf.width_deg)
    return norm * (1.0 + d2) ** (0.5 - psf.beta)


# ----------------------------------------------------------------------------------------------------------------
def add_hot_pixels(rng: np.random.Generator, electrons: np.ndarray, mask: np.ndarray, rates: ContaminantRates,
                   sigma_e: float, full_well_e: float) -> int:
    """Add dark charge to a random ``hot_pixel_fraction`` of pixels (log-uniform from 3 sigma to half the full
    well) in place and mark them; returns how many."""
    h, w = electrons.shape
    n = rng.poisson(rates.hot_pixel_fraction * h * w)
    if n == 0:
        return 0
    flat = np.unique(rng.integers(0, h * w, n))
    charge = 10.0 ** rng.uniform(np.log10(3.0 * sigma_e), np.log10(0.5 * full_well_e), flat.size)
    electrons.ravel()[flat] += charge
    mask.ravel()[flat] |= CONTAMINANT_BITS["hot_pixel"]
    return int(flat.size)


def dead_pixels(rng: np.random.Generator, shape: tuple[int, int], rates: ContaminantRates) -> np.ndarray:
    """(H, W) bool map of pixels that give no signal: isolated dead pixels and bad columns.

    A bad column is dead from a charge trap to the end of the column in the readout direction (downwards, y = 0),
    or, in a third of cases, over its whole length.
    """
    h, w = shape
    dead = np.zeros(shape, dtype=bool)
    n_pix = rng.poisson(rates.bad_pixel_fraction * h * w)
    if n_pix:
        dead.ravel()[rng.integers(0, h * w, n_pix)] = True
    for _ in range(rng.poisson(rates.bad_columns_per_mpix * h * w / 1e6)):
        col = rng.integers(0, w)
        top = h if rng.random() < 1.0 / 3.0 else rng.integers(1, h + 1)
        dead[:top, col] = True
    return dead


# ----------------------------------------------------------------------------------------------------------------
def bleed_saturated(electrons: np.ndarray, full_well_e: float, mask: np.ndarray) -> np.ndarray:
    """Spill charge beyond the full well along columns, in place, conserving charge; marks the pixels.

    Each run of over-full pixels in a column is clipped to the full well and its excess shared equally between
    the pixels above and below it, which fill up to the full well one after another (charge that reaches the
    image edge is lost). Marks ``saturated`` on the over-full pixels and ``bleed_trail`` on the filled ones.
    Returns the (H, W) bool map of pixels at the full well afterwards.
    """
    over = electrons > full_well_e
    if not over.any():
        return over
    mask[over] |= CONTAMINANT_BITS["saturated"]
    h = electrons.shape[0]
    for col in np.unique(np.nonzero(over)[1]):
        column = electrons[:, col]  # a view: edits land in the image
        rows = np.flatnonzero(column > full_well_e)
        # Runs of consecutive over-full rows.
        splits = np.flatnonzero(np.diff(rows) > 1) + 1
        for run in np.split(rows, splits):
            a, b = run[0], run[-1] + 1
            excess = float(np.sum(column[a:b] - full_well_e))
            column[a:b] = full_well_e
            for start, stop, step in ((b, h, 1), (a - 1, -1, -1)):
                filled = _fill_wells(column, start, stop, step, 0.5 * excess, full_well_e)
                mask[filled, col] |= CONTAMINANT_BITS["bleed_trail"]
    return electrons >= full_well_e


def _fill_wells(column: np.ndarray, start: int, stop: int, step: int, charge: float, full_well_e: float):
    """Pour ``charge`` into ``column[start:stop:step]`` well by well; returns the indices that received charge."""
    idx = np.arange(start, stop, step)
    if idx.size == 0 or charge <= 0:
        return idx[:0]
    room = np.clip(full_well_e - column[idx], 0.0, None)
    cum = np.cumsum(room)
    n_full = int(np.searchsorted(cum, charge, side="right"))
    column[idx[:n_full]] = np.maximum(column[idx[:n_full]], full_well_e)
    if n_full < idx.size:
        column[idx[n_full]] += charge - (cum[n_full - 1] if n_full else 0.0)
        return idx[: n_full + 1]
    return idx
