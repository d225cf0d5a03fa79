"""Source detection, side by side on the same fresh images: sep, photutils, the Poisson TS map, and skyfm.

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/detect.py [--n 8] [--calib-n 2] [--cases fermi-plane,wise] [--out runs/bench-detect]

**Images.** Every case simulates ``--n`` test patches (256 x 256) and ``--calib-n`` calibration patches with seeds
``BENCH_SEED_BASE + 1000 * case + i`` (test) and ``CALIB_SEED_BASE + 1000 * case + i`` (calibration):
1.5e9 and 1.6e9 upward, never used for training (fine-tuning trains on seeds from 1e8 and validates from 9e8,
the denoiser holds out from 2^31, pretraining shards draw hashed seeds through ``patch_seed``).

Cases: Fermi-LAT (resampled 4FGL sky anywhere), Fermi-LAT Galactic plane (the real 4FGL-DR2 sky, centres at
|b| <= 8 deg so the patch lies within |b| < 21), CTAO Galactic plane (extended, overlapping sources), MeerLICHT
(drawn scenes), MeerLICHT crowded fields, Hubble, WISE; and the interstellar-model swap, ``fermi-plane-ichalo``:
the fermi-plane seeds and skies with the ``ic-halo`` Galactic emission model instead of ``gas-disk``, the only one
that pretraining and fine-tuning ever simulated (the issue's "trained with one model, tested with the other").

Methods: ``sep``, ``sep-nofilter`` (sep's crowded-field configuration: no detection filter, 3-px minimum area),
``photutils-dao``, ``photutils-segmentation`` (every instrument; counts cubes summed over bins),
``tsmap-true`` / ``tsmap-estimated`` (counts cubes; true simulated background or one estimated from the counts),
and ``skyfm`` (``skyfm.detect.detect_patch`` with the default detector shipped in the package, when it imports
and loads; otherwise the benchmark runs the baselines alone and says so). On counts cubes ``detect_patch``
gets the simulator's true background (``patch.background_image``), like ``tsmap-true``, and so selects by the
likelihood (the network's and the TS map's peaks fitted together, kept at TS >= 25, score sqrt(TS):
``skyfm detect --background``); ``skyfm-estbg`` is the same without it (the network's selection, with the
background estimated from the counts for the refinement, as for real data without a model). On CCD
images ``skyfm-notrails`` is ``skyfm`` with ``drop_trails=False`` (``skyfm detect --no-drop-trails``; the
satellite-trail filter is on by default for MeerLICHT and Hubble, off for WISE). With
``--with-denoiser``, counts cubes also get ``tsmap-denoiser``: the TS map with the background the shipped diffusion
denoiser removed (``skyfm denoise``'s ``BACKGROUND`` HDU, :func:`skyfm.heads.denoise.apply.denoise_patch` with
``return_background=True``, its default samples and steps; its Mpix/s includes the denoiser).

**Metrics** (:mod:`skyfm.catalog.metrics`), true sources with snr >= 5 must be found; match radius 3 px for
counts cubes, else 0.75 PSF FWHM (at least 2 px):

* ``F1@fixed``: at each method's documented threshold: SNR >= 5 (sep, photutils), TS >= 25 (TS map: score =
  sqrt(TS) >= 5), the detector's own per-instrument ``min_score`` (skyfm; it is run there, so its sweeps and
  F1@cal only go upward from it unless ``--skyfm-min-score`` is lower; with likelihood selection TS >= 25, its
  table, like the TS map's, holding rows down to TS 16 for the sweeps);
* ``F1@cal``: at the threshold of best F1 on the calibration patches, applied to the test patches;
* ``R(3-5)@P0.9``: recall of true SNR 3-5 sources at the lowest threshold whose precision (against sources with
  snr >= 3) is >= 0.9, on the test patches;
* ``CR+trail``: detections (at the fixed threshold) that match no true source, sit on a cosmic-ray or
  satellite-trail pixel (``patch.contaminant_mask``) and have no true source with snr >= 1 within the match radius
  (in crowded fields a third of the cosmic-ray pixels lie that near a real star, and a detection of that star is
  not a detection of the cosmic ray), with the ratio to sep's count;
* ``loc/CRB``: median separation / (1.18 x Cramér–Rao sigma) for isolated point sources with snr >= 10 (1 = at the
  bound; the CRB uses the true background and the image's PSF);
* ``cov68``: fraction of matched true fluxes inside flux +- flux_err (methods that give flux_err);
* Fermi plane: association rate of true sources at |b| < 20 with snr >= 20 and 10-20, a true source being
  associated when a detection lies within its 95% radius (4FGL-DR2 Conf_95_SemiMajor for real sources, widened in
  quadrature by the detection's 2.45 pos_err; at least 0.1 deg), for all of them and for the point sources alone
  (4FGL-DR2 gives extended sources no 95% radius, and the AutoSourceID papers measure point sources; a detection
  1 px from the centre of a 3 deg template is not what the target asks for);
* ``Mpix/s``: image pixels (H x W) per second of wall time of the method alone, one thread.

Writes ``OUT/results.json`` and ``OUT/results.md`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402

BENCH_SEED_BASE = 1_500_000_000
CALIB_SEED_BASE = 1_600_000_000
VALIDATION_SEED_BASES = (950_000_000, 960_000_000)  # --seeds validation: for choosing settings, never reporting
SNR_MIN = 5.0
LIKELIHOOD_MIN_TS = 25.0  # skyfm detect's --min-ts, the TS map's ts_min
SWEEP_MIN_TS = 16.0  # the lowest TS that skyfm's likelihood selection and the TS map (candidate_ts) keep for sweeps
TARGET_PRECISION = 0.9
CONTAMINANT_BITS = 1 | 2  # cosmic_ray | satellite_trail

CASES = [  # (key, label, instrument, options(rng) -> simulate_patch kwargs)
    ("fermi", "Fermi-LAT, resampled 4FGL sky", "fermi-lat", lambda rng: {"population": "resampled"}),
    ("fermi-plane", "Fermi-LAT, real 4FGL sky, |b| <= 8 centres", "fermi-lat",
     lambda rng: {"population": "real", "center": (float(rng.uniform(0, 360)), float(rng.uniform(-8, 8)))}),
    ("ctao-plane", "CTAO Galactic plane (extended, overlapping)", "ctao", lambda rng: {"population": "plane"}),
    ("meerlicht", "MeerLICHT, drawn scenes", "meerlicht", lambda rng: {}),
    ("meerlicht-crowded", "MeerLICHT, crowded fields", "meerlicht", lambda rng: {"scene": "crowded"}),
    ("hubble", "Hubble (3 bands)", "hubble", lambda rng: {}),
    ("wise", "WISE (4 bands)", "wise", lambda rng: {}),
    ("fermi-plane-ichalo", "Fermi-LAT plane as fermi-plane, but the ic-halo interstellar model (training: gas-disk)",
     "fermi-lat", lambda rng: {"population": "real", "center": (float(rng.uniform(0, 360)), float(rng.uniform(-8, 8))),
                               "galactic_model": "ic-halo"}),
    # one band of a many-band instrument, as users' single-filter files are (the heads are trained on every band)
    ("wise-w1", "WISE, W1 only (a W1 tile)", "wise", lambda rng: {"bands": ["W1"]}),
    ("hubble-f606w", "Hubble, F606W only", "hubble", lambda rng: {"bands": ["F606W"]}),
    # the other way round: all six filters of an instrument whose heads are trained on one per image
    ("meerlicht-six", "MeerLICHT, six bands (u g q r i z), drawn scenes", "meerlicht",
     lambda rng: {"bands": ["u", "g", "q", "r", "i", "z"]}),
]
# the same seeds (sky positions, sources, noise draws) as fermi-plane, wise, hubble and meerlicht
SEED_CASE = {"fermi-plane-ichalo": 1, "wise-w1": 6, "hubble-f606w": 5, "meerlicht-six": 3}
FIXED = {"sep": 5.0, "sep-nofilter": 5.0, "photutils-dao": 5.0, "photutils-segmentation": 5.0, "tsmap-true": 5.0, "tsmap-estimated": 5.0,
         "tsmap-denoiser": 5.0,
         "skyfm": None, "skyfm-estbg": None, "skyfm-notrails": None}


def _simulate(case_index: int, instrument: str, options, n: int, base: int) -> list:
    from skyfm.data.simulate import simulate_patch

    out = []
    for i in range(n):
        seed = base + 1000 * case_index + i
        rng = np.random.default_rng([seed, 99])
        out.append(simulate_patch(instrument, seed, **options(rng)))
    return out


def _skyfm_runner(min_score=None, drop_trails=None):
    """(callable, note): skyfm's detect_patch with the default detector, or (None, why not)."""
    try:
        from skyfm.detect import detect_patch
        from skyfm.heads import load_detector

        det = load_detector()
    except Exception as e:  # ImportError before the detector lands, SkyfmError when the model is missing
        return None, f"skyfm not run: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    from skyfm.detect import default_min_score

    def run(patch, drop_trails=drop_trails):  # min_score / drop_trails None: the detector's per-instrument ones
        # likelihood selection keeps TS >= 16 here, as the TS-map baseline's table does, so that the sweeps of both
        # go below the catalogs' TS >= 25 alike; F1@fixed cuts at 25 (skyfm detect's default --min-ts)
        return detect_patch(patch, det, min_score=min_score, drop_trails=drop_trails, min_ts=SWEEP_MIN_TS)

    run.fixed_threshold = lambda inst: default_min_score(det, det.head_config(inst))
    how = "its own per-instrument min_score" if min_score is None else f"min_score {min_score}"
    return run, (f"skyfm: skyfm.detect.detect_patch with the shipped default detector, run at {how} "
                 "(sweeps start there; F1@fixed at its own per-instrument min_score)")


