"""Does the diffusion denoiser remove the background, keep the sources, and help the next tasks? Measured.

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/denoise.py [--n 4] [--model DIR] [--out runs/bench-denoise]

On fresh simulated patches with truth (seeds 2**31 + 100000 + i: never seen in training, whose patch seeds are
below 2**31, nor in the training run's validation set, 2**31 + j for small j), for each case:

* **residual**: rms of (clean - true source-only image) / noise sigma per pixel, against the raw image's
  (data - true background - true sources) / sigma, over all pixels and over source pixels (true source > 1 sigma);
  and the calibration of the uncertainty: the share of source pixels with |clean - true| <= the uncertainty
  (68.27% for a calibrated 1-sigma error) and the rms of (clean - true) / uncertainty, for the uncertainty
  denoise_patch returns (calibrated on validation seeds where the model has a calibration,
  :mod:`skyfm.heads.denoise.calibrate`), for the samples' raw spread (std, ddof=1) and for the ddof=0 spread
  the denoiser returned before the calibration existed.
* **flux**: median over true sources (aperture SNR >= 5 in the noiseless truth, per band) of the aperture flux
  (radius 1 PSF FWHM, at least 1.5 px) in the clean image over the same aperture in the true source image; first
  for isolated point sources (the source itself gives >= 70% of the true aperture flux), then for all (where
  neighbours and unresolved sources share the aperture).
* **detection**: F1 of :func:`skyfm.baselines.sep_detect` (as the detection benchmark runs it, and in its
  crowded-field configuration ``sep-nofilter``) and, for counts cubes, of
  :func:`skyfm.baselines.tsmap_detect` run on the raw image and on the clean one; truth = sources with true
  snr >= 5, a detection matched (:func:`skyfm.catalog.match_catalogs`) to a fainter true source counts neither way.
  Metrics from :mod:`skyfm.catalog.metrics` (score_sweep, best_f1, metrics_at_threshold).
  F1 is given at the method's usual cut (SNR >= 5, sqrt(TS) >= 5) and at its best score threshold ("best": the
  clean image's noise level is not the raw one's, so its SNR scale differs). The TS map runs on the raw counts with
  the true background (a perfect interstellar model), with the estimated one, and with the denoiser's (the
  ``BACKGROUND`` that ``skyfm denoise`` writes: data minus the plain mean of the samples, smoothed,
  :func:`skyfm.heads.denoise.apply.removed_background`; circular as a likelihood background: docs/benchmarks.md);
  on the clean image it runs on clean + that background against that background.
  skyfm's own detector (:func:`skyfm.detect.detect_patch`, its own default threshold) on raw and clean, where
  the default detector exists.
* **speed**: one 256x256 patch, 1 sample, 4 / 10 / 20 DDIM steps (flux correction included).

``--flux-correction none`` measures the denoiser's plain mean of samples; the default, ``forced``, what
``skyfm denoise`` writes (:mod:`skyfm.heads.denoise.flux`).
* **generation**: unconditional samples (observation dropped, band given) against simulated source-only images of
  the same band in the denoiser's space (1 unit ~ 1 noise sigma): pixel quantiles and KS distance, radially
  averaged power spectrum, and sep source counts (threshold 2 units, 3 px).

Writes OUT/denoise.md and OUT/denoise.json and prints the markdown.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from skyfm.data.patch import Patch  # noqa: E402
from skyfm.data.simulate import simulate_patch  # noqa: E402
from skyfm.heads.denoise.apply import band_fwhm_pix as fwhm_pix  # noqa: E402
from skyfm.heads.denoise.apply import denoise_patch, generate, load_denoiser  # noqa: E402
from skyfm.heads.denoise.calibrate import apply_calibration, plane_center, uncertainty_kind  # noqa: E402
from skyfm.heads.denoise.calibrate import true_noise_sigma as noise_sigma  # noqa: E402
from skyfm.heads.denoise.data import HELD_OUT_SEED_BASE, patch_samples  # noqa: E402
from skyfm.heads.denoise.flux import LOCAL_BACKGROUND  # noqa: E402
from skyfm.instruments import load_instrument  # noqa: E402
from skyfm.instruments.scaling import robust_background  # noqa: E402

BENCH_SEED_BASE = HELD_OUT_SEED_BASE + 100_000
TRUTH_SNR = 5.0


CASES = [  # name, instrument, simulator options (callable of rng), size
    ("fermi-plane", "fermi-lat", lambda r: {"population": "resampled", "center": plane_center(r)}, 128),
    ("ctao-plane", "ctao", lambda r: {"population": "plane"}, 128),
    ("meerlicht-crowded", "meerlicht", lambda r: {"scene": "crowded"}, 128),
    ("meerlicht-field", "meerlicht", lambda r: {"scene": "field"}, 128),
    ("hubble-field", "hubble", lambda r: {"scene": "field"}, 128),
    ("wise-field", "wise", lambda r: {"scene": "field"}, 128),
]
GEN_BANDS = [("fermi-lat", "E1"), ("ctao", "T1"), ("meerlicht", "q"), ("hubble", "F606W"), ("wise", "W1")]


# ----------------------------------------------------------------------------------------------------------------
def raw_background(patch):
    if patch.background_image is not None:
        return patch.background_image
    return np.stack([np.full(patch.data.shape[1:], patch.meta.get(f"sky_{b}", robust_background(d)[0]), np.float32)
                     for b, d in zip(patch.bands, patch.data)])


def residual_stats(patch, clean, std, spread=None, samples=None):
    """Residuals in noise units and the calibration of the uncertainty ``std`` (what denoise_patch returns);
    ``spread``: the raw std of the samples (ddof=1) for the same comparison before calibration, and with it,
    ``samples`` K, the ddof=0 std of the earlier runs (spread * sqrt((K - 1) / K))."""
    sig = noise_sigma(patch)
    src = patch.source_image
    good = np.ones(src.shape, bool) if patch.contaminant_mask is None else patch.contaminant_mask == 0
    raw = ((patch.data - raw_background(patch) - src) / sig)[good]
    res = ((clean - src) / sig)[good]
    on = (src > sig)[good]
    rms = lambda a: float(np.sqrt(np.mean(a**2))) if a.size else float("nan")  # noqa: E731
    share = lambda a: float(np.mean(a)) if a.size else float("nan")  # noqa: E731
    # calibration where there is a source: (clean - true) / std
    z = ((clean - src) / np.maximum(std, 1e-3 * sig))[good][on]
    inside = (np.abs(clean - src) <= std)[good]
    out = {"rms_raw": rms(raw), "rms_clean": rms(res), "rms_raw_src": rms(raw[on]), "rms_clean_src": rms(res[on]),
           "z_rms_src": rms(z), "within_1std_src": share(inside[on]), "within_1std_bkg": share(inside[~on])}
    if spread is not None:
        z_raw = ((clean - src) / np.maximum(spread, 1e-3 * sig))[good][on]
        out["z_rms_src_spread"] = rms(z_raw)
        out["within_1std_src_spread"] = share((np.abs(clean - src) <= spread)[good][on])
        out["within_1std_bkg_spread"] = share((np.abs(clean - src) <= spread)[good][~on])
        if samples and samples > 1:
            ddof0 = spread * np.sqrt((samples - 1) / samples)
            out["within_1std_src_ddof0"] = share((np.abs(clean - src) <= ddof0)[good][on])
    return out


def _nanmean(values) -> float:
    v = np.asarray(values, np.float64)
    return float(np.mean(v[np.isfinite(v)])) if np.isfinite(v).any() else float("nan")


def _band_psf(patch, c):
    inst = load_instrument(patch.instrument)
    band = inst.band(patch.bands[c])
    seeing = patch.meta.get(f"seeing_{patch.bands[c]}")
    return band.psf if seeing is None else band.psf_with_fwhm(float(seeing) / 3600)


def flux_ratios(patch, clean):
    """(ratio, true aperture SNR, dominant) per (true source, band) with true aperture SNR >= 5, away from edges.

    ``dominant``: a point source giving >= 70% of the true aperture flux itself (its flux_band x the PSF's
    aperture containment), i.e. not confused with neighbours or unresolved sources.
    """
    import sep

    inst = load_instrument(patch.instrument)
    sig = noise_sigma(patch)
    if patch.truth is None or len(patch.truth) == 0:
        return []
    x = np.asarray(patch.truth["x"], np.float64)
    y = np.asarray(patch.truth["y"], np.float64)
    fb = np.asarray(patch.truth["flux_band"], np.float64).reshape(len(x), -1)
    point = np.asarray(patch.truth["extension"], np.float64) == 0
    out = []
    for c in range(patch.n_bands):
        r = max(1.5, fwhm_pix(patch, c))
        true, _, _ = sep.sum_circle(np.ascontiguousarray(patch.source_image[c], np.float64), x, y, r, subpix=5)
        var, _, _ = sep.sum_circle(np.ascontiguousarray(sig[c].astype(np.float64) ** 2), x, y, r, subpix=5)
        got, _, _ = sep.sum_circle(np.ascontiguousarray(clean[c], np.float64), x, y, r, subpix=5)
        snr = true / np.sqrt(np.maximum(var, 1e-12))
        ok = (snr >= TRUTH_SNR) & (x > r) & (y > r) & (x < patch.width - 1 - r) & (y < patch.height - 1 - r)
        own = fb[:, c] * _band_psf(patch, c).containment(r * inst.pixel_scale_deg)
        dominant = point & (own >= 0.7 * true)
        out.extend(zip((got[ok] / true[ok]).tolist(), snr[ok].tolist(), dominant[ok].tolist()))
    return out


def clean_patch(patch, data, background=None):
    return Patch(data=data.astype(np.float32), instrument=patch.instrument, bands=list(patch.bands), wcs=patch.wcs,
                 truth=patch.truth, source_image=patch.source_image, energy_edges_kev=patch.energy_edges_kev,
                 meta=dict(patch.meta))


def match_radius(patch):
    """The project's benchmark match radius (skyfm.catalog.evaluate.default_radius_pix)."""
    from skyfm.catalog.evaluate import default_radius_pix

    return float(default_radius_pix(load_instrument(patch.instrument)))


