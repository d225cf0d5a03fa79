"""Detection, fluxes and classes of stars and galaxies on large field images: skyfm with and without the residual
search, Kron fluxes and class calibration, beside sep's FLUX_AUTO and half-light radii.

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/field_fluxes.py [--n 4] [--cases meerlicht,hubble,wise] [--out runs/bench-field-fluxes]

The detection benchmark (``benchmarks/detect.py``) draws 256-px patches of every scene; a 256-px patch of a sparse
field holds a few sources, so its flux numbers are those of crowded fields and clusters, where nearly every source
is a star. Deep high-latitude images, what most users of an optical or infrared survey look at, hold as many
galaxies as stars. Here each case simulates ``--n`` field scenes of 1024^2 pixels (WISE 768^2), seeds
``1.75e9 + 1000 * case + i`` (never used in training), and for the true sources with SNR >= 5 that a method
matches (the match radius of :mod:`skyfm.finetune.evaluate`) reports per class: the median flux / true flux with
its 16-84% range, and the share whose 68% interval (``flux +- flux_err``, as the detection benchmark's coverage,
in ln flux) holds the true flux; how well stars and galaxies are told apart (:func:`class_row`); and precision,
recall and F1 as ``benchmarks/detect.py`` counts them (:func:`detection_counts`).

Methods: ``skyfm`` (the shipped default), ``skyfm-no-search`` (the same with every head's ``residual_search``
and ``companion_search`` unset, as before Run 18), ``skyfm-psf`` (also ``kron_excess_min`` and ``class_calibration`` unset: PSF or network
fluxes and the network's classes, as before Runs 16 and 17), and
``sep-auto``: sep's extraction (1.5 sigma, 5 px, SExtractor's default filter) with SExtractor's FLUX_AUTO (Kron
ellipse of 2.5 Kron radii, at least 3.5, ``sep.kron_radius`` and ``sep.sum_ellipse``; errors from the background
rms and the gain), on the band sum for several bands; its galaxy score is the half-light radius over the stellar
locus's (a size, not a probability: only its ROC area is given). For detection also ``sep``: the detection
benchmark's sep baseline (:func:`skyfm.baselines.sep_detect`) at its fixed threshold, aperture SNR >= 5, and
``sep-nofilter``, its crowded-field configuration (no detection filter, 3-px minimum area; their fluxes and classes
are not scored here: "-").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SEED_BASE = 1_750_000_000
SIZES = {"meerlicht": 1024, "hubble": 1024, "wise": 768}
SEP_MIN_SNR = 5.0  # the detection benchmark's fixed threshold for sep
SEP_METHODS = ("sep", "sep-nofilter")  # skyfm.baselines.BASELINES, scored for detection only


def sep_auto(patch):
    """sep extraction with SExtractor's FLUX_AUTO (Kron 2.5, minimum radius 3.5) on the band sum: (x, y, flux, err,
    size), ``size`` the half-light radius (``sep.flux_radius``) over the stellar locus's (the lower quartile of
    the half-light radii of the sources with SNR > 20), the classical star / galaxy separator."""
    import sep

    from skyfm.instruments import load_instrument

    inst = load_instrument(patch.instrument)
    gain = float((inst.noise or {}).get("gain", 1.0)) or 1.0
    data = np.ascontiguousarray(np.asarray(patch.data, dtype=np.float64).sum(axis=0))
    bkg = sep.Background(data)
    sub = data - bkg.back()
    rms = bkg.globalrms
    sep.set_extract_pixstack(5_000_000)
    sep.set_sub_object_limit(4096)
    obj = sep.extract(sub, 1.5, err=rms, minarea=5, deblend_cont=1e-4)
    x, y, a, b, theta = obj["x"], obj["y"], obj["a"], obj["b"], obj["theta"]
    kron, _ = sep.kron_radius(sub, x, y, a, b, theta, 6.0)
    kron = np.where(np.isfinite(kron) & (kron > 0), kron, 3.5)
    r = np.maximum(2.5 * kron, 3.5)
    flux, err, _ = sep.sum_ellipse(sub, x, y, a, b, theta, r, err=rms, gain=gain, subpix=1)
    r50, _ = sep.flux_radius(sub, x, y, r, 0.5, normflux=np.where(flux > 0, flux, np.nan), subpix=5)
    bright = np.isfinite(r50) & (flux > 20 * err)
    locus = np.percentile(r50[bright], 25) if bright.sum() >= 5 else np.nanmedian(r50)
    return x, y, flux, err, r50 / locus


def within_68(flux, err, true) -> np.ndarray:
    """Per pair: the true flux inside the 68% interval, in ln flux as the detection benchmark's coverage."""
    return np.abs(np.log(true / flux)) <= err / flux


