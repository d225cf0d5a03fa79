"""Copy a trained detector into the package as the default one (float16 weights, so the wheel stays small).

    python -m skyfm.finetune.ship runs/detector-default/model --thresholds runs/detector-default/sweep.json
    python -m skyfm.finetune.ship --calibrate-errors [MODEL_DIR]   # error scales into MODEL_DIR/config.json

Writes ``skyfm/resources/models/detector-default/{config.json, model.safetensors, README.md}``.

**Error calibration** (:func:`calibrate_errors`). The network's ``flux_err`` and ``pos_err`` come from its
variance heads and the counts-cube likelihood fit's from the inverse Fisher matrix; neither is guaranteed to be
calibrated (a network under- or over-estimates its variances, a fit ignores unmodelled neighbours, diffuse
structure and the model's own approximations). Per instrument, on validation patches (seeds ``VAL_SEED_BASE +
seed_offset + i``, never the benchmark's) at the detector's own threshold, true sources with SNR >= 5 are matched
to detections (the benchmark's radius) and two multiplicative factors are chosen: on ``flux_err``, the one that
makes ``|flux - true flux| <= k flux_err`` hold for 68.27% of the matches (:func:`flux_err_scale`), and on
``pos_err`` the one that makes the median of separation / ``pos_err`` 1.1774 = sqrt(2 ln 2), the median of a
2-D Gaussian with that sigma per axis (:func:`pos_err_scale`). The matches are pooled, as the benchmark pools
them; a crowded cluster (hundreds of matched stars a patch) then weighs most, and where the errors of its scenes
differ the factor depends on how many clusters a seed range draws (``--balance-scenes`` weights every scene alike
instead, :func:`scene_weights`; with a handful of matches in a field scene that is noisier). The rows a fit refined
(the likelihood fit of counts cubes, the PSF fit of CCD point sources) get their own scales and floors, since
their errors replace the network's (:func:`_fit_flux_errors`, :func:`_fit_pos_errors`); on counts cubes twice,
against the true background (what a user's model stands for) and against one estimated from the counts (the
``_estbg`` keys: that estimate's own error is then part of the fit's, :func:`_estimated_background_errors`). Against
the true background their statistical flux errors also grow with the crowding (``fit_flux_err_scale_crowding``,
:func:`crowding_scales`), as the CCD fits' floor does (``fit_flux_err_floor_crowding``, :func:`crowding_floors`). The
refined CCD rows that keep the network's flux (the faint stars of a cluster core whose light nobody assigns, a
crowded field's blends) get a scale of the network's error and a weight of the confusion noise, every scene
covered alike (:func:`_unfitted_flux_errors`, :func:`confusion_error_terms`). They are written into
``heads.<instrument>`` of the detector's ``config.json`` and applied in :mod:`skyfm.detect`.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from skyfm.errors import SkyfmError
from skyfm.heads.config import (FLOOR_KEYS, SCALE_KEYS, SUBSET_FLOOR_KEYS, SUBSET_SCALE_KEYS, UNFITTED_SCALE_KEYS,
                                UNFITTED_WEIGHT_KEYS)
from skyfm.heads.detector import DEFAULT_MODEL_DIR, SourceDetector

COVERAGE_68 = math.erf(1.0 / math.sqrt(2.0))  # 0.6827: the share of a Gaussian within one sigma
MEDIAN_2D = math.sqrt(2.0 * math.log(2.0))  # 1.1774: median radius of a circular 2-D Gaussian of unit sigma
MIN_MATCHES = 20  # fewer matched sources than this: the factor is too noisy, keep 1.0 (and say so)
# counts cubes fitted against a background estimated from the counts (no model): their own scales and floor
ESTBG_SCALE_KEYS = ("fit_flux_err_scale_estbg", "fit_pos_err_scale_estbg")
ESTBG_FLOOR_KEYS = ("fit_flux_err_floor_estbg",)


def ship(model_dir: str | Path, target: str | Path = DEFAULT_MODEL_DIR, notes: str | Path | None = None,
         thresholds: str | Path | None = None) -> Path:
    """Copy ``model_dir`` to ``target`` in float16; ``thresholds``: a validation JSON (``evaluate --sweep``)
    whose ``best_threshold`` per instrument becomes that head's ``min_score``."""
    det = SourceDetector.from_pretrained(model_dir)
    if thresholds is not None:
        chosen = json.loads(Path(thresholds).read_text())
        for name, res in chosen.items():
            if name in det.config.heads and res.get("best_threshold") is not None:
                det.config.heads[name].min_score = float(res["best_threshold"])
    target = Path(target)
    det.save_pretrained(target, dtype=torch.float16)
    training = det.config.training or {}
    lines = [
        "# detector-default",
        "",
        "The detector `skyfm detect` uses when no `--model` is given: the pretrained skyfm-tiny backbone with light",
        "heads for every built-in instrument (heatmap, offset + position sigma, flux mean/variance, class, extension).",
        "Weights are stored as float16 and loaded as float32.",
        "",
        "Trained by:",
        "",
        "```bash",
        str(training.get("command") or "skyfm finetune --config configs/finetune/default.yaml --out runs/detector-default"),
        f"python -m skyfm.finetune.evaluate {model_dir} --config default --n 12 --size 128 --sweep --seed-offset 0 --out sweep.json",
        f"python -m skyfm.finetune.ship {model_dir} --thresholds sweep.json --notes validation.txt",
        "python -m skyfm.finetune.ship --calibrate-errors --n 12 --size 256 --seed-offset 0 --out calibration.json",
        "```",
        "",
        "Recipe (as run):",
        "",
        "```json",
        json.dumps(training.get("recipe", {}), indent=1),
        "```",
    ]
    if notes is not None and Path(notes).is_file():
        lines += ["", "Validation (fresh seeds 900000000 + i):", "", "```", Path(notes).read_text().strip(), "```"]
    (target / "README.md").write_text("\n".join(lines) + "\n")
    return target