class DetTally:
    """Score sweeps of one detector over the patches of a case (skyfm.catalog.metrics: greedy matching by score,
    truth = snr >= 5, matches to fainter true sources count neither way)."""

    def __init__(self, cut):
        self.cut = cut
        self.sweeps = []

    def add(self, det, truth, radius):
        from skyfm.catalog.metrics import score_sweep

        if truth is None or len(truth) == 0:  # every detection is a false positive (score_sweep needs a truth)
            score = np.sort(np.asarray(det["score"], float))[::-1] if len(det) else np.zeros(0)
            self.sweeps.append({"score": score, "match_snr": np.full(len(score), np.nan), "truth_snr": np.zeros(0),
                                "match_truth": np.full(len(score), -1)})
            return
        self.sweeps.append(score_sweep(det, truth, radius))

    def summary(self):
        from skyfm.catalog.metrics import best_f1, concat_sweeps, metrics_at_threshold

        if not self.sweeps:
            return None
        sweep = concat_sweeps(self.sweeps)
        best = best_f1(sweep, TRUTH_SNR)
        at = metrics_at_threshold(sweep, self.cut, TRUTH_SNR) if self.cut is not None else {}
        return {"f1_at_cut": at.get("f1"), "cut": self.cut, "tp": at.get("tp"), "fp": at.get("fp"),
                "fn": at.get("fn"), "f1_best": best["f1"], "best_cut": best["threshold"],
                "precision_best": best["precision"], "recall_best": best["recall"]}


