"""Calibrated per-pixel uncertainty of the denoiser: a model of the error chosen on validation seeds.

The spread of K diffusion samples is not a calibrated error of their mean. It misses what the samples share: the
network's bias (the posterior-mean shrinkage of faint sources, the flux correction's aperture errors, confusion of
neighbours) is the same in every sample, so the spread is too small, more so the brighter the pixel. As the
detector's errors (:func:`skyfm.finetune.ship.calibrate_errors`), the spread is turned into a 1-sigma error by a
small model per instrument (optionally per band), chosen on simulated validation patches with truth:

    sigma^2 = (scale * spread)^2 + (clean_floor * |clean|)^2 + (noise_floor * noise)^2

* ``spread``: the std of the K samples (``ddof=1``), scaled with each source by the flux correction
  (:func:`skyfm.heads.denoise.apply.denoise_patch`);
* ``clean``: the clean (denoised) pixel; ``clean_floor`` is a relative error that does not shrink with the
  number of samples (the flux correction's aperture photometry, the network's shape errors);
* ``noise``: the noise sigma of the observed pixel, estimated without truth (:func:`noise_sigma`): the robust sky
  sigma of a CCD band, ``sqrt(background + clean)`` counts for a counts cube, with the background the flux
  correction's estimate (observed - clean, averaged away from sources).

The parameters are chosen (:func:`choose`) so that ``|clean - true| <= sigma`` holds for 68.27% of the
validation *source pixels* (true source > 1 noise sigma, contaminated pixels left out: the benchmark's "within 1
std, source px"), every patch counting alike as in the benchmark's mean over patches. That fixes ``scale`` for given
floors; the floors are chosen so that the coverage is also as close to 68.27% as can be in each bin of true
per-pixel SNR (:data:`SNR_BINS`, the first bin being the pixels with no significant source), because one factor
on the spread alone cannot cover faint and bright pixels (and the background) at once where their errors grow
differently from the spread; of the four forms (scale alone, + a floor, + both) the one with the fewest parameters
within one percentage point of the best is kept.

Validation patches: the benchmark's scenes (:data:`VALIDATION_CASES`; MeerLICHT patches with all six bands), 128 px,
simulator seeds
``CALIBRATION_SEED_BASE + 1000 * case + seed_offset + i`` = 2**31 + 1,000,000 + ... (the chosen set: offset 0;
the check set of ``--check-n``: offset 500), disjoint from training (< 2**31), the
training run's validation set (2**31 + j, j < 1000), the benchmark's test seeds (2**31 + 100,000 + ...; its speed
and generation seeds 2**31 + 150,000 ... 2**31 + 190,001) and the flux-correction diagnostics (2**31 + 800,000 + i).

The result is stored in the denoiser's ``config.json`` as ``uncertainty_calibration``::

    {"forced": {"fermi-lat": {"scale": 2.1, "clean_floor": 0.3, "noise_floor": 0.0, "bands": {...}}, ...},
     "none": {...}, "provenance": {"command": ..., "seeds": ..., "samples": 4, "steps": 10, ...}}

keyed by the flux correction it was chosen for (``forced``, the default of ``skyfm denoise``, and ``none``), then
by instrument; a ``bands`` mapping overrides the instrument's numbers for a band. An instrument with no entry (a
new telescope, an old checkpoint) keeps the raw spread. Run::

    python -m skyfm.heads.denoise.calibrate --n 32 --check-n 16 --out runs/denoise-calib   # choose, check, save
    python -m skyfm.heads.denoise.calibrate --n 32 --check-n 16 --out runs/denoise-calib --reuse \
        --write skyfm/resources/models/denoiser-default                                    # ... and write it

The samples' spread is chosen and applied with ``ddof=1``; the parameters are chosen at the model's default
number of samples and steps (recorded in ``provenance``). At other K they are an approximation (the ddof=1
variance is unbiased for any K >= 2, but the coverage also depends on how noisy the spread of K samples is), not
measured here: re-run the chooser with ``--samples K`` for another K.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from skyfm.errors import SkyfmError
from skyfm.heads.denoise.data import HELD_OUT_SEED_BASE

COVERAGE_68 = math.erf(1.0 / math.sqrt(2.0))  # 0.6827
CALIBRATION_SEED_BASE = HELD_OUT_SEED_BASE + 1_000_000
PARAM_KEYS = ("scale", "clean_floor", "noise_floor")
MODES = ("forced", "none")
SOURCE_SNR = 1.0  # source pixels: true source > 1 noise sigma (the benchmark's "source px")
SNR_BINS = (0.0, 1.0, 3.0, 10.0, 30.0, np.inf)  # bins of true per-pixel SNR the chooser balances (first: no source)
MIN_PIXELS = 200  # fewer validation source pixels than this: no parameters of its own (band) / none (instrument)
MIN_PATCHES = 8  # a band gets its own parameters only when its source pixels come from this many patches


def plane_center(rng):
    """A random (glon, glat) in the inner Galactic plane: the Fermi-plane scenes of the benchmark and calibration."""
    return (float(rng.uniform(-40, 40) % 360), float(rng.uniform(-2, 2)))


def _all_bands(instrument: str) -> list[str]:
    from skyfm.instruments import load_instrument

    return [b.name for b in load_instrument(instrument).bands]


# The benchmark's scenes (benchmarks/denoise.py CASES), other seeds. MeerLICHT patches carry all six bands here (the
# benchmark's carry one drawn at random), so that every band is seen in the same scenes and can have its own numbers.
VALIDATION_CASES = [
    ("fermi-plane", "fermi-lat", lambda r: {"population": "resampled", "center": plane_center(r)}),
    ("ctao-plane", "ctao", lambda r: {"population": "plane"}),
    ("meerlicht-crowded", "meerlicht", lambda r: {"scene": "crowded", "bands": _all_bands("meerlicht")}),
    ("meerlicht-field", "meerlicht", lambda r: {"scene": "field", "bands": _all_bands("meerlicht")}),
    ("hubble-field", "hubble", lambda r: {"scene": "field"}),
    ("wise-field", "wise", lambda r: {"scene": "field"}),
]
VALIDATION_VERSION = 2  # bump when VALIDATION_CASES change (saved pixels of another version are not reused)


# ----------------------------------------------------------------------------------------------------------------
# The model and its application
# ----------------------------------------------------------------------------------------------------------------
def calibrated_sigma(spread, clean, noise, scale: float = 1.0, clean_floor: float = 0.0,
                     noise_floor: float = 0.0) -> np.ndarray:
    """``sqrt((scale spread)^2 + (clean_floor |clean|)^2 + (noise_floor noise)^2)`` (module docstring)."""
    spread = np.asarray(spread, np.float64)
    var = (scale * spread) ** 2
    if clean_floor:
        var = var + (clean_floor * np.abs(np.asarray(clean, np.float64))) ** 2
    if noise_floor:
        var = var + (noise_floor * np.asarray(noise, np.float64)) ** 2
    return np.sqrt(var)


def check_params(params: dict, where: str = "uncertainty_calibration") -> dict:
    """``params`` with ``scale`` > 0 and floors >= 0 as floats (missing: 1, 0, 0); a one-line SkyfmError else."""
    if not isinstance(params, dict):
        raise SkyfmError(f"{where} should be a mapping of {', '.join(PARAM_KEYS)}, got {params!r}")
    unknown = sorted(set(params) - set(PARAM_KEYS) - {"bands"})
    if unknown:
        raise SkyfmError(f"{where}: unknown keys {', '.join(unknown)} (known: {', '.join(PARAM_KEYS)}, bands)")
    out = {}
    for key, default in zip(PARAM_KEYS, (1.0, 0.0, 0.0)):
        raw = params.get(key, default)
        try:
            v = float(raw)
        except (TypeError, ValueError):
            v = float("nan")
        ok = (v > 0) if key == "scale" else (v >= 0)
        if not (ok and math.isfinite(v)):
            raise SkyfmError(f"{where}: {key} should be {'a positive number' if key == 'scale' else 'a number >= 0'}"
                             f", got {raw!r}")
        out[key] = v
    return out


def check_calibration(calibration: dict, where: str = "uncertainty_calibration") -> dict:
    """``calibration`` if it is a valid ``uncertainty_calibration`` mapping (module docstring); a one-line
    SkyfmError naming the first bad entry otherwise."""
    if not isinstance(calibration, dict):
        raise SkyfmError(f"{where} should be a mapping, got {type(calibration).__name__}")
    unknown = sorted(set(calibration) - set(MODES) - {"provenance"})
    if unknown:
        raise SkyfmError(f"{where}: unknown keys {', '.join(unknown)} (known: {', '.join(MODES)}, provenance)")
    for mode in MODES:
        per_inst = calibration.get(mode) or {}
        if not isinstance(per_inst, dict):
            raise SkyfmError(f"{where}.{mode} should be a mapping of instruments")
        for inst, entry in per_inst.items():
            check_params(entry, f"{where}.{mode}.{inst}")
            bands = entry.get("bands") or {}
            if not isinstance(bands, dict):
                raise SkyfmError(f"{where}.{mode}.{inst}.bands should be a mapping of bands")
            for band, p in bands.items():
                check_params(p, f"{where}.{mode}.{inst}.bands.{band}")
    return calibration


def band_params(calibration: dict | None, flux_correction: str, instrument: str, band: str) -> dict | None:
    """The (checked) parameters of one band, or None where the calibration has none (raw spread)."""
    if not calibration:
        return None
    entry = (calibration.get(flux_correction) or {}).get(instrument)
    if entry is None:
        return None
    where = f"uncertainty_calibration.{flux_correction}.{instrument}"
    bands = entry.get("bands") or {}
    if band in bands:
        return check_params(bands[band], f"{where}.bands.{band}")
    return check_params(entry, where)


def uncertainty_kind(config, instrument: str, bands, flux_correction: str, samples: int) -> str:
    """What :func:`~skyfm.heads.denoise.apply.denoise_patch`'s uncertainty is for these settings: ``none`` (one
    sample: no spread, NaN), ``calibrated`` (every band has calibration parameters), ``partly calibrated``, or
    ``spread`` (the raw std of the samples: no calibration for this instrument and flux correction)."""
    if int(samples) < 2:
        return "none"
    calibration = getattr(config, "uncertainty_calibration", None)
    got = [band_params(calibration, flux_correction, instrument, b) is not None for b in bands]
    if got and all(got):
        return "calibrated"
    return "partly calibrated" if any(got) else "spread"


UNCERT_MEANING = {
    "calibrated": "calibrated 1-sigma error of the clean image: sqrt((scale*spread)^2 + (clean_floor*clean)^2 + "
                  "(noise_floor*noise)^2), spread = std (ddof=1) of the samples, parameters per instrument/band "
                  "chosen on validation seeds (config.json uncertainty_calibration)",
    "partly calibrated": "calibrated 1-sigma error in the bands with calibration parameters, the raw spread of the "
                         "samples (std, ddof=1) in the others",
    "spread": "std (ddof=1) of the diffusion samples: NOT calibrated (no calibration for this instrument); it "
              "underestimates the error of the clean image",
    "none": "NaN: 1 sample has no spread, so no uncertainty is given (use 2 or more samples)",
}


def noise_sigma(observed, clean, kind: str, fwhm: float, valid=None) -> np.ndarray:
    """(H, W) noise sigma per pixel of one observed band, without truth: the robust sky sigma of a CCD band; for
    counts ``sqrt(B + clean)`` with ``B`` the background estimate of the flux correction
    (:func:`skyfm.heads.denoise.flux.estimate_background`: observed - clean, averaged away from the sources)."""
    from skyfm.heads.denoise.flux import estimate_background
    from skyfm.instruments.scaling import robust_background

    obs = np.asarray(observed, np.float64)
    good = np.isfinite(obs) if valid is None else (np.asarray(valid, bool) & np.isfinite(obs))
    if kind == "ccd":
        sigma = robust_background(np.where(good, obs, np.nan).astype(np.float32))[1]
        return np.full(obs.shape, float(sigma))
    cl = np.where(good, np.asarray(clean, np.float64), 0.0)
    bkg = estimate_background(np.where(good, obs, 0.0), cl, max(float(fwhm), 1.0), "counts", valid=good)
    return np.sqrt(np.maximum(bkg, 0.0) + np.maximum(cl, 0.0))


def apply_calibration(patch, clean: np.ndarray, std: np.ndarray, config, flux_correction: str,
                      valid=None) -> np.ndarray:
    """(C, H, W) calibrated uncertainty of :func:`~skyfm.heads.denoise.apply.denoise_patch`'s ``(clean, std)``,
    band by band, from ``config.uncertainty_calibration`` (unchanged where it has no entry for the band)."""
    from skyfm.heads.denoise.apply import band_fwhm_pix
    from skyfm.heads.denoise.transforms import instrument_kind
    from skyfm.instruments import load_instrument

    calibration = getattr(config, "uncertainty_calibration", None)
    if not calibration:
        return std
    inst = load_instrument(patch.instrument)
    kind = instrument_kind(inst)
    out = np.array(std, np.float32, copy=True)
    for i, band in enumerate(patch.bands):
        p = band_params(calibration, flux_correction, inst.name, band)
        if p is None:
            continue
        noise = 0.0
        if p["noise_floor"]:
            noise = noise_sigma(patch.data[i], clean[i], kind, band_fwhm_pix(patch, i, inst), valid=valid)
        out[i] = calibrated_sigma(std[i], clean[i], noise, **p).astype(np.float32)
    if valid is not None:
        out = np.where(valid, out, 0.0).astype(np.float32)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Validation pixels
# ----------------------------------------------------------------------------------------------------------------
def true_noise_sigma(patch) -> np.ndarray:
    """(C, H, W) the benchmark's noise sigma per pixel: sqrt(expected counts), or the robust sky sigma of a CCD band."""
    from skyfm.instruments import load_instrument
    from skyfm.instruments.scaling import robust_background

    if load_instrument(patch.instrument).is_counts:
        return np.sqrt(np.maximum(patch.source_image + patch.background_image, 0.25))
    return np.stack([np.full(patch.data.shape[1:], robust_background(b)[1], np.float32) for b in patch.data])


