"""How close to the Cramér–Rao bound can any estimator localize the detection benchmark's isolated sources?

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/localization_bound.py [--n 8] [--cases meerlicht,wise] [--seeds test]

The detection benchmark (``benchmarks/detect.py``) reports ``loc/CRB``: the median separation of isolated point
sources with snr >= 10 (no neighbour brighter than 10% of their flux within two PSF FWHM) divided by 1.177 x their
Cramér–Rao sigma, computed for the source alone on its true background. This script asks what that number can be
on the same images (same seeds, same selection) by fitting each selected source with everything the simulator
knows — the image's exact PSF (per-band seeing), the true background, a start at the true position — by weighted
least squares on a box of 1.5 FWHM (+1 px), with

* ``oracle, data``: the image as it is (every other source's light still there);
* ``oracle, detectable subtracted``: the image minus every other true source with snr >= 5 (what a perfect
  detector and a perfect simultaneous fit of the detected neighbours could remove);
* ``oracle, all subtracted``: the image minus every other true source (the source really alone: the bound's
  assumption);

beside ``skyfm`` (the shipped default detector at its own threshold, as the benchmark runs it). Ratios are
reported overall and by true snr (10-30, 30-100, >= 100), and for CCD cases also split by whether the oracle's box
holds a contaminated pixel (the simulator's cosmic-ray, trail, saturated, bleed, hot or dead pixels): the bound
assumes none. Writes ``OUT/results.json`` and ``OUT/results.md``.

Counts cubes (``fermi``, ``fermi-plane``, ``ctao-plane``, ``fermi-plane-ichalo``): the oracle is skyfm's own
Poisson fitter (``skyfm.catalog.likelihood.fit_point_sources``, the instrument's PSF per bin) started at the true
position and flux, the other sources *modelled* rather than subtracted (a subtraction would break the Poisson
statistics): ``oracle, data`` fits against the true background alone (every other source's counts still there,
unmodelled), ``oracle, detectable modelled`` against the true background plus the expected counts of every other
source with snr >= 5, ``oracle, all modelled`` plus every other source. The last is the bound's own assumption, so
it also checks the fitter (about 1 at high snr when the fitter is efficient).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import detect as bench  # noqa: E402  (the detection benchmark's cases and seeds)

SNR_BINS = ((10.0, 30.0), (30.0, 100.0), (100.0, np.inf))
CCD_CASES = ("meerlicht", "meerlicht-crowded", "hubble", "wise")
COUNTS_CASES = ("fermi", "fermi-plane", "ctao-plane", "fermi-plane-ichalo")


def oracle_fits(patch, selected: np.ndarray) -> dict[str, np.ndarray]:
    """{variant: (N,) separation (pixels) of the oracle fit} for the true sources ``selected`` (indices)."""
    import astropy.units as u
    from scipy.optimize import least_squares

    from skyfm.data.simulate.render import add_point_sources

    inst = patch.instrument_config()
    scale = inst.pixel_scale_deg
    psfs = []
    for name in patch.bands:
        band = inst.band(name)
        seeing = patch.meta.get(f"seeing_{name}")
        psfs.append(band.psf if seeing is None else band.psf_with_fwhm(float(seeing) / 3600.0))
    nb = len(psfs)
    truth = patch.truth
    tx = np.asarray(u.Quantity(truth["x"]).value, float)
    ty = np.asarray(u.Quantity(truth["y"]).value, float)
    snr = np.asarray(truth["snr"], float)
    fb = np.asarray(u.Quantity(truth["flux_band"]).value, float).reshape(len(truth), -1)
    r = int(np.ceil(1.5 * max(p.fwhm_deg for p in psfs) / scale)) + 1
    gain = float(inst.noise.get("gain", 1.0))
    rn = float(inst.noise.get("read_noise", 0.0))
    out = {"data": [], "detectable subtracted": [], "all subtracted": []}
    for t in selected:
        ix, iy = int(round(tx[t])), int(round(ty[t]))
        if not (r <= ix < patch.width - r and r <= iy < patch.height - r):
            for v in out.values():
                v.append(np.nan)
            continue
        box = (slice(None), slice(iy - r, iy + r + 1), slice(ix - r, ix + r + 1))
        data = patch.data[box].astype(float)
        if patch.background_image is not None:
            sky = patch.background_image[box].astype(float)
        else:
            sky = np.stack([np.full((2 * r + 1,) * 2, float(patch.meta.get(f"sky_{b}", 0.0))) for b in patch.bands])
        own = np.stack([fb[t, c] * psfs[c].stamps(tx[t] - ix, ty[t] - iy, scale, radius_pix=r)[0] for c in range(nb)])
        others = patch.source_image[box] - own
        faint = np.zeros_like(others)  # the light of the other sources with snr < 5, on the box
        reach = r + 8
        near = (snr < 5) & (np.abs(tx - tx[t]) < reach + r) & (np.abs(ty - ty[t]) < reach + r)
        for c in range(nb):  # box coordinates: the box's corner pixel is (ix - r, iy - r)
            add_point_sources(faint[c], tx[near] - (ix - r), ty[near] - (iy - r), fb[near, c], psfs[c], scale,
                              radius_pix=reach, method="stamps")
        sigma = np.sqrt(np.maximum((sky + patch.source_image[box]) / gain + (rn / gain) ** 2, 1e-6))

        def residual(q, image):
            model = np.stack([q[2 + c] * psfs[c].stamps(q[0], q[1], scale, radius_pix=r)[0] for c in range(nb)])
            return ((image - sky - model) / sigma).ravel()

        start = np.r_[tx[t] - ix, ty[t] - iy, fb[t]]
        lower = np.r_[-2.0, -2.0, np.full(nb, -np.inf)]
        upper = np.r_[2.0, 2.0, np.full(nb, np.inf)]
        for name, image in (("data", data), ("detectable subtracted", data - others + faint),
                            ("all subtracted", data - others)):
            q = least_squares(residual, start, args=(image,), bounds=(lower, upper)).x
            out[name].append(np.hypot(q[0] - start[0], q[1] - start[1]))
    return {k: np.asarray(v) for k, v in out.items()}


def oracle_fits_counts(patch, selected: np.ndarray) -> dict[str, np.ndarray]:
    """Counts cubes: {variant: (N,) separation (pixels) of the oracle Poisson fit} for the true sources
    ``selected`` (indices); module docstring."""
    import astropy.units as u

    from skyfm.catalog import likelihood

    inst = patch.instrument_config()
    kernels = likelihood.psf_kernels(inst, inst.pixel_scale_deg, psfs=[inst.band(b).psf for b in patch.bands])
    tables = likelihood.psf_tables(kernels)
    truth = patch.truth
    tx = np.asarray(u.Quantity(truth["x"]).value, float)
    ty = np.asarray(u.Quantity(truth["y"]).value, float)
    snr = np.asarray(truth["snr"], float)
    fb = np.asarray(u.Quantity(truth["flux_band"]).value, float).reshape(len(truth), -1)
    ext = np.asarray(u.Quantity(truth["extension"]).value, float) if "extension" in truth.colnames else 0 * snr
    sky = patch.background_image.astype(float)
    counts = patch.data.astype(float)
    faint = (snr < 5) & (ext <= 0)  # the point sources a perfect detector would not have found
    faint_image = likelihood.add_point_sources(np.zeros_like(sky), kernels, tx[faint], ty[faint], fb[faint])
    out = {"data": [], "detectable modelled": [], "all modelled": []}
    for t in selected:
        own = likelihood.add_point_sources(np.zeros_like(sky), kernels, tx[t:t + 1], ty[t:t + 1], fb[t:t + 1])
        others = np.clip(patch.source_image - own, 0, None)
        for name, bg in (("data", sky), ("detectable modelled", sky + np.clip(others - faint_image, 0, None)),
                         ("all modelled", sky + others)):
            fit = likelihood.fit_point_sources(counts, bg, tables, tx[t:t + 1], ty[t:t + 1], fb[t:t + 1].sum(1),
                                               marginal_errors=False)
            out[name].append(float(np.hypot(fit["x"][0] - tx[t], fit["y"][0] - ty[t])))
    return {k: np.asarray(v) for k, v in out.items()}


def run_case(case_index: int, key: str, instrument: str, options, n: int, base: int, skyfm_fn) -> dict:
    from skyfm.catalog.evaluate import default_radius_pix, truth_crb
    from skyfm.catalog.metrics import detection_metrics, xy_of

    rows: dict[str, list] = {"skyfm": [], "oracle, data": [], "oracle, detectable subtracted": [],
                             "oracle, all subtracted": [], "oracle, detectable modelled": [],
                             "oracle, all modelled": []}
    snrs: dict[str, list] = {k: [] for k in rows}
    hits: dict[str, list] = {k: [] for k in rows}  # the star's oracle box holds a contaminated pixel
    for patch in bench._simulate(case_index, instrument, options, n, base):
        crb, iso = truth_crb(patch.truth, patch)
        snr = np.asarray(patch.truth["snr"], float)
        selected = np.flatnonzero(iso & (snr >= 10) & np.isfinite(crb))
        fits = oracle_fits_counts if patch.instrument_config().is_counts else oracle_fits
        hit = contaminated_boxes(patch)
        for name, sep in fits(patch, selected).items():
            ok = np.isfinite(sep)
            rows[f"oracle, {name}"].append(sep[ok] / (1.1774 * crb[selected][ok]))
            snrs[f"oracle, {name}"].append(snr[selected][ok])
            hits[f"oracle, {name}"].append(hit[selected][ok])
        if skyfm_fn is not None:
            cat = skyfm_fn(patch)
            cut = skyfm_fn.fixed_threshold(instrument)
            if cat.meta.get("selection") == "likelihood":  # score is sqrt(TS): the catalog's TS >= 25
                cut = float(np.sqrt(bench.LIKELIHOOD_MIN_TS))
            cat = cat[np.asarray(cat["score"], float) >= cut]
            m = detection_metrics(cat, patch.truth, default_radius_pix(patch.instrument_config()))
            d_idx, t_idx = np.asarray(m["det_idx"], int), np.asarray(m["truth_idx"], int)
            keep = np.isin(t_idx, selected)
            dx, dy = xy_of(cat)
            tx, ty = xy_of(patch.truth)
            d_idx, t_idx = d_idx[keep], t_idx[keep]
            rows["skyfm"].append(np.hypot(dx[d_idx] - tx[t_idx], dy[d_idx] - ty[t_idx]) / (1.1774 * crb[t_idx]))
            snrs["skyfm"].append(snr[t_idx])
            hits["skyfm"].append(hit[t_idx])
    out = {}
    for name in rows:
        if not rows[name]:
            continue
        ratio, s, h = np.concatenate(rows[name]), np.concatenate(snrs[name]), np.concatenate(hits[name])

        def median(sel):
            return float(np.median(ratio[sel])) if sel.any() else float("nan")

        out[name] = {"n": int(ratio.size), "median": median(np.ones(ratio.size, bool)),
                     "by_snr": [(lo, hi, int(((s >= lo) & (s < hi)).sum()), median((s >= lo) & (s < hi)))
                                for lo, hi in SNR_BINS]}
        if h.any():
            out[name]["by_box"] = {"clean": (int((~h).sum()), median(~h)), "contaminated": (int(h.sum()), median(h))}
    return out


def contaminated_boxes(patch) -> np.ndarray:
    """(N,) bool per true source of ``patch``: a contaminated pixel (any band, any bit of
    :data:`skyfm.data.patch.CONTAMINANT_BITS`) lies in the CCD oracle's fit box (1.5 FWHM + 1 px of the widest band);
    all False for counts cubes."""
    import astropy.units as u
    from scipy import ndimage

    n = len(patch.truth)
    if patch.contaminant_mask is None or patch.instrument_config().is_counts:
        return np.zeros(n, bool)
    inst = patch.instrument_config()
    r = int(np.ceil(1.5 * max(inst.band(b).psf.fwhm_deg for b in patch.bands) / inst.pixel_scale_deg)) + 1
    any_bit = np.bitwise_or.reduce(np.asarray(patch.contaminant_mask), axis=0) > 0
    near = ndimage.maximum_filter(any_bit, size=2 * r + 1, mode="constant")  # a hit within the box of each pixel
    x = np.clip(np.rint(np.asarray(u.Quantity(patch.truth["x"]).value, float)).astype(int), 0, patch.width - 1)
    y = np.clip(np.rint(np.asarray(u.Quantity(patch.truth["y"]).value, float)).astype(int), 0, patch.height - 1)
    return near[y, x]


def markdown(results: dict, command: str) -> str:
    lines = [f"command: `{command}`", "",
             "| case | estimator | loc/CRB, all (n) | snr 10-30 (n) | snr 30-100 (n) | snr >= 100 (n) |",
             "|---|---|---|---|---|---|"]
    for case, methods in results["cases"].items():
        for name, r in methods.items():
            bins = " | ".join(f"{m:.2f} ({k})" if np.isfinite(m) else f"- ({k})" for _, _, k, m in r["by_snr"])
            lines.append(f"| {case} | {name} | {r['median']:.2f} ({r['n']}) | {bins} |")
    split = [(case, name, r["by_box"]) for case, methods in results["cases"].items()
             for name, r in methods.items() if "by_box" in r]
    if split:
        lines += ["", "Split by the oracle's fit box: clean, or holding a contaminated pixel (cosmic ray, trail, "
                  "saturated, bleed, hot or dead):", "",
                  "| case | estimator | clean box (n) | contaminated box (n) |", "|---|---|---|---|"]
        for case, name, box in split:
            cells = " | ".join(f"{m:.2f} ({k})" if np.isfinite(m) else f"- ({k})"
                               for k, m in (box["clean"], box["contaminated"]))
            lines.append(f"| {case} | {name} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/localization_bound.py", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="patches per case (default 8, as benchmarks/detect.py)")
    ap.add_argument("--cases", default=",".join(CCD_CASES),
                    help="comma-separated cases of benchmarks/detect.py (default the CCD ones; also "
                         f"{', '.join(COUNTS_CASES)})")
    ap.add_argument("--seeds", choices=["test", "validation"], default="test",
                    help="test: the detection benchmark's test seeds (default); validation: seeds from 9.5e8")
    ap.add_argument("--no-skyfm", action="store_true", help="the oracle fits only")
    ap.add_argument("--out", default="runs/bench-localization-bound", help="output folder")
    args = ap.parse_args(argv)
    wanted = [c for c in args.cases.split(",") if c]
    known = {c[0]: (i, c) for i, c in enumerate(bench.CASES)}
    unknown = [c for c in wanted if c not in known or c not in CCD_CASES + COUNTS_CASES]
    if unknown:
        print(f"error: not a case of benchmarks/detect.py: {', '.join(unknown)} (choose from "
              f"{', '.join(CCD_CASES + COUNTS_CASES)})", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    skyfm_fn = None if args.no_skyfm else bench._skyfm_runner()[0]
    base = bench.BENCH_SEED_BASE if args.seeds == "test" else bench.VALIDATION_SEED_BASES[0]
    results: dict = {"seeds": args.seeds, "n": args.n, "cases": {}}
    started = time.perf_counter()
    for case in wanted:
        index, (key, _label, instrument, options) = known[case]
        index = bench.SEED_CASE.get(key, index)
        results["cases"][key] = run_case(index, key, instrument, options, args.n, base, skyfm_fn)
        print(f"[{key}] done at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    command = "benchmarks/localization_bound.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(results, command.strip())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