# ---------------------------------------------------------------------------------------------- error calibration
def _weights(weights, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(w) != n or not (np.isfinite(w) & (w >= 0)).all():
        raise SkyfmError(f"weights should be {n} non-negative numbers")
    return w


def weighted_quantile(values, q: float, weights=None) -> float:
    """The ``q`` quantile of ``values`` where each counts with its weight (``np.quantile``'s linear rule when the
    weights are equal)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    w = _weights(weights, len(v))
    keep = w > 0
    v, w = v[keep], w[keep]
    if not len(v):
        raise SkyfmError("no value with a positive weight")
    if np.all(w == w[0]):
        return float(np.quantile(v, q))
    order = np.argsort(v, kind="stable")
    v, w = v[order], w[order]
    cum = np.cumsum(w) - w  # weight below each value; the linear rule on (cum / (total - w_last))
    pos = cum / (cum[-1] if cum[-1] > 0 else 1.0)
    return float(np.interp(q, pos, v))


def _pairs(arrays, names, weights):
    arrs = [np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays]
    if len({len(a) for a in arrs}) != 1:
        raise SkyfmError(f"{', '.join(names)} should have one length, got {', '.join(str(len(a)) for a in arrs)}")
    w = _weights(weights, len(arrs[0]))
    ok = np.logical_and.reduce([np.isfinite(a) for a in arrs]) & (arrs[1] > 0) & (w > 0)
    if not ok.any():
        raise SkyfmError(f"no pair with a finite, positive {names[1]} to calibrate on")
    return [a[ok] for a in arrs], w[ok]


def flux_err_scale(flux, flux_err, true_flux, level: float = COVERAGE_68, weights=None) -> float:
    """The factor ``k`` for which ``|flux - true_flux| <= k flux_err`` holds for ``level`` of the pairs (the
    ``level`` quantile of the pulls ``|flux - true| / flux_err``, each pair counted with its weight); pairs with a
    non-finite or non-positive error are left out."""
    if not 0 < level < 1:
        raise SkyfmError(f"level should be in (0, 1), got {level}")
    (f, e, t), w = _pairs((flux, flux_err, true_flux), ("flux", "flux_err", "true_flux"), weights)
    return weighted_quantile(np.abs(f - t) / e, level, w)


def pos_err_scale(sep, pos_err, weights=None) -> float:
    """The factor ``k`` for which the (weighted) median of ``sep / (k pos_err)`` is sqrt(2 ln 2) = 1.1774, the
    median radius of a circular 2-D Gaussian with ``k pos_err`` per axis."""
    (d, e), w = _pairs((sep, pos_err), ("sep", "pos_err"), weights)
    return weighted_quantile(d / e, 0.5, w) / MEDIAN_2D


def _bisect(fn, lo: float, hi: float, iters: int = 60) -> float:
    """The root of a monotone ``fn`` in [lo, hi] (fn(lo) and fn(hi) of opposite signs)."""
    f_lo = fn(lo)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if (fn(mid) > 0) == (f_lo > 0):
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def pos_err_floor(sep, pos_err, weights=None) -> float:
    """The systematic error ``f`` (pixels) for which the (weighted) median of ``sep / sqrt(pos_err^2 + f^2)`` is
    1.1774; 0 when the errors are already large enough."""
    (d, e), w = _pairs((sep, pos_err), ("sep", "pos_err"), weights)

    def excess(f):
        return weighted_quantile(d / np.hypot(e, f), 0.5, w) - MEDIAN_2D

    if excess(0.0) <= 0:
        return 0.0
    return _bisect(excess, 0.0, 10.0 * float(np.max(d)) + 1e-9)


def flux_err_floor(flux, flux_err, true_flux, level: float = COVERAGE_68, weights=None) -> float:
    """The relative systematic error ``r`` for which ``|flux - true| <= sqrt(flux_err^2 + (r flux)^2)`` holds for
    ``level`` of the (weighted) pairs; 0 when the errors already cover that much."""
    (f, e, t), w = _pairs((flux, flux_err, true_flux), ("flux", "flux_err", "true_flux"), weights)

    def shortfall(r):
        inside = np.abs(f - t) <= np.hypot(e, r * np.abs(f))
        return float(np.sum(w * inside) / np.sum(w)) - level

    if shortfall(0.0) >= 0:
        return 0.0
    if shortfall(100.0) < 0:
        return 100.0
    return _bisect(shortfall, 0.0, 100.0)


def flux_err_scale_and_floor(flux, flux_err, true_flux, level: float = COVERAGE_68, weights=None) -> tuple[float, float]:
    """``(k, r)`` for errors ``sqrt((k flux_err)^2 + (r flux)^2)``: ``k`` makes the fainter half of the pairs (by
    their own SNR, ``|flux| / flux_err``) covered at ``level`` (:func:`flux_err_scale`), where the statistical
    error dominates; then ``r`` makes all of them covered at ``level`` (:func:`flux_err_floor`): a relative
    systematic error, for biases that grow with flux (unresolved neighbours in the fit) where a single factor
    over-covers the faint sources and under-covers the bright ones."""
    (f, e, t), w = _pairs((flux, flux_err, true_flux), ("flux", "flux_err", "true_flux"), weights)
    own = np.abs(f) / e
    faint = own <= weighted_quantile(own, 0.5, w)
    k = flux_err_scale(f[faint], e[faint], t[faint], level, w[faint])
    return k, flux_err_floor(f, k * e, t, level, w)


def crowding_floors(flux, flux_err, true_flux, crowding, level: float = COVERAGE_68, weights=None
                    ) -> tuple[float, float]:
    """``(r, c)`` for errors ``sqrt(flux_err^2 + ((r^2 + (c crowding)^2) flux^2))``: a relative floor that grows
    with the crowding (detected neighbours per FWHM^2, :func:`skyfm.catalog.psf_fit.crowding`). ``c`` makes the
    denser half of the pairs covered as well as the sparser half, ``r`` all of them at ``level``
    (:func:`flux_err_floor`); ``c`` is 0 when the dense half is covered at least as well without it (or the
    crowding does not vary). One floor for every source is set by the densest scenes (a cluster core's unsplit
    companions) and over-covers every other."""
    (f, e, t, rho), w = _pairs((flux, flux_err, true_flux, crowding), ("flux", "flux_err", "true_flux", "crowding"),
                               weights)
    dense = rho >= weighted_quantile(rho, 0.5, w)
    if dense.all() or not dense.any():
        return flux_err_floor(f, e, t, level, w), 0.0

    def with_c(c):
        e_c = np.hypot(e, c * rho * np.abs(f))
        r = flux_err_floor(f, e_c, t, level, w)
        return r, np.hypot(e_c, r * np.abs(f))

    def gap(c):  # dense minus sparse coverage, with the overall floor chosen for this c
        full = with_c(c)[1]
        return (flux_coverage(f[dense], full[dense], t[dense], weights=w[dense])
                - flux_coverage(f[~dense], full[~dense], t[~dense], weights=w[~dense]))

    c = 0.0
    if gap(0.0) < 0:
        hi = 0.01  # the first c that over-covers the dense half (far beyond, both halves are covered alike: all)
        while gap(hi) <= 0 and hi < 100.0:
            hi *= 2.0
        c = _bisect(gap, 0.0, hi, iters=40)
    r, full = with_c(c)
    if r == 0.0 and flux_coverage(f, full, t, weights=w) > level:
        # the crowding term alone over-covers: the statistical errors already cover the sparse half; take the
        # c that covers ``level`` of all (the dense half stays under) rather than over-cover everything, and none
        # where the statistical errors alone already do
        def excess(c):
            return flux_coverage(f, np.hypot(e, c * rho * np.abs(f)), t, weights=w) - level

        c = 0.0 if excess(0.0) >= 0 else _bisect(excess, 0.0, c, iters=40)
    return r, float(c)


def confusion_error_terms(flux, flux_err, true_flux, confusion, strata=None, level: float = COVERAGE_68,
                          weights=None) -> tuple[float, float]:
    """``(a, b)`` for errors ``hypot(a flux_err, b confusion)``: a statistical error and the confusion noise where
    the source stands (:func:`skyfm.catalog.psf_fit.blank_flux_scatter`), chosen so that every stratum (``strata``:
    a label per pair, such as the scene; those with at least ``MIN_MATCHES`` pairs count) is covered as close to
    ``level`` as can be (least squares over the strata's coverages, a log grid then a finer one around its best).
    Without two such strata the pairs are split at the median of ``confusion / flux_err``, where confusion rules
    and where it does not. ``b`` is 0 where the confusion does not help; a cluster core's unassigned faint stars
    need it, a crowded field's do not, and one factor on ``flux_err`` cannot serve both."""
    n = len(np.asarray(flux).reshape(-1))
    (f, e, t, c, index), w = _pairs((flux, flux_err, true_flux, confusion, np.arange(n)),
                                    ("flux", "flux_err", "true_flux", "confusion", "index"), weights)
    labels = np.full(n, "all") if strata is None else np.asarray(strata, dtype=object).reshape(-1).astype(str)
    if len(labels) != n:
        raise SkyfmError(f"{len(labels)} strata for {n} pairs")
    labels = labels[index.astype(int)]
    groups = [labels == g for g in np.unique(labels) if np.sum(labels == g) >= MIN_MATCHES]
    if len(groups) < 2:
        ratio = c / e
        high = ratio >= weighted_quantile(ratio, 0.5, w)
        groups = [high, ~high] if high.any() and (~high).any() else [np.ones(len(f), bool)]
    miss2 = (f - t) ** 2

    def cost(a_values, b):
        # a pair is covered where a >= sqrt(max((f - t)^2 - b^2 c^2, 0)) / e: per stratum, the weighted share of
        # those thresholds below each a
        need = np.sqrt(np.clip(miss2 - (b * c) ** 2, 0.0, None)) / e
        total = np.zeros(len(a_values))
        for g in groups:
            order = np.argsort(need[g])
            cum = np.concatenate([[0.0], np.cumsum(w[g][order])])
            covered = cum[np.searchsorted(need[g][order], a_values, side="right")] / cum[-1]
            total += (covered - level) ** 2
        return total

    def search(a_grid, b_grid):
        best = (np.inf, 1.0, 0.0)
        for b in b_grid:
            costs = cost(a_grid, b)
            i = int(np.argmin(costs))
            if costs[i] < best[0] - 1e-12:
                best = (float(costs[i]), float(a_grid[i]), float(b))
        return best

    _, a, b = search(np.logspace(-2, 2, 121), np.concatenate([[0.0], np.logspace(-2, 1.5, 106)]))
    fine = np.logspace(-0.04, 0.04, 17)
    b_fine = b * fine if b > 0 else np.concatenate([[0.0], np.logspace(-3, -2, 9)])
    _, a, b = search(a * fine, b_fine)
    return a, b


def flux_coverage(flux, flux_err, true_flux, scale: float = 1.0, weights=None) -> float:
    """(Weighted) share of pairs with ``|flux - true| <= scale flux_err`` (the benchmark's 68% flux coverage)."""
    try:
        (f, e, t), w = _pairs((flux, flux_err, true_flux), ("flux", "flux_err", "true_flux"), weights)
    except SkyfmError:
        return float("nan")
    return float(np.average(np.abs(f - t) <= scale * e, weights=w))


def scene_weights(scenes) -> np.ndarray:
    """Weights that give every scene the same total (1 / its number of matches), so that a crowded cluster with
    hundreds of matched stars does not outvote the fields (as the threshold choice's mean scene F1)."""
    scenes = np.asarray(scenes, dtype=object).reshape(-1)
    names, inverse, counts = np.unique(scenes.astype(str), return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse].astype(np.float64)


def matched_errors(cat, patch, inst, radius_pix: float | None = None, snr_min: float = 5.0) -> dict:
    """Detections of ``cat`` matched one-to-one to the true sources of ``patch`` with SNR >= ``snr_min``: arrays
    ``flux``, ``flux_err``, ``true_flux``, ``sep`` and ``pos_err`` (pixels), ``fit`` (the row's position and flux
    come from the PSF or likelihood fit: catalog column ``fit`` == 2, or a finite ``ts``), ``fit_pos`` (its position
    does: ``fit`` 1-3), ``crowding`` (catalog column ``crowding``, else 0), ``confusion``
    (catalog column ``flux_confusion`` of refined CCD catalogs, else NaN), ``blend`` (``flux_blend``, else 0),
    ``companion`` (``fit`` 5) and ``scene`` (the patch's scene or population). Rows of the residual search
    (``fit`` 4), whose errors have their own terms (``residual_search``), are left out."""
    import astropy.units as u

    from skyfm.catalog import match_catalogs
    from skyfm.catalog.evaluate import default_radius_pix
    from skyfm.catalog.table import wcs_pixel_scale_deg

    radius = float(default_radius_pix(inst) if radius_pix is None else radius_pix)
    val = lambda t, k: np.asarray(getattr(t[k], "value", t[k]), dtype=np.float64)  # noqa: E731
    scene = str(patch.meta.get("scene") or patch.meta.get("population") or "patch")
    keys = ("flux", "flux_err", "true_flux", "sep", "pos_err")
    empty = {k: np.zeros(0) for k in keys + ("crowding", "confusion", "blend")} | {
        "fit": np.zeros(0, dtype=bool), "fit_pos": np.zeros(0, dtype=bool), "companion": np.zeros(0, dtype=bool),
        "scene": np.zeros(0, dtype=object)}
    truth = patch.truth
    if truth is None or not len(truth) or not len(cat):
        return empty
    di, ti, sep = match_catalogs((val(cat, "x"), val(cat, "y")), truth, radius)
    bright = val(truth, "snr")[ti] >= snr_min
    if "fit" in cat.colnames:
        bright &= np.asarray(cat["fit"])[di] != 4
    di, ti, sep = di[bright], ti[bright], sep[bright]
    pe = u.Quantity(cat["pos_err"])
    if pe.unit.physical_type == "angle":
        if patch.wcs is None:
            raise SkyfmError("the catalog's pos_err is an angle but the patch has no WCS to turn it into pixels")
        pe_pix = pe.to_value(u.deg) / wcs_pixel_scale_deg(patch.wcs)
    else:
        pe_pix = pe.value
    if "fit" in cat.colnames:  # 2: position and flux from the PSF / likelihood fit; 1, 3: the position only
        fit = np.asarray(cat["fit"])
        fitted, positioned = fit == 2, (fit >= 1) & (fit <= 3)
    else:
        fitted = np.isfinite(val(cat, "ts")) if "ts" in cat.colnames else np.zeros(len(cat), bool)
        positioned = fitted
    crowd = np.nan_to_num(val(cat, "crowding"), nan=0.0) if "crowding" in cat.colnames else np.zeros(len(cat))
    confusion = val(cat, "flux_confusion") if "flux_confusion" in cat.colnames else np.full(len(cat), np.nan)
    blend = np.nan_to_num(val(cat, "flux_blend"), nan=0.0) if "flux_blend" in cat.colnames else np.zeros(len(cat))
    companion = np.asarray(cat["fit"]) == 5 if "fit" in cat.colnames else np.zeros(len(cat), bool)
    return {"flux": val(cat, "flux")[di], "flux_err": val(cat, "flux_err")[di], "true_flux": val(truth, "flux")[ti],
            "sep": np.asarray(sep, dtype=np.float64), "pos_err": np.asarray(pe_pix, dtype=np.float64)[di],
            "fit": fitted[di], "fit_pos": positioned[di], "crowding": crowd[di], "confusion": confusion[di],
            "blend": blend[di], "companion": companion[di], "scene": np.full(len(di), scene, dtype=object)}


def _concat(rows: list[dict]) -> dict:
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]} if rows else {}


