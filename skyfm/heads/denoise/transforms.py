"""Variance-stabilised spaces the denoiser works in, and their exact inverses.

The network sees one band at a time, in a space where the noise is about one unit everywhere:

* **counts** (Fermi-LAT, CTAO; per energy bin): the Anscombe transform shifted to keep zero at zero,
  ``f(x) = 2 sqrt(x + 3/8) - 2 sqrt(3/8)``. Poisson noise is ~1 unit at any count level. The observation and the
  source-only target go through the same ``f``; the inverse ``x = (t / 2 + sqrt(3/8))^2 - 3/8`` is exact for
  ``t >= 0`` (targets are non-negative, network outputs are clipped at 0 before inverting). With
  ``counts_compress = c > 0`` the Anscombe value is further compressed, ``c asinh(t / c)``: unchanged (noise ~1)
  below ~c, logarithmic for the brightest pixels, so that a 10^4-count pulsar does not dominate the loss; the
  inverse ``c sinh(u / c)`` is exact.
* **ccd** (MeerLICHT, Hubble, WISE; per filter): background-normalised asinh. The sky level and noise sigma of the
  *observed* band are estimated robustly (:func:`skyfm.instruments.scaling.robust_background`); the observation
  becomes ``asinh((x - sky) / (softening * sigma))`` and the source-only target ``asinh(s / (softening * sigma))``,
  whose inverse ``s = sinh(t) * softening * sigma`` is exact.

:func:`band_features` gives the few numbers that tell the network which band it looks at (log wavelength, counts or
CCD, the nominal PSF width in pixels); any instrument YAML provides them, so a new telescope needs no retraining to
be *run* (whether it works well is another matter).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from skyfm.errors import SkyfmError
from skyfm.instruments.scaling import robust_background

SQRT_3_8 = float(np.sqrt(0.375))
N_BAND_FEATURES = 3


def anscombe(x: np.ndarray) -> np.ndarray:
    """``2 sqrt(x + 3/8) - 2 sqrt(3/8)`` for ``x >= 0`` (negative values clipped to 0): 0 -> 0, noise ~1 unit."""
    return (2.0 * np.sqrt(np.clip(x, 0, None) + 0.375) - 2.0 * SQRT_3_8).astype(np.float32)


def inverse_anscombe(t: np.ndarray) -> np.ndarray:
    """Exact inverse of :func:`anscombe` for ``t >= 0`` (negative values clipped to 0 first)."""
    t = np.clip(np.asarray(t, dtype=np.float64), 0, None)
    return np.maximum((t / 2.0 + SQRT_3_8) ** 2 - 0.375, 0.0).astype(np.float32)


@dataclass
class BandTransform:
    """The transform of one band: ``kind`` ``counts`` (Anscombe) or ``ccd`` (asinh with ``sky``, ``scale``).

    ``scale`` is ``softening * sigma`` of the observed band (ccd only).
    """

    kind: str
    sky: float = 0.0
    scale: float = 1.0
    compress: float = 0.0

    def observation(self, x: np.ndarray) -> np.ndarray:
        """The observed band in network space."""
        if self.kind == "counts":
            return self._squash(anscombe(x))
        return np.arcsinh((np.asarray(x, np.float64) - self.sky) / self.scale).astype(np.float32)

    def target(self, s: np.ndarray) -> np.ndarray:
        """The source-only band (no background, no sky) in network space."""
        if self.kind == "counts":
            return self._squash(anscombe(s))
        return np.arcsinh(np.asarray(s, np.float64) / self.scale).astype(np.float32)

    def inverse_target(self, t: np.ndarray) -> np.ndarray:
        """Network space back to source-only data units (counts, ADU): the exact inverse of :meth:`target`."""
        if self.kind == "counts":
            if self.compress > 0:
                t = self.compress * np.sinh(np.asarray(t, np.float64) / self.compress)
            return inverse_anscombe(t)
        return (np.sinh(np.asarray(t, np.float64)) * self.scale).astype(np.float32)

    def _squash(self, t: np.ndarray) -> np.ndarray:
        if self.compress > 0:
            return (self.compress * np.arcsinh(np.asarray(t, np.float64) / self.compress)).astype(np.float32)
        return t

    def to_dict(self) -> dict:
        return {"kind": self.kind, "sky": float(self.sky), "scale": float(self.scale), "compress": self.compress}


def band_transform(band: np.ndarray, kind: str, softening: float = 1.0, valid: np.ndarray | None = None,
                   compress: float = 0.0) -> BandTransform:
    """The transform of one observed (H, W) band of a ``counts`` or ``ccd`` instrument.

    ``valid`` (H, W) bool marks the pixels to estimate the sky from (ccd); default: every finite pixel.
    ``compress`` (counts only): see the module docstring (0: plain Anscombe).
    """
    if kind == "counts":
        return BandTransform("counts", compress=float(compress))
    if kind != "ccd":
        raise SkyfmError(f"the denoiser knows counts and ccd instruments, not '{kind}'")
    values = np.asarray(band, dtype=np.float32)
    if valid is not None:
        values = np.where(valid, values, np.nan)
    sky, sigma = robust_background(values)
    if not np.isfinite(sigma) or sigma <= 0:
        sigma = 1.0
    return BandTransform("ccd", sky=float(sky), scale=float(softening * sigma))


def instrument_kind(inst) -> str:
    """``counts`` or ``ccd``: which family of transform an instrument's images take."""
    return "counts" if inst.is_counts else "ccd"


def band_features(inst, band_index: int) -> np.ndarray:
    """(N_BAND_FEATURES,) float32: what the network is told about a band.

    ``(log10 wavelength [m] + 10) / 5`` (gamma rays ~ -1.5, optical ~ +0.7, mid-IR ~ +1), +1 for counts or -1
    for CCDs, and ``log2(nominal PSF FWHM in pixels) / 3``.
    """
    b = inst.bands[band_index]
    fwhm_pix = max(b.psf.fwhm_deg / inst.pixel_scale_deg, 0.1)
    return np.array([(b.log10_wavelength_m + 10.0) / 5.0, 1.0 if inst.is_counts else -1.0, np.log2(fwhm_pix) / 3.0],
                    dtype=np.float32)
