"""Cosmic-ray pixels of a CCD image, to leave out of the PSF fit.

A single CCD exposure carries cosmic-ray hits (about 2% of the pixels of a 600 s Hubble ACS exposure): a few pixels
each, far sharper than any star. One inside a star's fit box pulls its fitted position by a good fraction of a
pixel, while the Cramér–Rao bound of a bright star is a few hundredths: on Hubble validation patches an oracle fit
(true PSF, true neighbours removed) of the benchmark's isolated stars is at 1.0x the bound where the fit box is clean
and 3.0x where it holds a contaminated pixel, as 78% of the boxes do (``docs/benchmarks.md``, Run 15).

:func:`cosmic_ray_mask` finds them with L.A.Cosmic (van Dokkum 2001, PASP 113, 1420) as astroscrappy implements it:
the Laplacian of the image against its noise (from the instrument's gain and read noise), with a fine-structure test
(the median-filter one) that tells a hit from an undersampled star's peak. The mask is only ever used to leave
pixels out of fits, and to tell a detection on a hit from a source (:func:`light_on_cosmic_rays`); the image itself is
not changed, but for a tile of pixels finer than the network's, cleaned before it is resampled
(:func:`clean_cosmic_rays`).
"""

from __future__ import annotations

import numpy as np

from skyfm.errors import SkyfmError

SIGMA_CLIP = 4.5  # Laplacian-to-noise limit of a hit (astroscrappy's default)
OBJECT_LIMIT = 5.0  # fine-structure contrast a hit needs over a star's peak (astroscrappy's default)
ITERATIONS = 1  # L.A.Cosmic passes: more grow the hits found (astroscrappy: 4) at no gain in the fit, Run 15
# the deeper pass whose pixels, joined to a hit, tell whether a detection is one (skyfm.detect._cosmic_rays,
# light_on_cosmic_rays): at 4.5 a hit's faint tail stays unflagged, and the residual search took it for a source
TEST_SIGMA_CLIP = 3.0


def cosmic_ray_mask(data: np.ndarray, inst, mask: np.ndarray | None = None,
                    sigma_clip: float = SIGMA_CLIP) -> np.ndarray:
    """(C, H, W) bool, True on the cosmic-ray pixels of each band of ``data``.

    Args:
        data: (C, H, W) image in ADU, the sky not subtracted (the noise model needs it).
        inst: the :class:`~skyfm.instruments.Instrument` (gain e-/ADU, read noise e-, saturation ADU).
        mask: (H, W) or (C, H, W) bool of pixels to ignore (saturated, off the detector), or None; never flagged.
        sigma_clip: the Laplacian-to-noise limit of a hit (:data:`TEST_SIGMA_CLIP` for the deeper test pass).
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
        out[c], _ = astroscrappy.detect_cosmics(plane, inmask=bad, sigclip=sigma_clip, objlim=OBJECT_LIMIT, gain=gain,
                                                readnoise=float(noise.get("read_noise", 0.0)), satlevel=saturation,
                                                fsmode="median", niter=ITERATIONS)
        out[c] &= ~bad
    return out


def light_on_cosmic_rays(image: np.ndarray, rms: np.ndarray, cosmics: np.ndarray, x: np.ndarray, y: np.ndarray,
                         radius: float) -> tuple[np.ndarray, np.ndarray]:
    """The light within ``radius`` pixels of each position (x, y), all bands together: (N,) share of it on
    cosmic-ray pixels (NaN where it is not positive), (N,) signal-to-noise ratio of the rest (the pixels off them).

    Args:
        image: (C, H, W) background-subtracted image.
        rms: (C, H, W) its noise per pixel.
        cosmics: (C, H, W) bool cosmic-ray pixels (:func:`cosmic_ray_mask`).
        x, y: (N,) positions, pixels (0-based centres).
        radius: of the disk summed, pixels.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    r = int(np.ceil(radius))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = dy ** 2 + dx ** 2 <= radius ** 2
    dy, dx = dy[disk], dx[disk]  # (K,)
    h, w = image.shape[1:]
    yy, xx = np.rint(y)[:, None].astype(int) + dy, np.rint(x)[:, None].astype(int) + dx  # (N, K)
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    yy, xx = np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)
    light = np.where(inside, image[:, yy, xx], 0.0)  # (C, N, K)
    on_rays = cosmics[:, yy, xx]
    total = light.sum(axis=(0, 2))
    elsewhere = np.where(on_rays, 0.0, light).sum(axis=(0, 2))
    variance = np.where(inside & ~on_rays, rms[:, yy, xx] ** 2, 0.0).sum(axis=(0, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, (total - elsewhere) / total, np.nan)
        snr = np.where(variance > 0, elsewhere / np.sqrt(variance), 0.0)
    return share, snr


def clean_cosmic_rays(data: np.ndarray, hits: np.ndarray) -> np.ndarray:
    """(C, H, W) float32 copy of ``data`` with each of its ``hits`` pixels (:func:`cosmic_ray_mask`) replaced by the
    mean of the other pixels of the 5 x 5 box around it (astroscrappy's ``meanmask``; the band's median where the box
    holds none). For an image that is resampled before the network sees it: averaged onto coarser pixels a hit is
    no longer sharper than a star (``skyfm.detect``)."""
    from scipy import ndimage

    out = np.array(data, dtype=np.float32)
    hits = np.asarray(hits, bool)
    for c in range(out.shape[0]):
        if not hits[c].any():
            continue
        good = (~hits[c] & np.isfinite(out[c])).astype(np.float32)
        values = np.where(good > 0, out[c], 0.0).astype(np.float32)
        total = ndimage.uniform_filter(values, 5, mode="nearest")
        weight = ndimage.uniform_filter(good, 5, mode="nearest")
        fill = np.where(weight > 1e-6, total / np.maximum(weight, 1e-6), np.median(out[c][good > 0]))
        out[c][hits[c]] = fill[hits[c]]
    return out
