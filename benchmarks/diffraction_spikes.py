"""Diffraction spikes on bright stars, which the simulators do not draw, beside sep on the same images.

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/diffraction_spikes.py [--n 4] [--share 0.01] [--out runs/bench-spikes]

A telescope whose secondary mirror hangs on vanes draws four spikes from every bright star (HST's at 45 deg to the
detector's axes). Each case simulates ``--n`` fresh 512^2 single-band images (seeds ``1.7996e9 + 100 * case + i``,
never used in training; Hubble F606W and MeerLICHT q in their scene mixes) and adds to every star of true SNR > 300
four arms at 45 / 135 deg holding ``--share`` of its flux: a ridge of Gaussian cross-section (sigma 0.7 px) whose
surface brightness falls as r^-2 beyond two FWHM. The sources are those of the image without spikes. Methods:
skyfm (:func:`skyfm.detect.detect_patch`, the shipped default detector) and ``sep-nofilter``
(:data:`skyfm.baselines.BASELINES`, at SNR 5). Reported: F1, false positives and the detections
on spike pixels (spike light above the image's noise sigma) with and without the spikes.

Writes ``OUT/results.json`` and ``OUT/results.md`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from image_units import catalog_of, f1_score

SEED_BASE = 1_799_600_000
CASES = {"hubble": "F606W", "meerlicht": "q"}
BRIGHT_SNR = 300.0


def spike_image(shape, x, y, flux, share: float, fwhm_pix: float, sigma: float) -> np.ndarray:
    """Four arms at 45 / 135 deg from each (x, y) star, holding ``share`` of its ``flux`` (see the module doc)."""
    out = np.zeros(shape)
    yy, xx = np.indices(shape)
    r0 = 2.0 * fwhm_pix
    for x0, y0, f in zip(x, y, flux):
        dx, dy = xx - x0, yy - y0
        inside = np.hypot(dx, dy) > r0
        for angle in (45.0, 135.0):
            a = np.radians(angle)
            along = dx * np.cos(a) + dy * np.sin(a)
            across = -dx * np.sin(a) + dy * np.cos(a)
            # r0 / r^2 integrates to 1 beyond r0: each of the four arms holds share / 4 of the flux
            brightness = f * share / 4.0 * r0 / np.maximum(np.abs(along), r0) ** 2 / (np.sqrt(2 * np.pi) * 0.7)
            arm = brightness * np.exp(-0.5 * (across / 0.7) ** 2) * inside
            out += np.where(arm > 0.05 * sigma, arm, 0.0)
    return out


def run(n: int, share: float, log) -> list[dict]:
    from skyfm.data.simulate import simulate_patch
    from skyfm.detect import get_detector
    from skyfm.finetune.evaluate import score_patch
    from skyfm.instruments import load_instrument
    from skyfm.instruments.scaling import robust_background

    det = get_detector(None, device="cpu")
    rows = []
    for c, (name, band) in enumerate(CASES.items()):
        inst = load_instrument(name)
        fwhm = inst.band(band).psf.fwhm_deg / inst.pixel_scale_deg
        totals = {}
        for i in range(n):
            patch = simulate_patch(name, SEED_BASE + 100 * c + i, size=512, bands=[band])
            _, sigma = robust_background(patch.data[0])
            t = patch.truth
            bright = (np.asarray(t["class"]) == "star") & (np.asarray(t["snr"], float) > BRIGHT_SNR)
            spikes = spike_image(patch.data.shape[1:], np.asarray(t["x"], float)[bright],
                                 np.asarray(t["y"], float)[bright], np.asarray(t["flux"], float)[bright], share,
                                 fwhm, sigma)
            with_spikes = dataclasses.replace(patch, data=(patch.data + spikes[None]).astype(np.float32))
            for image_name, image in (("no spikes", patch), ("spikes", with_spikes)):
                for method in ("skyfm", "sep-nofilter"):
                    cat = catalog_of(method, image, det)
                    s = score_patch(cat, patch, inst)
                    ix = np.clip(np.asarray(cat["x"], float).astype(int), 0, patch.width - 1)
                    iy = np.clip(np.asarray(cat["y"], float).astype(int), 0, patch.height - 1)
                    total = totals.setdefault((image_name, method), {"tp": 0, "fp": 0, "n_true": 0, "on": 0})
                    for k in ("tp", "fp", "n_true"):
                        total[k] += s[k]
                    total["on"] += int((spikes[iy, ix] > sigma).sum())
        for (image_name, method), total in totals.items():
            tp, fp, nt = total["tp"], total["fp"], total["n_true"]
            row = {"instrument": name, "band": band, "image": image_name, "method": method, "true_sources": nt,
                   "tp": tp, "fp": fp, "f1": f1_score(tp, fp, nt),
                   "on_spikes": total["on"]}
            log(f"  {name:9s} {image_name:9s} {method:12s} F1 {row['f1']:.3f}  FP {fp}  on spikes {total['on']}")
            rows.append(row)
    return rows


def markdown(rows: list[dict], n: int, share: float) -> str:
    lines = [f"Diffraction spikes: {n} fresh 512^2 single-band images per instrument (seeds from {SEED_BASE}), each "
             f"with and without four spikes holding {share:g} of the flux of every star of SNR > {BRIGHT_SNR:g}.", "",
             "| instrument (band) | image | method | true sources | TP | FP | F1 | detections on spike pixels |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['instrument']} ({r['band']}) | {r['image']} | {r['method']} | {r['true_sources']} | "
                     f"{r['tp']} | {r['fp']} | {r['f1']:.3f} | {r['on_spikes']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4, help="images per instrument (default 4)")
    parser.add_argument("--share", type=float, default=0.01, help="the spikes' share of a star's flux (default 0.01)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-spikes"), help="output folder")
    args = parser.parse_args(argv)
    rows = run(args.n, args.share, lambda m: print(m, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, args.n, args.share)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    (args.out / "results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
