"""Choose the cosmic-ray test of CCD detections on validation images: which L.A.Cosmic pass marks a hit's pixels,
what share of a detection's light on them makes it a hit, and how faint the rest of its light must be.

Run (from the repository root; ``skyfm.catalog.cosmics.TEST_SIGMA_CLIP``, ``skyfm.detect.COSMIC_RAY_LIGHT_MAX`` and
``skyfm.detect.COSMIC_RAY_SOURCE_SNR`` come from this command):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/choose_cosmic_rays.py [--fields 2] [--patches 8]

A single CCD exposure carries cosmic-ray hits. The PSF fit leaves the pixels L.A.Cosmic flags out
(:func:`skyfm.catalog.cosmics.cosmic_ray_mask`), but the network and the residual search still took hits, and the
faint tails L.A.Cosmic leaves unflagged, for sources: on single-band Hubble field images a third of the catalog.
:func:`skyfm.detect.refine_ccd_tile` drops the detections and finds whose light within a FWHM lies mostly on the
pixels of a hit (:func:`skyfm.detect._cosmic_rays`: a deeper L.A.Cosmic pass joined to the hits, grown by one
pixel), the light off them within two FWHM too faint to be a source of its own (L.A.Cosmic flags some bright
undersampled stars' cores, and a cluster's stars): this
script detects validation images (seeds 955e6, never used in training or in the benchmarks) at each of
:data:`SETTINGS` and prints F1, true and false positives per scene as ``benchmarks/detect.py`` counts them; ``off``
is no test (as before Run 30).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SEED_BASE = 955_000_000
# (Laplacian limit of the test pass, share of the light within a FWHM on its pixels, signal-to-noise ratio of the
# light off them within two FWHM below which a detection is a hit): the shipped choice first after "off", then one
# change at a time
SETTINGS = ((3.0, 0.5, 5.0), (4.5, 0.5, 5.0), (3.5, 0.5, 5.0), (3.0, 0.5, 3.0), (3.0, 0.5, 8.0))
# scene name: (instrument, bands or None for all, scene, side, images: "fields" or "patches")
SCENES = {
    "hubble F606W field": ("hubble", ["F606W"], "field", 1024, "fields"),
    "hubble F606W scene mix": ("hubble", ["F606W"], None, 256, "patches"),
    "hubble 3-band field": ("hubble", None, "field", 1024, "fields"),
    "hubble F606W cluster": ("hubble", ["F606W"], "cluster", 256, "patches"),
    "meerlicht q crowded": ("meerlicht", ["q"], "crowded", 256, "patches"),
    "wise field": ("wise", None, "field", 1024, "fields"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fields", type=int, default=2, help="field images per field scene")
    parser.add_argument("--patches", type=int, default=8, help="patches per patch scene")
    args = parser.parse_args()

    import skyfm.catalog.cosmics as cosmics
    import skyfm.detect as detect
    from skyfm.data.simulate import simulate_patch
    from skyfm.finetune.evaluate import score_patch
    from skyfm.instruments import load_instrument

    det = detect.get_detector(None, device="cpu")
    images = {name: [simulate_patch(inst, SEED_BASE + i, size=side, scene=scene, bands=bands)
                     for i in range(args.fields if kind == "fields" else args.patches)]
              for name, (inst, bands, scene, side, kind) in SCENES.items()}
    settings = [("off", None, None, None)] + [(f"{s:g} / {f:g} / {r:g}", s, f, r) for s, f, r in SETTINGS]
    print("| test pass sigma / light share / SNR of the rest | " + " | ".join(SCENES) + " | mean F1 |")
    print("|---|" + "---|" * (len(SCENES) + 1))
    for label, sigma, share, snr in settings:
        cosmics.TEST_SIGMA_CLIP = sigma if sigma is not None else cosmics.TEST_SIGMA_CLIP
        detect.COSMIC_RAY_LIGHT_MAX = share if share is not None else np.inf
        detect.COSMIC_RAY_SOURCE_SNR = snr if snr is not None else detect.COSMIC_RAY_SOURCE_SNR
        cells, f1s, t0 = [], [], time.time()
        for name, patches in images.items():
            inst = load_instrument(SCENES[name][0])
            tp = fp = n_true = 0
            for patch in patches:
                s = score_patch(detect.detect_patch(patch, det), patch, inst)
                tp, fp, n_true = tp + s["tp"], fp + s["fp"], n_true + s["n_true"]
            f1 = 2 * tp / max(1, tp + fp + n_true)
            f1s.append(f1)
            cells.append(f"{f1:.3f} ({tp} / {fp})")
        print(f"| {label} | " + " | ".join(cells) + f" | {np.mean(f1s):.4f} |  <!-- {time.time() - t0:.0f} s -->",
              flush=True)


if __name__ == "__main__":
    main()