def score(x, y, flux, err, galaxy_score, patch, inst) -> dict:
    """Per class: flux / true and |ln(true / flux)| <= err / flux of the matched true sources with SNR >= 5; and
    under ``classes`` their true classes with the method's ``galaxy_score`` (skyfm: the probability of a galaxy)."""
    from skyfm.catalog import match_catalogs
    from skyfm.finetune.evaluate import match_radius_pix

    t = patch.truth[np.asarray(patch.truth["snr"], float) >= 5]
    out = {"star": ([], []), "galaxy": ([], []), "classes": ([], [])}
    if len(t) == 0 or len(x) == 0:
        return out
    di, ti, _ = match_catalogs((np.asarray(x, float), np.asarray(y, float)), t, match_radius_pix(inst))
    true = np.asarray(getattr(t["flux"], "value", t["flux"]), float)[ti]
    f, e = np.asarray(flux, float)[di], np.asarray(err, float)[di]
    cls = np.asarray(t["class"])[ti]
    for k in ("star", "galaxy"):
        s = (cls == k) & (f > 0) & (true > 0) & np.isfinite(e)
        out[k][0].extend(f[s] / true[s])
        out[k][1].extend(within_68(f[s], e[s], true[s]))
    out["classes"][0].extend(cls == "galaxy")
    out["classes"][1].extend(np.asarray(galaxy_score, float)[di])
    return out


def detection_counts(x, y, patch, inst) -> tuple[int, int, int]:
    """(true positives, false positives, true sources) as ``benchmarks/detect.py`` counts them
    (:func:`skyfm.finetune.evaluate.score_patch`: the true sources are those with SNR >= 5; a detection matched to a
    true source of SNR >= 1.5 is no false positive)."""
    from astropy.table import QTable

    from skyfm.finetune.evaluate import score_patch

    s = score_patch(QTable({"x": np.asarray(x, float), "y": np.asarray(y, float)}), patch, inst)
    return s["tp"], s["fp"], s["n_true"]


def class_row(is_galaxy, galaxy_score, probability: bool) -> dict:
    """ROC area of the galaxy score; for probabilities also the accuracy (galaxy at >= 0.5), the shares of
    galaxies and of stars called what they are, and the Brier score (2 x the mean squared error: 0 perfect, 0.5 a
    coin's 0.5 everywhere)."""
    from skyfm.catalog.metrics import rank_auc

    y, p = np.asarray(is_galaxy, bool), np.asarray(galaxy_score, float)
    ok = np.isfinite(p)
    y, p = y[ok], p[ok]
    row = {"n": int(y.size), "n_galaxies": int(y.sum()), "auc": round(rank_auc(y, p), 3)}
    if probability and y.size:
        called = p >= 0.5
        row.update(accuracy=round(float(np.mean(called == y)), 3),
                   galaxies_called=round(float(np.mean(called[y])), 3) if y.any() else None,
                   stars_called=round(float(np.mean(~called[~y])), 3) if (~y).any() else None,
                   brier=round(float(2 * np.mean((p - y) ** 2)), 3))
    return row