def _factors(m: dict, select, prefix: str, current: dict, out: dict, balance_scenes: bool = False) -> None:
    """Fill out[prefix + flux_err_scale] etc. from the matches ``m[select]`` (pooled, or with ``balance_scenes``
    every scene weighted alike), relative to the current scales; also the coverage (pooled and scene-balanced)
    and the median separation / error, before and after."""
    n = int(np.sum(select)) if len(m) else 0
    out[f"{prefix}n_matched"] = n
    w = wb = None
    if n:
        sc = m["scene"][select] if "scene" in m else np.full(n, "patch", dtype=object)
        wb = scene_weights(sc)
        w = wb if balance_scenes else None
        out[f"{prefix}n_matched_per_scene"] = {str(k): int(v) for k, v in zip(*np.unique(sc.astype(str),
                                                                                          return_counts=True))}
    for kind in ("flux", "pos"):
        key = f"{prefix}{kind}_err_scale"
        if n < MIN_MATCHES:
            out[key] = float(current[key])
            out.setdefault("notes", []).append(f"{key}: {n} matched sources (< {MIN_MATCHES}), kept {current[key]}")
            continue
        if kind == "flux":
            f, e, t = m["flux"][select], m["flux_err"][select], m["true_flux"][select]
            k = flux_err_scale(f, e, t, weights=w)
            out[f"{prefix}flux_cov68_before"] = round(flux_coverage(f, e, t), 4)
            out[f"{prefix}flux_cov68_after"] = round(flux_coverage(f, e, t, k), 4)
            out[f"{prefix}flux_cov68_scene_balanced_before"] = round(flux_coverage(f, e, t, weights=wb), 4)
            out[f"{prefix}flux_cov68_scene_balanced_after"] = round(flux_coverage(f, e, t, k, weights=wb), 4)
            out[f"{prefix}median_flux_ratio"] = round(float(np.median(f / np.maximum(t, 1e-30))), 4)
        else:
            d, e = m["sep"][select], m["pos_err"][select]
            k = pos_err_scale(d, e, weights=w)
            med = weighted_quantile(d / e, 0.5, w)
            out[f"{prefix}median_sep_over_pos_err_before"] = round(med, 4)
            out[f"{prefix}median_sep_over_pos_err_after"] = round(med / k, 4)
        out[key] = float(current[key]) * k  # the matches carry the current scales already