# ----------------------------------------------------------------------------------------------------------------
def run_quality(model, n, samples, steps, with_ts, with_detector, log, only=None, eta=None, flux_correction="forced",
                seed_offset=0, flux_config=None, precision="auto"):
    from skyfm.baselines import BASELINES, sep_detect, tsmap_detect

    detector = None
    if with_detector:
        try:
            from skyfm.detect import detect_patch, get_detector

            detector = get_detector(None)
        except Exception as e:  # noqa: BLE001 - report, do not fail the benchmark
            log(f"  skyfm detector unavailable: {str(e).splitlines()[0]}")
    results = {}
    for ci, (name, inst_name, opts, size) in enumerate(CASES):
        if only and name not in only:
            continue
        t0 = time.time()
        rng = np.random.default_rng([ci, 99] if seed_offset == 0 else [ci, 99, seed_offset])
        res, fluxes, tally, tden, kinds = [], [], {}, 0.0, set()
        for i in range(n):
            seed = BENCH_SEED_BASE + seed_offset + 1000 * ci + i
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                patch = simulate_patch(inst_name, seed, size=size, **opts(rng))
            t1 = time.time()
            clean, spread, bhat = denoise_patch(patch, model, samples=samples, steps=steps, seed=i, eta=eta,
                                                flux_correction=flux_correction, calibrated=False,
                                                flux_config=flux_config, precision=precision,
                                                return_background=True)
            # exactly what denoise_patch(calibrated=True) returns, from the same samples
            valid = None if patch.mask is None else ~np.asarray(patch.mask, bool)
            std = apply_calibration(patch, clean, spread, model.config, flux_correction, valid=valid)
            kinds.add(uncertainty_kind(model.config, load_instrument(inst_name).name, patch.bands, flux_correction,
                                       samples or model.config.default_samples))
            tden += time.time() - t1
            res.append(residual_stats(patch, clean, std, spread, samples or model.config.default_samples))
            fluxes.extend(flux_ratios(patch, clean))
            radius = match_radius(patch)
            cp = clean_patch(patch, clean)
            runs = {"sep raw": (lambda: sep_detect(patch), 5.0), "sep clean": (lambda: sep_detect(cp), None),
                    "sep-nofilter raw": (lambda: BASELINES["sep-nofilter"](patch), 5.0),
                    "sep-nofilter clean": (lambda: BASELINES["sep-nofilter"](cp), None)}
            if with_ts and patch.background_image is not None:
                runs.update({
                    "ts raw (true bkg)": (lambda: tsmap_detect(patch, background="true"), 5.0),
                    "ts raw (estimated bkg)": (lambda: tsmap_detect(patch, background="estimated"), 5.0),
                    "ts raw (denoiser bkg)": (lambda b=bhat: tsmap_detect(patch, background=b), 5.0),
                    "ts clean": (lambda b=bhat: tsmap_detect(clean_patch(patch, clean + b), background=b), 5.0),
                })
            if detector is not None:
                # the network's selection: the question is what the denoised image does to the network
                runs["skyfm raw"] = (lambda: detect_patch(patch, detector, selection="network"), None)
                runs["skyfm clean"] = (lambda: detect_patch(cp, detector, selection="network"), None)
            for key, (fn, cut) in runs.items():
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        det = fn()
                except Exception as e:  # noqa: BLE001
                    log(f"  {name} {key}: failed ({str(e).splitlines()[0]})")
                    continue
                tally.setdefault(key, DetTally(cut)).add(det, patch.truth, radius)
        # means over the patches; a patch with no source pixel has none of the "source px" numbers (NaN) and is
        # left out of their means (before, one such patch made the case's mean NaN)
        agg = {k: _nanmean([r[k] for r in res]) for k in res[0]}
        fl = np.asarray([f for f, _, _ in fluxes])
        snr = np.asarray([s for _, s, _ in fluxes])
        dom = np.asarray([d for _, _, d in fluxes], bool)
        by_snr = {}
        for lo, hi in ((5, 10), (10, 30), (30, np.inf)):
            sel = (snr >= lo) & (snr < hi)
            by_snr[f"{lo}-{hi}"] = [int(sel.sum()), float(np.median(fl[sel])) if sel.any() else None]
        results[name] = {
            "instrument": inst_name, "n": n, "size": size, "residual": agg, "uncertainty": sorted(kinds),
            "flux": {"n_sources": int(fl.size), "median_ratio": float(np.median(fl)) if fl.size else None,
                     "p16": float(np.percentile(fl, 16)) if fl.size else None,
                     "p84": float(np.percentile(fl, 84)) if fl.size else None, "median_by_true_snr": by_snr,
                     "isolated_n": int(dom.sum()), "isolated_median_ratio": float(np.median(fl[dom])) if dom.any() else None,
                     "isolated_p16": float(np.percentile(fl[dom], 16)) if dom.any() else None,
                     "isolated_p84": float(np.percentile(fl[dom], 84)) if dom.any() else None},
            "detection": {k: v.summary() for k, v in tally.items()},
            "denoise_s_per_patch": tden / n, "wall_s": time.time() - t0,
        }
        log(f"  {name}: {time.time() - t0:.0f} s; flux ratio {results[name]['flux']['median_ratio']}, "
            f"rms clean/raw {agg['rms_clean']:.3f}/{agg['rms_raw']:.3f}")
    return results