def _denoiser_tsmap():
    """tsmap_detect with the shipped denoiser's removed background (``--with-denoiser``)."""
    from skyfm.baselines import tsmap_detect
    from skyfm.heads.denoise.apply import denoise_patch, load_denoiser

    model = load_denoiser()

    def run(patch):
        _, _, background = denoise_patch(patch, model, seed=0, return_background=True)
        return tsmap_detect(patch, background=background)

    return run


def _methods(counts: bool, skyfm_fn, with_denoiser: bool = False):
    from skyfm.baselines import BASELINES, photutils_detect, sep_detect, tsmap_detect

    m = {"sep": sep_detect, "sep-nofilter": BASELINES["sep-nofilter"], "photutils-dao": lambda p: photutils_detect(p, "dao"),
         "photutils-segmentation": lambda p: photutils_detect(p, "segmentation")}
    if counts:
        m["tsmap-true"] = lambda p: tsmap_detect(p, background="true")
        m["tsmap-estimated"] = lambda p: tsmap_detect(p, background="estimated")
        if with_denoiser:
            m["tsmap-denoiser"] = _denoiser_tsmap()
    if skyfm_fn is not None:
        m["skyfm"] = skyfm_fn
        if counts:  # detect_patch refines with patch.background_image when present: also run it without
            from dataclasses import replace

            m["skyfm-estbg"] = lambda p: skyfm_fn(replace(p, background_image=None))
        else:  # CCD images: also without the satellite-trail filter (skyfm detect --no-drop-trails)
            m["skyfm-notrails"] = lambda p: skyfm_fn(p, drop_trails=False)
    return m


