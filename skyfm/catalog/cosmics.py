"""Cosmic-ray pixels of a CCD image, to leave out of the PSF fit.

A single CCD exposure carries cosmic-ray hits (about 2% of the pixels of a 600 s Hubble ACS exposure): a few pixels
each, far sharper than any star. One inside a star's fit box pulls its fitted position by a good fraction of a
pixel, while the Cramér–Rao bound of a bright star is a few hundredths: on Hubble validation patches an oracle fit
(true PSF, true neighbours removed) of the benchmark's isolated stars is at 1.0x the bound where the fit box is clean
and 3.0x where it holds a contaminated pixel, as 78% of the boxes do (``docs/benchmarks.md``, Run 15).

:func:`cosmic_ray_mask` finds them with L.A.Cosmic (van Dokkum 2001, PASP 113, 1420) as astroscrappy implements it:
the Laplacian of the image against its noise (from the instrument's gain and read noise), with a fine-structure test
(the median-filter one) that tells a hit from an undersampled star's peak. The mask is only ever used to leave
pixels out of fits; the image itself is not changed.
"""

from __future__ import annotations

import numpy as np

from skyfm.errors import SkyfmError

SIGMA_CLIP = 4.5  # Laplacian-to-noise limit of a hit (astroscrappy's default)
OBJECT_LIMIT = 5.0  # fine-structure contrast a hit needs over a star's peak (astroscrappy's default)
ITERATIONS = 1  # L.A.Cosmic passes: more grow the hits found (astroscrappy: 4) at no gain in the fit, Run 15


def cosmic_ray_mask(data: np.ndarray, inst, mask: np.ndarray | None = None) -> np.ndarray:
    """(C, H, W) bool, True on the cosmic-ray pixels of each band of ``data``.

    Args:
        data: (C, H, W) image in ADU, the sky not subtracted (the noise model needs it).
        inst: the :class:`~skyfm.instruments.Instrument` (gain e-/ADU, read noise e-, saturation ADU).
        mask: (H, W) or (C, H, W) bool of pixels to ignore (saturated, off the detector), or None; never flagged.
    """
    import astroscrappy

    data = np.asarray(data)
    if data.ndim != 3:
        raise SkyfmError(f"cosmic_ray_mask needs a (C, H, W) image, got shape {data.shape}")
    noise = inst.noise or {}
    gain = float(noise.get("gain", 1.0)) or 1.0
    saturation = float(noise.get("saturation", 0.0)) or 1e30
    ignore = np.zeros(data.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), data.shape)
    out = np.zeros(data.shape, dtype=bool)
    for c in range(data.shape[0]):
        bad = ignore[c] | ~np.isfinite(data[c])
        plane = np.where(bad, 0.0, data[c]).astype(np.float32)
        out[c], _ = astroscrappy.detect_cosmics(plane, inmask=bad, sigclip=SIGMA_CLIP, objlim=OBJECT_LIMIT, gain=gain,
                                                readnoise=float(noise.get("read_noise", 0.0)), satlevel=saturation,
                                                fsmode="median", niter=ITERATIONS)
        out[c] &= ~bad
    return out
