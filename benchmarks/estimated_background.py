"""The background a counts cube's sources are fitted against when there is no model: estimated from the counts
with or without the detections left out, against the true one; validation patches, never the benchmark's seeds.

Run (from the repository root), one instrument per process:

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/estimated_background.py fermi-lat [--n 12]

On ``--n`` validation patches (256 x 256, the default fine-tuning recipe's scenes, seeds ``VAL_SEED_BASE + i``) the
shipped detector's network detections (its threshold) are refined by ``skyfm.detect.refine_counts`` without error
scales against each background: ``current`` (``estimate_background`` as it finds sources: 1 PSF FWHM smoothing,
sources in), ``maskKr68-sS`` (the detections left out within K r68, smoothing S FWHM) and ``true``. Printed per
background: matched fitted rows (truth snr >= 5, 3 px), median fitted / true flux, the share of true fluxes within
the fit's own (unscaled) 1-sigma error, and the median |pull|.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

VARIANTS = {"current": None, "mask2r68-s1": (2.0, 1.0), "mask2r68-s2": (2.0, 2.0), "mask3r68-s2": (3.0, 2.0),
            "mask2r68-s3": (2.0, 3.0)}


def main(argv=None) -> int:
    from skyfm.catalog import likelihood
    from skyfm.catalog.match import match_catalogs
    from skyfm.detect import default_min_score, detect_tiles, refine_counts
    from skyfm.finetune.config import load_finetune_config
    from skyfm.finetune.data import validation_patches
    from skyfm.heads import load_detector
    from skyfm.instruments import load_instrument

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("instrument", help="a counts-cube instrument of the default recipe: fermi-lat or ctao")
    ap.add_argument("--n", type=int, default=12, help="validation patches (default 12)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    det = load_detector()
    specs = {load_instrument(k).name: v for k, v in load_finetune_config("default").instrument_specs().items()}
    inst = load_instrument(args.instrument)
    th = default_min_score(det, det.head_config(inst.name))
    rows = {v: [] for v in list(VARIANTS) + ["true"]}
    for p in validation_patches(inst, specs[inst.name], args.n, 256, seed_offset=0):
        found = detect_tiles(p, inst, det, min_score=th)
        kernels = likelihood.psf_kernels(inst, psfs=[inst.band(b).psf for b in p.bands])
        data = np.nan_to_num(p.data.astype(np.float64))
        backgrounds = {}
        for name, par in VARIANTS.items():
            backgrounds[name] = (likelihood.estimate_background(data, kernels) if par is None else
                                 likelihood.estimate_background(data, kernels, sources=(found["x"], found["y"]),
                                                                source_radius_r68=par[0], smoothing_fwhm=par[1]))
        backgrounds["true"] = p.background_image
        for name, bkg in backgrounds.items():
            a = refine_counts({k: np.array(v, copy=True) for k, v in found.items()}, data, inst, None, bkg,
                              bands=list(p.bands), head=None)
            di, ti, _ = match_catalogs((a["x"], a["y"]), p.truth, 3.0)
            ok = (np.asarray(p.truth["snr"])[ti] >= 5) & (a["fit"][di] == 2)
            rows[name].append((a["flux"][di][ok], a["flux_err"][di][ok], np.asarray(p.truth["flux"])[ti][ok]))
    print(f"| background ({inst.name}, {args.n} validation patches) | fitted rows | median flux ratio | "
          "within 1 sigma | median abs pull |\n|---|---|---|---|---|")
    for name, parts in rows.items():
        f, e, t = (np.concatenate([p[i] for p in parts]) for i in range(3))
        print(f"| {name} | {len(f)} | {np.median(f / t):.3f} | {np.mean(np.abs(f - t) <= e):.3f} | "
              f"{np.median(np.abs(f - t) / e):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
