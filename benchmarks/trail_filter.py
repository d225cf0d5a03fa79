"""What does the satellite-trail filter (``skyfm detect --drop-trails``) drop, and what does it cost?

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/trail_filter.py [--cases meerlicht,meerlicht-crowded,hubble] [--n 32]

On the detection benchmark's validation seeds (``benchmarks/detect.py --seeds validation``: 9.5e8 upward, never
reported as test numbers), every patch is run through ``detect_patch`` with and without ``drop_trails``. Per case:
the patches whose simulation holds a satellite trail, the patches where the filter dropped something, the
detections dropped, and the true sources with snr >= 5 that were matched without the filter and are not with it
(the real stars the filter cost). Writes ``OUT/results.json`` and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import detect as bench  # noqa: E402  (the detection benchmark's cases and seeds)

TRAIL_BIT = 2  # satellite_trail in skyfm.data.patch.CONTAMINANT_BITS


def run_case(key: str, n: int) -> dict:
    from skyfm.catalog.evaluate import default_radius_pix
    from skyfm.catalog.metrics import detection_metrics
    from skyfm.detect import detect_patch
    from skyfm.heads import load_detector
    from skyfm.instruments import load_instrument

    det = load_detector()
    case_index = [c[0] for c in bench.CASES].index(key)
    _, _, instrument, options = bench.CASES[case_index]
    radius = default_radius_pix(load_instrument(instrument))
    out = {"patches": n, "with_trail": 0, "with_drops": 0, "dropped": 0, "true_lost": 0, "per_patch": []}
    patches = bench._simulate(case_index, instrument, options, n, bench.VALIDATION_SEED_BASES[0])
    for i, p in enumerate(patches):
        plain, filtered = detect_patch(p, det, drop_trails=False), detect_patch(p, det, drop_trails=True)
        bright = np.asarray(p.truth["snr"], dtype=float) >= 5
        found = [np.isin(np.arange(len(p.truth)), detection_metrics(c, p.truth, radius)["truth_idx"]) & bright
                 for c in (plain, filtered)]
        trail = bool((np.bitwise_or.reduce(p.contaminant_mask, axis=0) & TRAIL_BIT).any())
        dropped, lost = len(plain) - len(filtered), int(found[0].sum() - found[1].sum())
        out["with_trail"] += trail
        out["with_drops"] += dropped > 0
        out["dropped"] += dropped
        out["true_lost"] += lost
        if trail or dropped:
            out["per_patch"].append({"patch": i, "trail": trail, "dropped": dropped, "true_lost": lost})
    return out


def markdown(results: dict) -> str:
    lines = [f"Validation seeds, {results['n']} patches per case; total {results['wall_s']:.0f} s.", "",
             "| case | patches with a trail | patches with drops | detections dropped | true snr >= 5 lost |",
             "|---|---|---|---|---|"]
    for key, r in results["cases"].items():
        lines.append(f"| {key} | {r['with_trail']} | {r['with_drops']} | {r['dropped']} | {r['true_lost']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="meerlicht,meerlicht-crowded,hubble", help="comma-separated CCD cases")
    ap.add_argument("--n", type=int, default=32, help="validation patches per case")
    ap.add_argument("--out", default="runs/bench-trail-filter")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = {"n": args.n, "cases": {}}
    for key in [s.strip() for s in args.cases.split(",") if s.strip()]:
        results["cases"][key] = run_case(key, args.n)
        print(f"[{key}] done after {time.perf_counter() - t0:.0f} s", flush=True)
    results["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
