"""Point-spread functions: radial profiles, containment radii and pixel-integrated stamps.

Three radial families cover the five instruments:

* ``gaussian``: optical/IR cores and the CTAO PSF.
* ``moffat``: ground-based seeing (MeerLICHT), with power-law wings.
* ``king``: the Fermi-LAT IRF form, ``K(r) = (1 - 1/g) / (2 pi s^2) * (1 + r^2 / (2 g s^2))^-g``.
  It is a Moffat profile with ``alpha^2 = 2 g s^2`` and ``beta = g``, so both share one implementation.

All profiles are in the flat-sky (small-angle) approximation and normalised to unit integral over the plane.
Sizes are in degrees; :meth:`PSF.stamp` converts to pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from skyfm.errors import SkyfmError

GAUSSIAN_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


@dataclass(frozen=True)
class PSF:
    """A circular PSF.

    Attributes:
        model: ``"gaussian"`` or ``"moffat"`` (``"king"`` is converted to ``"moffat"`` on construction).
        width_deg: Gaussian sigma, or Moffat alpha, in degrees.
        beta: Moffat power index (> 1); unused for Gaussians.
    """

    model: str
    width_deg: float
    beta: float = 0.0

    # --- constructors from the numbers instrument teams publish -------------------------------------------
    @classmethod
    def gaussian(cls, *, fwhm_deg: float | None = None, r68_deg: float | None = None) -> "PSF":
        if (fwhm_deg is None) == (r68_deg is None):
            raise SkyfmError("a Gaussian PSF needs exactly one of fwhm or r68")
        if fwhm_deg is not None:
            sigma = fwhm_deg / GAUSSIAN_FWHM_PER_SIGMA
        else:
            sigma = r68_deg / np.sqrt(-2.0 * np.log(1.0 - 0.68))
        return cls("gaussian", float(sigma))

    @classmethod
    def moffat(cls, *, beta: float, fwhm_deg: float | None = None, r68_deg: float | None = None) -> "PSF":
        if beta <= 1.0:
            raise SkyfmError(f"a Moffat/King PSF needs beta (gamma) > 1, got {beta}")
        if (fwhm_deg is None) == (r68_deg is None):
            raise SkyfmError("a Moffat PSF needs exactly one of fwhm or r68")
        if fwhm_deg is not None:
            alpha = fwhm_deg / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
        else:  # F(r) = 1 - (1 + (r/alpha)^2)^(1 - beta)
            alpha = r68_deg / np.sqrt((1.0 - 0.68) ** (1.0 / (1.0 - beta)) - 1.0)
        return cls("moffat", float(alpha), float(beta))

    @classmethod
    def king(cls, *, gamma: float, r68_deg: float | None = None, sigma_deg: float | None = None) -> "PSF":
        """The LAT King function, from its containment radius (or its IRF sigma) and gamma."""
        if sigma_deg is not None:
            if gamma <= 1.0:
                raise SkyfmError(f"a King PSF needs gamma > 1, got {gamma}")
            return cls("moffat", float(np.sqrt(2.0 * gamma) * sigma_deg), float(gamma))
        return cls.moffat(beta=gamma, r68_deg=r68_deg)

    # --- radial functions -----------------------------------------------------------------------------------
    def profile(self, r_deg: np.ndarray) -> np.ndarray:
        """Surface density (per deg^2) at radius ``r_deg``; integrates to 1 over the plane."""
        r2 = np.asarray(r_deg, dtype=np.float64) ** 2
        w2 = self.width_deg**2
        if self.model == "gaussian":
            return np.exp(-0.5 * r2 / w2) / (2.0 * np.pi * w2)
        return (self.beta - 1.0) / (np.pi * w2) * (1.0 + r2 / w2) ** (-self.beta)

    def containment(self, r_deg: np.ndarray | float) -> np.ndarray:
        """Fraction of the flux inside radius ``r_deg``."""
        r2 = np.asarray(r_deg, dtype=np.float64) ** 2
        w2 = self.width_deg**2
        if self.model == "gaussian":
            return 1.0 - np.exp(-0.5 * r2 / w2)
        return 1.0 - (1.0 + r2 / w2) ** (1.0 - self.beta)

    def containment_radius(self, fraction: float = 0.68) -> float:
        """Radius (deg) that contains ``fraction`` of the flux."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
        if self.model == "gaussian":
            return float(self.width_deg * np.sqrt(-2.0 * np.log(1.0 - fraction)))
        return float(self.width_deg * np.sqrt((1.0 - fraction) ** (1.0 / (1.0 - self.beta)) - 1.0))

    @property
    def fwhm_deg(self) -> float:
        if self.model == "gaussian":
            return float(self.width_deg * GAUSSIAN_FWHM_PER_SIGMA)
        return float(2.0 * self.width_deg * np.sqrt(2.0 ** (1.0 / self.beta) - 1.0))

    # --- pixel rendering ------------------------------------------------------------------------------------
    def stamp_radius_pix(self, pixel_scale_deg: float, fraction: float = 0.995, max_radius_pix: int = 128) -> int:
        """Half-size (pixels) of a stamp that holds ``fraction`` of the flux, at least 2 pixels."""
        r = self.containment_radius(fraction) / pixel_scale_deg
        return int(np.clip(np.ceil(r), 2, max_radius_pix))

    def oversampling(self, pixel_scale_deg: float) -> int:
        """Sub-pixels per pixel side needed to integrate the profile over a pixel to better than ~0.5%."""
        return int(np.clip(np.ceil(4.0 * pixel_scale_deg / self.fwhm_deg), 1, 9))

    def stamps(
        self,
        dx: np.ndarray,
        dy: np.ndarray,
        pixel_scale_deg: float,
        radius_pix: int | None = None,
        oversample: int | None = None,
    ) -> np.ndarray:
        """Pixel-integrated PSF stamps for sources at sub-pixel offsets.

        Args:
            dx, dy: offsets (pixels) of each source from the centre pixel of its stamp, each in [-0.5, 0.5].
            pixel_scale_deg: pixel side in degrees.
            radius_pix: stamp half-size; stamps are (2 r + 1) x (2 r + 1). Default: holds 99.5% of the flux.
            oversample: sub-pixels per side; default from :meth:`oversampling`.

        Returns:
            (N, 2 r + 1, 2 r + 1) float64 array: the fraction of each source's flux that falls in each pixel.
            Flux beyond the stamp is lost, by design: choose ``radius_pix`` for the accuracy you need.
        """
        dx = np.atleast_1d(np.asarray(dx, dtype=np.float64))
        dy = np.atleast_1d(np.asarray(dy, dtype=np.float64))
        r = self.stamp_radius_pix(pixel_scale_deg) if radius_pix is None else int(radius_pix)
        size = 2 * r + 1
        if self.model == "gaussian" and oversample is None:
            return self._gaussian_stamps(dx, dy, pixel_scale_deg, r)
        os_ = self.oversampling(pixel_scale_deg) if oversample is None else int(oversample)
        # Sub-pixel centres along one axis, relative to the stamp centre, in pixels: (size * os,)
        sub = (np.arange(size * os_) + 0.5) / os_ - 0.5 - r
        gx = sub[None, :] - dx[:, None]  # (N, S*os)
        gy = sub[None, :] - dy[:, None]  # (N, S*os)
        r2 = (gy[:, :, None] ** 2 + gx[:, None, :] ** 2) * pixel_scale_deg**2  # (N, S*os, S*os)
        dens = self.profile(np.sqrt(r2)) * (pixel_scale_deg / os_) ** 2
        return dens.reshape(len(dx), size, os_, size, os_).sum(axis=(2, 4))

    def _gaussian_stamps(self, dx: np.ndarray, dy: np.ndarray, pixel_scale_deg: float, r: int) -> np.ndarray:
        """Exact pixel integrals of a Gaussian: separable products of error-function differences."""
        from scipy.special import erf

        edges = np.arange(-r - 0.5, r + 1.5)  # (S + 1,) pixel edges relative to the stamp centre
        s = self.width_deg / pixel_scale_deg * np.sqrt(2.0)
        cx = 0.5 * erf((edges[None, :] - dx[:, None]) / s)  # (N, S + 1)
        cy = 0.5 * erf((edges[None, :] - dy[:, None]) / s)
        px = np.diff(cx, axis=1)  # (N, S)
        py = np.diff(cy, axis=1)
        return py[:, :, None] * px[:, None, :]

    def kernel(self, pixel_scale_deg: float, radius_pix: int | None = None) -> np.ndarray:
        """A centred, pixel-integrated 2-D kernel (for convolving extended emission), normalised to sum 1."""
        k = self.stamps(np.zeros(1), np.zeros(1), pixel_scale_deg, radius_pix)[0]
        return k / k.sum()
