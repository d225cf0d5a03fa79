"""Flux: a mean and a variance per source, total and per band (AutoSourceID-FE's mean-variance estimation).

Channels of this family: ``flux`` (2: mean and ln variance of ln(total flux / unit)) and ``band_flux``
(2 per band of the instrument: the same for each band). The network sees scaled images, so fluxes are learned in
units it can see:

* counts instruments: unit = 1 count (the log1p scaling keeps counts absolute);
* CCDs: unit = the band's background noise sigma (ADU per pixel, what the asinh scaling divides by); the total's
  unit is the sum of the present bands' sigmas. Detection multiplies back, so catalogs carry ADU.

The loss is the Gaussian negative log-likelihood of ln flux, so ``exp(mean) * unit`` is the flux and
``sqrt(exp(ln variance))`` its fractional 1-sigma error.
"""

from __future__ import annotations

import numpy as np
import torch

LOGVAR_RANGE = (-8.0, 6.0)


def gaussian_nll(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean Gaussian NLL (without the constant) over finite targets; 0 when there are none."""
    ok = torch.isfinite(target)
    if not bool(ok.any()):
        return mean.sum() * 0.0
    lv = logvar.float()[ok].clamp(*LOGVAR_RANGE)
    err = mean.float()[ok] - target[ok]
    return (0.5 * err**2 * torch.exp(-lv) + 0.5 * lv).mean()


def log_flux_target(flux, unit) -> np.ndarray:
    """ln(flux / unit), NaN where the flux is missing or not positive."""
    flux = np.asarray(flux, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(flux / unit)
    out[~np.isfinite(out) | ~(flux > 0)] = np.nan
    return out.astype(np.float32)


def decode_flux(mean: np.ndarray, logvar: np.ndarray, unit) -> tuple[np.ndarray, np.ndarray]:
    """(flux, 1-sigma error) in the units of ``unit`` from predicted ln-flux mean and ln variance."""
    sigma = np.sqrt(np.exp(np.clip(logvar, *LOGVAR_RANGE)))
    flux = np.exp(np.clip(mean, -30, 30)) * unit
    return flux, flux * sigma


def flux_phys(band_counts: np.ndarray, exposure_cm2_s: np.ndarray) -> np.ndarray:
    """Photon flux (ph cm-2 s-1) over the bands given: sum over bands of counts / exposure, as the simulator's
    ``flux_phys`` (the sum of the bands' photon fluxes). ``exposure_cm2_s``: (C,) one per band, or (N, C) one per
    source and band (an exposure cube's, :mod:`skyfm.catalog.exposure`)."""
    band_counts = np.atleast_2d(np.asarray(band_counts, dtype=np.float64))
    return (band_counts / np.atleast_2d(np.asarray(exposure_cm2_s, dtype=np.float64))).sum(axis=1)


__all__ = ["decode_flux", "flux_phys", "gaussian_nll", "log_flux_target"]
