"""Likelihood selection of counts-cube detections (``skyfm detect --background``): which TS-map candidates and how
many passes, chosen on validation seeds, never the benchmark's test seeds.

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/likelihood_selection.py [--n 8] [--cases fermi,fermi-plane,ctao-plane]

For each case of ``benchmarks/detect.py`` (its scenes, validation seeds 950000000 + 1000 * case + i, or 960000000 +
... with ``--seed-base 1``) and each variant, ``skyfm.detect._detect_likelihood`` with the shipped detector and the
simulator's true background (none with ``--no-model``: the estimate from the counts), kept at fitted TS >= 25;
precision, recall and F1 against true sources with snr >= 5 (match radius 3 px), pooled over the patches, and
``loc/CRB`` as ``benchmarks/detect.py`` measures it (median separation / 1.18 Cramér–Rao sigma of isolated point
sources with snr >= 10), and for the variants with the extension test (``skyfm detect --test-extension``) how it
labels the matched true sources: the share of extended ones (4FGL templates, CTAO's shapes) it finds extended with
their median size ratio (fitted / true r68), and the share of point sources it calls extended. Variants: TS-map
peaks from TS 25, 16 or 9 as candidates, one pass or more (each further one in the TS map of the background plus the
sources found so far); the head's own passes and extension test, with fits that moved far kept or dropped
(``likelihood_keep_far_moves``); ``--variants`` picks some by name. On ``fermi-plane`` also the association rates of
``benchmarks/detect.py`` (true sources at |b| < 20 with a detection within their 95% radius; all, and point sources
alone).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

VARIANTS = {"peaks TS>=25, 1 pass": dict(candidate_ts=25.0, passes=1),
            "peaks TS>=16, 1 pass": dict(candidate_ts=16.0, passes=1),
            "peaks TS>=16, 2 passes": dict(candidate_ts=16.0, passes=2),
            "peaks TS>=9, 2 passes": dict(candidate_ts=9.0, passes=2),
            "peaks TS>=16, 3 passes": dict(candidate_ts=16.0, passes=3),
            "peaks TS>=16, 2 passes, extension": dict(candidate_ts=16.0, passes=2, extension=True),
            "peaks TS>=16, 1 pass, extension": dict(candidate_ts=16.0, passes=1, extension=True),
            "the head's": {},
            "the head's, far moves kept": dict(keep_far_moves=True),
            "the head's, far moves dropped": dict(keep_far_moves=False)}


def main(argv=None) -> int:
    import detect as bench

    from skyfm.catalog.evaluate import default_radius_pix, truth_crb
    from skyfm.catalog.metrics import detection_metrics, localization_metrics
    from skyfm.detect import _detect_likelihood, default_min_score
    from skyfm.heads import load_detector
    from skyfm.instruments import load_instrument

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="validation patches per case (default 8)")
    ap.add_argument("--cases", default="fermi,fermi-plane,ctao-plane", help="comma-separated counts-cube cases")
    ap.add_argument("--variants", default=None,
                    help="';'-separated variant names (default all): " + "; ".join(VARIANTS))
    ap.add_argument("--seed-base", type=int, choices=(0, 1), default=0,
                    help="which of detect.py's two validation seed bases (default 0: 950000000)")
    ap.add_argument("--no-model", action="store_true",
                    help="no background model: the likelihood selection against the estimated background")
    args = ap.parse_args(argv)
    variants = VARIANTS
    if args.variants:
        names = [v.strip() for v in args.variants.split(";") if v.strip()]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown:
            ap.error(f"unknown variant(s) {unknown}; choose from: {'; '.join(VARIANTS)}")
        variants = {v: VARIANTS[v] for v in names}
    conf95 = bench._assoc_radius_table()
    warnings.filterwarnings("ignore")
    det = load_detector()
    rows = []
    for ci, (key, _, instrument, options) in enumerate(bench.CASES):
        if key not in args.cases.split(","):
            continue
        inst = load_instrument(instrument)
        head = det.head_config(inst.name)
        radius = default_radius_pix(inst)
        counts = {v: [0, 0, 0] for v in variants}
        assoc = {v: {k: 0 for k in bench.ASSOC_KEYS} for v in variants}
        seps_crb = {v: [] for v in variants}
        ext_rows = {v: [] for v in variants}  # (true extension, fitted extension or 0) of matched true sources
        heads_own = dict(passes=head.likelihood_passes or 1, extension=bool(head.likelihood_extension_test))
        for p in bench._simulate(ci, instrument, options, args.n, bench.VALIDATION_SEED_BASES[args.seed_base]):
            crb, isolated = truth_crb(p.truth, p)
            bright = isolated & (np.asarray(p.truth["snr"], dtype=float) >= 10) & np.isfinite(crb)
            for name, kw in variants.items():
                options = {**heads_own, **kw} if name.startswith("the head's") else kw
                cat = _detect_likelihood(p, det, inst, head, None, None if args.no_model else p.background_image,
                                         default_min_score(det, head), 25.0, **options)
                m = detection_metrics(cat, p.truth, radius)
                for i, k in enumerate(("tp", "fp", "fn")):
                    counts[name][i] += m[k]
                loc = localization_metrics(cat, p.truth, m["det_idx"], m["truth_idx"], crb_pix=crb, select=bright)
                seps_crb[name].extend(loc.get("sep_over_crb", []))
                if "ts_ext" in cat.colnames and len(m["det_idx"]):
                    called = np.isfinite(np.asarray(cat["ts_ext"], dtype=float))[m["det_idx"]]
                    fitted = np.asarray(cat["extension"].to_value("deg"))[m["det_idx"]]
                    true = np.asarray(p.truth["extension"], dtype=float)[m["truth_idx"]]
                    ext_rows[name].extend(zip(true, np.where(called, fitted, 0.0)))
                if key == "fermi-plane":
                    for k, v in bench._association(cat, p, conf95).items():
                        assoc[name][k] += v
        for name, (tp, fp, fn) in counts.items():
            prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
            a = assoc[name]
            rates = " | ".join(f"{a[f'a_{k}'] / a[f'n_{k}']:.3f}" if a[f"n_{k}"] else "-"
                               for k in ("ge20", "10_20", "pt_ge20", "pt_10_20"))
            loc = f"{np.median(seps_crb[name]) / 1.1774:.2f} ({len(seps_crb[name])})" if seps_crb[name] else "-"
            ext = "- | -"
            if ext_rows[name]:
                e = np.array(ext_rows[name])
                is_ext, found = e[:, 0] > 0, e[:, 1] > 0
                ratio = np.median(e[is_ext & found, 1] / e[is_ext & found, 0]) if np.any(is_ext & found) else np.nan
                ext = (f"{np.mean(found[is_ext]):.2f} of {is_ext.sum()}, size x{ratio:.2f} | "
                       f"{np.mean(found[~is_ext]):.3f} of {(~is_ext).sum()}")
            rows.append(f"| {key} | {name} | {prec:.3f} | {rec:.3f} | {2 * prec * rec / max(prec + rec, 1e-9):.3f} "
                        f"| {loc} | {rates} | {ext} |")
            print(rows[-1], flush=True)
    print("\n| case | candidates | precision | recall | F1 | loc/CRB (n) | association >= 20 sigma | 10-20 | point "
          "sources >= 20 sigma | 10-20 | extended sources found extended | point sources called extended |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