def _stat_errors(err, floor_term, scale: float) -> np.ndarray:
    """The statistical errors inside catalog errors ``hypot(scale stat, floor_term)``."""
    return np.sqrt(np.maximum(np.asarray(err) ** 2 - np.asarray(floor_term) ** 2, 0.0)) / scale


def _coverage_before_after(flux, err_before, err_after, true_flux, select) -> list:
    """[coverage with ``err_before``, coverage with ``err_after``] of the pairs ``select``, 4 decimals."""
    return [round(flux_coverage(flux[select], err[select], true_flux[select]), 4) for err in (err_before, err_after)]


def crowding_scales(flux, flux_err, true_flux, crowding, level: float = COVERAGE_68, weights=None
                    ) -> tuple[float, float, float]:
    """``(k, c, r)`` for errors ``sqrt((k (1 + c crowding) flux_err)^2 + (r flux)^2)``: statistical errors that grow
    with the crowding (counts cubes: the sources too faint to detect add to a fitted flux, the more the denser the
    detected ones). ``c`` makes the denser half of the pairs covered as well as the sparser half, with ``k`` and
    ``r`` for each ``c`` as :func:`flux_err_scale_and_floor` chooses them; 0 when the dense half is covered at least
    as well without it (or the crowding does not vary)."""
    (f, e, t, rho), w = _pairs((flux, flux_err, true_flux, crowding), ("flux", "flux_err", "true_flux", "crowding"),
                               weights)
    dense = rho >= weighted_quantile(rho, 0.5, w)

    def with_c(c):
        grown = e * (1.0 + c * rho)
        k, r = flux_err_scale_and_floor(f, grown, t, level, w)
        return k, r, np.hypot(k * grown, r * np.abs(f))

    def gap(c):  # dense minus sparse coverage, with k and r chosen for this c
        full = with_c(c)[2]
        return (flux_coverage(f[dense], full[dense], t[dense], weights=w[dense])
                - flux_coverage(f[~dense], full[~dense], t[~dense], weights=w[~dense]))

    c = 0.0
    if dense.any() and not dense.all() and gap(0.0) < 0:
        hi = 0.01  # the first c that covers the dense half better than the sparse one
        while gap(hi) <= 0 and hi < 1e6:
            hi *= 2.0
        c = _bisect(gap, 0.0, hi, iters=40)
    k, r, _ = with_c(c)
    return float(k), float(c), float(r)