def run_speed(model, log, flux_correction="forced", precisions=("fp32", "bf16")):
    """Best of two runs per (patch, steps, precision), 1 sample; bf16 only where it is native on the model's
    device."""
    from skyfm.utils import bf16_is_fast

    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {}
    ml = simulate_patch("meerlicht", BENCH_SEED_BASE + 90_000, size=256, scene="field")
    fe = simulate_patch("fermi-lat", BENCH_SEED_BASE + 90_001, size=256)
    for precision in precisions:
        if precision == "bf16" and not bf16_is_fast(device):
            log(f"  speed: bf16 is not native on this {device.type}; skipped")
            continue
        denoise_patch(ml, model, samples=1, steps=1, flux_correction=flux_correction, precision=precision)  # warm-up
        for label, patch, steps in [("meerlicht 1x256x256", ml, 4), ("meerlicht 1x256x256", ml, 10),
                                    ("meerlicht 1x256x256", ml, 20), ("fermi-lat 6x256x256", fe, 4)]:
            times = []
            for _ in range(2):
                t = time.time()
                denoise_patch(patch, model, samples=1, steps=steps, flux_correction=flux_correction,
                              precision=precision)
                sync()
                times.append(time.time() - t)
            out[f"{label}, {steps} steps, {precision}"] = min(times)
            log(f"  speed {label} {steps} steps {precision}: {min(times):.2f} s")
    return out


