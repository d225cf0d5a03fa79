"""Where the PSF fit helps and where it does not: loc/CRB and F1 per validation patch (scene), fit off and on.

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/psf_fit_scenes.py [--instrument hubble] [--n 8] [--seed-base 950005000]

For each simulated patch (validation seeds: ``--seed-base + i``, never reported as test results) the shipped
detector runs twice, its head's ``psf_fit`` off and on; printed per patch: the scene, the number of isolated point
sources with snr >= 10 matched (as ``benchmarks/detect.py``'s loc/CRB), their median separation / (1.18 x CRB),
the median reduced chi-square of their fits, and F1 (snr >= 5) at the detector's threshold. One dense cluster can
hold most of an instrument's isolated stars, and so set ``detect.py``'s pooled loc/CRB; this shows which scene
does.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instrument", default="hubble", help="a CCD instrument (default hubble)")
    ap.add_argument("--n", type=int, default=8, help="patches (default 8)")
    ap.add_argument("--seed-base", type=int, default=950_005_000, help="first simulator seed (validation range)")
    args = ap.parse_args(argv)

    from skyfm.catalog.evaluate import default_radius_pix, truth_crb
    from skyfm.catalog.metrics import detection_metrics, localization_metrics
    from skyfm.data.simulate import simulate_patch
    from skyfm.detect import default_min_score, detect_patch
    from skyfm.heads import load_detector
    from skyfm.instruments import load_instrument

    det = load_detector()
    inst = load_instrument(args.instrument)
    head = det.head_config(inst.name)
    radius = default_radius_pix(inst)
    threshold = default_min_score(det, head)
    print(f"{inst.name}: seeds {args.seed_base}+, threshold {threshold}, match radius {radius:.2f} px")
    print("| patch | scene | true sources | fit | isolated snr >= 10 (n) | loc/CRB | median fit chi2 | F1 |")
    print("|---|---|---|---|---|---|---|---|")
    pooled = {False: [], True: []}
    for i in range(args.n):
        p = simulate_patch(inst.name, args.seed_base + i)
        crb, isolated = truth_crb(p.truth, p)
        snr = np.asarray(p.truth["snr"], dtype=float)
        for fit in (False, True):
            det.config.heads[inst.name] = dataclasses.replace(head, psf_fit=fit)
            cat = detect_patch(p, det, threshold)
            m = detection_metrics(cat, p.truth, radius)
            select = isolated & (snr >= 10) & np.isfinite(crb)
            loc = localization_metrics(cat, p.truth, m["det_idx"], m["truth_idx"], crb_pix=crb, select=select)
            ratio = loc.get("sep_over_crb", np.zeros(0)) / 1.1774
            pooled[fit].append(ratio)
            di = np.asarray(m["det_idx"], int)[select[np.asarray(m["truth_idx"], int)]]
            chi2 = np.asarray(cat["fit_chi2"], dtype=float)[di] if "fit_chi2" in cat.colnames else np.zeros(0)
            median = f"{np.median(ratio):.2f}" if len(ratio) else "-"
            med_chi2 = f"{np.nanmedian(chi2):.1f}" if np.isfinite(chi2).any() else "-"
            print(f"| {i} | {p.meta['scene']} | {len(p.truth)} | {'on' if fit else 'off'} | {len(ratio)} | {median} "
                  f"| {med_chi2} | {m['f1']:.3f} |")
    det.config.heads[inst.name] = head
    for fit in (False, True):
        r = np.concatenate(pooled[fit])
        print(f"pooled, fit {'on' if fit else 'off'}: loc/CRB {np.median(r):.2f} ({len(r)} sources)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
