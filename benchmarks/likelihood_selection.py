"""Likelihood selection of counts-cube detections (``skyfm detect --background``): which TS-map candidates and how
many passes, chosen on validation seeds, never the benchmark's test seeds.

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/likelihood_selection.py [--n 8] [--cases fermi,fermi-plane,ctao-plane]

For each case of ``benchmarks/detect.py`` (its scenes, validation seeds 950000000 + 1000 * case + i) and each
variant, ``skyfm.detect._detect_likelihood`` with the shipped detector and the simulator's true background, kept
at fitted TS >= 25; precision, recall and F1 against true sources with snr >= 5 (match radius 3 px), pooled over
the patches. Variants: TS-map peaks from TS 25 or from TS 16 as candidates, one pass or two (the second in the TS
map of the background plus the sources the first found).
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
            "peaks TS>=9, 2 passes": dict(candidate_ts=9.0, passes=2)}


def main(argv=None) -> int:
    import detect as bench

    from skyfm.catalog.evaluate import default_radius_pix
    from skyfm.catalog.metrics import detection_metrics
    from skyfm.detect import _detect_likelihood, default_min_score
    from skyfm.heads import load_detector
    from skyfm.instruments import load_instrument

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="validation patches per case (default 8)")
    ap.add_argument("--cases", default="fermi,fermi-plane,ctao-plane", help="comma-separated counts-cube cases")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    det = load_detector()
    rows = []
    for ci, (key, _, instrument, options) in enumerate(bench.CASES):
        if key not in args.cases.split(","):
            continue
        inst = load_instrument(instrument)
        head = det.head_config(inst.name)
        radius = default_radius_pix(inst)
        counts = {v: [0, 0, 0] for v in VARIANTS}
        for p in bench._simulate(ci, instrument, options, args.n, bench.VALIDATION_SEED_BASES[0]):
            for name, kw in VARIANTS.items():
                cat = _detect_likelihood(p, det, inst, head, None, p.background_image, default_min_score(det, head),
                                         25.0, **kw)
                m = detection_metrics(cat, p.truth, radius)
                for i, k in enumerate(("tp", "fp", "fn")):
                    counts[name][i] += m[k]
        for name, (tp, fp, fn) in counts.items():
            prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
            rows.append(f"| {key} | {name} | {prec:.3f} | {rec:.3f} | {2 * prec * rec / max(prec + rec, 1e-9):.3f} |")
            print(rows[-1], flush=True)
    print("\n| case | candidates | precision | recall | F1 |\n|---|---|---|---|---|\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
