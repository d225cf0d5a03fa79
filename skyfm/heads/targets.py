"""Dense training targets of the detector heads from a truth catalog (simulated truth or a reference catalog).

For each patch (H x W pixels) :func:`build_targets` makes:

* ``heat`` (H, W): Gaussian centre targets (:func:`~skyfm.heads.localization.render_gaussian`) of the sources with
  ``snr >= min_target_snr`` (a reference catalog without ``snr`` counts every row);
* ``neg_weight`` (H, W): weight of the heatmap's negative term: 0 on invalid / padding pixels and around faint true
  sources (``ignore_snr <= snr < min_target_snr``: neither found nor missed), ``contaminant_weight`` on
  contaminant pixels (so cosmic rays and trails are learned as "no source"), 1 elsewhere;
* regression targets on the 3 x 3 pixels around each target source (each pixel to its nearest source): the
  sub-pixel offset ``dx, dy`` (source position minus pixel centre), ln total flux and ln flux per band (units of
  :mod:`skyfm.heads.flux`), class index and extension (:mod:`skyfm.heads.classification`).
"""

from __future__ import annotations

import numpy as np

from skyfm.heads.classification import class_index, extension_target
from skyfm.heads.config import DetectorConfig, InstrumentHeadConfig
from skyfm.heads.flux import log_flux_target
from skyfm.heads.localization import render_gaussian

ARTEFACT_BITS = 1 | 2 | 8 | 16 | 32  # CONTAMINANT_BITS except "saturated" (4)


def _column(truth, name, n, default=np.nan) -> np.ndarray:
    if truth is None or name not in truth.colnames:
        return np.full(n, default, dtype=np.float64)
    col = truth[name]
    value = getattr(col, "value", col)
    return np.asarray(value, dtype=np.float64)


def build_targets(truth, shape: tuple[int, int], head: InstrumentHeadConfig, bands: list[str], units: np.ndarray,
                  config: DetectorConfig, contaminant: np.ndarray | None = None,
                  pixel_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The target maps of one patch (module docstring). ``units`` (C,) flux units of the patch's bands."""
    H, W = shape
    nb = head.n_bands
    heat = np.zeros((H, W), np.float32)
    neg_weight = np.ones((H, W), np.float32)
    if contaminant is not None:
        # artefacts (cosmic rays, trails, bleeding, hot and dead pixels) are insisted on as "no source"; saturated
        # pixels are not: they are the cores of real bright stars, which must be found
        artefact = (np.asarray(contaminant) & ARTEFACT_BITS).any(axis=0)
        neg_weight[artefact] = config.contaminant_weight
    reg = np.zeros((H, W), bool)
    best = np.full((H, W), np.inf, np.float32)
    tx, ty = np.zeros((H, W), np.float32), np.zeros((H, W), np.float32)
    tflux = np.full((H, W), np.nan, np.float32)
    tband = np.full((nb, H, W), np.nan, np.float32)
    tcls = np.full((H, W), -1, np.int64)
    text = np.full((H, W), np.nan, np.float32)

    n = 0 if truth is None else len(truth)
    if n:
        x, y = _column(truth, "x", n), _column(truth, "y", n)
        snr = _column(truth, "snr", n, default=np.inf)
        snr = np.where(np.isfinite(snr) | np.isinf(snr), snr, 0.0)
        units = np.asarray(units, dtype=np.float64)
        band_index = [head.bands.index(b) if b in head.bands else -1 for b in bands]
        ln_flux = log_flux_target(_column(truth, "flux", n), float(units.sum()))
        ln_band = np.full((n, nb), np.nan, np.float32)
        if "flux_band" in truth.colnames:
            fb = np.asarray(getattr(truth["flux_band"], "value", truth["flux_band"]), dtype=np.float64)
            fb = fb.reshape(n, -1)
            for j, k in enumerate(band_index):
                if k >= 0 and j < fb.shape[1]:
                    ln_band[:, k] = log_flux_target(fb[:, j], units[j])
        cls = class_index(truth, head.class_names, head.kind)
        ext = extension_target(_column(truth, "extension", n, default=0.0), head.pixel_scale_deg)
        sigma = head.heat_sigma_pix
        cx_all, cy_all = np.rint(x).astype(int), np.rint(y).astype(int)
        for i in range(n):
            cx, cy = cx_all[i], cy_all[i]
            if not (0 <= cx < W and 0 <= cy < H):
                continue
            if snr[i] >= config.min_target_snr:
                render_gaussian(heat, cx, cy, sigma)
                r = int(np.ceil(2 * sigma))  # a star's own core is never an artefact negative
                box = neg_weight[max(cy - r, 0):cy + r + 1, max(cx - r, 0):cx + r + 1]
                np.minimum(box, 1.0, out=box)
                y0, y1, x0, x1 = max(cy - 1, 0), min(cy + 2, H), max(cx - 1, 0), min(cx + 2, W)
                yy, xx = np.mgrid[y0:y1, x0:x1]
                d = (xx - x[i]) ** 2 + (yy - y[i]) ** 2
                win = d < best[y0:y1, x0:x1]
                best[y0:y1, x0:x1][win] = d[win]
                reg[y0:y1, x0:x1] |= win
                tx[y0:y1, x0:x1][win] = (x[i] - xx)[win]
                ty[y0:y1, x0:x1][win] = (y[i] - yy)[win]
                tflux[y0:y1, x0:x1][win] = ln_flux[i]
                for k in range(nb):
                    tband[k, y0:y1, x0:x1][win] = ln_band[i, k]
                tcls[y0:y1, x0:x1][win] = cls[i]
                text[y0:y1, x0:x1][win] = ext[i]
            elif snr[i] >= config.ignore_snr:
                r = 2
                neg_weight[max(cy - r, 0):cy + r + 1, max(cx - r, 0):cx + r + 1] = 0.0
        # a faint neighbour's ignore box must not hide a bright source's own negatives-free peak: positives are
        # scored wherever heat == 1 regardless of neg_weight.
    if pixel_mask is not None:
        neg_weight[np.asarray(pixel_mask, bool)] = 0.0
    return {"heat": heat, "neg_weight": neg_weight, "reg": reg, "dx": tx, "dy": ty, "flux": tflux,
            "band_flux": tband, "cls": tcls, "extension": text}


__all__ = ["build_targets"]
