"""Instrument-aware scaling of images for the networks, and its inverse.

Photon counts span zero to thousands and CCD images carry an arbitrary sky level; networks want inputs of order
one. Each instrument's YAML names one method:

* ``log1p``: ``log(1 + counts)``, for counts cubes (keeps zero at zero, compresses bright sources).
* ``anscombe``: ``2 sqrt(counts + 3/8)``, the variance-stabilising transform for Poisson counts (noise ~ 1).
* ``asinh``: background-normalised ``asinh((x - sky) / (softening * sigma))`` per band, with the sky level and
  noise ``sigma`` estimated robustly from the image (sigma-clipped median and MAD): noise is about one unit, the
  sky is zero, and bright sources are compressed logarithmically.
* ``counts-asinh``: the same for counts cubes, with the sky a clipped mean of the counts (a median is 0 for
  sparse counts) and sigma its Poisson sigma, ``sqrt(sky + 1)`` (the 1: a bin with almost no background must not
  turn a single photon into tens of sigma). Its parameters are stored as ``asinh``'s, so that everything that
  applies or inverts ``asinh`` does the same with these.

:func:`scale_image` returns the scaled array and the per-band parameters that :func:`unscale_image` needs.
"""

from __future__ import annotations

import numpy as np

from skyfm.errors import SkyfmError

MAD_TO_SIGMA = 1.4826


def robust_background(band: np.ndarray, n_iter: int = 3, clip: float = 3.0, max_pixels: int = 65536) -> tuple[float, float]:
    """Sky level and noise sigma of one 2-D band by iterated sigma clipping (NaNs ignored).

    Uses at most ``max_pixels`` pixels on a regular sub-grid, so that a 16k x 16k image costs no more than a patch.
    """
    values = band[np.isfinite(band)]
    if values.size == 0:
        raise SkyfmError("cannot estimate the background of a band with no finite pixels")
    if values.size > max_pixels:
        values = values[:: values.size // max_pixels]
    med = float(np.median(values))
    sigma = float(MAD_TO_SIGMA * np.median(np.abs(values - med)))
    for _ in range(n_iter):
        if sigma <= 0:
            break
        keep = np.abs(values - med) < clip * sigma
        if keep.sum() < 16:
            break
        med = float(np.median(values[keep]))
        sigma = float(MAD_TO_SIGMA * np.median(np.abs(values[keep] - med)))
    if sigma <= 0:  # a very flat or mostly-empty band: fall back to the standard deviation
        sigma = float(np.std(values)) or 1.0
    return med, sigma


def scale_image(image: np.ndarray, method: str, softening: float = 1.0) -> tuple[np.ndarray, dict]:
    """Scale a (C, H, W) image; returns (scaled float32 array, parameters for :func:`unscale_image`)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise SkyfmError(f"scaling expects a (bands, height, width) array, got shape {image.shape}")
    if method == "log1p":
        return np.log1p(np.clip(image, 0, None)), {"method": method}
    if method == "anscombe":
        return 2.0 * np.sqrt(np.clip(image, 0, None) + 0.375), {"method": method}
    if method == "asinh":
        sky, sigma = zip(*(robust_background(b) for b in image))
        sky_a = np.asarray(sky, dtype=np.float32)[:, None, None]
        sig_a = np.asarray(sigma, dtype=np.float32)[:, None, None] * softening
        params = {"method": method, "sky": list(map(float, sky)), "sigma": list(map(float, sigma)), "softening": softening}
        return np.arcsinh((image - sky_a) / sig_a).astype(np.float32), params
    if method == "counts-asinh":
        sky = [poisson_background(b) for b in image]
        sigma = [float(np.sqrt(b + 1.0)) for b in sky]
        sky_a = np.asarray(sky, dtype=np.float32)[:, None, None]
        sig_a = np.asarray(sigma, dtype=np.float32)[:, None, None] * softening
        params = {"method": "asinh", "estimator": "poisson", "sky": list(map(float, sky)),
                  "sigma": sigma, "softening": softening}
        return np.arcsinh((image - sky_a) / sig_a).astype(np.float32), params
    raise SkyfmError(f"unknown scaling method '{method}'; use log1p, anscombe, asinh or counts-asinh")


def poisson_background(band: np.ndarray, clip: float = 5.0, n_iter: int = 3) -> float:
    """Background counts per pixel of one counts band: the mean without the pixels far above it (sources),
    ``counts > b + clip sqrt(b) + clip``, iterated. A mean, not a median: at < 1 count per pixel the median is 0."""
    values = band[np.isfinite(band)].astype(np.float64)
    if values.size == 0:
        raise SkyfmError("cannot estimate the background of a band with no finite pixels")
    level = float(values.mean())
    for _ in range(n_iter):
        keep = values <= level + clip * np.sqrt(max(level, 0.0)) + clip
        if keep.sum() < 16:
            break
        level = float(values[keep].mean())
    return max(level, 0.0)


def unscale_image(scaled: np.ndarray, params: dict) -> np.ndarray:
    """Invert :func:`scale_image` (Anscombe with the simple algebraic inverse)."""
    method = params["method"]
    scaled = np.asarray(scaled, dtype=np.float32)
    if method == "log1p":
        return np.expm1(scaled)
    if method == "anscombe":
        return (scaled / 2.0) ** 2 - 0.375
    if method == "asinh":
        sky = np.asarray(params["sky"], dtype=np.float32)[:, None, None]
        sigma = np.asarray(params["sigma"], dtype=np.float32)[:, None, None] * params.get("softening", 1.0)
        return np.sinh(scaled) * sigma + sky
    raise SkyfmError(f"unknown scaling method '{method}'")