def _score(cat) -> np.ndarray:
    return np.asarray(cat["score"], dtype=np.float64) if "score" in cat.colnames else np.ones(len(cat))


def _contaminant_hits(cat, patch, truth_idx_matched_det: np.ndarray, radius: float) -> int:
    """Detections on a cosmic-ray or trail pixel that match no true source and have no true source of snr >= 1
    within ``radius`` (module docstring, ``CR+trail``)."""
    if patch.contaminant_mask is None or len(cat) == 0:
        return 0
    cm = np.bitwise_or.reduce(patch.contaminant_mask, axis=0) & CONTAMINANT_BITS
    xd, yd = np.asarray(cat["x"], dtype=float), np.asarray(cat["y"], dtype=float)
    x = np.clip(np.round(xd).astype(int), 0, patch.width - 1)
    y = np.clip(np.round(yd).astype(int), 0, patch.height - 1)
    on = cm[y, x] > 0
    unmatched = np.ones(len(cat), dtype=bool)
    unmatched[truth_idx_matched_det] = False
    truth = patch.truth
    if truth is not None and len(truth):
        real = np.asarray(truth["snr"], dtype=float) >= 1.0
        tx, ty = np.asarray(truth["x"], dtype=float)[real], np.asarray(truth["y"], dtype=float)[real]
        if tx.size:
            from scipy.spatial import cKDTree

            dist, _ = cKDTree(np.c_[tx, ty]).query(np.c_[xd, yd])
            unmatched &= dist > radius
    return int(np.sum(on & unmatched))


