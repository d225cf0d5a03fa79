"""Do the PSF fit's flux errors mean what they say? Pulls of CCD PSF fluxes by the fit's reduced chi-square.

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/fit_errors.py [--instruments meerlicht,wise] [--n 16] [--seed-offset 0]

On the error calibration's own validation patches (``skyfm.finetune.data.validation_patches``: the fine-tuning
recipe's scene mix, seeds 900000000 + offset + i, 256 px, never the detection benchmark's), the shipped detector's
rows that took the PSF flux (catalog column ``fit`` == 2) are matched to true sources with snr >= 5, and their
pulls ``|flux - true| / sigma`` are reported in bins of ``fit_chi2`` for two sigmas:

* ``Fisher``: the fit's statistical error alone (the catalog's error with the calibrated scale, floor and the
  chi-square widening taken out);
* ``widened``: the Fisher error times sqrt(max(1, chi2)), as :func:`skyfm.detect.refine_ccd_tile` applies it
  (before the calibrated scale and floor).

A calibrated error gives a 68% quantile of the pulls (``q68``) equal in every bin; the spread of ``q68`` across bins
is what a single scale and floor cannot absorb. Also the median ``|flux - true| / true`` per bin and the 68% coverage
of the catalog's errors as shipped, per scene. Writes ``OUT/results.json`` and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

CHI2_BINS = ((0.0, 1.5), (1.5, 3.0), (3.0, 10.0), (10.0, 100.0), (100.0, np.inf))


def matched_fit_rows(inst_name: str, n: int, seed_offset: int) -> dict:
    """Arrays over the PSF-flux rows matched to snr >= 5 true sources: flux, error (as shipped), Fisher error,
    chi2, true flux, scene."""
    import astropy.units as u

    from skyfm.catalog import match_catalogs
    from skyfm.catalog.evaluate import default_radius_pix
    from skyfm.detect import default_min_score, detect_patch, get_detector
    from skyfm.finetune.config import load_finetune_config
    from skyfm.finetune.data import validation_patches
    from skyfm.finetune.ship import _stat_errors
    from skyfm.instruments import load_instrument

    inst = load_instrument(inst_name)
    det = get_detector(None)
    head = det.head_config(inst.name)
    specs = {load_instrument(k).name: v for k, v in load_finetune_config("default").instrument_specs().items()}
    scale, floor = head.error_scales(fit=True)[0], head.error_floors()[0]
    rows = {k: [] for k in ("flux", "err", "fisher", "chi2", "true", "scene")}
    for p in validation_patches(inst, specs[inst.name], n, 256, seed_offset=seed_offset):
        cat = detect_patch(p, det, default_min_score(det, head), selection="network")
        val = lambda k: np.asarray(u.Quantity(cat[k]).value, dtype=np.float64)  # noqa: E731
        di, ti, _ = match_catalogs((val("x"), val("y")), p.truth, default_radius_pix(inst))
        keep = (np.asarray(p.truth["snr"])[ti] >= 5) & (np.asarray(cat["fit"])[di] == 2)
        di, ti = di[keep], ti[keep]
        flux, err, chi2 = val("flux")[di], val("flux_err")[di], val("fit_chi2")[di]
        widened = _stat_errors(err, floor * flux, scale)
        rows["flux"].append(flux)
        rows["err"].append(err)
        rows["fisher"].append(widened / np.sqrt(np.maximum(np.nan_to_num(chi2, nan=1.0), 1.0)))
        rows["chi2"].append(chi2)
        rows["true"].append(np.asarray(p.truth["flux"], dtype=np.float64)[ti])
        rows["scene"].append(np.full(len(di), str(p.meta.get("scene", "patch")), dtype=object))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in rows.items()}


def summarize(m: dict) -> dict:
    dev = np.abs(m["flux"] - m["true"])
    widen = np.sqrt(np.maximum(np.nan_to_num(m["chi2"], nan=1.0), 1.0))
    out = {"n": int(len(dev)), "bins": [], "scenes": {}}
    for lo, hi in CHI2_BINS:
        s = (np.nan_to_num(m["chi2"], nan=1.0) >= lo) & (np.nan_to_num(m["chi2"], nan=1.0) < hi)
        if not s.any():
            continue
        out["bins"].append({"chi2": [lo, hi], "n": int(s.sum()),
                            "q68_fisher": float(np.quantile(dev[s] / m["fisher"][s], 0.6827)),
                            "q68_widened": float(np.quantile(dev[s] / (m["fisher"][s] * widen[s]), 0.6827)),
                            "median_rel_dev": float(np.median(dev[s] / m["true"][s])),
                            "coverage_shipped": float(np.mean(dev[s] <= m["err"][s]))})
    for sc in np.unique(m["scene"].astype(str)):
        s = m["scene"].astype(str) == sc
        out["scenes"][sc] = {"n": int(s.sum()), "coverage_shipped": float(np.mean(dev[s] <= m["err"][s]))}
    out["coverage_shipped"] = float(np.mean(dev <= m["err"])) if len(dev) else float("nan")
    return out


def markdown(results: dict) -> str:
    lines = [f"Validation patches: {results['n']} per instrument, 256 px, seeds 900000000 + {results['seed_offset']} "
             f"+ i; total {results['wall_s']:.0f} s.", "",
             "| instrument | chi2 | n | q68 pull, Fisher | q68 pull, widened | median abs(dF)/F "
             "| coverage as shipped |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results["instruments"].items():
        for b in r["bins"]:
            lo, hi = b["chi2"]
            lines.append(f"| {name} | {lo:g}-{hi:g} | {b['n']} | {b['q68_fisher']:.2f} | {b['q68_widened']:.2f} | "
                         f"{b['median_rel_dev']:.3f} | {b['coverage_shipped']:.2f} |")
        scenes = ", ".join(f"{k} {v['coverage_shipped']:.2f} ({v['n']})" for k, v in r["scenes"].items())
        lines.append(f"| {name} | all | {r['n']} | | | | {r['coverage_shipped']:.2f} ({scenes}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instruments", default="meerlicht,wise", help="comma-separated CCD instruments")
    ap.add_argument("--n", type=int, default=16, help="validation patches per instrument")
    ap.add_argument("--seed-offset", type=int, default=0)
    ap.add_argument("--out", default="runs/bench-fit-errors")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = {"n": args.n, "seed_offset": args.seed_offset, "instruments": {}}
    for name in [s.strip() for s in args.instruments.split(",") if s.strip()]:
        results["instruments"][name] = summarize(matched_fit_rows(name, args.n, args.seed_offset))
        print(f"[{name}] done after {time.perf_counter() - t0:.0f} s", flush=True)
    results["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
