"""Forced photometry of the denoiser's sources: give each source in the clean image the flux the observation has.

An x0-predicting denoiser returns (an average of) posterior means, and a posterior mean shrinks faint sources
towards the prior's zero: the shipped denoiser keeps only 0.1-0.9 of a point source's aperture flux, less in broad
PSFs and crowded Galactic-plane fields. The *shape* and position of the sources it finds are good; their amplitude
is not. :func:`forced_flux_correction` keeps the shape and fixes the amplitude against the data, per band:

1. **background**: ``B = observed - clean`` averaged over a box much larger than the PSF (``box_fwhm`` FWHMs, at
   least ``min_box`` px), using only pixels away from the clean image's sources (clean > ``mask_threshold`` noise
   sigma, grown by one FWHM) and, on a second pass, without pixels more than ``clip`` sigma above the first
   estimate (cosmic rays, trails, undetected bright sources; for counts the Poisson upper tail,
   ``clip sqrt(B) + clip^2``). A mean, not a median, so that it stays unbiased for Poisson counts at < 1 count
   per pixel. Known bias (see :data:`LOCAL_BACKGROUND`): on the Galactic plane, where the diffuse emission peaks
   under the crowded sources, the pixels left are the fainter off-ridge sky, and B is about 30-45% low there.
2. **sources**: the clean image's pixels above ``threshold`` noise sigma are the source footprints; each connected
   footprint is split among its local maxima (each pixel goes to the nearest maximum in its footprint).
3. **forced photometry**: for each source, the aperture ``A`` = the pixels within ``aperture_fwhm`` FWHMs (at least
   1.5 px) of its maximum (with ``exact_aperture``: an exact circle about its flux-weighted centre) that belong to
   no other source; the source's pixels are multiplied by one factor, chosen
   so that the clean image's flux in ``A`` becomes ``sum_A (observed - B)``: forced aperture photometry, unbiased
   when B is. Aperture pixels far (``outlier_clip`` sigma) above the source's shape fitted to the data (an L1 fit,
   robust to them) are left out of both sums, so that cosmic rays, trails and hot pixels that the denoiser rightly
   removed do not come back through the photometry; on CCDs a source whose observed excess is not point-like
   (``shape_tol``: a bright cosmic-ray track under a faint ghost in the clean image) is left as the denoiser made
   it. (Counts cubes have no such artefacts, and the Fermi-LAT PSF is far from Gaussian, so the test is CCD-only.)
   Sources the denoiser itself barely sees (clean aperture SNR < ``min_snr``) and pixels outside every footprint
   (noise-only pixels) are left as they are; factors are clipped to ``[0, max_scale]``.
4. **uncertainty**: the samples' std of a brightened source is multiplied by the same factor (never decreased).

Nothing here uses simulation truth: only the observed band, the clean band, the noise sigma (Poisson from B for
counts, the robust sky sigma for CCDs) and the PSF FWHM in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from skyfm.errors import SkyfmError

FLUX_CORRECTIONS = ("none", "forced")


@dataclass
class ForcedFluxConfig:
    """Settings of :func:`forced_flux_correction` (chosen on simulated patches outside the benchmark's seeds)."""

    threshold: float = 0.05  # source footprint: clean > threshold * noise sigma per pixel
    mask_threshold: float = 0.05  # background: leave out clean > mask_threshold * noise sigma (grown by 1 FWHM)
    aperture_fwhm: float = 1.0  # aperture radius in PSF FWHMs (at least 1.5 px)
    box_fwhm: float = 8.0  # background box side in PSF FWHMs
    min_box: int = 16  # ... and at least this many pixels
    grow_box: bool = False  # where a box holds too few background pixels: double it (False: the patch's mean)
    exact_aperture: bool = False  # exact circle about the source's centre (False: whole pixels about its peak)
    clip: float = 3.0  # background: second pass drops pixels this many sigma above the first estimate
    min_snr: float = 1.0  # leave sources whose clean aperture SNR is below this untouched
    max_scale: float = 20.0  # clip the flux factors to [0, max_scale]
    shape_tol: float = 0.3  # CCDs: leave sources whose observed excess is this far from a point source untouched
    outlier_clip: float = 5.0  # aperture pixels this many sigma above the fitted source shape are left out (0: off)


#: The background estimated near the sources, and exact apertures: measured, not shipped. Against the simulator's
#: true background (Fermi-LAT plane, diagnostic seeds) it cuts the background error under isolated sources from
#: -110% / -55% of their light to -22% / -19% in the two best-populated energy bins, but the clean image's flux of
#: isolated sources then falls short (0.95 on the test seeds) and sep and the TS map find fewer sources on it; the
#: shipped default's low background over-brightens sources by about as much as the denoiser's misses (sources it
#: keeps at < 10% of their flux, which no photometry restores) pull the median down. docs/benchmarks.md has both.
LOCAL_BACKGROUND = ForcedFluxConfig(mask_threshold=0.3, box_fwhm=4.0, min_box=8, grow_box=True, exact_aperture=True)


def check_flux_correction(name: str) -> str:
    """``name`` if it is one of :data:`FLUX_CORRECTIONS`, else a one-line SkyfmError."""
    if name not in FLUX_CORRECTIONS:
        raise SkyfmError(f"--flux-correction must be one of {', '.join(FLUX_CORRECTIONS)}, got '{name}'")
    return name


def _box_mean(values: np.ndarray, weight: np.ndarray, box: int, grow: bool = False) -> np.ndarray:
    """Weighted mean of ``values`` in a ``box`` x ``box`` window (normalised convolution, zero outside).

    Where the window holds too few weighted pixels (under 5% of the best-covered window: a crowded stretch of the
    Galactic plane whose pixels are all near sources), the weighted mean of the whole image stands in, or, with
    ``grow``, the window doubles until it holds enough (the whole image's mean is the emptier, fainter sky's)."""
    from scipy.ndimage import uniform_filter

    h, w = values.shape
    out = np.full(values.shape, np.nan)
    full = max(h, w)
    floor = None
    while True:
        num = uniform_filter(values * weight, box, mode="constant")
        den = uniform_filter(weight, box, mode="constant")
        if floor is None:
            floor = max(0.05 * float(den.max()), 1e-12) if den.size else 1e-12
        fill = np.isnan(out) & (den > floor)
        out[fill] = num[fill] / den[fill]
        if not grow or not np.isnan(out).any() or box >= 2 * full:
            break
        box = min(2 * box, 2 * full)
    if np.isnan(out).any():
        glob = float((values * weight).sum() / weight.sum()) if weight.sum() > 0 else float(np.mean(values))
        out[np.isnan(out)] = glob
    return out


def estimate_background(observed: np.ndarray, clean: np.ndarray, fwhm: float, kind: str, sigma: float | None = None,
                        valid: np.ndarray | None = None, config: ForcedFluxConfig | None = None,
                        footprint: np.ndarray | None = None) -> np.ndarray:
    """(H, W) background of one band: ``observed - clean`` averaged away from the sources (module docstring, 1).

    ``sigma``: the noise sigma per pixel of a CCD band (ignored for counts, whose sigma is sqrt(B)).
    ``footprint``: pixels to leave out (default: clean > ``threshold`` sigma, computed here).
    """
    from scipy.ndimage import binary_dilation

    cfg = config or ForcedFluxConfig()
    h, w = observed.shape
    resid = np.asarray(observed, np.float64) - np.asarray(clean, np.float64)
    good = np.ones((h, w), bool) if valid is None else np.asarray(valid, bool).copy()
    good &= np.isfinite(resid)
    resid = np.where(good, resid, 0.0)
    box = int(min(max(cfg.min_box, round(cfg.box_fwhm * fwhm)), max(h, w)))
    grow = max(1, int(round(fwhm)))
    if footprint is None:
        b0 = _box_mean(resid, good.astype(np.float64), box, cfg.grow_box)
        footprint = clean > cfg.mask_threshold * _noise_sigma(kind, b0, sigma)
    away = good & ~binary_dilation(footprint, iterations=grow)
    if away.sum() < 0.1 * good.sum():  # sources everywhere: fall back to all valid pixels
        away = good
    bkg = _box_mean(resid, away.astype(np.float64), box, cfg.grow_box)
    keep = away & (resid - bkg <= _clip_level(kind, bkg, sigma, cfg.clip))
    if keep.sum() >= 0.5 * away.sum():
        bkg = _box_mean(resid, keep.astype(np.float64), box, cfg.grow_box)
    return bkg


def _clip_level(kind: str, background: np.ndarray, sigma: float | None, clip: float) -> np.ndarray:
    """How far above the background a pixel must be to be clipped: ``clip`` sigma for CCDs; for counts the same
    with a ``clip**2`` margin, about the Poisson upper tail at ``clip`` sigma, so that single counts on a
    background below one count per pixel are not clipped (which would bias the mean low)."""
    if kind == "counts":
        b = np.maximum(background, 0.0)
        return clip * np.sqrt(b) + clip**2
    return np.full(background.shape, clip * float(sigma if sigma else 1.0))


def _noise_sigma(kind: str, background: np.ndarray, sigma: float | None) -> np.ndarray:
    if kind == "counts":
        return np.sqrt(np.maximum(background, 0.0) + 1e-3)
    return np.full(background.shape, float(sigma if sigma else 1.0))


def _sources(clean: np.ndarray, footprint: np.ndarray, fwhm: float) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Label image (0: no source, k: source k) and the peak (y, x) of each source, k = 1..n."""
    from scipy.ndimage import distance_transform_edt, find_objects, label, maximum_filter

    comp, n = label(footprint)
    size = max(3, int(round(fwhm)) | 1)
    peaks_mask = (clean == maximum_filter(clean, size=size, mode="nearest")) & footprint
    labels = np.zeros(clean.shape, np.int32)
    peaks: list[tuple[int, int]] = []
    for ci, sl in enumerate(find_objects(comp), start=1):
        if sl is None:
            continue
        inside = comp[sl] == ci
        pk = peaks_mask[sl] & inside
        py, px = np.nonzero(pk)
        if py.size == 0:  # a plateau: its brightest pixel
            flat = np.where(inside, clean[sl], -np.inf)
            py, px = np.unravel_index(np.argmax(flat), flat.shape)
            py, px = np.atleast_1d(py), np.atleast_1d(px)
        if py.size > 1:  # several maxima: each pixel to the nearest one (within this footprint)
            markers = np.zeros(inside.shape, np.int32)
            markers[py, px] = np.arange(1, py.size + 1)
            _, (iy, ix) = distance_transform_edt(markers == 0, return_indices=True)
            local = markers[iy, ix]
        else:
            local = np.ones(inside.shape, np.int32)
        base = len(peaks)
        labels[sl][inside] = (local[inside] + base).astype(np.int32)
        peaks.extend((int(y + sl[0].start), int(x + sl[1].start)) for y, x in zip(py, px))
    return labels, peaks


def _outliers(d, t, keep, own, kind, bkg, sigma, clip):
    """Aperture pixels far above the source's shape scaled to the data (cosmic rays, trails, hot pixels that the
    denoiser removed): ``d - s t > clip * sigma`` with ``s`` the L1 fit of ``t`` to ``d`` (the weighted median of
    ``d / t``, weights ``t``), robust to a few such pixels. Returns a bool mask like ``d`` (True: leave out)."""
    sel = keep & own & (t > 0)
    if sel.sum() < 3:
        return np.zeros(d.shape, bool)
    ratio, wt = d[sel] / t[sel], t[sel]
    order = np.argsort(ratio)
    cw = np.cumsum(wt[order])
    s = max(float(ratio[order][np.searchsorted(cw, 0.5 * cw[-1])]), 0.0)
    model = s * t
    if kind == "counts":
        level = clip * np.sqrt(np.maximum(bkg, 0.0) + model + 1e-3) + clip**2
    else:
        level = clip * float(sigma if sigma else 1.0)
    return keep & (d - model > level)


def _not_point_like(d, t, keep, py, px, fwhm, noise, tol):
    """Whether the observed excess in the aperture is far from a point source: ``sum |d - a P| - (the noise's
    share) > tol * sum a P`` for ``P`` a Gaussian of the PSF's FWHM at the clean source's centroid, ``a`` its
    least-squares amplitude. A bright cosmic-ray track or trail that the denoiser removed fails; a point source
    the denoiser only shrank passes (its excess is PSF-shaped)."""
    if keep.sum() < 3:
        return False
    w = np.where(keep, np.maximum(t, 0.0), 0.0)
    yy, xx = np.indices(d.shape)
    cy, cx = ((float((w * yy).sum() / w.sum()), float((w * xx).sum() / w.sum())) if w.sum() > 0
              else (float(py), float(px)))
    prof = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (fwhm / 2.3548) ** 2))[keep]
    dk = d[keep]
    amp = float((dk * prof).sum() / max((prof**2).sum(), 1e-30))
    if amp <= 0:
        return False
    excess = float(np.abs(dk - amp * prof).sum()) - 0.8 * float(noise[keep].sum())
    return excess > tol * amp * float(prof.sum())


def _centroid(t: np.ndarray, own: np.ndarray, py: int, px: int, r: float) -> tuple[float, float]:
    """Flux-weighted centre (y, x) of a source's clean pixels within ``r`` of its peak (the peak if none)."""
    yy, xx = np.indices(t.shape)
    wt = np.where(own & ((yy - py) ** 2 + (xx - px) ** 2 <= r * r), np.maximum(t, 0.0), 0.0)
    total = float(wt.sum())
    if total <= 0:
        return float(py), float(px)
    return float((wt * yy).sum() / total), float((wt * xx).sum() / total)


