"""Skies that are not flat: a gradient across the image (scattered light, the moon, a bright star's halo) or a
patch of nebulosity, beside sep on the same images.

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/sky_backgrounds.py [--n 3] [--scene field] [--out runs/bench-sky-backgrounds]

The simulators' skies are flat across an image; real ones rarely are. Each case simulates ``--n`` fresh 512^2
single-band images of the simulator's ``--scene`` (``field``; ``crowded``: nebulae lie in the Galactic plane, among
many stars) (seeds ``1.7991e9 + 100 * case + i``, never used in training: MeerLICHT q, Hubble F606W, WISE W1) and
adds to each, in units of its robust sky noise sigma: nothing; a linear gradient from 0 at the left
edge to 1.5, 3 or 30 sigma at the right; a Gaussian glow of 20 sigma at its peak and 60 px sigma (nebulosity); a
filament of 20 sigma, a Gaussian 15 x 150 px (sigmas) across the centre at 30 deg.
The sources are those of the flat image (the truth with SNR >= 5 as simulated; the extra light's Poisson noise is
not added). Methods: skyfm (:func:`skyfm.detect.detect_patch`, the shipped default detector) and ``sep-nofilter``
(:data:`skyfm.baselines.BASELINES`, sep's crowded-field configuration, which estimates its background on a 64-px
mesh, at SNR 5).

Writes ``OUT/results.json`` and ``OUT/results.md`` and prints the markdown.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from image_units import command, f1_score

SEED_BASE = 1_799_100_000
CASES = {"meerlicht": "q", "hubble": "F606W", "wise": "W1"}
SKIES = ("flat", "gradient 1.5 sigma", "gradient 3 sigma", "gradient 30 sigma", "nebula 20 sigma", "filament 20 sigma")


def extra_sky(kind: str, shape: tuple[int, int], sigma: float) -> np.ndarray:
    yy, xx = np.indices(shape)
    if kind == "flat":
        return np.zeros(shape)
    if kind.startswith("gradient"):
        return float(kind.split()[1]) * sigma * xx / (shape[1] - 1)
    if kind.startswith("filament"):  # 15 x 150 px (Gaussian sigmas), its long axis at 30 deg
        u = (xx - 0.5 * shape[1]) * np.cos(np.pi / 6) + (yy - 0.5 * shape[0]) * np.sin(np.pi / 6)
        v = -(xx - 0.5 * shape[1]) * np.sin(np.pi / 6) + (yy - 0.5 * shape[0]) * np.cos(np.pi / 6)
        return 20.0 * sigma * np.exp(-u ** 2 / (2 * 150.0 ** 2) - v ** 2 / (2 * 15.0 ** 2))
    return 20.0 * sigma * np.exp(-((xx - 0.6 * shape[1]) ** 2 + (yy - 0.4 * shape[0]) ** 2) / (2 * 60.0 ** 2))


def run(n: int, log, scene: str = "field") -> list[dict]:
    from skyfm.baselines import BASELINES
    from skyfm.data.simulate import simulate_patch
    from skyfm.detect import detect_patch, get_detector
    from skyfm.finetune.evaluate import score_patch
    from skyfm.instruments import load_instrument
    from skyfm.instruments.scaling import robust_background

    det = get_detector(None, device="cpu")
    methods = {"skyfm": lambda p: detect_patch(p, det),
               "sep-nofilter": lambda p: (lambda c: c[np.asarray(c["score"], float) >= 5.0])(BASELINES["sep-nofilter"](p))}
    rows = []
    for k, (name, band) in enumerate(CASES.items()):
        inst = load_instrument(name)
        totals = {(sky, m): [0, 0, 0] for sky in SKIES for m in methods}
        for i in range(n):
            patch = simulate_patch(name, SEED_BASE + 100 * k + i, size=512, bands=[band], scene=scene)
            _, sigma = robust_background(patch.data[0])
            for sky in SKIES:
                data = (patch.data + extra_sky(sky, patch.data.shape[1:], sigma)[None]).astype(np.float32)
                p = dataclasses.replace(patch, data=data)
                for m, fn in methods.items():
                    s = score_patch(fn(p), p, inst)
                    t = totals[(sky, m)]
                    t[0], t[1], t[2] = t[0] + s["tp"], t[1] + s["fp"], t[2] + s["n_true"]
        for (sky, m), (tp, fp, n_true) in totals.items():
            f1 = f1_score(tp, fp, n_true)
            rows.append({"instrument": name, "band": band, "sky": sky, "method": m, "true_sources": n_true,
                         "tp": tp, "fp": fp, "f1": f1})
            log(f"  {name:9s} {sky:20s} {m:12s} F1 {f1:.3f}  TP {tp}  FP {fp}  of {n_true}")
    return rows


def markdown(rows: list[dict], n: int, scene: str = "field") -> str:
    lines = [f"Sky backgrounds: {n} fresh 512^2 {scene} images per instrument (seeds from {SEED_BASE}) with light "
             "added; F1 (TP / FP).", "",
             "| instrument (band) | method | " + " | ".join(SKIES) + " |", "|---|---|" + "---|" * len(SKIES)]
    for name in CASES:
        for m in ("skyfm", "sep-nofilter"):
            cells = [next(r for r in rows if r["instrument"] == name and r["method"] == m and r["sky"] == sky)
                     for sky in SKIES]
            lines.append(f"| {name} ({cells[0]['band']}) | {m} | "
                         + " | ".join(f"{c['f1']:.3f} ({c['tp']} / {c['fp']})" for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    return command(argv, __doc__, 3, "runs/bench-sky-backgrounds", run, markdown,
                   options={"scene": ("field", "the simulator's scene: field, crowded, ...")})


if __name__ == "__main__":
    raise SystemExit(main())
