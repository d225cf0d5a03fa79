"""Images from cameras whose gain or read noise is not the instrument YAML's, beside sep on the same images.

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/camera_noise.py [--n 8] [--out runs/bench-camera-noise]

skyfm's CCD steps take a camera's gain (e- per ADU) and read noise from the instrument's YAML, as an independent
simulator or another readout of the same telescope need not have them. Each case simulates ``--n`` fresh 256^2
single-band images (seeds ``1.7998e9 + 100 * case + i``, never used in training; Hubble F606W crowded and in its
scene mix, MeerLICHT q crowded, WISE W1 in its scene mix) with the instrument's noise as its YAML says, and with the
gain halved, doubled, and the read noise tripled (the same electrons: a camera of another gain only rescales the
ADU; a higher read noise makes a noisier image, whose truth SNRs are its own), and detects each as the instrument
itself: skyfm (:func:`skyfm.detect.detect_patch`, the shipped default detector) and ``sep-nofilter``
(:data:`skyfm.baselines.BASELINES`, at SNR 5). Reported: F1 (:func:`skyfm.finetune.evaluate.score_patch`).

Writes ``OUT/results.json`` and ``OUT/results.md`` and prints the markdown.
"""

from __future__ import annotations

import dataclasses

from image_units import catalog_of, command, f1_score

SEED_BASE = 1_799_800_000
CASES = (("hubble", "F606W", "crowded"), ("hubble", "F606W", None), ("meerlicht", "q", "crowded"),
         ("wise", "W1", None))  # (instrument, band, scene; None: the instrument's scene mix)
CAMERAS = {"as the YAML": {}, "gain x0.5": {"gain": 0.5}, "gain x2": {"gain": 2.0},
           "read noise x3": {"read_noise": 3.0}}
METHODS = ("skyfm", "sep-nofilter")


def camera(inst, factors: dict):
    """``inst`` with its noise's gain and read noise multiplied by ``factors``."""
    noise = {k: float(v) * factors.get(k, 1.0) if k in ("gain", "read_noise") else v for k, v in inst.noise.items()}
    return dataclasses.replace(inst, noise=noise)


def run(n: int, log) -> list[dict]:
    from skyfm.data.simulate import simulate_patch
    from skyfm.detect import get_detector
    from skyfm.finetune.evaluate import score_patch
    from skyfm.instruments import load_instrument

    det = get_detector(None, device="cpu")
    rows = []
    for c, (name, band, scene) in enumerate(CASES):
        inst = load_instrument(name)
        for label, factors in CAMERAS.items():
            totals = {m: [0, 0, 0] for m in METHODS}
            for i in range(n):
                patch = simulate_patch(camera(inst, factors), SEED_BASE + 100 * c + i, size=256, bands=[band],
                                       scene=scene)
                patch = dataclasses.replace(patch, instrument=name)  # read as the instrument, YAML and all
                for method in METHODS:
                    s = score_patch(catalog_of(method, patch, det), patch, inst)
                    t = totals[method]
                    t[0], t[1], t[2] = t[0] + s["tp"], t[1] + s["fp"], t[2] + s["n_true"]
            for method, (tp, fp, nt) in totals.items():
                row = {"instrument": name, "band": band, "scene": scene or "scene mix", "camera": label,
                       "method": method, "true_sources": nt, "tp": tp, "fp": fp, "f1": f1_score(tp, fp, nt)}
                log(f"  {name:9s} {band:5s} {row['scene']:9s} {label:13s} {method:12s} F1 {row['f1']:.3f}")
                rows.append(row)
    return rows


def markdown(rows: list[dict], n: int) -> str:
    lines = [f"Cameras of another gain or read noise: {n} fresh 256^2 single-band images per case and camera (seeds "
             f"from {SEED_BASE}), detected as the instrument (its YAML's gain and read noise). F1, skyfm / "
             "sep-nofilter.", "",
             "| instrument (band, scene) | " + " | ".join(CAMERAS) + " |",
             "|---|" + "---|" * len(CAMERAS)]
    for name, band, scene in CASES:
        scene = scene or "scene mix"
        cells = []
        for label in CAMERAS:
            f1 = {r["method"]: r["f1"] for r in rows if (r["instrument"], r["band"], r["scene"], r["camera"])
                  == (name, band, scene, label)}
            cells.append(" / ".join(f"{f1[m]:.3f}" for m in METHODS))
        lines.append(f"| {name} ({band}, {scene}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    return command(argv, __doc__, 8, "runs/bench-camera-noise", run, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