def radial_power(images):
    """Radially averaged power spectrum (mean over images) in 12 log-spaced bins of spatial frequency."""
    n = images.shape[-1]
    f = np.fft.fftfreq(n)
    k = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    p = np.mean(np.abs(np.fft.fft2(images)) ** 2, axis=0)
    edges = np.geomspace(1.0 / n, 0.5, 13)
    return np.array([p[(k >= a) & (k < b)].mean() for a, b in zip(edges[:-1], edges[1:])])


def run_generation(model, n, steps, log, precision="auto"):
    import sep
    from scipy.stats import ks_2samp

    out = {}
    for gi, (inst_name, band) in enumerate(GEN_BANDS):
        inst = load_instrument(inst_name)
        bi = inst.band_index(band)
        gen = generate(model, inst_name, band, n=n, size=64, steps=steps, seed=gi, precision=precision)
        sims = []
        for i in range(n):
            seed = BENCH_SEED_BASE + 50_000 + 100 * gi + i
            kw = {} if inst.is_counts else {"bands": band}
            p = simulate_patch(inst_name, seed, size=64, **kw)
            idx = p.bands.index(inst.bands[bi].name)
            sims.append(patch_samples(p, model.config.ccd_softening, bands=[idx],
                                      compress=model.config.counts_compress)[0].target)
        sim = np.stack(sims)
        q = [50, 90, 99, 99.9]
        rng = np.random.default_rng(0)
        a = rng.choice(gen.ravel(), 20000)
        b = rng.choice(sim.ravel(), 20000)

        def counts(imgs):
            return [len(sep.extract(np.ascontiguousarray(im, np.float64), 2.0, minarea=3)) for im in imgs]

        pg, ps = radial_power(gen), radial_power(sim)
        out[f"{inst_name} {band}"] = {
            "quantiles": q, "gen_quantiles": np.percentile(gen, q).tolist(), "sim_quantiles": np.percentile(sim, q).tolist(),
            "ks": float(ks_2samp(a, b).statistic),
            "power_log10_ratio_mean_abs": float(np.mean(np.abs(np.log10(pg / ps)))),
            "power_log10_ratio": np.log10(pg / ps).round(2).tolist(),
            "sources_per_image_gen": float(np.mean(counts(gen))), "sources_per_image_sim": float(np.mean(counts(sim))),
            "mean_gen": float(gen.mean()), "mean_sim": float(sim.mean()),
        }
        log(f"  generation {inst_name} {band}: KS {out[f'{inst_name} {band}']['ks']:.3f}, sources/img "
            f"{out[f'{inst_name} {band}']['sources_per_image_gen']:.1f} vs {out[f'{inst_name} {band}']['sources_per_image_sim']:.1f}")
    return out


