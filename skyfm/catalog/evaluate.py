"""``skyfm evaluate``: one catalog against a truth table or a reference catalog, as numbers, a table and plots.

:func:`evaluate` returns a dict of metrics (see :mod:`skyfm.catalog.metrics`): detection (precision, recall, F1
overall and per SNR / flux bin), localization (median separation, and against the Cramér–Rao bound for isolated
point sources with SNR >= 10 when the truth comes from a simulated skyfm FITS file), flux (bias, scatter, 68%
coverage), classes (accuracy, Brier score, and per class completeness, purity and ROC area, when the truth has a
``class`` or ``class_group`` column) and association with a reference catalog. :func:`format_results` prints it
as a table.

Truth tables: a simulated FITS file written by skyfm (its ``TRUTH`` HDU; the instrument and the image come with
it) or any table file with ``x``, ``y`` (and ``snr``, ``flux`` for the binned metrics).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import astropy.units as u
import numpy as np

from skyfm.catalog.io import read_catalog, read_table
from skyfm.catalog.metrics import (associate, classification_metrics, cramer_rao_position, detection_metrics,
                                   flux_metrics, localization_metrics, read_reference)
from skyfm.errors import SkyfmError
from skyfm.utils import atomic_path


def default_radius_pix(instrument) -> float:
    """The match radius used when none is given: 3 px for counts cubes (0.3 deg on the LAT), else 0.75 PSF FWHM of
    the sharpest band, at least 2 px."""
    if instrument is None:
        return 3.0
    from skyfm.instruments import load_instrument

    inst = load_instrument(instrument)
    if inst.is_counts:
        return 3.0
    return max(2.0, 0.75 * min(inst.psf_fwhm_pix(i) for i in range(inst.n_bands)))


def _require_xy(table, what: str, path) -> None:
    missing = [c for c in ("x", "y") if c not in table.colnames]
    if missing:
        raise SkyfmError(f"{path}: the {what} has no {' or '.join(repr(m) for m in missing)} column "
                         f"(pixel positions are needed; it has {', '.join(table.colnames[:10])})")


def load_truth(path) -> tuple:
    """(truth table, Patch or None): the TRUTH HDU and image of a skyfm FITS file, or any table file."""
    path = Path(path)
    patch = None
    if path.suffix.lower() in (".fits", ".fit", ".fts") and path.is_file():
        from astropy.io import fits

        try:
            with fits.open(path, memmap=False) as hdul:
                is_skyfm = "SKYFMINS" in hdul[0].header and "TRUTH" in [h.name for h in hdul]
        except OSError as e:
            raise SkyfmError(f"{path} is not a readable FITS file ({e})") from None
        if is_skyfm:
            from skyfm.data import read_patch

            patch = read_patch(path)
            return patch.truth, patch
    return read_table(path), patch


def _isolated(truth, radius_pix: float) -> np.ndarray:
    from scipy.spatial import cKDTree

    x = np.asarray(u.Quantity(truth["x"]).value, dtype=np.float64)
    y = np.asarray(u.Quantity(truth["y"]).value, dtype=np.float64)
    flux = np.asarray(u.Quantity(truth["flux"]).value, dtype=np.float64) if "flux" in truth.colnames else np.ones(len(x))
    if len(x) < 2:
        return np.ones(len(x), dtype=bool)
    tree = cKDTree(np.stack([x, y], axis=1))
    out = np.ones(len(x), dtype=bool)
    for i, nb in enumerate(tree.query_ball_point(np.stack([x, y], axis=1), radius_pix)):
        for j in nb:
            if j != i and flux[j] > 0.1 * flux[i]:
                out[i] = False
                break
    return out


def truth_crb(truth, patch, background=None) -> tuple[np.ndarray, np.ndarray]:
    """Cramér–Rao bound (pixels per axis) of each true point source in a simulated patch, and a mask of the
    isolated point sources (no neighbour brighter than 10% of its flux within two PSF FWHM).

    ``background`` (C, H, W): expected background (default ``patch.background_image``, else for counts a smoothed
    ``data - source_image``, for CCDs the sky level recorded in ``patch.meta``)."""
    from scipy import ndimage

    inst = patch.instrument_config()
    scale = inst.pixel_scale_deg
    n = len(truth)
    if n == 0:  # an empty sky: no sources, no bounds
        return np.zeros(0), np.zeros(0, dtype=bool)
    x = np.asarray(u.Quantity(truth["x"]).value, dtype=np.float64)
    y = np.asarray(u.Quantity(truth["y"]).value, dtype=np.float64)
    ix = np.clip(np.round(x).astype(int), 0, patch.width - 1)
    iy = np.clip(np.round(y).astype(int), 0, patch.height - 1)
    psfs, bkg = [], np.zeros((n, patch.n_bands))
    for c, name in enumerate(patch.bands):
        band = inst.band(name)
        seeing = patch.meta.get(f"seeing_{name}")
        psfs.append(band.psf if seeing is None else band.psf_with_fwhm(float(seeing) / 3600.0))
        if background is not None:
            bkg[:, c] = np.asarray(background)[c, iy, ix]
        elif patch.background_image is not None:
            bkg[:, c] = patch.background_image[c, iy, ix]
        elif inst.is_counts and patch.source_image is not None:
            sm = ndimage.gaussian_filter(np.clip(patch.data[c] - patch.source_image[c], 0, None), 3.0)
            bkg[:, c] = np.maximum(sm[iy, ix], 1e-3)
        else:
            bkg[:, c] = float(patch.meta.get(f"sky_{name}", np.median(patch.data[c])))
    if "flux_band" in truth.colnames:
        fb = np.asarray(u.Quantity(truth["flux_band"]).value, dtype=np.float64).reshape(n, -1)
    else:
        fb = np.repeat(np.asarray(u.Quantity(truth["flux"]).value).reshape(n, 1) / patch.n_bands, patch.n_bands, 1)
    point = np.ones(n, dtype=bool)
    if "extension" in truth.colnames:
        point &= np.asarray(u.Quantity(truth["extension"]).value) <= 0
    if "class" in truth.colnames and not inst.is_counts:
        point &= np.asarray(truth["class"]).astype(str) == "star"
    if "saturated" in truth.colnames:
        point &= ~np.asarray(truth["saturated"], dtype=bool)
    gain = None if inst.is_counts else float(inst.noise.get("gain", 1.0))
    rn = 0.0 if inst.is_counts else float(inst.noise.get("read_noise", 0.0))
    crb = np.full(n, np.nan)
    if point.any():
        sel = np.nonzero(point)[0]
        for start in range(0, len(sel), 256):
            k = sel[start:start + 256]
            crb[k] = cramer_rao_position(psfs, fb[k], bkg[k], scale, dx=x[k] - ix[k], dy=y[k] - iy[k], gain=gain,
                                         read_noise=rn)
    fwhm = [p.fwhm_deg / scale for p in psfs]
    iso_r = 2.0 * (float(np.median(fwhm)) if inst.is_counts else float(max(fwhm)))
    return crb, point & _isolated(truth, iso_r)


def evaluate(catalog, truth=None, reference=None, *, radius_pix: float | None = None, snr_min: float = 5.0,
             min_score: float | None = None, snr_key: str = "snr", crb_snr_min: float = 10.0) -> dict:
    """Metrics of ``catalog`` (a table or file) against ``truth`` (a table or file) and/or ``reference``."""
    cat_path = catalog if not hasattr(catalog, "colnames") else "catalog"
    det = read_catalog(catalog) if not hasattr(catalog, "colnames") else catalog
    if truth is not None:
        _require_xy(det, "catalog", cat_path)
    if truth is None and reference is None:
        raise SkyfmError("give a truth table (--truth) or a reference catalog (--reference) to evaluate against")
    results: dict = {"catalog": str(cat_path), "n_det": len(det)}
    if min_score is not None:
        if "score" not in det.colnames:
            raise SkyfmError(f"{cat_path}: the catalog has no 'score' column to cut on")
        det = det[np.asarray(det["score"], dtype=np.float64) >= min_score]
        results["min_score"] = float(min_score)
        results["n_det"] = len(det)
    instrument = det.meta.get("instrument")
    if truth is not None:
        truth_path = truth if not hasattr(truth, "colnames") else "truth"
        if hasattr(truth, "colnames"):
            ttab, patch = truth, None
        else:
            ttab, patch = load_truth(truth)
        _require_xy(ttab, "truth table", truth_path)
        if patch is not None:
            instrument = instrument or patch.instrument
        radius = float(radius_pix) if radius_pix is not None else default_radius_pix(instrument)
        if not radius > 0:
            raise SkyfmError(f"--radius should be a positive number of pixels, got {radius_pix}")
        det_m = detection_metrics(det, ttab, radius, snr_key=snr_key, snr_min=snr_min)
        results["truth"] = str(truth_path)
        results["detection"] = det_m
        d_idx, t_idx = det_m["det_idx"], det_m["truth_idx"]
        loc = localization_metrics(det, ttab, d_idx, t_idx)
        if patch is not None and len(ttab):
            crb, iso = truth_crb(ttab, patch)
            snr = np.asarray(ttab[snr_key], dtype=np.float64) if snr_key in ttab.colnames else np.full(len(ttab), np.inf)
            sel = iso & (snr >= crb_snr_min) & np.isfinite(crb)
            loc_crb = localization_metrics(det, ttab, d_idx, t_idx, crb_pix=crb, select=sel)
            loc.update({f"crb_{k}" if k == "n" else k: v for k, v in loc_crb.items()})
            loc["crb_selection"] = f"isolated point sources with {snr_key} >= {crb_snr_min:g}"
        results["localization"] = loc
        results["flux"] = flux_metrics(det, ttab, d_idx, t_idx)
        classes = classification_metrics(det, ttab, d_idx, t_idx)
        if classes["n"]:
            results["classification"] = classes
    if reference is not None:
        ref = read_reference(reference)
        if not any(c in det.colnames for c in ("ra", "glon")):
            raise SkyfmError(f"{cat_path}: the catalog has no sky coordinates (ra/dec or glon/glat) to associate")
        assoc = associate(det, ref)
        n_assoc = int(np.sum(assoc["assoc_name"] != ""))
        results["association"] = {"reference": str(reference), "n_reference": len(ref), "n_associated": n_assoc,
                                  "fraction": n_assoc / len(det) if len(det) else float("nan"),
                                  "median_sep_deg": float(np.nanmedian(u.Quantity(assoc["assoc_sep"]).value))
                                  if n_assoc else float("nan")}
    return results


def _fmt(v, spec=".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def format_results(r: dict) -> str:
    """The metrics as a human-readable table."""
    lines = [f"catalog: {r['catalog']}  ({r['n_det']} detections"
             + (f" with score >= {r['min_score']:g}" if "min_score" in r else "") + ")"]
    d = r.get("detection")
    if d:
        lines.append(f"truth:   {r['truth']}  ({d['n_truth']} sources, {d['n_should']} with snr >= {d['snr_min']:g}); "
                     f"match radius {d['radius_pix']:g} pix")
        lines.append("")
        lines.append(f"  precision {_fmt(d['precision'])}   recall {_fmt(d['recall'])}   F1 {_fmt(d['f1'])}   "
                     f"(TP {d['tp']}, FP {d['fp']}, FN {d['fn']}, matched fainter sources {d['neither']})")
        lines.append("")
        lines.append(f"  {'recall per bin':<24} {'n':>5} {'found':>6}  recall")
        for name, key in (("snr", "per_snr"), ("flux", "per_flux")):
            for b in d.get(key, []):
                if b["n"] == 0:
                    continue
                hi = "inf" if not math.isfinite(b["hi"]) else f"{b['hi']:.3g}"
                label = f"{name} {b['lo']:.3g}-{hi}"
                lines.append(f"  {label:<24} {b['n']:>5} {b['found']:>6}  {_fmt(b['recall'], '.3f'):>6}")
    loc = r.get("localization")
    if loc:
        lines.append("")
        lines.append(f"  localization: median separation {_fmt(loc.get('median_sep_pix'))} pix over {loc['n']} matches")
        if "median_sep_over_crb" in loc:
            lines.append(f"                median separation / (1.18 CRB) {_fmt(loc['median_sep_over_crb'], '.2f')} "
                         f"over {loc.get('crb_n', 0)} {loc.get('crb_selection', '')} (1.0 = at the bound)")
    fl = r.get("flux")
    if fl and fl.get("n"):
        lines.append(f"  flux: median bias {_fmt(fl['bias'], '+.3f')}, scatter {_fmt(fl['scatter'])}, "
                     f"68% interval coverage {_fmt(fl['coverage68'], '.2f')} over {fl['n']} matches")
    c = r.get("classification")
    if c and c.get("n"):
        lines.append(f"  classes ({c['truth_key']}): accuracy {_fmt(c['accuracy'])}, Brier score {_fmt(c['brier'])} "
                     f"over {c['n']} matches")
        lines.append(f"  {'true class':<12} {'n':>5}  completeness  purity    AUC   called as " + " / ".join(c["class_names"]))
        for name, row in zip(c["class_names"], c["confusion"]):
            p = c["per_class"][name]
            lines.append(f"  {name:<12} {p['n_true']:>5}  {_fmt(p['completeness']):>12}  {_fmt(p['purity']):>6}  "
                         f"{_fmt(p['auc']):>5}   " + " / ".join(str(v) for v in row))
    a = r.get("association")
    if a:
        lines.append("")
        lines.append(f"  association with {a['reference']} ({a['n_reference']} sources): {a['n_associated']} of "
                     f"{r['n_det']} detections associated ({_fmt(a['fraction'], '.3f')}), median separation "
                     f"{_fmt(a['median_sep_deg'], '.4f')} deg")
    return "\n".join(lines)


def to_jsonable(obj):
    """Scalars and per-bin lists of the results, without per-source arrays."""
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items() if not isinstance(v, np.ndarray)}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def check_output_path(path, suffixes: tuple[str, ...], option: str) -> None:
    """A one-line SkyfmError before any work when an output path cannot be written."""
    if path is None:
        return
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise SkyfmError(f"{option} {p}: the file name should end in {' or '.join(suffixes)}")
    if p.is_dir():
        raise SkyfmError(f"{option} {p} is a folder; give a file name")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    import os

    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise SkyfmError(f"{option} {p}: cannot write into {parent}")


def write_json(results: dict, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_jsonable(results), indent=2) + "\n")
    return path
