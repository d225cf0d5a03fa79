"""Mosaics with no-data regions: a drizzled or SWarp image's edge written as zeros, or as NaN.

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/no_data_edges.py [--n 3] [--out runs/bench-no-data]

A rotated HST drizzle product, a SWarp coadd or a survey tile at a footprint's edge has a region where no exposure
fell: written as 0 (drizzle, SWarp) or NaN. Each case simulates ``--n`` fresh 512^2 single-band images (seeds
``1.79e9 + 100 * case + i``, never used in training: Hubble F606W and WISE W1 fields, MeerLICHT q crowded) and
detects each three ways with :func:`skyfm.detect.detect_patch` and the shipped default detector:

* ``full``: the image as simulated (scored on the part outside the wedge below);
* ``zeros``: a slanted wedge (``x + 0.6 y > 560``, a quarter of the image) set to 0, as a drizzle edge;
* ``NaN``: the same wedge invalid (the reader's mask: NaN, inf, BLANK or a MASK HDU).

Each is scored on the true sources (SNR >= 5) outside the wedge and the detections outside it
(:func:`skyfm.finetune.evaluate.score_patch`); detections inside the wedge are counted apart.

Writes ``OUT/results.json`` and ``OUT/results.md`` and prints the markdown.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from image_units import command, f1_score

SEED_BASE = 1_790_000_000
CASES = {"hubble": ("F606W", "field"), "meerlicht": ("q", "crowded"), "wise": ("W1", "field")}
VARIANTS = ("full", "zeros", "NaN")


def wedge(shape) -> np.ndarray:
    yy, xx = np.indices(shape)
    return xx + 0.6 * yy > 560


def variant_patch(patch, variant: str, no_data: np.ndarray):
    if variant == "full":
        return patch
    data = np.where(no_data, 0.0, patch.data).astype(np.float32)  # the reader too sets invalid pixels to 0
    return dataclasses.replace(patch, data=data, mask=no_data if variant == "NaN" else None)


def run(n: int, log) -> list[dict]:
    from skyfm.data.simulate import simulate_patch
    from skyfm.detect import detect_patch, get_detector
    from skyfm.finetune.evaluate import score_patch
    from skyfm.instruments import load_instrument

    det = get_detector(None, device="cpu")
    rows = []
    for c, (name, (band, scene)) in enumerate(CASES.items()):
        inst = load_instrument(name)
        totals = {v: {"tp": 0, "fp": 0, "n_true": 0, "inside": 0} for v in VARIANTS}
        for i in range(n):
            patch = simulate_patch(name, SEED_BASE + 100 * c + i, size=512, bands=[band], scene=scene)
            no_data = wedge(patch.data.shape[1:])
            truth = patch.truth
            tin = no_data[np.clip(np.rint(np.asarray(truth["y"])).astype(int), 0, 511),
                          np.clip(np.rint(np.asarray(truth["x"])).astype(int), 0, 511)]
            outside_truth = dataclasses.replace(patch, truth=truth[~tin])
            for variant in VARIANTS:
                cat = detect_patch(variant_patch(patch, variant, no_data), det)
                iy = np.clip(np.rint(np.asarray(cat["y"], float)).astype(int), 0, 511)
                ix = np.clip(np.rint(np.asarray(cat["x"], float)).astype(int), 0, 511)
                inside = no_data[iy, ix]
                s = score_patch(cat[~inside], outside_truth, inst)
                t = totals[variant]
                t["tp"], t["fp"], t["n_true"] = t["tp"] + s["tp"], t["fp"] + s["fp"], t["n_true"] + s["n_true"]
                t["inside"] += int(inside.sum())
        for variant, t in totals.items():
            row = {"instrument": name, "band": band, "scene": scene, "image": variant, "true_sources": t["n_true"],
                   "tp": t["tp"], "fp": t["fp"], "f1": f1_score(t["tp"], t["fp"], t["n_true"]),
                   "detections_in_wedge": t["inside"]}
            log(f"  {name:9s} {variant:6s} F1 {row['f1']:.3f}  TP {t['tp']}  FP {t['fp']}  in the wedge {t['inside']}")
            rows.append(row)
    return rows


def markdown(rows: list[dict], n: int) -> str:
    lines = [f"No-data wedges: {n} fresh 512^2 single-band images per instrument (seeds from {SEED_BASE}); "
             "skyfm.detect.detect_patch with the shipped default detector; scored outside the wedge.", "",
             "| instrument (band, scene) | image | true sources | TP | FP | F1 | detections in the wedge |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['instrument']} ({r['band']}, {r['scene']}) | {r['image']} | {r['true_sources']} | "
                     f"{r['tp']} | {r['fp']} | {r['f1']:.3f} | "
                     f"{r['detections_in_wedge'] if r['image'] != 'full' else '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    return command(argv, __doc__, 3, "runs/bench-no-data", run, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