def _fit_flux_errors(m: dict, select, head, out: dict, balance_scenes: bool = False, estimated: bool = False,
                     crowding: bool = True) -> None:
    """out[fit_flux_err_scale], out[fit_flux_err_floor] (the likelihood fit of counts cubes, the PSF fit of CCD
    point sources) from the matches ``m[select]``, by :func:`flux_err_scale_and_floor` on the fit's own errors
    (the catalog's with the current scale and floor taken out, so the answer does not depend on them); also the
    coverage before / after, overall and in the fainter and brighter half. ``estimated``: the rows were fitted
    against a background estimated from the counts (the head's ``_estbg`` scale and floor are theirs).
    ``crowding``: CCD fits get a floor that grows with the catalog's ``crowding`` (:func:`crowding_floors`), counts
    fits against a model a statistical error that does (:func:`crowding_scales`); False: one floor and one scale for
    all (and a crowding term the head carries is set to 0)."""
    scale_now = head.error_scales(fit=True, estimated=estimated)[0]
    floor_now = head.error_floors(estimated)[0]
    counts = head.kind == "counts"  # crowding grows a counts fit's statistical error, a CCD fit's floor
    per_crowding_now = 0.0 if estimated or counts else head.flux_floor_per_crowding()
    scale_crowding_now = head.flux_scale_per_crowding() if counts and not estimated else 0.0
    n = int(np.sum(select)) if len(m) else 0
    out["fit_n_matched"] = n
    if n < MIN_MATCHES:
        out["fit_flux_err_scale"], out["fit_flux_err_floor"] = scale_now, floor_now
        out.setdefault("notes", []).append(f"fit flux errors: {n} matched fitted sources (< {MIN_MATCHES}), kept")
        return
    sc = m["scene"][select]
    w = scene_weights(sc) if balance_scenes else None
    f, e, t = m["flux"][select], m["flux_err"][select], m["true_flux"][select]
    if not estimated and "blend" in m:  # the blend term, which _blend_flux_errors chooses, taken out too
        e = _without_blend(e, m["blend"][select], head.blend_flux_error_weight())
    rho = m["crowding"][select] if "crowding" in m else np.zeros(n)
    stat = _stat_errors(e, np.hypot(floor_now, per_crowding_now * rho) * f, scale_now)
    stat = stat / (1.0 + scale_crowding_now * rho)
    k, r = flux_err_scale_and_floor(f, stat, t, weights=w)
    c = grow = 0.0
    if counts and not estimated and crowding and (np.ptp(rho) > 0 or scale_crowding_now > 0):
        k, grow, r = crowding_scales(f, stat, t, rho, weights=w)
        out["fit_flux_err_scale_crowding"] = grow
    elif counts and scale_crowding_now > 0:
        out["fit_flux_err_scale_crowding"] = 0.0
    elif not estimated and crowding and (np.ptp(rho) > 0 or per_crowding_now > 0):  # CCD: the floor grows
        r, c = crowding_floors(f, k * stat, t, rho, weights=w)
        out["fit_flux_err_floor_crowding"] = float(c)
    elif per_crowding_now > 0:
        out["fit_flux_err_floor_crowding"] = 0.0
    new = np.hypot(k * (1.0 + grow * rho) * stat, np.hypot(r, c * rho) * np.abs(f))
    faint = np.abs(f) / np.maximum(stat, 1e-30) <= np.median(np.abs(f) / np.maximum(stat, 1e-30))
    out["fit_flux_err_scale"], out["fit_flux_err_floor"] = float(k), float(r)
    out["fit_flux_cov68_before"] = round(flux_coverage(f, e, t), 4)
    out["fit_flux_cov68_after"] = round(flux_coverage(f, new, t), 4)
    out["fit_median_flux_ratio"] = round(float(np.median(f / np.maximum(t, 1e-30))), 4)
    out["fit_flux_cov68_faint_half_before_after"] = _coverage_before_after(f, e, new, t, faint)
    out["fit_flux_cov68_bright_half_before_after"] = _coverage_before_after(f, e, new, t, ~faint)
    out["fit_flux_cov68_scene_balanced_after"] = round(flux_coverage(f, new, t, weights=scene_weights(sc)), 4)
    if c > 0 or grow > 0:
        dense = rho >= np.median(rho)
        out["fit_flux_cov68_sparse_half_before_after"] = _coverage_before_after(f, e, new, t, ~dense)
        out["fit_flux_cov68_dense_half_before_after"] = _coverage_before_after(f, e, new, t, dense)


