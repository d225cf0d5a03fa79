"""What a CCD image's own noise says about it: a sky that was subtracted, and the unit of a file that does not say.

A CCD pixel's noise is fixed by its level: ``sigma^2 = L / gain + (read_noise / gain)^2`` in ADU (the instrument's
``noise`` gain, e- per ADU, and read noise, e-). Where an image breaks that rule, something was done to it:

* :func:`missing_sky`: the level is near zero but the noise is a sky's: the sky was subtracted (MAST's drizzled
  Hubble images, SDSS frames, survey coadds). L.A.Cosmic's noise model and the saturation test take it back.
* :func:`sky_noise_offset`: the noise is not the level's by the rule (a camera read out at another gain or with
  another read noise than the YAML's): L.A.Cosmic's noise model takes the sky the noise implies.
* :func:`noise_unit_scale`: the noise is far from what the level implies: the pixels are not in the instrument's
  ADU (a file in e-/s or nanomaggies with no BUNIT saying so). The scale that makes the rule hold is the number
  of ADU per unit of the file.

All three read the emptiest ``block`` x ``block`` boxes of a band: their median level is the sky, and the scatter of
differences between neighbouring pixels is one pixel's noise (the light of sources broader than a pixel, a
cluster's included, mostly cancels in it).
"""

from __future__ import annotations

import numpy as np

# a band whose sky level is below this share of the sky its noise implies has had its sky subtracted (MAST's drizzled
# Hubble images, SDSS frames, survey coadds): the noise model takes the missing sky back (missing_sky)
SKY_DEFICIT = 0.5
SKY_BLOCK = 32  # px: the boxes the sky statistics are taken in
EMPTIEST_SHARE = 0.1  # the emptiest boxes: those at or below this quantile of the boxes' levels


