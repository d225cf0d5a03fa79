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
from skyfm.instruments.ccd_noise import missing_sky, sky_noise_offset  # noqa: F401 (missing_sky: its old place)

SIGMA_CLIP = 4.5  # Laplacian-to-noise limit of a hit (astroscrappy's default)
OBJECT_LIMIT = 5.0  # fine-structure contrast a hit needs over a star's peak (astroscrappy's default)
# the deeper pass whose pixels, joined to a hit, tell whether a detection is one (skyfm.detect._cosmic_rays,
# light_on_cosmic_rays): at 4.5 a hit's faint tail stays unflagged, and the residual search took it for a source
TEST_SIGMA_CLIP = 3.0


def cosmic_ray_mask(data: np.ndarray, inst, mask: np.ndarray | None = None,
                    sigma_clip: float = SIGMA_CLIP) -> np.ndarray:
    """(C, H, W) bool, True on the cosmic-ray pixels of each band of ``data``.

    Args:
        data: (C, H, W) image in ADU (the noise model needs its sky: where a band's has been subtracted, or its
            noise is not what the instrument's gain and read noise make of its level, the sky its noise implies
            stands in for it: :func:`~skyfm.instruments.ccd_noise.sky_noise_offset`).
        inst: the :class:`~skyfm.instruments.Instrument` (gain e-/ADU, read noise e-, saturation ADU).
        mask: (H, W) or (C, H, W) bool of pixels to ignore (saturated, off the detector), or None; never flagged.
        sigma_clip: the Laplacian-to-noise limit of a hit (:data:`TEST_SIGMA_CLIP` for the deeper test pass).
    """
    return cosmic_ray_masks(data, inst, mask, (sigma_clip,))[0]


def cosmic_ray_masks(data: np.ndarray, inst, mask: np.ndarray | None = None,
                     sigma_clips: tuple[float, ...] = (SIGMA_CLIP,)) -> list[np.ndarray]:
    """:func:`cosmic_ray_mask` at each of ``sigma_clips``: a list of (C, H, W) bool masks.

    The pixels astroscrappy's ``detect_cosmics`` flags in one pass (``niter=1``: its default of 4 grows the hits
    found at no gain in the fit, Run 15; separable medians, the median fine-structure image), computed with its
    own C filters (``astroscrappy.utils``) so that the Laplacian-to-noise and fine-structure images, the median
    filters that are nearly all of the cost, are made once for every limit; and without the cleaned image
    ``detect_cosmics`` also makes, which the mask does not need. A test holds the masks equal to
    ``detect_cosmics``'s. A lower limit's mask holds every pixel of a higher one's: its candidates pass the lower
    limit, and its growth the lower fraction of it.
    """
    data = np.asarray(data)
    if data.ndim != 3:
        raise SkyfmError(f"cosmic_ray_mask needs a (C, H, W) image, got shape {data.shape}")
    noise = inst.noise or {}
    gain = float(noise.get("gain", 1.0)) or 1.0
    saturation = float(noise.get("saturation", 0.0)) or 1e30
    read_noise = float(noise.get("read_noise", 0.0))
    ignore = np.zeros(data.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), data.shape)
    out = [np.zeros(data.shape, dtype=bool) for _ in sigma_clips]
    for c in range(data.shape[0]):
        bad = ignore[c] | ~np.isfinite(data[c])
        plane = np.where(bad, 0.0, data[c] + sky_noise_offset(data[c], bad, gain, read_noise)).astype(np.float32)
        for found, plane_mask in zip(out, _lacosmic_one_pass(plane, bad, sigma_clips, gain, read_noise, saturation)):
            found[c] = plane_mask & ~bad
    return out


def _lacosmic_one_pass(plane: np.ndarray, bad: np.ndarray, sigma_clips, gain: float, read_noise: float,
                       saturation: float, sigma_frac: float = 0.3) -> list[np.ndarray]:
    """(H, W) bool hits of one band at each limit: astroscrappy 1.3's ``detect_cosmics`` loop body, step for step
    (its arguments are C floats, hence the float32 casts that keep the masks bit for bit)."""
    from astroscrappy.utils import dilate3, dilate5, laplaceconvolve, rebin, sepmedfilt5, sepmedfilt7, sepmedfilt9
    from astroscrappy.utils import subsample

    f32 = np.float32
    electrons = np.ascontiguousarray(plane * float(f32(gain)), dtype=np.float32)  # (H, W)
    variance = electrons + float(f32(read_noise) * f32(read_noise))
    # astroscrappy's update_mask: saturated stars' cores grown by two pixels, the given mask by one
    saturated = electrons >= float(f32(saturation))
    if saturated.any():  # the median is all the cost, and it only ever narrows a saturated set
        saturated &= sepmedfilt7(electrons) > float(f32(saturation)) / 10.0
    ignore = dilate5(saturated.view(np.uint8), 2).astype(bool) | dilate3(bad.astype(np.uint8)).astype(bool)
    good = ~ignore
    laplacian = rebin(np.clip(laplaceconvolve(subsample(electrons)), 0.0, None))  # L+ of van Dokkum (2001)
    sigma = np.sqrt(np.maximum(sepmedfilt7(variance), f32(0.00001)))  # a hit-free noise map
    laplacian /= 2.0 * sigma
    sharp = laplacian - sepmedfilt7(laplacian)  # S': the Laplacian-to-noise ratio, smooth structure removed
    fine = sepmedfilt5(electrons)
    fine = (fine - sepmedfilt9(fine)) / sigma  # the fine-structure image, in S' units
    fine[fine < 0.01] = 0.01
    contrast = sharp / fine
    masks = []
    for clip in sigma_clips:
        clip = float(f32(clip))
        hits = (sharp > clip) & good & (contrast > OBJECT_LIMIT)
        hits = dilate3(hits.view(np.uint8)).astype(bool) & good & (sharp > clip)
        low = float(f32(sigma_frac) * f32(clip))
        masks.append(dilate3(hits.view(np.uint8)).astype(bool) & good & (sharp > low))
    return masks


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