def _assoc_radius_table():
    """{4FGL name: Conf_95_SemiMajor (deg)} from the 4FGL-DR2 file beside the checkout, or {} with a warning (the
    association then uses the detections' own errors alone: its rates are not comparable with a run that had it)."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fermi" / "gll_psc_v27.fit"
    if not path.is_file():
        print(f"warning: {path} not found: the Fermi-LAT association takes no 4FGL 95% radii (rates not comparable "
              "with runs that had them; a checkout elsewhere needs shared/ beside it)", file=sys.stderr)
        return {}
    from skyfm.catalog.metrics import read_reference

    ref = read_reference(path)
    return {str(n).strip(): float(a) for n, a in zip(ref["Source_Name"], ref["Conf_95_SemiMajor"]) if np.isfinite(a)}


ASSOC_KEYS = [f"{c}_{p}{k}" for c in "na" for p in ("", "pt_") for k in ("ge20", "10_20")]


def _association(cat, patch, conf95: dict) -> dict:
    """Per true source at |b| < 20: associated with some detection within its 95% radius (module docstring)."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    t = patch.truth
    glat = np.asarray(t["glat"], dtype=float)
    snr = np.asarray(t["snr"], dtype=float)
    sel = np.abs(glat) < 20
    res = {k: 0 for k in ASSOC_KEYS}
    if not sel.any():
        return res
    names = [str(s).strip() for s in t["name"]]
    r_ref = np.array([conf95.get(n, 0.0) for n in names])
    tc = SkyCoord(np.asarray(t["glon"], float) * u.deg, glat * u.deg, frame="galactic")
    assoc = np.zeros(len(t), dtype=bool)
    if len(cat) and "glon" in cat.colnames:
        dc = SkyCoord(u.Quantity(cat["glon"], u.deg), u.Quantity(cat["glat"], u.deg), frame="galactic")
        pe = (u.Quantity(cat["pos_err"]).to_value(u.deg) if "pos_err" in cat.colnames
              and u.Quantity(cat["pos_err"]).unit.physical_type == "angle" else np.zeros(len(cat)))
        idx_t, idx_d, sep, _ = dc.search_around_sky(tc, 2.0 * u.deg)
        r = np.maximum(np.hypot(r_ref[idx_t], 2.4477 * np.nan_to_num(pe[idx_d])), 0.1)
        ok = sep.to_value(u.deg) <= r
        assoc[idx_t[ok]] = True
    point = np.asarray(t["extension"], dtype=float) <= 0 if "extension" in t.colnames else np.ones(len(t), bool)
    for key, lo, hi in (("ge20", 20.0, np.inf), ("10_20", 10.0, 20.0)):
        for prefix, among in (("", sel), ("pt_", sel & point)):
            s = among & (snr >= lo) & (snr < hi)
            res[f"n_{prefix}{key}"] = int(s.sum())
            res[f"a_{prefix}{key}"] = int((s & assoc).sum())
    return res