def sky_boxes(plane: np.ndarray, bad: np.ndarray | None = None,
              block: int = SKY_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(boxes (B, block, block) with unusable pixels NaN, their median levels (B,)) of one band cut into
    ``block`` x ``block`` boxes (the right and bottom remainders left out), boxes less than half usable dropped.
    Unusable: ``bad``, non-finite, and exact zeros (no data: a drizzle's edge, not sky)."""
    h, w = (plane.shape[0] // block) * block, (plane.shape[1] // block) * block
    if h == 0 or w == 0:
        return np.zeros((0, block, block)), np.zeros(0)
    unusable = ~np.isfinite(plane) | (plane == 0)
    if bad is not None:
        unusable |= bad
    boxes = np.where(unusable, np.nan, plane)[:h, :w].reshape(h // block, block, w // block, block)
    boxes = boxes.transpose(0, 2, 1, 3).reshape(-1, block, block)  # (B, block, block)
    if not unusable[:h, :w].any():
        return boxes, np.median(boxes.reshape(len(boxes), -1), axis=1)
    boxes = boxes[np.isfinite(boxes).mean(axis=(1, 2)) >= 0.5]
    return boxes, np.nanmedian(boxes.reshape(len(boxes), -1), axis=1) if len(boxes) else np.zeros(0)


def pixel_noise(box: np.ndarray) -> float:
    """One pixel's noise in a box: the robust scatter (MAD) of differences between horizontal neighbours over
    sqrt(2); NaN with fewer than 16 usable differences, or none (a box filled with one value, as some pipelines pad
    their images, holds no noise to measure: taken for the sky's, it would tell L.A.Cosmic that the sky has none)."""
    d = (box[:, 1:] - box[:, :-1]).ravel()
    d = d[np.isfinite(d)]
    if d.size < 16:
        return float("nan")
    mad = float(np.median(np.abs(d - np.median(d))))
    return 1.4826 * mad / np.sqrt(2.0) if mad > 0 else float("nan")


def emptiest_sky(plane: np.ndarray, bad: np.ndarray | None = None, block: int = SKY_BLOCK) -> tuple[float, float]:
    """(level, pixel noise) of a band's emptiest box (the :data:`EMPTIEST_SHARE` quantile of the boxes' median
    levels); NaNs where no box is usable."""
    boxes, level = sky_boxes(plane, bad, block)
    if not len(boxes):
        return float("nan"), float("nan")
    emptiest = int(np.argsort(level)[int(EMPTIEST_SHARE * len(level))])
    return float(level[emptiest]), pixel_noise(boxes[emptiest])


def missing_sky(plane: np.ndarray, bad: np.ndarray, gain: float, read_noise: float, block: int = SKY_BLOCK) -> float:
    """ADU of sky that a band's noise implies and its level lacks: 0 for an image as exposed, about the subtracted
    level for a sky-subtracted one.

    L.A.Cosmic's noise model is the pixel's own electrons plus the read noise; with the sky subtracted a pixel holds
    only the read noise by that model, the noise is underestimated and noise peaks pass for hits (a crowded MeerLICHT
    field: 2.4% of its pixels flagged against 0.12%). The emptiest box of the band (the 10th percentile of the
    boxes' median levels) gives its sky level and its pixel noise; where that level is within one sigma of zero and
    below :data:`SKY_DEFICIT` of the sky the noise implies (``(sigma gain)^2 - read_noise^2`` electrons), the
    difference is added back for the noise model (and the saturation test); the Laplacian and fine-structure images
    do not change with a constant.

    Args:
        plane: (H, W) one band, ADU; bad: (H, W) bool, its pixels to ignore (and its exact zeros are).
    """
    return _missing_sky(*emptiest_sky(plane, bad, block), gain, read_noise)


def _missing_sky(sky: float, sigma: float, gain: float, read_noise: float) -> float:
    """:func:`missing_sky` of an emptiest box's level and noise."""
    if not np.isfinite(sigma):
        return 0.0
    implied = ((sigma * gain) ** 2 - read_noise ** 2) / gain  # ADU
    # an image as exposed keeps its sky many sigma above zero (a cluster core's emptiest box too, whose light
    # inflates the scatter); a sky-subtracted one is within a sigma of it
    subtracted = implied > 0 and sky < SKY_DEFICIT * implied and sky < sigma
    return implied - sky if subtracted else 0.0


def noise_unit_scale(plane: np.ndarray, gain: float, read_noise: float, sky_e: float | None = None,
                     bad: np.ndarray | None = None, block: int = SKY_BLOCK) -> float:
    """ADU per unit of one band whose pixels may not be in the instrument's ADU: the scale ``c`` that makes its
    emptiest sky obey the CCD noise rule, ``(c sigma)^2 = c L / gain + (read_noise / gain)^2`` (level ``L`` and
    pixel noise ``sigma`` in the file's unit), the median over the emptiest boxes (:data:`EMPTIEST_SHARE` of them,
    at least one). About 1 for an image in ADU; ``EXPTIME / gain`` for one in e-/s. NaN where no box is usable.

    Where the sky has been subtracted (the emptiest boxes' median level within one sigma of zero) the level says
    nothing: the noise is matched to ``sky_e`` (the band's nominal sky, e- per pixel) and the read noise instead,
    or to the read noise alone where ``sky_e`` is None (then ``c`` is a lower bound)."""
    boxes, level = sky_boxes(plane, bad, block)
    if not len(boxes):
        return float("nan")
    emptiest = np.argsort(level)[: max(1, int(EMPTIEST_SHARE * len(level)))]
    level = level[emptiest].astype(np.float64)
    sigma = np.array([pixel_noise(boxes[k]) for k in emptiest])
    good = np.isfinite(sigma)  # (pixel_noise gives NaN, never 0, where it measures nothing)
    if not good.any():
        return float("nan")
    level, sigma = level[good], sigma[good]
    read_adu2 = (read_noise / gain) ** 2  # the read noise's variance in ADU
    if np.median(level) < np.median(sigma):  # sky subtracted
        return float(np.median(np.sqrt((sky_e or 0.0) / gain ** 2 + read_adu2) / sigma))
    b = level / gain
    return float(np.median((b + np.sqrt(b * b + 4.0 * sigma ** 2 * read_adu2)) / (2.0 * sigma ** 2)))


# a band whose sky noise is this far (relative) from the model's has another gain or read noise than the YAML's: on
# validation patches as simulated only cluster cores were (structure between pixels inflates their noise)
NOISE_MISMATCH = 0.15


def sky_noise_offset(plane: np.ndarray, bad: np.ndarray, gain: float, read_noise: float,
                     block: int = SKY_BLOCK) -> float:
    """ADU to add to a band for the noise model ``level / gain + (read_noise / gain)^2`` (ADU^2) to give its sky's
    measured noise: :func:`missing_sky` where the sky was subtracted; else, where the emptiest box's noise is more
    than :data:`NOISE_MISMATCH` from the model's (a camera read out at another gain or with another read noise than
    the instrument's YAML says, as an independent simulator's may be), the sky that noise implies minus the level
    (negative where the noise is finer); else 0. L.A.Cosmic's noise model takes it: a camera of half the gain
    had a third more pixels flagged than its hits, the extra ones peaks of noise and of stars."""
    sky, sigma = emptiest_sky(plane, bad, block)
    subtracted = _missing_sky(sky, sigma, gain, read_noise)
    if subtracted > 0:
        return subtracted
    if not (np.isfinite(sigma) and sky > 0):
        return 0.0
    model = np.sqrt(sky / gain + (read_noise / gain) ** 2)
    if abs(sigma / model - 1.0) <= NOISE_MISMATCH:
        return 0.0
    implied = ((sigma * gain) ** 2 - read_noise ** 2) / gain
    return max(implied, 0.0) - sky