def _without_blend(err, light, weight: float) -> np.ndarray:
    """Flux errors with their blend term (``weight`` x the neighbours' overlapping ``light``, in quadrature) taken
    out."""
    return np.sqrt(np.maximum(err ** 2 - (weight * light) ** 2, 0.0))


BLEND_MIN_SHARE = 0.1  # rows whose neighbours' overlapping light is at least this share of their own flux


def _blend_flux_errors(m: dict, head, out: dict) -> None:
    """out[fit_flux_err_blend]: the share of ``flux_blend`` that the flux errors of PSF-fitted CCD rows hold
    (``fit`` 2 and the companions, 5), the smallest that makes the blended ones (their neighbours' overlapping light
    at least :data:`BLEND_MIN_SHARE` of their flux) cover 68% of their true fluxes with the head's other terms as
    they are (0 where they already do); also the coverage before / after, blended and all."""
    if not m:
        m = {k: np.zeros(0, dtype=bool if k in ("fit", "companion") else float)
             for k in ("fit", "companion", "flux", "flux_err", "true_flux", "blend")}
    sel = m["fit"] | m["companion"]
    f, e, t, light = (m[k][sel] for k in ("flux", "flux_err", "true_flux", "blend"))
    now = head.blend_flux_error_weight()
    base = _without_blend(e, light, now)
    blended = light >= BLEND_MIN_SHARE * np.abs(f)
    out["blend_n_matched"] = int(blended.sum())
    if blended.sum() < MIN_MATCHES:
        out["fit_flux_err_blend"] = now
        out.setdefault("notes", []).append(f"blend errors: {int(blended.sum())} matched blended rows "
                                           f"(< {MIN_MATCHES}), kept")
        return

    def coverage(k: float, rows) -> float:
        return flux_coverage(f[rows], np.hypot(base[rows], k * light[rows]), t[rows])

    lo, hi = 0.0, 0.0  # no term needed where the blended rows are covered already
    if coverage(0.0, blended) < COVERAGE_68:
        hi = 1.0
        while coverage(hi, blended) < COVERAGE_68 and hi < 1e3:
            hi *= 2.0
        if coverage(hi, blended) < COVERAGE_68:  # errors far off for another reason: no weight is an answer
            out["fit_flux_err_blend"] = now
            out.setdefault("notes", []).append(f"blend errors: no weight up to {hi:g} covers 68% of the blended "
                                               "rows, kept")
            return
    for _ in range(40):  # bisection: coverage grows with the weight
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if coverage(mid, blended) < COVERAGE_68 else (lo, mid)
    k = float(hi)
    out["fit_flux_err_blend"] = k
    out["blend_flux_cov68_before_after"] = [round(coverage(now, blended), 4), round(coverage(k, blended), 4)]
    everyone = np.ones(len(f), bool)
    out["blend_all_fitted_flux_cov68_before_after"] = [round(coverage(now, everyone), 4),
                                                      round(coverage(k, everyone), 4)]


def _unfitted_flux_errors(m: dict, head, out: dict) -> None:
    """out[unfitted_flux_err_scale], out[unfitted_flux_err_confusion] from the matched rows of refined CCD
    catalogs that keep the network's flux (catalog ``fit`` < 2 with a finite ``flux_confusion``; saturated stars,
    whose aperture flux keeps its own error, have none): :func:`confusion_error_terms` on the network's error (the
    catalog's with the current terms taken out) and the confusion, every scene a stratum; also the coverage
    before / after, overall and per scene."""
    scale_now, weight_now = head.unfitted_flux_error_terms()
    sel = (~m["fit"] & np.isfinite(m["confusion"])) if len(m) else np.zeros(0, bool)
    n = int(np.sum(sel))
    out["unfitted_n_matched"] = n
    if n < MIN_MATCHES:
        out.setdefault("notes", []).append(f"unfitted flux errors: {n} matched rows (< {MIN_MATCHES}), kept")
        return
    f, e, t, conf, sc = (m[k][sel] for k in ("flux", "flux_err", "true_flux", "confusion", "scene"))
    stat = _stat_errors(e, weight_now * conf, scale_now)
    a, b = confusion_error_terms(f, stat, t, conf, strata=sc)
    new = np.hypot(a * stat, b * conf)
    out["unfitted_flux_err_scale"], out["unfitted_flux_err_confusion"] = float(a), float(b)
    out["unfitted_flux_cov68_before"] = round(flux_coverage(f, e, t), 4)
    out["unfitted_flux_cov68_after"] = round(flux_coverage(f, new, t), 4)
    out["unfitted_flux_cov68_per_scene_before_after"] = {
        str(k): [int(np.sum(sc == k)), *_coverage_before_after(f, e, new, t, sc == k)]
        for k in np.unique(sc.astype(str))}