def run_case(case_index, key, label, instrument, options, n, n_cal, skyfm_fn, conf95, log,
             with_denoiser: bool = False) -> dict:
    from skyfm.catalog.evaluate import default_radius_pix, truth_crb
    from skyfm.catalog.metrics import (best_f1, concat_sweeps, detection_metrics, localization_metrics,
                                       metrics_at_threshold, recall_at_precision, score_sweep)
    from skyfm.instruments import load_instrument

    inst = load_instrument(instrument)
    radius = default_radius_pix(inst)
    t0 = time.perf_counter()
    test = _simulate(case_index, instrument, options, n, BENCH_SEED_BASE)
    cal = _simulate(case_index, instrument, options, n_cal, CALIB_SEED_BASE)
    log(f"[{key}] simulated {n} + {n_cal} patches in {time.perf_counter() - t0:.1f} s; radius {radius:.2f} px")
    crbs = [truth_crb(p.truth, p) for p in test]
    methods = _methods(inst.is_counts, skyfm_fn, with_denoiser)
    out = {"label": label, "instrument": instrument, "n_test": n, "n_cal": n_cal, "radius_pix": radius,
           "n_true_snr5": int(sum(np.sum(np.asarray(p.truth["snr"]) >= SNR_MIN) for p in test)),
           "n_true_snr3_5": int(sum(np.sum((np.asarray(p.truth["snr"]) >= 3) & (np.asarray(p.truth["snr"]) < 5))
                                    for p in test)),
           "methods": {}}
    for name, fn in methods.items():
        try:
            cal_sw = []
            for p in cal:
                cal_sw.append(score_sweep(fn(p), p.truth, radius))
            sweeps, seps_crb, ratios, covered, n_cov, hits = [], [], [], 0, 0, 0
            assoc = {k: 0 for k in ASSOC_KEYS}
            wall, pix = 0.0, 0
            fixed_thr = FIXED.get(name)
            if name.startswith("skyfm") and hasattr(skyfm_fn, "fixed_threshold"):
                fixed_thr = skyfm_fn.fixed_threshold(instrument)
            for p, (crb, iso) in zip(test, crbs):
                t = time.perf_counter()
                cat = fn(p)
                wall += time.perf_counter() - t
                if name.startswith("skyfm") and cat.meta.get("selection") == "likelihood":
                    fixed_thr = float(np.sqrt(LIKELIHOOD_MIN_TS))  # score is sqrt(TS): the catalog's TS >= 25
                elif name.startswith("skyfm") and cat.meta.get("min_score") is not None:
                    fixed_thr = float(cat.meta["min_score"])  # a head's threshold for the image's bands
                pix += p.height * p.width
                sweeps.append(score_sweep(cat, p.truth, radius))
                kept = cat if fixed_thr is None else cat[_score(cat) >= fixed_thr]
                m = detection_metrics(kept, p.truth, radius)
                hits += _contaminant_hits(kept, p, m["det_idx"], radius)
                snr = np.asarray(p.truth["snr"], dtype=float)
                sel = iso & (snr >= 10) & np.isfinite(crb)
                loc = localization_metrics(kept, p.truth, m["det_idx"], m["truth_idx"], crb_pix=crb, select=sel)
                if "sep_over_crb" in loc:
                    seps_crb.append(loc["sep_over_crb"])
                if "flux_err" in kept.colnames and len(m["det_idx"]):
                    should = snr[m["truth_idx"]] >= SNR_MIN
                    fd = np.asarray(kept["flux"], float)[m["det_idx"]][should]
                    fe = np.asarray(kept["flux_err"], float)[m["det_idx"]][should]
                    ft = np.asarray(p.truth["flux"], float)[m["truth_idx"]][should]
                    ok = np.isfinite(fe) & (fe > 0)
                    covered += int(np.sum(np.abs(fd[ok] - ft[ok]) <= fe[ok]))
                    n_cov += int(ok.sum())
                    ratios.append(fd / np.maximum(ft, 1e-30))
                if key == "fermi-plane":
                    a = _association(kept, p, conf95)
                    for k in assoc:
                        assoc[k] += a[k]
            sw = concat_sweeps(sweeps)
            fixed = metrics_at_threshold(sw, -np.inf if fixed_thr is None else fixed_thr, SNR_MIN)
            cal_best = best_f1(concat_sweeps(cal_sw), SNR_MIN) if cal_sw else {"threshold": float("nan")}
            at_cal = (metrics_at_threshold(sw, cal_best["threshold"], SNR_MIN) if np.isfinite(cal_best["threshold"])
                      else {"f1": float("nan"), "precision": float("nan"), "recall": float("nan")})
            r35 = recall_at_precision(sw, TARGET_PRECISION, (3.0, 5.0))
            sc = np.concatenate(seps_crb) if seps_crb else np.zeros(0)
            rat = np.concatenate(ratios) if ratios else np.zeros(0)
            res = {
                "f1_fixed": fixed["f1"], "precision_fixed": fixed["precision"], "recall_fixed": fixed["recall"],
                "fixed_threshold": fixed_thr, "f1_cal": at_cal["f1"], "precision_cal": at_cal["precision"],
                "recall_cal": at_cal["recall"], "cal_threshold": cal_best["threshold"],
                "recall_snr3_5_at_p": r35["recall"], "p_reached": r35["precision"], "r35_threshold": r35["threshold"],
                "contaminant_detections": hits, "loc_over_crb": float(np.median(sc / 1.1774)) if len(sc) else float("nan"),
                "n_loc": int(len(sc)), "flux_cov68": covered / n_cov if n_cov else float("nan"), "n_flux": n_cov,
                "flux_bias": float(np.median(rat) - 1) if len(rat) else float("nan"),
                "mpix_per_s": pix / 1e6 / wall if wall > 0 else float("nan"), "wall_s": wall,
            }
            if key == "fermi-plane":
                for k in ("ge20", "10_20", "pt_ge20", "pt_10_20"):
                    res[f"assoc_{k}"] = assoc[f"a_{k}"] / assoc[f"n_{k}"] if assoc[f"n_{k}"] else float("nan")
                    res[f"n_assoc_{k}"] = assoc[f"n_{k}"]
            out["methods"][name] = res
            log(f"[{key}] {name:<24} F1@fixed {res['f1_fixed']:.3f} F1@cal {res['f1_cal']:.3f} "
                f"R35 {res['recall_snr3_5_at_p']:.3f} {res['mpix_per_s']:.3f} Mpix/s ({wall:.1f} s)")
        except Exception as e:  # one method failing must not lose the others' numbers
            out["methods"][name] = {"error": f"{type(e).__name__}: {e}"}
            log(f"[{key}] {name} FAILED: {type(e).__name__}: {e}")
    sep_hits = out["methods"].get("sep", {}).get("contaminant_detections")
    for res in out["methods"].values():
        if "contaminant_detections" in res:
            res["contaminant_vs_sep"] = (res["contaminant_detections"] / sep_hits if sep_hits else float("nan"))
    return out