def run_case(name: str, n: int, index: int, log) -> list[dict]:
    import copy

    from skyfm.baselines import BASELINES
    from skyfm.data.simulate import simulate_patch
    from skyfm.detect import detect_patch, get_detector
    from skyfm.instruments import load_instrument

    inst = load_instrument(name)
    det = get_detector(None)
    no_search = copy.deepcopy(det)
    for head in no_search.config.heads.values():
        head.residual_search = head.companion_search = None
    psf_only = copy.deepcopy(no_search)
    for head in psf_only.config.heads.values():
        head.kron_excess_min, head.class_calibration = None, None
    detectors = {"skyfm": det, "skyfm-no-search": no_search, "skyfm-psf": psf_only}
    pooled = {m: {"star": ([], []), "galaxy": ([], []), "classes": ([], [])}
              for m in (*detectors, "sep-auto", *SEP_METHODS)}
    counts = {m: np.zeros(3, int) for m in pooled}
    seconds = {m: 0.0 for m in pooled}
    for i in range(n):
        patch = simulate_patch(name, SEED_BASE + 1000 * index + i, size=SIZES[name], scene="field")
        for method in pooled:
            t0 = time.perf_counter()
            if method == "sep-auto":
                x, y, f, e, g = sep_auto(patch)
            elif method in SEP_METHODS:
                cat = BASELINES[method](patch)
                cat = cat[np.asarray(cat["score"], float) >= SEP_MIN_SNR]
                x, y = np.asarray(cat["x"], float), np.asarray(cat["y"], float)
            else:
                cat = detect_patch(patch, detectors[method])
                v = lambda c: np.asarray(getattr(cat[c], "value", cat[c]), float)
                x, y, f, e = v("x"), v("y"), v("flux"), v("flux_err")
                g = np.asarray(cat["class_prob"], float)[:, list(cat.meta["class_names"]).index("galaxy")]
            seconds[method] += time.perf_counter() - t0
            counts[method] += detection_counts(x, y, patch, inst)
            if method in SEP_METHODS:
                continue
            s = score(x, y, f, e, g, patch, inst)
            for k in s:
                pooled[method][k][0].extend(s[k][0])
                pooled[method][k][1].extend(s[k][1])
        log(f"  {name} image {i + 1}/{n} done")
    rows = []
    for method, per in pooled.items():
        row = {"case": name, "method": method, "seconds": round(seconds[method], 1)}
        tp, fp, n_true = (int(c) for c in counts[method])
        row["detection"] = {"tp": tp, "fp": fp, "n_true": n_true,
                            "precision": round(tp / max(tp + fp, 1), 3), "recall": round(tp / max(n_true, 1), 3),
                            "f1": round(2 * tp / max(2 * tp + fp + n_true - tp, 1), 3)}
        every = []
        if method in SEP_METHODS:  # detection only
            rows.append(row)
            log(f"  {method:10s} {json.dumps(row['detection'])}")
            continue
        row["classes"] = class_row(*per.pop("classes"), probability=method.startswith("skyfm"))
        for k, (ratio, inside) in per.items():
            ratio = np.asarray(ratio)
            every.extend(inside)
            row[k] = {"n": int(ratio.size),
                      "ratio": [round(float(q), 3) for q in np.percentile(ratio, [50, 16, 84])] if ratio.size else None,
                      "cov68": round(float(np.mean(inside)), 3) if ratio.size else None}
        row["cov68_all"] = round(float(np.mean(every)), 3) if every else None
        rows.append(row)
        log(f"  {method:10s} {json.dumps({k: row[k] for k in ('detection', 'star', 'galaxy', 'cov68_all', 'classes')})}")
    return rows


def markdown(rows: list[dict]) -> str:
    def cell(r):
        if not r or not r["n"]:
            return "-"
        m, lo, hi = r["ratio"]
        return f"{m:.2f} [{lo:.2f}, {hi:.2f}] / {r['cov68']:.2f} ({r['n']})"

    out = ["| case | method | F1 (precision / recall) | true positives | false positives | seconds |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        d = r["detection"]
        out.append(f"| {r['case']} | {r['method']} | {d['f1']:.3f} ({d['precision']:.2f} / {d['recall']:.2f}) | "
                   f"{d['tp']} / {d['n_true']} | {d['fp']} | {r['seconds']} |")
    out += ["", "| case | method | stars: flux / true [16%, 84%] / cov68 (n) | galaxies: the same | cov68, all |",
            "|---|---|---|---|---|"]
    for r in (r for r in rows if "classes" in r):
        out.append(f"| {r['case']} | {r['method']} | {cell(r['star'])} | {cell(r['galaxy'])} | {r['cov68_all']} |")
    out += ["", "| case | method | stars and galaxies (galaxies) | accuracy | galaxies called galaxies | stars called "
            "stars | ROC area | Brier |", "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if "classes" in r):
        c = r["classes"]
        out.append(f"| {r['case']} | {r['method']} | {c['n']} ({c['n_galaxies']}) | {c.get('accuracy', '-')} | "
                   f"{c.get('galaxies_called', '-')} | {c.get('stars_called', '-')} | {c['auc']} | {c.get('brier', '-')} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--n", type=int, default=4, help="field images per case (default 4)")
    p.add_argument("--cases", default="meerlicht,hubble,wise", help="instruments, comma-separated")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", default="runs/bench-field-fluxes", help="output folder (results.json, results.md)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)
    rows = []
    for name in args.cases.split(","):
        if name not in SIZES:
            p.error(f"unknown case {name!r} (choose from {', '.join(SIZES)})")
        log(f"{name}: {args.n} field images of {SIZES[name]}^2")
        rows += run_case(name, args.n, list(SIZES).index(name), log)
    (out / "results.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")
    (out / "results.md").write_text(markdown(rows))
    log(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
