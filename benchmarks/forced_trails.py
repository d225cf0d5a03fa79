"""The satellite-trail filter (``skyfm detect --drop-trails``) on validation images that a trail crosses, and on
images that none crosses.

Run (from the repository root)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/forced_trails.py \\
        [--cases meerlicht:crowded:1:12,meerlicht:field:1:8,hubble:field:1:8,hubble:cluster:1:8,meerlicht:crowded:0:24]

Each case is ``instrument:scene:trail probability:patches`` (``instrument/BAND``: images of that band alone,
``hubble/F606W``): 256^2 patches of validation seeds (9.565e8 upward,
never used in training or reported as test numbers) drawn with the instrument's satellite-trail probability set
to the given value (1: a trail across every patch; 0: none, so anything the filter drops is a loss). At the
benchmark's natural rates (``benchmarks/trail_filter.py``) a few patches in 32 hold a trail, too few to choose
anything on. Every patch is detected with and without ``drop_trails``; per case the true positives among the
SNR >= 5 sources, the false positives (rows matching no true source), the rows on cosmic-ray or trail pixels with
no true source near (``benchmarks/detect.py``'s CR+trail count) and F1 over the SNR >= 5 sources.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import detect as bench  # noqa: E402  (the detection benchmark's CR+trail count)

SEED_BASE = 956_500_000
DEFAULT_CASES = ("meerlicht:crowded:1:12,meerlicht:field:1:8,hubble:field:1:8,hubble:cluster:1:8,"
                 "meerlicht:crowded:0:24,hubble:cluster:0:12,meerlicht:field:0:16,hubble:field:0:12,wise:field:0:8")


def run_case(detector, name: str, scene: str, probability: float, n: int) -> str:
    from skyfm.catalog.evaluate import default_radius_pix
    from skyfm.catalog.metrics import detection_metrics
    from skyfm.data.simulate import simulate_patch
    from skyfm.detect import detect_patch
    from skyfm.instruments import load_instrument

    name, _, band = name.partition("/")
    options = {"scene": scene, **({"bands": [band]} if band else {})}
    inst = load_instrument(name)
    inst = dataclasses.replace(inst, contaminants={**inst.contaminants, "satellite_trail_probability": probability})
    radius = default_radius_pix(inst)
    totals = np.zeros((2, 3), int)  # (plain, filtered) x (TP of SNR >= 5, FP, CR+trail)
    n_true = 0
    for i in range(n):
        patch = simulate_patch(inst, SEED_BASE + i, **options)
        bright = np.asarray(patch.truth["snr"], float) >= 5
        n_true += int(bright.sum())
        for k, drop in enumerate((False, True)):
            cat = detect_patch(patch, detector, drop_trails=drop)
            m = detection_metrics(cat, patch.truth, radius)
            totals[k] += [int(bright[m["truth_idx"]].sum()), len(cat) - len(m["det_idx"]),
                          bench._contaminant_hits(cat, patch, m["det_idx"], radius)]

    def f1(tp, fp):
        return 2 * tp / max(2 * tp + fp + (n_true - tp), 1)

    cells = [f"{tp} / {fp} / {hits}, F1 {f1(tp, fp):.4f}" for tp, fp, hits in totals]
    return f"| {name}{'/' + band if band else ''} {scene} | {probability:g} | {n} | {cells[0]} | {cells[1]} |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated instrument:scene:probability:patches")
    args = parser.parse_args(argv)
    import torch

    from skyfm.heads import load_detector

    torch.set_num_threads(1)
    detector = load_detector()
    start = time.perf_counter()
    print("| case | trail probability | patches | without the filter: TP / FP / CR+trail | with it |")
    print("|---|---|---|---|---|")
    for case in args.cases.split(","):
        name, scene, probability, n = case.split(":")
        print(run_case(detector, name, scene, float(probability), int(n)), flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