def _f(v, spec=".3f"):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return format(v, spec)


def markdown(results: dict) -> str:
    lines = [f"Detection benchmark: {results['n_test']} test + {results['n_cal']} calibration patches of 256 x 256 per "
             f"case, seeds from {BENCH_SEED_BASE} (test) and {CALIB_SEED_BASE} (calibration); {results['skyfm_note']}.",
             f"Machine: {results['machine']}; one thread per method; total {results['total_s']:.0f} s.", ""]
    lines.append("| case | method | F1@fixed (P / R @threshold) | F1@cal | R(SNR 3-5)@P0.9 | CR+trail dets (vs sep) | "
                 "loc/CRB (n) | flux cov68 (n) | Mpix/s |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for key, case in results["cases"].items():
        for name, r in case["methods"].items():
            if "error" in r:
                lines.append(f"| {key} | {name} | failed: {r['error'][:60]} | | | | | | |")
                continue
            cont = (f"{r['contaminant_detections']} ({_f(r.get('contaminant_vs_sep'), '.2f')})"
                    if case["instrument"] not in ("fermi-lat", "ctao") else "-")
            lines.append(
                f"| {key} | {name} | {_f(r['f1_fixed'])} ({_f(r['precision_fixed'], '.2f')} / {_f(r['recall_fixed'], '.2f')}"
                f" @{_f(r['fixed_threshold'], '.3g')}) "
                f"| {_f(r['f1_cal'])} | {_f(r['recall_snr3_5_at_p'])} | {cont} | {_f(r['loc_over_crb'], '.2f')} ({r['n_loc']}) "
                f"| {_f(r['flux_cov68'], '.2f')} ({r['n_flux']}) | {_f(r['mpix_per_s'], '.3g')} |")
    fp = results["cases"].get("fermi-plane")
    if fp:
        lines += ["", "Fermi-LAT plane, association of true sources at |b| < 20 deg with a detection within the 95% "
                  "radius (at the fixed threshold):", "", "| method | >= 20 sigma | 10-20 sigma | point sources: >= 20 "
                  "sigma | 10-20 sigma |", "|---|---|---|---|---|"]
        for name, r in fp["methods"].items():
            if "assoc_ge20" in r:
                lines.append("| " + " | ".join([name] + [f"{_f(r.get(f'assoc_{k}'))} (n={r.get(f'n_assoc_{k}')})"
                                                         for k in ("ge20", "10_20", "pt_ge20", "pt_10_20")]) + " |")
    swap = results["cases"].get("fermi-plane-ichalo")
    if fp and swap:
        lines += ["", "Interstellar-model swap (same seeds; trained on gas-disk, tested on ic-halo): F1@fixed",
                  "", "| method | gas-disk | ic-halo | drop |", "|---|---|---|---|"]
        for name, r in fp["methods"].items():
            r2 = swap["methods"].get(name, {})
            if "f1_fixed" in r and "f1_fixed" in r2:
                lines.append(f"| {name} | {_f(r['f1_fixed'])} | {_f(r2['f1_fixed'])} | "
                             f"{_f(r['f1_fixed'] - r2['f1_fixed'], '+.3f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring (benchmarks/detect.py) for every metric.")
    ap.add_argument("--n", type=int, default=8, help="test patches per case (default 8)")
    ap.add_argument("--calib-n", type=int, default=2, help="calibration patches per case for F1@cal (default 2)")
    ap.add_argument("--cases", default="all", help="comma-separated case keys: " + ", ".join(c[0] for c in CASES))
    ap.add_argument("--no-skyfm", action="store_true", help="run the baselines only")
    ap.add_argument("--out", default="runs/bench-detect", help="output folder for results.json and results.md")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for skyfm (default 1)")
    ap.add_argument("--skyfm-min-score", type=float, default=None,
                    help="run skyfm at this min_score so its sweeps reach lower (default: its own threshold; "
                         "lower is slower on counts cubes, where every candidate gets a likelihood fit)")
    ap.add_argument("--with-denoiser", action="store_true",
                    help="counts cubes: also the TS map with the shipped denoiser's removed background (slow: "
                         "~13 s per 256 x 256 Fermi-LAT cube on one thread)")
    ap.add_argument("--seeds", choices=["test", "validation"], default="test",
                    help="test: the reported seeds (default); validation: seeds from 9.5e8 and 9.6e8, to choose "
                         "settings (tile sizes, refinement) without looking at the test images")
    args = ap.parse_args(argv)
    if args.seeds == "validation":
        global BENCH_SEED_BASE, CALIB_SEED_BASE
        BENCH_SEED_BASE, CALIB_SEED_BASE = VALIDATION_SEED_BASES
    warnings.filterwarnings("ignore")
    wanted = None if args.cases == "all" else set(args.cases.split(","))
    unknown = (wanted or set()) - {c[0] for c in CASES}
    if unknown:
        ap.error(f"unknown case(s) {', '.join(sorted(unknown))}")
    skyfm_fn, note = (None, "skyfm not run (--no-skyfm)") if args.no_skyfm else _skyfm_runner(args.skyfm_min_score)
    if skyfm_fn is not None:
        import torch

        torch.set_num_threads(args.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(note)
    conf95 = _assoc_radius_table()
    t0 = time.perf_counter()
    results = {"n_test": args.n, "n_cal": args.calib_n, "skyfm_note": note, "cases": {},
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}
    for i, (key, label, instrument, options) in enumerate(CASES):
        if wanted is not None and key not in wanted:
            continue
        results["cases"][key] = run_case(SEED_CASE.get(key, i), key, label, instrument, options, args.n, args.calib_n,
                                         skyfm_fn, conf95, log, args.with_denoiser)
    results["total_s"] = time.perf_counter() - t0
    md = markdown(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clean = json.loads(json.dumps(results, default=lambda o: o.item() if hasattr(o, "item") else str(o)).replace("NaN", "null"))
    (out / "results.json").write_text(json.dumps(clean, indent=2) + "\n")
    (out / "results.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