def _aperture_weights(shape: tuple[int, int], cy: float, cx: float, r: float, subpix: int = 5) -> np.ndarray:
    """Share of each pixel inside the circle of radius ``r`` about (``cy``, ``cx``), from ``subpix``^2 samples
    per pixel: an exact circular aperture at a sub-pixel centre (an integer-pixel disk of r = 1.5 holds 9 px, the
    circle 7.1, enough to bias a compact source's forced flux by 10-20%)."""
    off = (np.arange(subpix) + 0.5) / subpix - 0.5
    ys = (np.arange(shape[0])[:, None] + off[None, :]).reshape(-1)  # (H * subpix,)
    xs = (np.arange(shape[1])[:, None] + off[None, :]).reshape(-1)  # (W * subpix,)
    inside = (ys[:, None] - cy) ** 2 + (xs[None, :] - cx) ** 2 <= r * r  # (H * subpix, W * subpix)
    return inside.reshape(shape[0], subpix, shape[1], subpix).mean(axis=(1, 3))


def forced_flux_correction(observed: np.ndarray, clean: np.ndarray, std: np.ndarray | None, fwhm: float, kind: str,
                           sigma: float | None = None, valid: np.ndarray | None = None,
                           config: ForcedFluxConfig | None = None) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Clean band with each source's aperture flux forced to the observed one (see the module docstring).

    Args:
        observed: (H, W) observed band in data units (counts, ADU; sky included).
        clean: (H, W) the denoiser's source-only band, same units.
        std: (H, W) its uncertainty (rescaled with the sources), or None.
        fwhm: PSF FWHM in pixels.
        kind: ``counts`` (Poisson noise, sqrt(B)) or ``ccd`` (constant noise ``sigma``).
        sigma: noise sigma per pixel of a CCD band.
        valid: (H, W) bool, pixels to use (default all finite).

    Returns (clean, std, info): new arrays (the inputs are not modified) and ``info`` with ``background`` (H, W),
    ``labels`` (H, W) int, ``scale`` (n_sources,) the factor applied to each (1 where untouched).
    """
    cfg = config or ForcedFluxConfig()
    if kind not in ("counts", "ccd"):
        raise SkyfmError(f"forced flux correction knows counts and ccd bands, not '{kind}'")
    obs = np.asarray(observed, np.float64)
    cl = np.asarray(clean, np.float64)
    good = np.isfinite(obs) & np.isfinite(cl)
    if valid is not None:
        good &= np.asarray(valid, bool)
    cl0 = np.where(good, cl, 0.0)
    fwhm = max(float(fwhm), 1.0)
    bkg = estimate_background(np.where(good, obs, 0.0), cl0, fwhm, kind, sigma, good, cfg)
    noise = _noise_sigma(kind, bkg, sigma)
    footprint = good & (cl0 > cfg.threshold * noise)
    # a second background pass with the sources seen against the first one
    bkg = estimate_background(np.where(good, obs, 0.0), cl0, fwhm, kind, sigma, good, cfg,
                              footprint=good & (cl0 > cfg.mask_threshold * noise))
    noise = _noise_sigma(kind, bkg, sigma)
    labels, peaks = _sources(cl0, footprint, fwhm)
    n = len(peaks)
    scale = np.ones(n + 1)
    if n:
        r = max(1.5, cfg.aperture_fwhm * fwhm)
        ri = int(np.ceil(r)) + int(cfg.exact_aperture)
        sub = np.where(good, obs - bkg, 0.0)
        h, w = cl0.shape
        for k, (py, px) in enumerate(peaks, start=1):
            y0, y1, x0, x1 = max(0, py - ri), min(h, py + ri + 1), max(0, px - ri), min(w, px + ri + 1)
            lab = labels[y0:y1, x0:x1]
            t, d = cl0[y0:y1, x0:x1], sub[y0:y1, x0:x1]
            if cfg.exact_aperture:
                cy, cx = _centroid(t, lab == k, py - y0, px - x0, r)
                weight = _aperture_weights(t.shape, cy, cx, r) * good[y0:y1, x0:x1]
            else:
                yy, xx = np.ogrid[y0 - py:y1 - py, x0 - px:x1 - px]
                weight = ((yy * yy + xx * xx <= r * r) & good[y0:y1, x0:x1]).astype(np.float64)
            own, free = (weight > 0) & (lab == k), (weight > 0) & (lab == 0)
            den = float((weight * t)[own].sum())
            var = float((weight * noise[y0:y1, x0:x1] ** 2)[own].sum())
            if den <= 0 or den / np.sqrt(max(var, 1e-30)) < cfg.min_snr:
                continue
            keep = own | free
            if kind == "ccd" and cfg.shape_tol > 0 and _not_point_like(d, t, keep, py - y0, px - x0, fwhm,
                                                                       noise[y0:y1, x0:x1], cfg.shape_tol):
                continue
            if cfg.outlier_clip > 0:
                keep &= ~_outliers(d, t, keep, own, kind, bkg[y0:y1, x0:x1], sigma, cfg.outlier_clip)
                den = float((weight * t)[keep & own].sum())
                if den <= 0:
                    continue
            # aperture flux of the observation, less the neighbours' pixels, less the untouched faint pixels
            num = float((weight * d)[keep].sum()) - float((weight * t)[keep & free].sum())
            scale[k] = float(np.clip(num / den, 0.0, cfg.max_scale))
    factor = scale[labels]
    out = np.where(good, cl0 * factor, cl).astype(np.float32)
    # the uncertainty scales with a source brightened by the correction, and never drops below the samples' spread
    out_std = None if std is None else np.where(good, np.asarray(std, np.float64) * np.maximum(factor, 1.0),
                                                std).astype(np.float32)
    return out, out_std, {"background": bkg.astype(np.float32), "labels": labels, "scale": scale[1:]}
