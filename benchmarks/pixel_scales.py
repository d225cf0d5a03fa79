"""Images whose pixels are finer or coarser than the instrument's: a HST drizzle at 0.03", unWISE's 2.75" tiles.

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_NUM_THREADS=2 \\
        .venv/bin/python benchmarks/pixel_scales.py [--n 4] [--out runs/bench-pixel-scales]

``skyfm detect`` resamples each tile onto the network's pixels (the instrument's: ``skyfm.detect._native_tile``)
and maps the catalog back. Each case simulates ``--n`` fresh single-band or two-band images per pixel scale (seeds
``1.797e9 + i``, never used in training) with the instrument's YAML at ``factor`` times its pixel scale (the same
PSF, sky, depth and scene, the images covering the same sky: 384 native pixels a side), labels them as the
instrument itself, and runs :func:`skyfm.detect.detect_patch` with the shipped default detector; scored by
:func:`skyfm.finetune.evaluate.score_patch` with the match radius in the image's own pixels. The simulator places
its scenes per pixel, so the images of each factor hold different skies: compare skyfm at one factor before and
after a change, not one factor with another.

Writes ``OUT/results.json`` and ``OUT/results.md`` and prints the markdown.
"""

from __future__ import annotations

import dataclasses

from image_units import command, f1_score

SEED_BASE = 1_797_000_000
CASES = {"hubble": (["F606W"], None), "meerlicht": (["q"], "crowded"), "wise": (["W1", "W2"], None)}
FACTORS = (0.6, 1.0, 2.0)  # image pixel / instrument pixel
NATIVE_SIDE = 384


def run(n: int, log) -> list[dict]:
    from skyfm.data.simulate import simulate_patch
    from skyfm.detect import detect_patch, get_detector
    from skyfm.finetune.evaluate import match_radius_pix, score_patch
    from skyfm.instruments import load_instrument

    det = get_detector(None, device="cpu")
    rows = []
    for name, (bands, scene) in CASES.items():
        inst = load_instrument(name)
        for factor in FACTORS:
            scaled = dataclasses.replace(inst, pixel_scale=inst.pixel_scale * factor)
            tp = fp = n_true = 0
            for i in range(n):
                patch = simulate_patch(scaled, SEED_BASE + i, size=int(NATIVE_SIDE / factor) // 8 * 8, bands=bands,
                                       scene=scene)
                patch = dataclasses.replace(patch, instrument=name)
                s = score_patch(detect_patch(patch, det), patch, inst, radius=match_radius_pix(inst) / factor)
                tp, fp, n_true = tp + s["tp"], fp + s["fp"], n_true + s["n_true"]
            row = {"instrument": name, "bands": "+".join(bands), "scene": scene or "scene mix", "factor": factor,
                   "arcsec_per_pixel": round(float(scaled.pixel_scale.to_value("arcsec")), 4),
                   "true_sources": n_true, "tp": tp, "fp": fp, "f1": f1_score(tp, fp, n_true)}
            log(f"  {name:9s} x{factor:<4g} F1 {row['f1']:.3f}  TP {tp}  FP {fp}  of {n_true}")
            rows.append(row)
    return rows


def markdown(rows: list[dict], n: int) -> str:
    lines = [f"Pixel scales: {n} fresh images per instrument and scale (seeds from {SEED_BASE}), "
             "skyfm.detect.detect_patch with the shipped default detector.", "",
             "| instrument (bands, scene) | pixel (x the instrument's) | true sources | TP | FP | F1 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['instrument']} ({r['bands']}, {r['scene']}) | {r['arcsec_per_pixel']:g}\" "
                     f"(x{r['factor']:g}) | {r['true_sources']} | {r['tp']} | {r['fp']} | {r['f1']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    return command(argv, __doc__, 4, "runs/bench-pixel-scales", run, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