def patch_pixels(patch, clean_by_mode: dict, std_by_mode: dict) -> dict:
    """Per-pixel arrays of one denoised validation patch (all valid, uncontaminated pixels): ``band``, ``true``
    (source-only truth), ``snr`` (true / true noise sigma), and per mode ``clean_<mode>``, ``std_<mode>``,
    ``noise_<mode>`` (the estimated noise sigma, :func:`noise_sigma`)."""
    from skyfm.heads.denoise.apply import band_fwhm_pix
    from skyfm.heads.denoise.transforms import instrument_kind
    from skyfm.instruments import load_instrument

    inst = load_instrument(patch.instrument)
    kind = instrument_kind(inst)
    valid = np.ones(patch.shape[1:], bool) if patch.mask is None else ~np.asarray(patch.mask, bool)
    good = np.broadcast_to(valid, patch.shape).copy()
    if patch.contaminant_mask is not None:
        good &= patch.contaminant_mask == 0
    sig = true_noise_sigma(patch)
    out = {"band": np.broadcast_to(np.asarray(patch.bands, dtype=object)[:, None, None], patch.shape)[good],
           "true": patch.source_image[good].astype(np.float32),
           "snr": (patch.source_image / sig)[good].astype(np.float32)}
    for mode in clean_by_mode:
        clean, std = clean_by_mode[mode], std_by_mode[mode]
        noise = np.stack([noise_sigma(patch.data[i], clean[i], kind, band_fwhm_pix(patch, i, inst), valid=valid)
                          for i in range(patch.n_bands)])
        out[f"clean_{mode}"] = clean[good].astype(np.float32)
        out[f"std_{mode}"] = std[good].astype(np.float32)
        out[f"noise_{mode}"] = noise[good].astype(np.float32)
    return out


