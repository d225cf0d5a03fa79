"""How good is a catalog: detection, localization, photometry and association metrics against a truth.

**Which true sources count.** A true source "should be found" when its ``snr`` (the simulator's truth column)
is at least ``snr_min`` (5). Detections are matched one-to-one to *all* true sources within ``radius_pix``
(:func:`skyfm.catalog.match_catalogs`); then

* a detection matched to a source that should be found is a true positive (TP);
* a detection matched to a fainter true source is **neither** TP nor FP: finding a real source below the
  completeness limit is not an error, and not required either;
* an unmatched detection is a false positive (FP); an unmatched source that should be found is a false negative.

precision = TP / (TP + FP), recall = TP / (TP + FN), F1 their harmonic mean. Recall is also given per SNR and per
flux bin for every true source (faint bins included).

**Score sweeps.** :func:`score_sweep` orders detections by ``score`` and matches them greedily in that order (each
true source to the highest-scoring detection within the radius, the COCO convention), so one pass gives
precision and recall at every threshold; sweeps of several images concatenate (:func:`concat_sweeps`).
:func:`best_f1` picks the threshold of highest F1; :func:`recall_at_precision` gives the recall of sources in an
SNR range (3-5) at the lowest threshold where the precision reaches a target (counting, for that precision, every
true source with snr >= the range's lower edge as a true positive).

**Localization** is compared with the Cramér–Rao bound (:func:`cramer_rao_position`): the smallest position
scatter any unbiased estimator can reach, from the Fisher information of the pixel-integrated PSF model, for
Poisson counts or a CCD image (Poisson source + sky, Gaussian read noise).

**Association** with a reference catalog (4FGL-DR2 and the like): :func:`associate` adds ``assoc_name`` and
``assoc_sep`` to each detection inside a reference source's 95% error ellipse (widened by the detection's own 95%
radius).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.table import Table

from skyfm.catalog.match import match_catalogs, xy_of
from skyfm.errors import SkyfmError

SNR_BINS = (0.0, 3.0, 5.0, 10.0, 20.0, 50.0, np.inf)
R95_PER_SIGMA = 2.4477  # radius of 95% containment of a circular 2-D Gaussian, in units of its sigma per axis


def _col(table, name, default=None) -> np.ndarray | None:
    if table is None or name not in table.colnames:
        return default
    return np.asarray(u.Quantity(table[name]).value if hasattr(table[name], "unit") and table[name].unit is not None
                      else table[name], dtype=np.float64)


def _prf(tp, fp, fn):
    precision = tp / (tp + fp) if tp + fp > 0 else float("nan")
    recall = tp / (tp + fn) if tp + fn > 0 else float("nan")
    if np.isfinite(precision) and np.isfinite(recall) and precision + recall > 0:
        f1 = 2 * precision * recall / (precision + recall)
    else:
        f1 = 0.0 if (tp + fn > 0 or tp + fp > 0) else float("nan")
    return precision, recall, f1


def detection_metrics(det, truth, radius_pix: float, snr_key: str = "snr", *, score_key: str = "score",
                      min_score: float | None = None, snr_min: float = 5.0, snr_bins=SNR_BINS,
                      flux_bins=None, flux_key: str = "flux") -> dict:
    """Precision, recall and F1 of ``det`` against ``truth`` (module docstring), overall and per bin.

    Args:
        det: catalog with ``x``, ``y`` (and ``score`` when ``min_score`` is given).
        truth: true sources with ``x``, ``y`` and ``snr_key`` (and ``flux_key`` for flux bins).
        radius_pix: match radius.
        min_score: keep only detections with ``score >= min_score``.
        snr_bins, flux_bins: bin edges for recall per bin (flux bins default: 8 log bins over the truth's range).

    Returns:
        dict: ``tp``, ``fp``, ``fn``, ``neither``, ``precision``, ``recall``, ``f1``, ``n_det``, ``n_truth``,
        ``snr_min``, ``radius_pix``, ``per_snr`` and ``per_flux`` (lists of {lo, hi, n, found, recall}), and the
        matches (``det_idx``, ``truth_idx``, ``sep_pix``) for further metrics.
    """
    if min_score is not None:
        score = _col(det, score_key)
        if score is None:
            raise SkyfmError(f"the catalog has no '{score_key}' column to cut on")
        det = det[score >= min_score]
    d_idx, t_idx, sep = match_catalogs(det, truth, radius_pix)
    n_det = len(det)
    n_truth = len(truth)
    snr = _col(truth, snr_key)
    if snr is None:
        if n_truth:
            warnings.warn(f"truth has no '{snr_key}' column: every true source counts as one to find", stacklevel=2)
        snr = np.full(n_truth, np.inf)
    should = snr >= snr_min
    tp = int(np.sum(should[t_idx]))
    neither = int(len(t_idx) - tp)
    fp = int(n_det - len(d_idx))
    fn = int(np.sum(should) - tp)
    precision, recall, f1 = _prf(tp, fp, fn)
    found = np.zeros(n_truth, dtype=bool)
    found[t_idx] = True
    per_snr = _per_bin(snr, found, snr_bins)
    per_flux = []
    flux = _col(truth, flux_key)
    if flux is not None and n_truth:
        if flux_bins is None:
            pos = flux[flux > 0]
            if len(pos):
                flux_bins = np.logspace(np.log10(pos.min()), np.log10(pos.max()) + 1e-9, 9)
        if flux_bins is not None:
            per_flux = _per_bin(flux, found, flux_bins)
    return {"tp": tp, "fp": fp, "fn": fn, "neither": neither, "precision": precision, "recall": recall, "f1": f1,
            "n_det": n_det, "n_truth": n_truth, "n_should": int(np.sum(should)), "snr_min": snr_min,
            "radius_pix": float(radius_pix), "per_snr": per_snr, "per_flux": per_flux,
            "det_idx": d_idx, "truth_idx": t_idx, "sep_pix": sep}


def _per_bin(values, found, edges):
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (values >= lo) & (values < hi)
        n = int(sel.sum())
        k = int(found[sel].sum())
        out.append({"lo": float(lo), "hi": float(hi), "n": n, "found": k, "recall": k / n if n else float("nan")})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Score sweeps
# ----------------------------------------------------------------------------------------------------------------
def score_sweep(det, truth, radius_pix: float, snr_key: str = "snr", score_key: str = "score") -> dict:
    """Detections ordered by score, each with the snr of the true source it matches (NaN: none).

    Returns a dict of arrays: ``score`` (descending), ``match_snr`` (per detection), ``truth_snr`` (every true
    source) and, for bookkeeping, ``match_truth`` (index into the truth, -1 when unmatched).
    """
    dx, dy = xy_of(det)
    tx, ty = xy_of(truth)
    score = _col(det, score_key)
    if score is None:
        raise SkyfmError(f"the catalog has no '{score_key}' column for a precision-recall sweep")
    snr = _col(truth, snr_key)
    if snr is None:
        snr = np.full(len(tx), np.inf)
    order = np.argsort(-score, kind="stable")
    match = np.full(len(dx), -1, dtype=np.int64)
    if len(tx) and len(dx):
        from scipy.spatial import cKDTree

        tree = cKDTree(np.stack([tx, ty], axis=1))
        taken = np.zeros(len(tx), dtype=bool)
        cands = tree.query_ball_point(np.stack([dx, dy], axis=1)[order], radius_pix)
        for rank, i in enumerate(order):
            best, best_d = -1, np.inf
            for j in cands[rank]:
                if not taken[j]:
                    d = (tx[j] - dx[i]) ** 2 + (ty[j] - dy[i]) ** 2
                    if d < best_d:
                        best, best_d = j, d
            if best >= 0:
                taken[best] = True
                match[rank] = best
    match_snr = np.full(len(dx), np.nan)
    match_snr[match >= 0] = snr[match[match >= 0]]  # an image with no true source matches nothing
    return {"score": score[order], "match_snr": match_snr,
            "truth_snr": snr, "match_truth": match}


def concat_sweeps(sweeps: list[dict]) -> dict:
    """One sweep from the sweeps of several images (scores re-sorted)."""
    if not sweeps:
        return {"score": np.zeros(0), "match_snr": np.zeros(0), "truth_snr": np.zeros(0), "match_truth": np.zeros(0, int)}
    score = np.concatenate([s["score"] for s in sweeps])
    msnr = np.concatenate([s["match_snr"] for s in sweeps])
    order = np.argsort(-score, kind="stable")
    return {"score": score[order], "match_snr": msnr[order],
            "truth_snr": np.concatenate([s["truth_snr"] for s in sweeps]),
            "match_truth": np.full(len(score), -2, dtype=np.int64)}


def precision_recall_curve(sweep: dict, snr_min: float = 5.0) -> dict:
    """Precision, recall and F1 at every distinct score threshold of a sweep (arrays, thresholds descending)."""
    score = sweep["score"]
    msnr = sweep["match_snr"]
    n_should = int(np.sum(sweep["truth_snr"] >= snr_min))
    is_tp = np.nan_to_num(msnr, nan=-np.inf) >= snr_min
    is_fp = np.isnan(msnr)
    ctp = np.cumsum(is_tp)
    cfp = np.cumsum(is_fp)
    if len(score) == 0:
        return {"threshold": np.zeros(0), "precision": np.zeros(0), "recall": np.zeros(0), "f1": np.zeros(0),
                "n_should": n_should}
    last = np.r_[score[1:] != score[:-1], True]  # the last detection of each distinct score
    tp, fp, thr = ctp[last].astype(float), cfp[last].astype(float), score[last]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        recall = tp / n_should if n_should else np.full(len(tp), np.nan)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {"threshold": thr, "precision": precision, "recall": recall, "f1": np.nan_to_num(f1), "n_should": n_should}


def best_f1(sweep: dict, snr_min: float = 5.0) -> dict:
    """The threshold of highest F1 and the precision, recall and F1 there."""
    c = precision_recall_curve(sweep, snr_min)
    if len(c["f1"]) == 0:
        return {"threshold": float("nan"), "precision": float("nan"), "recall": 0.0, "f1": 0.0}
    k = int(np.argmax(c["f1"]))
    return {"threshold": float(c["threshold"][k]), "precision": float(c["precision"][k]),
            "recall": float(c["recall"][k]), "f1": float(c["f1"][k])}


def metrics_at_threshold(sweep: dict, threshold: float, snr_min: float = 5.0) -> dict:
    """Precision, recall and F1 of the detections with score >= threshold."""
    keep = sweep["score"] >= threshold
    msnr = sweep["match_snr"][keep]
    tp = int(np.sum(np.nan_to_num(msnr, nan=-np.inf) >= snr_min))
    fp = int(np.sum(np.isnan(msnr)))
    fn = int(np.sum(sweep["truth_snr"] >= snr_min)) - tp
    p, r, f = _prf(tp, fp, fn)
    return {"threshold": float(threshold), "precision": p, "recall": r, "f1": f, "tp": tp, "fp": fp, "fn": fn}


def recall_at_precision(sweep: dict, precision: float = 0.9, snr_range=(3.0, 5.0)) -> dict:
    """Recall of true sources with ``snr_range[0] <= snr < snr_range[1]`` at the lowest score threshold whose
    precision (true positives: matches to any source with snr >= ``snr_range[0]``) is still >= ``precision``.

    Returns dict: ``recall``, ``threshold``, ``precision`` (reached), ``n`` (sources in the range); recall 0 and
    threshold NaN when the target precision is never reached.
    """
    lo, hi = snr_range
    score, msnr, tsnr = sweep["score"], np.nan_to_num(sweep["match_snr"], nan=-np.inf), sweep["truth_snr"]
    n_range = int(np.sum((tsnr >= lo) & (tsnr < hi)))
    if len(score) == 0:
        return {"recall": 0.0, "threshold": float("nan"), "precision": float("nan"), "n": n_range}
    is_tp = msnr >= lo
    is_fp = np.isnan(sweep["match_snr"])
    ctp, cfp = np.cumsum(is_tp), np.cumsum(is_fp)
    in_range = np.cumsum((msnr >= lo) & (msnr < hi))
    last = np.r_[score[1:] != score[:-1], True]
    idx = np.nonzero(last)[0]
    prec = ctp[idx] / np.maximum(ctp[idx] + cfp[idx], 1)
    ok = np.nonzero(prec >= precision)[0]
    if len(ok) == 0:
        return {"recall": 0.0, "threshold": float("nan"), "precision": float(prec.max()) if len(prec) else float("nan"),
                "n": n_range}
    k = idx[ok[-1]]
    return {"recall": float(in_range[k] / n_range) if n_range else float("nan"), "threshold": float(score[k]),
            "precision": float(prec[ok[-1]]), "n": n_range}


# ----------------------------------------------------------------------------------------------------------------
# Cramér–Rao bound
# ----------------------------------------------------------------------------------------------------------------
def cramer_rao_position(psf, flux, background, pixel_scale_deg: float, *, dx=0.0, dy=0.0, gain: float | None = None,
                        read_noise: float = 0.0, radius_pix: int | None = None, step: float = 0.01) -> np.ndarray:
    """The Cramér–Rao bound on the position (1-sigma per axis, pixels) of point sources.

    The Fisher information of the pixel-integrated model ``mu = B + F P(x - x0, y - y0)`` for the parameters
    (x0, y0, F_1 .. F_C) — fluxes are nuisance parameters, the background is known — summed over bands, with
    derivatives by central differences of the exact pixel-integrated PSF (:meth:`PSF.stamps`).

    Args:
        psf: a :class:`~skyfm.instruments.psf.PSF`, or a list of them (one per band).
        flux: (N,) total flux per source in counts / ADU, or (N, C) per band.
        background: expected background per pixel (counts or ADU): scalar, (N,) or (N, C).
        pixel_scale_deg: pixel side.
        dx, dy: sub-pixel offsets of each source from its pixel centre (the bound depends on them for
            undersampled PSFs); scalars or (N,).
        gain: None for Poisson counts (variance = mu); for a CCD image in ADU, e-/ADU: variance = mu / gain +
            (read_noise / gain)^2 with ``read_noise`` in e-.

    Returns:
        (N,) sqrt of the mean of the x and y variance bounds, pixels.
    """
    psfs = list(psf) if isinstance(psf, (list, tuple)) else [psf]
    nb = len(psfs)
    flux = np.asarray(flux, dtype=np.float64)
    n = flux.shape[0] if flux.ndim else 1
    flux = flux.reshape(n, -1)
    if flux.shape[1] == 1 and nb > 1:
        flux = np.repeat(flux / nb, nb, axis=1)
    if flux.shape[1] != nb:
        raise SkyfmError(f"flux has {flux.shape[1]} bands for {nb} PSFs")
    bkg = np.asarray(background, dtype=np.float64)
    if bkg.ndim == 0:
        bkg = np.full((n, nb), float(bkg))
    elif bkg.ndim == 1:
        bkg = np.repeat(bkg.reshape(n, 1), nb, axis=1) if len(bkg) == n else np.broadcast_to(bkg, (n, nb))
    bkg = np.broadcast_to(bkg, (n, nb))
    dx = np.broadcast_to(np.asarray(dx, dtype=np.float64), (n,))
    dy = np.broadcast_to(np.asarray(dy, dtype=np.float64), (n,))
    npar = 2 + nb
    fisher = np.zeros((n, npar, npar))
    for c, p in enumerate(psfs):
        r = radius_pix if radius_pix is not None else p.stamp_radius_pix(pixel_scale_deg, 0.995, 64)
        base = p.stamps(dx, dy, pixel_scale_deg, radius_pix=r)
        gx = (p.stamps(dx + step, dy, pixel_scale_deg, radius_pix=r) - p.stamps(dx - step, dy, pixel_scale_deg, radius_pix=r)) / (2 * step)
        gy = (p.stamps(dx, dy + step, pixel_scale_deg, radius_pix=r) - p.stamps(dx, dy - step, pixel_scale_deg, radius_pix=r)) / (2 * step)
        f = flux[:, c][:, None, None]
        mu = bkg[:, c][:, None, None] + f * base
        var = np.maximum(mu, 1e-12) if gain is None else np.maximum(mu / gain + (read_noise / gain) ** 2, 1e-12)
        # model mu = B + F P(x - x0): d mu / d x0 = -F dP/dx; signs cancel in the Fisher matrix except cross terms
        derivs = [-f * gx, -f * gy] + [base if k == c else np.zeros_like(base) for k in range(nb)]
        flat = np.stack([d.reshape(n, -1) for d in derivs], axis=1)  # (N, npar, npix)
        fisher += np.einsum("npk,nqk->npq", flat / var.reshape(n, 1, -1), flat)
    idx = np.arange(nb) + 2
    used = np.ones(npar, dtype=bool)
    used[idx[flux.max(axis=0) <= 0]] = False  # bands with no flux carry no flux parameter
    out = np.full(n, np.nan)
    for i in range(n):
        fm = fisher[i][np.ix_(used, used)]
        try:
            cov = np.linalg.inv(fm)
            out[i] = np.sqrt(max(0.5 * (cov[0, 0] + cov[1, 1]), 0.0))
        except np.linalg.LinAlgError:
            pass
    return out


def localization_metrics(det, truth, det_idx, truth_idx, crb_pix=None, select=None) -> dict:
    """Median separation (pixels) of matched pairs, and median separation / CRB when ``crb_pix`` (per true source)
    is given; ``select`` (bool per true source) restricts to some sources (isolated, SNR >= 10...).

    The separation of a 2-D position with per-axis sigma s has median 1.177 s: the ratio reported is
    median(sep) / median(1.177 CRB), which is 1 for an estimator at the bound."""
    dx, dy = xy_of(det)
    tx, ty = xy_of(truth)
    d_idx, t_idx = np.asarray(det_idx), np.asarray(truth_idx)
    if select is not None:
        keep = np.asarray(select)[t_idx]
        d_idx, t_idx = d_idx[keep], t_idx[keep]
    sep = np.hypot(dx[d_idx] - tx[t_idx], dy[d_idx] - ty[t_idx])
    out = {"n": int(len(sep)), "median_sep_pix": float(np.median(sep)) if len(sep) else float("nan")}
    if crb_pix is not None and len(sep):
        crb = np.asarray(crb_pix)[t_idx]
        ok = np.isfinite(crb) & (crb > 0)
        out["median_crb_pix"] = float(np.median(crb[ok])) if ok.any() else float("nan")
        out["median_sep_over_crb"] = (float(np.median(sep[ok] / (1.1774 * crb[ok]))) if ok.any() else float("nan"))
        out["sep_over_crb"] = sep[ok] / crb[ok]
    return out


def flux_metrics(det, truth, det_idx, truth_idx, flux_key: str = "flux", select=None) -> dict:
    """Flux recovery of matched pairs: median bias and robust scatter of (measured - true) / true, and the
    fraction of true fluxes inside the 1-sigma (68%) interval flux +- flux_err when ``flux_err`` exists."""
    d_idx, t_idx = np.asarray(det_idx), np.asarray(truth_idx)
    if select is not None:
        keep = np.asarray(select)[t_idx]
        d_idx, t_idx = d_idx[keep], t_idx[keep]
    fd = _col(det, "flux")
    ft = _col(truth, flux_key)
    if fd is None or ft is None or len(d_idx) == 0:
        return {"n": int(len(d_idx)), "bias": float("nan"), "scatter": float("nan"), "coverage68": float("nan")}
    fd, ft = fd[d_idx], ft[t_idx]
    ok = np.isfinite(fd) & np.isfinite(ft) & (ft > 0)
    rel = (fd[ok] - ft[ok]) / ft[ok]
    out = {"n": int(ok.sum()), "bias": float(np.median(rel)) if ok.any() else float("nan"),
           "scatter": float(1.4826 * np.median(np.abs(rel - np.median(rel)))) if ok.any() else float("nan"),
           "coverage68": float("nan")}
    fe = _col(det, "flux_err")
    if fe is not None:
        fe = fe[d_idx][ok]
        good = np.isfinite(fe) & (fe > 0)
        if good.any():
            out["coverage68"] = float(np.mean(np.abs(fd[ok][good] - ft[ok][good]) <= fe[good]))
            out["n_coverage"] = int(good.sum())
    out["ratio"] = fd[ok] / ft[ok]
    out["true_flux"] = ft[ok]
    return out


def rank_auc(positive, score) -> float:
    """Area under the ROC curve of ``score`` for the ``positive`` rows (Mann-Whitney, ties counted half): the
    chance that a random positive scores above a random negative; NaN without both."""
    positive, score = np.asarray(positive, bool), np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(det, truth, det_idx, truth_idx, class_names=None, truth_key: str | None = None) -> dict:
    """Class probabilities of matched pairs against the true classes.

    ``class_names`` default to the catalog's ``meta['class_names']``; the true class is ``truth_key`` (default
    ``class_group`` when the truth has it, as counts cubes' classes ``agn / pulsar / other``, else ``class``), and
    pairs whose true class is not one of the names are left out. Returns ``n``, ``accuracy`` (the most probable
    class is the true one), ``brier`` (mean squared distance of the probability vector from the true class's
    one-hot vector: 0 perfect, 2 worst), ``confusion`` (K x K counts: rows true, columns called), and per class
    ``n_true``, ``completeness`` (share of that class called it), ``purity`` (share of those called it that are
    it) and ``auc`` (ROC area of its probability, one against the rest)."""
    names = list(class_names if class_names is not None else det.meta.get("class_names", []))
    out = {"n": 0, "class_names": names}
    if not names or "class_prob" not in det.colnames:
        return out
    key = truth_key or next((k for k in ("class_group", "class") if k in truth.colnames), None)
    if key is None or key not in truth.colnames:
        return out
    lookup = {c.lower(): i for i, c in enumerate(names)}
    d_idx, t_idx = np.asarray(det_idx, int), np.asarray(truth_idx, int)
    true = np.array([lookup.get(str(v).strip().lower(), -1) for v in np.asarray(truth[key])[t_idx]], dtype=int)
    keep = true >= 0
    prob = np.asarray(det["class_prob"], dtype=np.float64)
    prob = (prob.reshape(len(det), -1) if len(det) else np.zeros((0, len(names))))[d_idx[keep]]
    true = true[keep]
    k = len(names)
    called = prob.argmax(axis=1) if len(prob) else np.zeros(0, int)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (true, called), 1)
    onehot = np.eye(k)[true]
    out.update({"n": int(len(true)), "truth_key": key, "accuracy": float(np.mean(called == true)) if len(true) else
                float("nan"), "brier": float(np.mean(((prob - onehot) ** 2).sum(axis=1))) if len(true) else
                float("nan"), "confusion": confusion.tolist()})
    per = {}
    for i, name in enumerate(names):
        n_called = int(confusion[:, i].sum())
        per[name] = {"n_true": int(confusion[i].sum()),
                     "completeness": float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else float("nan"),
                     "purity": float(confusion[i, i] / n_called) if n_called else float("nan"),
                     "auc": rank_auc(true == i, prob[:, i])}
    out["per_class"] = per
    return out


# ----------------------------------------------------------------------------------------------------------------
# Association with a reference catalog
# ----------------------------------------------------------------------------------------------------------------
_NAME_COLS = ("Source_Name", "name", "NAME", "source_name", "Name", "id", "ID")
_LON_LAT = (("glon", "glat", "galactic"), ("GLON", "GLAT", "galactic"), ("ra", "dec", "icrs"),
            ("RAJ2000", "DEJ2000", "icrs"), ("RA", "DEC", "icrs"), ("RA", "Dec", "icrs"))


def _sky(table, what: str):
    from astropy.coordinates import SkyCoord

    for lon, lat, frame in _LON_LAT:
        if lon in table.colnames and lat in table.colnames:
            return SkyCoord(u.Quantity(np.asarray(table[lon], dtype=np.float64), u.deg),
                            u.Quantity(np.asarray(table[lat], dtype=np.float64), u.deg), frame=frame)
    raise SkyfmError(f"the {what} has no sky coordinates (glon/glat or ra/dec columns)")


def read_reference(reference) -> Table:
    """A reference catalog from a Table or a file (the 4FGL FITS catalog reads its LAT_Point_Source_Catalog HDU)."""
    if isinstance(reference, Table):
        return reference
    path = Path(reference)
    if not path.exists():
        raise SkyfmError(f"reference catalog not found: {path}")
    from skyfm.catalog.io import read_table

    if path.suffix.lower() in (".fit", ".fits", ".fts", ".gz"):
        from astropy.io import fits

        try:
            with fits.open(path, memmap=False) as hdul:
                names = [h.name for h in hdul]
                if "LAT_POINT_SOURCE_CATALOG" in names:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        return Table.read(hdul["LAT_POINT_SOURCE_CATALOG"])
        except OSError as e:
            raise SkyfmError(f"{path} is not a readable FITS file ({e})") from None
    return read_table(path)


def associate(catalog, reference, *, radius_deg: float | None = None, name_col: str | None = None,
              pos_err_floor_deg: float = 0.0):
    """Add ``assoc_name`` and ``assoc_sep`` (deg) to ``catalog``: the nearest reference source whose 95% error
    ellipse (``Conf_95_SemiMajor``, ``Conf_95_SemiMinor``, ``Conf_95_PosAng``; 4FGL columns), widened in
    quadrature by the detection's own 95% radius (2.45 ``pos_err``), contains the detection.

    Reference sources without an ellipse (NaN, or no such columns: a simulated truth) use ``radius_deg``
    (default 0.1 deg) as their 95% radius. Returns a copy of the catalog with the two columns ('' and NaN where
    nothing is associated); ``meta['assoc_reference']`` names the reference.
    """
    from astropy.coordinates import SkyCoord

    ref = read_reference(reference)
    out = catalog.copy()
    det = _sky(out, "catalog")
    refc = _sky(ref, "reference catalog")
    names = None
    for c in ((name_col,) if name_col else _NAME_COLS):
        if c and c in ref.colnames:
            names = np.asarray([str(s).strip() for s in ref[c]])
            break
    if names is None:
        names = np.asarray([f"REF{i}" for i in range(len(ref))])
    fallback = 0.1 if radius_deg is None else float(radius_deg)
    a = _col(ref, "Conf_95_SemiMajor", np.full(len(ref), np.nan))
    b = _col(ref, "Conf_95_SemiMinor", np.full(len(ref), np.nan))
    pa = _col(ref, "Conf_95_PosAng", np.zeros(len(ref)))
    bad = ~np.isfinite(a) | (a <= 0)
    a = np.where(bad, fallback, a)
    b = np.where(bad | ~np.isfinite(b) | (b <= 0), a, b)
    pa = np.nan_to_num(pa)
    if "pos_err" in out.colnames and u.Quantity(out["pos_err"]).unit.physical_type == "angle":
        r_det = R95_PER_SIGMA * np.nan_to_num(u.Quantity(out["pos_err"]).to_value(u.deg))
    else:
        r_det = np.zeros(len(out))
    r_det = np.maximum(r_det, pos_err_floor_deg)
    assoc_name = np.full(len(out), "", dtype=object)
    assoc_sep = np.full(len(out), np.nan)
    if len(out) and len(ref):
        search = float(np.max(a)) + float(np.max(r_det, initial=0.0)) + 1e-9
        idx_r, idx_d, sep2d, _ = det.search_around_sky(refc.transform_to(det.frame), search * u.deg)
        if len(idx_d):
            # offsets of the detection from the reference source in the reference's frame, along its ellipse axes
            r_icrs = refc[idx_r].icrs
            d_icrs = det[idx_d].icrs
            pos_ang = r_icrs.position_angle(d_icrs).to_value(u.rad)  # east of north
            s = sep2d.to_value(u.deg)
            theta = pos_ang - np.deg2rad(pa[idx_r])
            along, across = s * np.cos(theta), s * np.sin(theta)
            aa = np.hypot(a[idx_r], r_det[idx_d])
            bb = np.hypot(b[idx_r], r_det[idx_d])
            inside = (along / aa) ** 2 + (across / bb) ** 2 <= 1.0
            best = {}
            for i, j, sj, ok in zip(idx_d, idx_r, s, inside):
                if ok and (i not in best or sj < best[i][1]):
                    best[i] = (j, sj)
            for i, (j, sj) in best.items():
                assoc_name[i] = names[j]
                assoc_sep[i] = sj
    width = max([len(s) for s in assoc_name] + [1])
    out["assoc_name"] = np.asarray(assoc_name, dtype=f"U{width}")
    out["assoc_name"].info.description = "Name of the associated reference-catalog source ('' when none)"
    out["assoc_sep"] = assoc_sep * u.deg
    out["assoc_sep"].info.description = "Separation from the associated reference source"
    out.meta["assoc_reference"] = str(reference) if not isinstance(reference, Table) else "table"
    return out