# ----------------------------------------------------------------------------------------------------------------
def fmt(v, d=3):
    return "-" if v is None else f"{v:.{d}f}"


def markdown(r) -> str:
    lines = [f"# Denoiser benchmark\n", f"`{r['command']}`  ", f"model: `{r['model']}`; {r['samples']} samples x "
             f"{r['steps']} DDIM steps (eta {r['eta']}); flux correction {r.get('flux_correction', 'none')} ({r.get('flux_config', 'default')} settings); {r['n']} patches per case ({r['patch_size']} px), seeds {BENCH_SEED_BASE + r.get('seed_offset', 0)}+; "
             f"torch threads {r['threads']}; precision {r.get('precision', 'fp32')}; {r['machine']}; load average at start {r['load']}; total {r['wall_s']:.0f} s\n"]
    lines += ["## Residual and flux\n",
              "| case | rms raw (noise units) | rms clean | rms raw, source px | rms clean, source px | "
              "(clean-true)/std rms, source px | within 1 std, source px | flux ratio, isolated point sources: "
              "median [16%, 84%] (n) | all sources | all, by true aperture SNR 5-10 / 10-30 / >30 | s/patch |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in r["quality"].items():
        s, f = c["residual"], c["flux"]
        lines.append(f"| {name} | {fmt(s['rms_raw'])} | {fmt(s['rms_clean'])} | {fmt(s['rms_raw_src'])} | "
                     f"{fmt(s['rms_clean_src'])} | {fmt(s['z_rms_src'], 2)} | {fmt(s['within_1std_src'], 2)} | "
                     f"{fmt(f['isolated_median_ratio'])} [{fmt(f['isolated_p16'], 2)}, {fmt(f['isolated_p84'], 2)}] "
                     f"({f['isolated_n']}) | "
                     f"{fmt(f['median_ratio'])} [{fmt(f['p16'], 2)}, {fmt(f['p84'], 2)}] ({f['n_sources']}) | "
                     + " / ".join(f"{fmt(m, 2)} ({k})" for k, m in f["median_by_true_snr"].values()) + " | "
                     f"{c['denoise_s_per_patch']:.1f} |")
    lines += ["\n## Uncertainty: is |clean - true| <= the uncertainty for 68% of the pixels?\n",
              "std: what denoise_patch returns (calibrated where the model has a calibration: 'uncertainty'); "
              "spread: the samples' raw std (ddof=1); ddof=0: the std the denoiser gave before the calibration. "
              "Source px: true source > 1 noise sigma; background px: the others. Means over patches (those "
              "with source pixels for the source-pixel columns).\n",
              "| case | uncertainty | within 1 std, source px: ddof=0 spread / ddof=1 spread / **std** | "
              "background px: spread / std | (clean-true)/uncertainty rms, source px: spread / std |",
              "|---|---|---|---|---|"]
    for name, c in r["quality"].items():
        s = c["residual"]
        lines.append(f"| {name} | {', '.join(c.get('uncertainty', []))} | {fmt(s.get('within_1std_src_ddof0'), 2)} / "
                     f"{fmt(s.get('within_1std_src_spread'), 2)} / **{fmt(s['within_1std_src'], 2)}** | "
                     f"{fmt(s.get('within_1std_bkg_spread'), 2)} / {fmt(s.get('within_1std_bkg'), 2)} | "
                     f"{fmt(s.get('z_rms_src_spread'), 2)} / {fmt(s['z_rms_src'], 2)} |")
    lines += ["\n## Detection: F1 on raw vs clean images (truth: snr >= 5)\n",
              "| case | detector | F1 at usual cut | F1 at best cut (cut) | tp / fp / fn at usual cut |", "|---|---|---|---|---|"]
    for name, c in r["quality"].items():
        for k, d in c["detection"].items():
            if d is None:
                continue
            lines.append(f"| {name} | {k} | {fmt(d['f1_at_cut'])} | {fmt(d['f1_best'])} ({d['best_cut']:.3g}) | "
                         + (f"{d['tp']} / {d['fp']} / {d['fn']}" if d["cut"] is not None else "-") + " |")
    lines += ["\n## Speed (1 sample)\n", "| patch | s |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in r.get("speed", {}).items()]
    if r.get("generation"):
        lines += ["\n## Generation: unconditional samples vs the simulator (denoiser space, 1 unit ~ 1 sigma)\n",
                  "| band | pixel quantiles 50/90/99/99.9 gen | sim | KS | mean abs log10 power ratio | "
                  "sep sources / 64x64 image gen vs sim |", "|---|---|---|---|---|---|"]
        for k, g in r["generation"].items():
            lines.append(f"| {k} | {'/'.join(f'{v:.2f}' for v in g['gen_quantiles'])} | "
                         f"{'/'.join(f'{v:.2f}' for v in g['sim_quantiles'])} | {g['ks']:.3f} | "
                         f"{g['power_log10_ratio_mean_abs']:.2f} | {g['sources_per_image_gen']:.1f} vs "
                         f"{g['sources_per_image_sim']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4, help="patches per case (default 4)")
    p.add_argument("--model", default=None, help="denoiser directory (default: the shipped one)")
    p.add_argument("--samples", type=int, default=None, help="samples per pixel (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the model's)")
    p.add_argument("--flux-correction", default="forced", choices=["none", "forced"],
                   help="denoise_patch's flux correction (default forced; none: the plain mean of the samples)")
    p.add_argument("--flux-config", default="default", choices=["default", "local"],
                   help="settings of the forced correction: default (shipped) or local (skyfm.heads.denoise.flux."
                        "LOCAL_BACKGROUND: background from near the sources, exact apertures; measured, not shipped)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="network arithmetic of the quality and generation runs (default auto: bf16 where native); "
                        "the speed section times fp32 and bf16")
    p.add_argument("--gen-n", type=int, default=16, help="generated images per band")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="auto", help="where the denoiser runs: auto (a CUDA GPU if any), cpu, cuda")
    p.add_argument("--no-ts", action="store_true", help="skip the TS maps (the slow part)")
    p.add_argument("--no-detector", action="store_true", help="skip skyfm's own detector")
    p.add_argument("--skip", default="", help="comma list of sections to skip: quality, speed, generation")
    p.add_argument("--cases", default="", help="comma list of quality cases to run (default: all: "
                   + ", ".join(c[0] for c in CASES) + ")")
    p.add_argument("--seed-offset", type=int, default=0,
                   help="added to every quality seed (default 0: the test seeds reported in docs/benchmarks.md); "
                        "700000 gives the diagnostic seeds on which settings are chosen")
    p.add_argument("--out", default="runs/bench-denoise")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    skip = set(filter(None, a.skip.split(",")))
    t0 = time.time()
    model = load_denoiser(a.model, device=a.device)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    r = {"command": "python benchmarks/denoise.py " + " ".join(sys.argv[1:] if argv is None else argv),
         "model": a.model or "skyfm/resources/models/denoiser-default", "n": a.n, "patch_size": 128,
         "samples": a.samples or model.config.default_samples, "steps": a.steps or model.config.default_steps,
         "eta": model.config.eta if a.eta is None else a.eta, "flux_correction": a.flux_correction,
         "seed_offset": a.seed_offset, "flux_config": a.flux_config, "precision": a.precision,
         "threads": a.threads, "machine": f"{platform.machine()} {os.cpu_count()} cores",
         "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if "quality" not in skip:
        r["quality"] = run_quality(model, a.n, a.samples, a.steps, not a.no_ts, not a.no_detector, log,
                                   only=set(filter(None, a.cases.split(","))), eta=a.eta,
                                   flux_correction=a.flux_correction, seed_offset=a.seed_offset,
                                   flux_config=LOCAL_BACKGROUND if a.flux_config == "local" else None,
                                   precision=a.precision)
    if "speed" not in skip:
        r["speed"] = run_speed(model, log, a.flux_correction)
    if "generation" not in skip:
        r["generation"] = run_generation(model, a.gen_n, 10, log, a.precision)
    r.setdefault("quality", {})
    r["wall_s"] = time.time() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(r)
    (out / "denoise.md").write_text(md)
    (out / "denoise.json").write_text(json.dumps(r, indent=2) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