def validation_pixels(model, n: int = 16, size: int = 128, samples: int | None = None, steps: int | None = None,
                      cases=None, log=None, seed_offset: int = 0) -> dict:
    """``{case: {"instrument", "seeds", pixel arrays (:func:`patch_pixels`) + "patch" (its simulator seed)}}`` of
    ``n`` validation patches per case (seeds ``CALIBRATION_SEED_BASE + 1000 * case + seed_offset + i``), denoised
    once (raw spread, no calibration) and flux-corrected from the same samples for the ``forced`` mode."""
    if seed_offset < 0 or seed_offset + n > 1000:
        raise SkyfmError(f"validation seeds: seed_offset + n should be <= 1000, got {seed_offset} + {n}")
    from skyfm.data.simulate import simulate_patch
    from skyfm.heads.denoise.apply import correct_fluxes, denoise_patch

    out = {}
    for ci, (name, inst_name, opts) in enumerate(VALIDATION_CASES):
        if cases and name not in cases:
            continue
        t0 = time.time()
        rng = np.random.default_rng([ci, 1_000_000, seed_offset])
        rows = []
        for i in range(n):
            seed = CALIBRATION_SEED_BASE + 1000 * ci + seed_offset + i
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                patch = simulate_patch(inst_name, seed, size=size, **opts(rng))
            clean, std = denoise_patch(patch, model, samples=samples, steps=steps, seed=i, flux_correction="none",
                                       calibrated=False)
            valid = np.ones(patch.shape[1:], bool) if patch.mask is None else ~np.asarray(patch.mask, bool)
            clean_f, std_f = correct_fluxes(patch, clean, std, valid)
            row = patch_pixels(patch, {"none": clean, "forced": clean_f}, {"none": std, "forced": std_f})
            row["patch"] = np.full(row["true"].size, seed, np.int64)
            rows.append(row)
        merged = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        first = CALIBRATION_SEED_BASE + 1000 * ci + seed_offset
        out[name] = {"instrument": inst_name, "seeds": f"{first} + i, i < {n}", **merged}
        if log:
            log(f"  {name}: {n} patches, {time.time() - t0:.0f} s")
    return out




