"""Detectors on MeerLICHT nights unlike the nominal one: seeing outside 2-3" and Moffat wings other than beta 3.5.

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/psf_variety.py [--model shipped] [--model runs/detector-psf-variety/model] \\
        [--min-score 0.3] [--out runs/bench-psf-variety]

MeerLICHT's heads were trained on images whose seeing is drawn from the YAML's 2-3" and whose PSF is a Moffat
of beta 3.5; real nights are broader or sharper and real PSFs have heavier or lighter wings. Each detector folder
(``shipped``: the default one) detects (:func:`skyfm.detect.detect_patch`, refinement on, the head's thresholds
unless ``--min-score``) on validation images (seeds ``951_600_000 + i``, never used in training nor in the
detection benchmark's test seeds) of one q band, 256^2: 4 crowded fields and 8 images of the scene mix, at seeing
2.0, 2.5, 3.0 (the trained range), 3.5, 4.5 and 5.5", and at drawn seeing with beta 2.0, 2.5 and 5.0
(``simulate_patch(..., seeing=, psf_beta=)``). Reported: precision, recall and F1 against the true sources with
SNR >= 5 (:func:`skyfm.finetune.evaluate.score_patch`) per cell, and the mean F1 in and outside the trained range.

Writes ``OUT/results.json`` and ``OUT/results.md`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from image_units import f1_score

SEED_BASE = 951_600_000
SCENES = (("crowded", "crowded", 4), ("mix", None, 8))  # (label, simulate_patch scene, images)
CELLS = [("seeing", s, None) for s in (2.0, 2.5, 3.0, 3.5, 4.5, 5.5)] + [("beta", None, b) for b in (2.0, 2.5, 5.0)]
TRAINED_SEEING = (2.0, 3.0)


def cell_label(kind: str, seeing, beta) -> str:
    return f'seeing {seeing}"' if kind == "seeing" else f"beta {beta}"


def run_model(model: str, min_score: float | None) -> dict:
    from skyfm.data.simulate import simulate_patch
    from skyfm.detect import get_detector, detect_patch
    from skyfm.finetune.evaluate import score_patch
    from skyfm.instruments import load_instrument

    det = get_detector(None if model == "shipped" else model, device="cpu")
    inst = load_instrument("meerlicht")
    out = {}
    for label, scene, n in SCENES:
        for kind, seeing, beta in CELLS:
            tp = fp = n_true = 0
            for i in range(n):
                patch = simulate_patch("meerlicht", SEED_BASE + i, size=256, bands=["q"], scene=scene,
                                       seeing=seeing, psf_beta=beta)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a SeeingWarning outside the trained range, expected here
                    s = score_patch(detect_patch(patch, det, min_score=min_score), patch, inst)
                tp, fp, n_true = tp + s["tp"], fp + s["fp"], n_true + s["n_true"]
            key = f"{label} {cell_label(kind, seeing, beta)}"
            out[key] = {"tp": tp, "fp": fp, "n_true": n_true, "precision": tp / max(tp + fp, 1),
                        "recall": tp / max(n_true, 1), "f1": f1_score(tp, fp, n_true),
                        "trained": kind == "seeing" and TRAINED_SEEING[0] <= seeing <= TRAINED_SEEING[1]}
            print(f"[{model}] {key}: F1 {out[key]['f1']:.3f} (P {out[key]['precision']:.2f} / "
                  f"R {out[key]['recall']:.2f})", flush=True)
    return out


def markdown(results: dict, header: str) -> str:
    models = list(results)
    cells = list(next(iter(results.values())))
    lines = [header, "", "| images | night | " + " | ".join(f"F1 (P / R), {m}" for m in models) + " |",
             "|---|---|" + "---|" * len(models)]
    for key in cells:
        label, night = key.split(" ", 1)
        row = [f"{results[m][key]['f1']:.3f} ({results[m][key]['precision']:.2f} / {results[m][key]['recall']:.2f})"
               for m in models]
        lines.append(f"| {label} | {night} | " + " | ".join(row) + " |")
    for label, _, _ in SCENES:
        for trained, name in ((True, 'mean, trained 2-3"'), (False, "mean, outside")):
            keys = [k for k in cells if k.startswith(label + " ") and results[models[0]][k]["trained"] == trained]
            row = [f"{np.mean([results[m][k]['f1'] for k in keys]):.3f}" for m in models]
            lines.append(f"| {label} | {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=None,
                    help="a detector folder, or 'shipped' for the default one; repeat to compare (default: shipped)")
    ap.add_argument("--min-score", type=float, default=None,
                    help="one detection threshold for every model (default: each head's own)")
    ap.add_argument("--out", default="runs/bench-psf-variety", help="output folder for results.json and results.md")
    args = ap.parse_args()
    models = args.model or ["shipped"]
    start = time.perf_counter()
    results = {m: run_model(m, args.min_score) for m in models}
    threshold = "each head's own threshold" if args.min_score is None else f"min_score {args.min_score}"
    header = (f"MeerLICHT q, validation seeds {SEED_BASE}+i, 256^2, {threshold}; total "
              f"{time.perf_counter() - start:.0f} s.\n\n`python {' '.join(sys.argv)}`")
    md = markdown(results, header)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