def _fit_pos_errors(m: dict, head, out: dict, balance_scenes: bool = False) -> None:
    """out[fit_pos_err_scale], out[fit_pos_err_floor] (the PSF fit of CCD images) from the matches whose position
    was fitted (``m["fit_pos"]``, catalog column ``fit`` >= 1, as the errors are applied): the scale makes the
    fainter half's median separation 1.1774 errors, then the floor (pixels, in quadrature) all of them; the
    catalog's errors with the current scale and floor taken out, as for the flux."""
    sel = m["fit_pos"] if len(m) else np.zeros(0, bool)
    n = int(np.sum(sel))
    out["fit_pos_n_matched"] = n
    if n < MIN_MATCHES:
        out["fit_pos_err_scale"], out["fit_pos_err_floor"] = head.error_scales(fit=True)[1], head.error_floors()[1]
        out.setdefault("notes", []).append(f"fit position errors: {n} matched fitted sources (< {MIN_MATCHES}), kept")
        return
    w = scene_weights(m["scene"][sel]) if balance_scenes else np.ones(n)
    d, pe = m["sep"][sel], m["pos_err"][sel]
    stat = _stat_errors(pe, head.error_floors()[1], head.error_scales(fit=True)[1])
    # the fainter half: the larger statistical position errors (not the flux's SNR, whose errors carry floors)
    faint = stat >= weighted_quantile(stat, 0.5, w)
    k = pos_err_scale(d[faint], stat[faint], weights=w[faint])
    floor = pos_err_floor(d, k * stat, weights=w)
    out["fit_pos_err_scale"], out["fit_pos_err_floor"] = float(k), float(floor)
    out["fit_median_sep_over_pos_err_before"] = round(float(np.median(d / pe)), 4)
    out["fit_median_sep_over_pos_err_after"] = round(float(np.median(d / np.hypot(k * stat, floor))), 4)


def calibrate_errors(detector=None, config="default", n: int = 12, size: int = 128, seed_offset: int = 0,
                     instruments: list[str] | None = None, min_score: float | None = None,
                     balance_scenes: bool = False, selection: str = "network", crowding: bool = True,
                     confusion: bool = True, bands: list[str] | None = None, blend: bool = True) -> dict:
    """Per instrument, the error scales of the module docstring, chosen on ``n`` validation patches.

    The patches carry the detector's current scales; the factors returned are the new scales (current times the
    correction), so calibrating a calibrated detector returns about the same numbers. The network's scales come
    from ``detect_patch(refine=False)``, the fit's from the refined rows (catalog column ``fit`` == 2) of
    ``detect_patch(refine=True)``: the likelihood fit of counts cubes (the true background, as the benchmark)
    and the PSF fit of CCD point sources. Returns ``{instrument: {flux_err_scale, pos_err_scale, [fit_...],
    n_matched, flux_cov68_before / after, median_sep_over_pos_err_before / after, ...}}``.

    The fits' errors (counts and CCD alike) get a scale and a floor chosen on their statistical part: the
    catalog's errors with the current scale and floor taken out (:func:`_fit_flux_errors`, :func:`_fit_pos_errors`),
    so they do not depend on what the detector carried before. ``selection``: which rows the refined catalogs keep
    (:func:`skyfm.detect.detect_patch`; ``"auto"`` selects counts-cube rows by their TS, the patches carrying
    their true background). ``crowding``: the CCD fits' flux floor grows with crowding (:func:`crowding_floors`),
    the counts fits' statistical flux error (against the true background) does (:func:`crowding_scales`); False:
    one floor, one scale. ``confusion``: also the errors of the refined CCD rows that keep the network's flux
    (:func:`_unfitted_flux_errors`). ``bands``: calibrate on patches of these bands (all six of MeerLICHT's, whose
    head is trained on one per image) for the head's ``band_subsets`` entry of them (result key ``band_subset``;
    :func:`write_error_scales` writes there). ``blend``: also the weight of the fitted CCD rows' blend term
    (:func:`_blend_flux_errors`), chosen with the head's other terms as they are: write those first.
    """
    from skyfm.detect import default_min_score, detect_patch, get_detector
    from skyfm.heads.config import subset_key
    from skyfm.finetune.config import load_finetune_config
    from skyfm.finetune.data import VAL_SEED_BASE, validation_patches
    from skyfm.instruments import load_instrument

    det = get_detector(detector)
    cfg = load_finetune_config(config) if isinstance(config, (str, Path)) else config
    specs = {load_instrument(k).name: v for k, v in cfg.instrument_specs().items()}
    results = {}
    for name, spec in specs.items():
        if instruments and name not in instruments:
            continue
        if name not in det.config.heads:
            continue
        inst = load_instrument(name)
        head = det.head_config(name)
        subset = None
        if bands:
            for b in bands:
                inst.band(b)  # one clear error for a band the instrument lacks
            subset, head = subset_key(head.bands, bands), head.for_bands(bands)
        current = {k: float(getattr(head, k)) for k in SCALE_KEYS}
        th = default_min_score(det, head) if min_score is None else float(min_score)
        net, fit, est = [], [], []
        for p in validation_patches(inst, spec, n, size, seed_offset=seed_offset, bands=bands):
            net.append(matched_errors(detect_patch(p, det, th, refine=False, selection="network"), p, inst))
            fit.append(matched_errors(detect_patch(p, det, th, refine=True, selection=selection), p, inst))
            if inst.is_counts:  # and against a background estimated from the counts, as without a model
                cat = detect_patch(replace(p, background_image=None), det, th, refine=True, selection="network")
                est.append(matched_errors(cat, p, inst))
        res = {"min_score": th, "n_patches": n, "size": size, "seeds": f"{VAL_SEED_BASE} + {seed_offset} + i",
               "weighting": "scene-balanced" if balance_scenes else "pooled", "selection": selection}
        if subset is not None:
            res["band_subset"] = subset
        m = _concat(net)
        _factors(m, np.ones(len(m.get("flux", [])), dtype=bool), "", current, res, balance_scenes)
        mf = _concat(fit)  # the refined rows: likelihood fit (counts) or PSF fit (CCD point sources)
        fitted = mf["fit"] if mf else np.zeros(0, bool)
        if inst.is_counts:
            _factors(mf, fitted, "fit_", current, res, balance_scenes)
        else:
            _fit_pos_errors(mf, head, res, balance_scenes)
            if confusion:
                _unfitted_flux_errors(mf, head, res)
        _fit_flux_errors(mf, fitted, head, res, balance_scenes, crowding=crowding)
        if not inst.is_counts and blend:
            _blend_flux_errors(mf, head, res)
        if inst.is_counts:
            res.update(_estimated_background_errors(_concat(est), head, balance_scenes))
        results[name] = res
    return results