# ----------------------------------------------------------------------------------------------------------------
# Choosing the parameters
# ----------------------------------------------------------------------------------------------------------------
def coverage(err, sigma, weights=None) -> float:
    """(Weighted) share of pixels with ``|err| <= sigma`` (NaN for none)."""
    err, sigma = np.abs(np.asarray(err, np.float64)), np.asarray(sigma, np.float64)
    if not err.size:
        return float("nan")
    return float(np.average(err <= sigma, weights=weights))


def patch_weights(patch, source) -> np.ndarray:
    """Per pixel ``1 / (pixels of its patch in its class)``, the classes being source and background pixels:
    every patch counts alike, as in the benchmark, whose "within 1 std" is the mean of the patches' coverages."""
    patch = np.asarray(patch).reshape(-1)
    source = np.asarray(source, bool).reshape(-1)
    key = np.unique(np.stack([patch.astype(np.int64), source.astype(np.int64)], axis=1), axis=0,
                    return_inverse=True, return_counts=True)
    inverse, counts = key[1].reshape(-1), key[2]
    return 1.0 / counts[inverse]


def _needed_k2(err2, spread2, floor2) -> np.ndarray:
    """Per pixel, the ``scale^2`` it needs to be covered: ``(err^2 - floor^2) / spread^2`` (-1 where the floors
    alone cover it, inf where it has no spread and is not covered)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        need = (err2 - floor2) / spread2
    return np.where(err2 <= floor2, -1.0, np.where(np.isfinite(need), need, np.inf))


def _coverage_quantile(values, level: float, weights=None) -> float:
    """The smallest ``v`` of ``values`` with (weighted) share of ``values <= v`` at least ``level``."""
    v = np.asarray(values, np.float64)
    w = np.ones(v.size) if weights is None else np.asarray(weights, np.float64)
    order = np.argsort(v, kind="stable")
    cum = np.cumsum(w[order])
    i = int(np.searchsorted(cum, level * cum[-1] * (1 - 1e-12), side="left"))
    return float(v[order][min(i, v.size - 1)])


def scale_only(err, spread, level: float = COVERAGE_68, weights=None) -> float:
    """The factor ``k`` for which ``|err| <= k spread`` holds for ``level`` of the (weighted) pixels (the ``level``
    quantile of ``|err| / spread``; a pixel with no spread and an error is never covered)."""
    err, spread = np.abs(np.asarray(err, np.float64)), np.asarray(spread, np.float64)
    need = _needed_k2(err**2, spread**2, np.zeros_like(err))
    return math.sqrt(max(_coverage_quantile(need, level, weights), 0.0))


def _bin_labels(bins) -> list[str]:
    return [f"{bins[j]:g}-{bins[j + 1]:g}" for j in range(len(bins) - 1)]


def coverage_by_snr(err, sigma, snr, bins=SNR_BINS, weights=None) -> dict:
    """``{bin label: [pixels, (weighted) coverage]}`` over bins of true per-pixel SNR."""
    err, sigma, snr = np.abs(np.asarray(err, np.float64)), np.asarray(sigma, np.float64), np.asarray(snr, np.float64)
    w = np.ones(err.size) if weights is None else np.asarray(weights, np.float64)
    bi = np.digitize(snr, np.asarray(bins[1:-1], np.float64))
    inside = err <= sigma
    return {lab: [int(np.sum(bi == j)),
                  round(float(np.average(inside[bi == j], weights=w[bi == j])), 4) if np.any(bi == j) else None]
            for j, lab in enumerate(_bin_labels(bins))}


def choose(err, spread, clean, noise, snr, floors: bool = True, level: float = COVERAGE_68, bins=SNR_BINS,
           source_snr: float = SOURCE_SNR, weights=None, clean_grid=None, noise_grid=None, min_bin: int = 50,
           tolerance: float = 0.01, max_pixels_per_bin: int = 100_000, seed: int = 0) -> dict:
    """Parameters of the uncertainty model (module docstring) for one group of validation pixels.

    ``err`` = clean - true, ``spread`` the samples' std, ``clean``, ``noise`` (the estimated noise sigma) and
    ``snr`` (true source / true noise sigma) per pixel, source and background pixels alike; ``weights`` per
    pixel (default equal; :func:`patch_weights` makes every patch count alike).

    * **constraint**: ``|err| <= sigma`` for ``level`` (68.27%) of the (weighted) source pixels
      (``snr > source_snr``), pooled: for given floors, the smallest ``scale`` that does it (a weighted quantile,
      as :func:`scale_only`).
    * **choice of the floors**: among the pairs (``clean_floor``, ``noise_floor``) of the grids (0 included, so
      ``scale`` alone is a candidate), the one whose (weighted) coverages in the ``bins`` of true SNR (those with
      at least ``min_bin`` pixels; the first bin holds the pixels with no significant source) are closest to
      ``level``, least squares with every bin alike; a pair whose floors alone already cover more than ``level``
      of the source pixels is not used. Bins larger than ``max_pixels_per_bin`` are subsampled (``seed``) for
      this choice.
    * **parsimony**: the floors are weakly identifiable (a floor on the noise and a larger factor on a spread that
      follows the noise fit alike), so of the four forms (scale; + clean floor; + noise floor; + both) the one
      with the fewest parameters whose bin rms is within ``tolerance`` (1 percentage point of coverage) of the
      best form's is kept.

    Without ``floors`` only ``scale``. Returns ``{scale, clean_floor, noise_floor, n_source_pixels, n_pixels,
    coverage_source_before / after, coverage_by_snr_before / after / scale_only, scale_only, bin_rms_after}``
    (before: the raw spread; coverages weighted as the choice).
    """
    arrays = [np.asarray(a, np.float64).reshape(-1) for a in (err, spread, clean, noise, snr)]
    n_all = arrays[0].size
    if len({a.size for a in arrays}) != 1:
        raise SkyfmError("err, spread, clean, noise and snr should have one length")
    w_all = np.ones(n_all) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if w_all.size != n_all or not np.all(np.isfinite(w_all) & (w_all >= 0)):
        raise SkyfmError(f"weights should be {n_all} numbers >= 0")
    ok = np.logical_and.reduce([np.isfinite(a) for a in arrays]) & (w_all > 0)
    err, spread, clean, noise, snr = (a[ok] for a in arrays)
    w_all = w_all[ok]
    err, clean = np.abs(err), np.abs(clean)
    bi = np.digitize(snr, np.asarray(bins[1:-1], np.float64))
    rng = np.random.default_rng(seed)
    keep = np.ones(err.size, bool)
    for j in range(len(bins) - 1):
        idx = np.flatnonzero(bi == j)
        if idx.size > max_pixels_per_bin:
            keep[idx] = False
            keep[rng.choice(idx, max_pixels_per_bin, replace=False)] = True
    src_all = snr > source_snr
    if not src_all.any():
        raise SkyfmError("no validation source pixels to calibrate on")
    labels = _bin_labels(bins)
    e, s, c, n, b_, w = err[keep], spread[keep], clean[keep], noise[keep], bi[keep], w_all[keep]
    used = [j for j in range(len(labels)) if np.sum(b_ == j) >= min_bin] or [int(np.bincount(b_).argmax())]
    masks = [(b_ == j, w[b_ == j].sum()) for j in used]
    e2, s2, c2, n2 = e**2, s**2, c**2, n**2
    # the constraint on *all* source pixels (not the subsample)
    ws = w_all[src_all]
    es2, ss2, cs2, ns2 = err[src_all] ** 2, spread[src_all] ** 2, clean[src_all] ** 2, noise[src_all] ** 2
    k0 = scale_only(err[src_all], spread[src_all], level, ws)
    best = None
    ca = np.r_[0.0, np.geomspace(0.01, 3.0, 24)] if clean_grid is None else np.asarray(clean_grid, np.float64)
    nb = np.r_[0.0, np.geomspace(0.01, 3.0, 24)] if noise_grid is None else np.asarray(noise_grid, np.float64)
    if not floors:
        ca, nb = np.zeros(1), np.zeros(1)
    best_by_form = {}  # form (clean floor?, noise floor?) -> (bin rms, scale, a, b)
    for a in ca:
        for b in nb:
            k2 = _coverage_quantile(_needed_k2(es2, ss2, a * a * cs2 + b * b * ns2), level, ws)
            if not (k2 > 0 and np.isfinite(k2)):
                continue  # the floors alone cover more than `level` (or nothing ever covers enough)
            inside = (_needed_k2(e2, s2, a * a * c2 + b * b * n2) <= k2) * w
            rms = math.sqrt(sum((inside[m].sum() / wm - level) ** 2 for m, wm in masks) / len(masks))
            form = (bool(a > 0), bool(b > 0))
            if form not in best_by_form or rms < best_by_form[form][0] - 1e-12:
                best_by_form[form] = (rms, math.sqrt(k2), float(a), float(b))
    forms = {}
    if best_by_form:  # Occam: the form with fewest parameters within `tolerance` of the best bin rms
        lowest = min(v[0] for v in best_by_form.values())
        ok_forms = [f for f, v in best_by_form.items() if v[0] <= lowest + tolerance]
        form = min(ok_forms, key=lambda f: (sum(f), best_by_form[f][0]))
        _, k, a, b = best_by_form[form]
        forms = {("scale" + " + clean_floor" * f[0] + " + noise_floor" * f[1]): round(v[0], 4)
                 for f, v in sorted(best_by_form.items())}
    else:
        k, a, b = k0, 0.0, 0.0
    k = float(k) * (1 + 1e-9)  # the quantile pixel itself stays inside after rounding
    sigma = calibrated_sigma(spread, clean, noise, k, a, b)
    after = coverage_by_snr(err, sigma, snr, bins, w_all)
    rms = math.sqrt(np.mean([(after[labels[j]][1] - level) ** 2 for j in used]))
    return {"scale": k, "clean_floor": a, "noise_floor": b,
            "n_source_pixels": int(src_all.sum()), "n_pixels": int(err.size),
            "coverage_source_before": round(coverage(err[src_all], spread[src_all], ws), 4),
            "coverage_source_after": round(coverage(err[src_all], sigma[src_all], ws), 4),
            "coverage_by_snr_before": coverage_by_snr(err, spread, snr, bins, w_all),
            "coverage_by_snr_after": after, "bin_rms_after": round(rms, 4), "bin_rms_by_form": forms,
            "scale_only": round(k0, 4),
            "coverage_by_snr_scale_only": coverage_by_snr(err, k0 * spread, snr, bins, w_all)}


def _params(res: dict) -> dict:
    return {"scale": round(res["scale"], 4), "clean_floor": round(res["clean_floor"], 4),
            "noise_floor": round(res["noise_floor"], 4)}


def choose_calibration(pixels: dict, modes=MODES, per_band: bool = True, floors: bool = True,
                       min_pixels: int = MIN_PIXELS, min_patches: int = MIN_PATCHES,
                       balance_patches: bool = True) -> tuple[dict, dict]:
    """``(calibration, report)`` from :func:`validation_pixels`' output: per mode and instrument (all its cases
    pooled) the parameters of :func:`choose`, and with ``per_band`` per band those of the band's own pixels where
    the band is in every patch of the instrument and has at least ``min_pixels`` source pixels from at least
    ``min_patches`` patches; else the instrument's apply to it. (Where a patch carries one band drawn at random,
    as MeerLICHT's, a band's patches are a different mix of scenes for every band, and per-band numbers would
    fit the scenes, not the bands.) With ``balance_patches`` (default) every patch counts alike (:func:`patch_weights`).
    ``calibration`` is the ``uncertainty_calibration`` mapping without provenance; ``report`` has the
    coverages before and after per instrument and band, and notes."""
    by_inst: dict[str, list] = {}
    for case, d in pixels.items():
        by_inst.setdefault(d["instrument"], []).append(d)
    calibration: dict = {m: {} for m in modes}
    report: dict = {m: {} for m in modes}
    for mode in modes:
        for inst, ds in sorted(by_inst.items()):
            keys = ["band", "patch", "true", "snr", f"clean_{mode}", f"std_{mode}", f"noise_{mode}"]
            d = {k: np.concatenate([x[k] for x in ds]) for k in keys}
            src = d["snr"] > SOURCE_SNR
            rep = report[mode].setdefault(inst, {"n_patches": int(len(np.unique(d["patch"])))})
            if src.sum() < min_pixels:
                rep["note"] = f"{int(src.sum())} source pixels (< {min_pixels}): not calibrated, raw spread"
                continue

            def fit(sel):
                w = patch_weights(d["patch"][sel], src[sel]) if balance_patches else None
                return choose(d[f"clean_{mode}"][sel] - d["true"][sel], d[f"std_{mode}"][sel],
                              d[f"clean_{mode}"][sel], d[f"noise_{mode}"][sel], d["snr"][sel], floors=floors,
                              weights=w)

            res = fit(np.ones(src.size, bool))
            entry = _params(res)
            rep["instrument"] = res
            bands = {}
            all_patches = np.unique(d["patch"])
            for band in sorted(set(d["band"].tolist())):
                sel = d["band"] == band
                n_src, n_patch = int((sel & src).sum()), int(len(np.unique(d["patch"][sel & src])))
                n_with = int(len(np.unique(d["patch"][sel])))
                if not per_band or n_src < min_pixels or n_patch < min_patches or n_with < all_patches.size:
                    rep.setdefault("bands_using_instrument", {})[band] = {
                        "source_pixels": n_src, "patches_with_source_pixels": n_patch,
                        "patches_with_band": n_with, "patches": int(all_patches.size)}
                    continue
                bres = fit(sel)
                bands[band] = _params(bres)
                rep.setdefault("bands", {})[band] = bres
            if bands:
                entry["bands"] = bands
            calibration[mode][inst] = entry
    return calibration, report


def evaluate_calibration(pixels: dict, calibration: dict, mode: str = "forced") -> dict:
    """Per case, the coverage of the raw spread and of the calibrated sigma on source pixels (``within 1 std``,
    the mean over patches of each patch's share, as the benchmark computes it; patches with no source pixel left
    out) and on background pixels, and by bins of true SNR (patch-weighted): to check a calibration on other
    pixels than those it was chosen on."""
    out = {}
    for case, d in pixels.items():
        sigma = np.array(d[f"std_{mode}"], np.float64, copy=True)
        for band in sorted(set(d["band"].tolist())):
            p = band_params(calibration, mode, d["instrument"], band)
            if p is None:
                continue
            sel = d["band"] == band
            sigma[sel] = calibrated_sigma(d[f"std_{mode}"][sel], d[f"clean_{mode}"][sel], d[f"noise_{mode}"][sel],
                                          **p)
        err = d[f"clean_{mode}"] - d["true"]
        src = d["snr"] > SOURCE_SNR
        w = patch_weights(d["patch"], src)
        out[case] = {"source_pixels": int(src.sum()),
                     "patches_with_source_pixels": int(len(np.unique(d["patch"][src]))),
                     "within_1std_src_raw": round(coverage(err[src], d[f"std_{mode}"][src], w[src]), 4),
                     "within_1std_src_calibrated": round(coverage(err[src], sigma[src], w[src]), 4),
                     "within_1std_src_pooled_raw": round(coverage(err[src], d[f"std_{mode}"][src]), 4),
                     "within_1std_src_pooled_calibrated": round(coverage(err[src], sigma[src]), 4),
                     "within_1std_background_raw": round(coverage(err[~src], d[f"std_{mode}"][~src], w[~src]), 4),
                     "within_1std_background_calibrated": round(coverage(err[~src], sigma[~src], w[~src]), 4),
                     "coverage_by_snr_calibrated": coverage_by_snr(err, sigma, d["snr"], weights=w)}
    return out


def write_calibration(model_dir, calibration: dict) -> Path:
    """Write ``calibration`` as ``uncertainty_calibration`` into ``model_dir/config.json`` (every other key and the
    weights untouched), after checking it."""
    from skyfm.heads.denoise.model import CONFIG_NAME, MODEL_TYPE
    from skyfm.utils import atomic_path

    check_calibration(calibration)
    path = Path(model_dir) / CONFIG_NAME
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SkyfmError(f"{path}: cannot read the denoiser config ({e})") from None
    if cfg.get("model_type") != MODEL_TYPE:
        raise SkyfmError(f"{path} is not a skyfm denoiser config")
    cfg["uncertainty_calibration"] = calibration
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Validation seeds: CALIBRATION_SEED_BASE (2**31 + 1,000,000) + 1000 * "
                                            "case + seed_offset + i; never the benchmark's.")
    parser.add_argument("--model", default=None, help="denoiser directory (default: the shipped one)")
    parser.add_argument("--n", type=int, default=32, help="validation patches per case (default 32)")
    parser.add_argument("--size", type=int, default=128, help="patch side in pixels (default 128, as the benchmark)")
    parser.add_argument("--samples", type=int, default=None, help="samples per pixel (default: the model's)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    parser.add_argument("--seed-offset", type=int, default=0, help="first validation seed offset (default 0)")
    parser.add_argument("--cases", default="", help="comma list of validation cases (default all: "
                        + ", ".join(c[0] for c in VALIDATION_CASES) + ")")
    parser.add_argument("--no-floors", action="store_true", help="a factor on the spread only")
    parser.add_argument("--per-instrument", action="store_true", help="no per-band parameters")
    parser.add_argument("--pool-pixels", action="store_true",
                        help="pool the pixels (default: every patch counts alike, as in the benchmark's mean)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the validation pixels an earlier run with the same settings saved in OUT "
                             "(pixels.npz, check_pixels.npz) instead of denoising again")
    parser.add_argument("--check-n", type=int, default=0,
                        help="also check the chosen calibration on this many other validation patches per case "
                             "(seeds from seed offset 500)")
    parser.add_argument("--out", default="runs/denoise-calib", help="folder for calibration.json (default %(default)s)")
    parser.add_argument("--write", default=None, metavar="MODEL_DIR",
                        help="write the chosen calibration into MODEL_DIR/config.json")
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args(argv)
    import torch

    from skyfm.heads.denoise.apply import load_denoiser

    torch.set_num_threads(a.threads)
    if a.n < 1:
        parser.error("--n must be at least 1")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    t0 = time.time()
    model = load_denoiser(a.model)
    if int(a.samples or model.config.default_samples) < 2:
        parser.error("the calibration needs at least 2 samples (1 sample has no spread)")
    cases = set(filter(None, a.cases.split(",")))
    command = "python -m skyfm.heads.denoise.calibrate " + " ".join(sys.argv[1:] if argv is None else argv)
    log(f"validation pixels: {a.n} patches per case, seeds {CALIBRATION_SEED_BASE} + 1000 * case + {a.seed_offset} + i")
    folder = Path(a.out)
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"model": str(a.model), "n": a.n, "size": a.size, "samples": a.samples, "steps": a.steps,
                "seed_offset": a.seed_offset, "cases": sorted(cases), "validation_version": VALIDATION_VERSION}

    def pixels_for(name, n, offset):
        path = folder / name
        these = {**settings, "n": n, "seed_offset": offset}
        if a.reuse and path.is_file():
            px, saved = load_pixels(path)
            if saved == these:
                log(f"reusing {path}")
                return px
            log(f"{path} has other settings ({saved}): denoising again")
        px = validation_pixels(model, n, a.size, a.samples, a.steps, cases, log, seed_offset=offset)
        save_pixels(path, px, these)
        return px

    pixels = pixels_for("pixels.npz", a.n, a.seed_offset)
    calibration, report = choose_calibration(pixels, per_band=not a.per_instrument, floors=not a.no_floors,
                                             balance_patches=not a.pool_pixels)
    calibration["provenance"] = {
        "command": command, "model": a.model or "skyfm/resources/models/denoiser-default",
        "seeds": f"{CALIBRATION_SEED_BASE} + 1000 * case + {a.seed_offset} + i, i < {a.n} "
                 "(2**31 + 1,000,000 + ...: disjoint from training, its validation set, the benchmark and the "
                 "flux diagnostics)",
        "cases": [c[0] for c in VALIDATION_CASES if not cases or c[0] in cases], "patch_size": a.size,
        "samples": int(a.samples or model.config.default_samples),
        "steps": int(a.steps or model.config.default_steps), "std_ddof": 1,
        "target": "68.27% of the validation source pixels (true > 1 noise sigma) of an instrument / band within "
                  "1 sigma, " + ("pixels pooled" if a.pool_pixels else "every patch counting alike") + "; floors "
                  "chosen to balance the coverage in bins of true SNR " + ", ".join(_bin_labels(SNR_BINS))
                  + "; the simplest form within 0.01 of the best bin rms",
        "per_band": "no" if a.per_instrument else (f"bands in every patch of the instrument, with >= {MIN_PIXELS} "
                                                    f"source pixels from >= {MIN_PATCHES} patches"),
        "model_form": "sigma^2 = (scale spread)^2 + (clean_floor clean)^2 + (noise_floor noise)^2",
    }
    out = {"calibration": calibration, "report": report,
           "validation": {m: evaluate_calibration(pixels, calibration, m) for m in MODES}}
    if a.check_n:
        log(f"check pixels: {a.check_n} patches per case, seed offset 500")
        check = pixels_for("check_pixels.npz", a.check_n, 500)
        out["check"] = {"seeds": f"{CALIBRATION_SEED_BASE} + 1000 * case + 500 + i, i < {a.check_n}",
                        **{m: evaluate_calibration(check, calibration, m) for m in MODES}}
        calibration["provenance"]["check"] = {
            "seeds": out["check"]["seeds"],
            "within_1std_source_px_raw_to_calibrated": {
                m: {case: [r["within_1std_src_raw"], r["within_1std_src_calibrated"]]
                    for case, r in out["check"][m].items()} for m in MODES}}
    out["wall_s"] = round(time.time() - t0, 1)
    (folder / "calibration.json").write_text(json.dumps(out, indent=1, default=_jsonable) + "\n")
    print(json.dumps(calibration, indent=1))
    for part in ("validation", "check"):
        for case, r in (out.get(part) or {}).get("forced", {}).items():
            log(f"{part} (forced) {case}: within 1 std, source px {r['within_1std_src_raw']} -> "
                f"{r['within_1std_src_calibrated']}; background px {r['within_1std_background_raw']} -> "
                f"{r['within_1std_background_calibrated']}")
    log(f"wrote {folder / 'calibration.json'} ({out['wall_s']:.0f} s)")
    if a.write:
        log(f"wrote {write_calibration(a.write, calibration)}")
    return 0


def save_pixels(path, pixels: dict, settings: dict) -> Path:
    """Write :func:`validation_pixels`' output (and the settings it was made with) to an ``.npz`` file."""
    arrays = {"__settings__": np.array(json.dumps(settings))}
    for case, d in pixels.items():
        for k, v in d.items():
            v = np.asarray(v)
            arrays[f"{case}/{k}"] = v.astype(str) if v.dtype == object else v
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return path


def load_pixels(path) -> tuple[dict, dict]:
    """``(pixels, settings)`` saved by :func:`save_pixels` (plain arrays: nothing is unpickled)."""
    with np.load(path, allow_pickle=False) as z:
        settings = json.loads(str(z["__settings__"]))
        pixels: dict = {}
        for key in z.files:
            if key == "__settings__":
                continue
            case, name = key.split("/", 1)
            v = z[key]
            pixels.setdefault(case, {})[name] = str(v) if v.ndim == 0 else (v.astype(object) if name == "band" else v)
    return pixels, settings


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    raise TypeError(type(x).__name__)


if __name__ == "__main__":
    sys.exit(main())