def _estimated_background_errors(m: dict, head, balance_scenes: bool = False) -> dict:
    """The ``_estbg`` scales and floor (and their coverage numbers, ``estbg_...``) from the fitted rows of counts
    cubes whose background was estimated from the counts."""
    fitted = m["fit"] if m else np.zeros(0, bool)
    flux_scale, pos_scale = head.error_scales(fit=True, estimated=True)
    sub: dict = {}
    _factors(m, fitted, "fit_", {"fit_flux_err_scale": flux_scale, "fit_pos_err_scale": pos_scale}, sub,
             balance_scenes)
    _fit_flux_errors(m, fitted, head, sub, balance_scenes, estimated=True)
    keys = ("fit_flux_err_scale", "fit_pos_err_scale", "fit_flux_err_floor")
    return {(f"{k}_estbg" if k in keys else f"estbg_{k}"): v for k, v in sub.items()}


def write_error_scales(model_dir, scales: dict) -> Path:
    """Write the ``*_err_scale`` values of ``scales`` ({instrument: {...}}) into ``heads.<instrument>`` of
    ``model_dir/config.json`` (into its ``band_subsets`` entry where a result has a ``band_subset``), leaving every
    other key (and the weights) as they are."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SkyfmError(f"{path}: cannot read the detector config ({e})") from None
    heads = cfg.get("heads") or {}
    for name, res in scales.items():
        if name not in heads:
            raise SkyfmError(f"{path}: no head for instrument {name!r} (heads: {', '.join(heads)})")
        target, scale_keys = heads[name], SCALE_KEYS + ESTBG_SCALE_KEYS + UNFITTED_SCALE_KEYS
        floor_keys = FLOOR_KEYS + ESTBG_FLOOR_KEYS + UNFITTED_WEIGHT_KEYS
        if res.get("band_subset"):
            target = (target.get("band_subsets") or {}).get(res["band_subset"], {})
            heads[name]["band_subsets"] = {**(heads[name].get("band_subsets") or {}), res["band_subset"]: target}
            scale_keys, floor_keys = SUBSET_SCALE_KEYS, SUBSET_FLOOR_KEYS
        for key in scale_keys:
            if key in res:
                v = float(res[key])
                if not (v > 0 and math.isfinite(v)):
                    raise SkyfmError(f"{name}: {key} should be a positive number, got {v}")
                target[key] = round(v, 4)
        for key in floor_keys:
            if key in res:
                v = float(res[key])
                if not (v >= 0 and math.isfinite(v)):
                    raise SkyfmError(f"{name}: {key} should be a number >= 0, got {v}")
                target[key] = round(v, 5)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    tmp.replace(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", default=None,
                        help="trained detector to ship (with --calibrate-errors: the detector folder to calibrate "
                             "in place, default --target, the shipped one)")
    parser.add_argument("--notes", default=None)
    parser.add_argument("--target", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--thresholds", default=None, help="validation JSON of evaluate --sweep")
    parser.add_argument("--calibrate-errors", action="store_true",
                        help="choose the flux / position error scales on validation patches and write them into the "
                             "detector's config.json (run it after shipping)")
    parser.add_argument("--config", default="default", help="fine-tuning recipe whose scenes the patches follow")
    parser.add_argument("--n", type=int, default=12, help="validation patches per instrument")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed-offset", type=int, default=0)
    parser.add_argument("--instrument", action="append", default=None)
    parser.add_argument("--balance-scenes", action="store_true",
                        help="weight every scene alike instead of pooling the matches")
    parser.add_argument("--selection", choices=["network", "auto"], default="network",
                        help="rows of the refined catalogs: the network's (default) or, with auto, counts-cube rows "
                             "selected by their likelihood TS (skyfm detect --background)")
    parser.add_argument("--no-crowding-floor", action="store_true",
                        help="CCD fits: one relative flux floor for every source instead of one that grows with the "
                             "catalog's crowding (the density of detected neighbours); counts fits: one scale of "
                             "their statistical flux errors instead of one that grows with it")
    parser.add_argument("--no-confusion-errors", action="store_true",
                        help="CCD heads: leave the errors of refined rows that keep the network's flux as they are "
                             "(do not calibrate unfitted_flux_err_scale / _confusion)")
    parser.add_argument("--bands", default=None,
                        help="comma-separated bands every calibration patch holds (u,g,q,r,i,z: MeerLICHT images of "
                             "all six filters); the terms go to the head's band_subsets entry for them")
    parser.add_argument("--out", default=None, help="also write the calibration JSON here")
    parser.add_argument("--dry-run", action="store_true", help="print the factors, write nothing")
    args = parser.parse_args()
    if not args.calibrate_errors:
        if args.model_dir is None:
            parser.error("MODEL_DIR is needed to ship a detector")
        print(ship(args.model_dir, args.target, args.notes, args.thresholds))
        return
    torch.set_num_threads(1)
    target = Path(args.model_dir if args.model_dir is not None else args.target)
    res = calibrate_errors(target, args.config, n=args.n, size=args.size, seed_offset=args.seed_offset,
                           instruments=args.instrument, balance_scenes=args.balance_scenes,
                           selection=args.selection, crowding=not args.no_crowding_floor,
                           confusion=not args.no_confusion_errors,
                           bands=args.bands.split(",") if args.bands else None)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if not args.dry_run:
        print(write_error_scales(target, res))


if __name__ == "__main__":
    main()
