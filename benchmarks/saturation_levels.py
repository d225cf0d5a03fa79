"""Images from cameras that differ from the instrument's YAML: drizzles of several exposures, other CCDs' full wells
and gains.

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/saturation_levels.py [--n 3] [--out runs/bench-saturation-levels]

skyfm leaves pixels at or above a saturation level out of the PSF fit (a clipped core is no PSF) and gives the
stars it clips an aperture flux (:func:`skyfm.detect.saturation_mask`, :func:`skyfm.detect.add_saturated_stars`).
The instrument's YAML gives one exposure's level; real files often saturate elsewhere, and say so in their header
(:func:`skyfm.data.readers.image_saturation`). Each case simulates ``--n`` fresh 512^2 single-band images (seeds
``1.7995e9 + 100 * case + i``, never used in training) with an instrument changed as the case says, and writes
each as a FITS file twice: with the header keyword real files of that kind carry, and without it (what skyfm read
before it looked for one, and still reads from a file that lacks it):

* ``hubble-drizzle``: Hubble F606W (its scenes' mix), a drizzle of 4 exposures (4 x the exposure time, each
  exposure with its own full well, so 4 x the level in the summed counts), written as a ``_drc`` file is: e-/s,
  ``EXPTIME`` the total, ``NDRIZIM = 4``. Without the keyword, stars above one exposure's level are taken for
  saturated ones.
* ``meerlicht-low-well``: MeerLICHT q (crowded fields) from a CCD whose full well reads out at 20000 ADU (the
  instrument's: 60000), with ``SATURATE = 20000``. Without it, clipped cores are fitted as PSFs.
* ``meerlicht-gain``: MeerLICHT q (crowded fields) from a CCD read out at 4 e-/ADU (the instrument's: 1), with
  ``GAIN = 4`` (:func:`skyfm.data.readers.image_gain`). Without it, the PSF fit takes the bright stars' Poisson
  noise for four times what it is.

Each file goes through ``skyfm detect`` (:func:`skyfm.detect.detect_file`, the shipped default detector).
Reported: F1 against the simulated truth (:func:`skyfm.finetune.evaluate.score_patch`) and, for two groups of
true sources matched within the instrument's radius, how many, the median |flux / true - 1|, the share of true
fluxes inside the 68% intervals and the median position error (pixels): the unsaturated stars whose peak pixel is
above the instrument's level (which the file's level spares), the saturated ones (truth column ``saturated``) and
the bright unsaturated ones (true SNR >= 50, whose errors the gain sets).

Writes ``OUT/results.json`` and ``OUT/results.md`` and prints the markdown.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from image_units import command, f1_score, write_image

SEED_BASE = 1_799_500_000
VARIANTS = ("header keyword", "no keyword")
BRIGHT_SNR = 50.0


def drizzle_of(inst, exposures: int):
    """``inst`` summing ``exposures`` exposures: their total time, and each exposure's full well in the sum."""
    bands = tuple(dataclasses.replace(b, exposure_time=b.exposure_time * exposures) for b in inst.bands)
    return dataclasses.replace(inst, bands=bands,
                               noise={**inst.noise, "saturation": inst.noise["saturation"] * exposures})


def low_well(inst, level: float):
    """``inst`` with a CCD that reads out full wells at ``level`` ADU."""
    return dataclasses.replace(inst, noise={**inst.noise, "saturation": level})


def other_gain(inst, gain: float):
    """``inst`` with a CCD read out at ``gain`` e- per ADU (its full well in ADU as the instrument's)."""
    return dataclasses.replace(inst, noise={**inst.noise, "gain": gain})


# case -> (instrument, band, scene (None: the instrument's mix), how the simulated camera differs,
#          the file's unit and header keywords)
CASES = {
    "hubble-drizzle": ("hubble", "F606W", None, lambda i: drizzle_of(i, 4), "e-/s", {"NDRIZIM": 4}),
    # (a level in the header is in the file's unit: ADU here)
    "meerlicht-low-well": ("meerlicht", "q", "crowded", lambda i: low_well(i, 20000.0), "adu", {"SATURATE": 20000.0}),
    "meerlicht-gain": ("meerlicht", "q", "crowded", lambda i: other_gain(i, 4.0), "adu", {"GAIN": 4.0}),
}


def matched_rows(cat, patch, inst, adu_per_unit: float) -> dict:
    """Per true source matched: |flux / true - 1|, inside its 68% interval, position error (px), ``saturated``
    (truth), ``above`` (unsaturated, its peak pixel at or above the instrument's saturation level) and ``bright``
    (neither, true SNR >= :data:`BRIGHT_SNR`)."""
    from skyfm.catalog import match_catalogs
    from skyfm.catalog.evaluate import default_radius_pix

    val = lambda k: np.asarray(getattr(cat[k], "value", cat[k]), dtype=np.float64)  # noqa: E731
    truth = patch.truth
    di, ti, sep = match_catalogs((val("x"), val("y")), truth, float(default_radius_pix(inst)))
    true = np.asarray(truth["flux"], float)[ti]
    flux, err = val("flux")[di] * adu_per_unit, val("flux_err")[di] * adu_per_unit  # back in ADU
    saturated = np.asarray(truth["saturated"], bool)[ti]
    h, w = patch.data.shape[1:]
    ix = np.clip(np.rint(np.asarray(truth["x"], float)[ti]).astype(int), 0, w - 1)
    iy = np.clip(np.rint(np.asarray(truth["y"], float)[ti]).astype(int), 0, h - 1)
    peak = patch.data[0, iy, ix]
    above = ~saturated & (peak >= 0.999 * float(inst.noise["saturation"]))
    bright = ~saturated & ~above & (np.asarray(truth["snr"], float)[ti] >= BRIGHT_SNR)
    return {"dev": np.abs(flux / true - 1.0), "covered": np.abs(flux - true) <= err, "sep": sep,
            "saturated": saturated, "above": above, "bright": bright}


def group_stats(rows: dict, sel: np.ndarray) -> dict:
    """How many of :func:`matched_rows`' ``rows`` ``sel`` holds, their median abs(flux / true - 1), 68% coverage
    and median position error (None for an empty group)."""
    def stat(f, key):
        return round(float(f(rows[key][sel])), 3) if sel.any() else None

    return {"n": int(sel.sum()), "median_flux_dev": stat(np.median, "dev"), "cov68": stat(np.mean, "covered"),
            "median_sep_pix": stat(np.median, "sep")}


def run(n: int, log) -> list[dict]:
    from skyfm.data.simulate import simulate_patch
    from skyfm.detect import detect_file, get_detector
    from skyfm.finetune.evaluate import score_patch
    from skyfm.instruments import load_instrument

    det = get_detector(None, device="cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for c, (case, (name, band, scene, camera, unit, keywords)) in enumerate(CASES.items()):
            inst = load_instrument(name)
            sim_inst = camera(inst)
            totals = {v: {"tp": 0, "fp": 0, "n_true": 0, "seconds": 0.0, "matched": []} for v in VARIANTS}
            for i in range(n):
                patch = simulate_patch(sim_inst, SEED_BASE + 100 * c + i, size=512, bands=[band], scene=scene)
                for v, variant in enumerate(VARIANTS):
                    path = Path(tmp) / f"{case}-{i}-{v}.fits"
                    adu_per_unit = write_image(patch, band, path, unit, sim_inst,
                                               keywords if variant == "header keyword" else {})
                    t0 = time.perf_counter()
                    cat = detect_file(path, instrument=name, model_dir=det, progress=False)
                    t = totals[variant]
                    t["seconds"] += time.perf_counter() - t0
                    s = score_patch(cat, patch, inst)
                    t["tp"], t["fp"], t["n_true"] = t["tp"] + s["tp"], t["fp"] + s["fp"], t["n_true"] + s["n_true"]
                    t["matched"].append(matched_rows(cat, patch, inst, adu_per_unit))
            for variant, t in totals.items():
                b = {k: np.concatenate([x[k] for x in t["matched"]]) for k in t["matched"][0]}
                row = {"case": case, "file": variant, "true_sources": t["n_true"],
                       "f1": f1_score(t["tp"], t["fp"], t["n_true"]), "seconds": round(t["seconds"], 1)}
                for part, sel in (("above_level", b["above"]), ("saturated", b["saturated"]),
                                  ("bright", b["bright"])):
                    row[part] = group_stats(b, sel)
                log(f"  {case:19s} {variant:15s} F1 {row['f1']:.3f}  above the level {row['above_level']}  "
                    f"saturated {row['saturated']}  bright {row['bright']}")
                rows.append(row)
    return rows


def markdown(rows: list[dict], n: int) -> str:
    lines = [f"Saturation levels: {n} fresh 512^2 single-band images per case (seeds from {SEED_BASE}), each "
             "written with and without its header keyword; `skyfm detect` with the shipped default detector. "
             "Stars matched: unsaturated ones whose peak is above the instrument's level, saturated ones, and "
             f"the other unsaturated ones with true SNR >= {BRIGHT_SNR:g}.", "",
             "| case | file | true sources (SNR >= 5) | F1 | unsaturated above the instrument's level: n, median "
             "abs(flux/true - 1), cov68, median error (px) | saturated: the same | bright: the same |",
             "|---|---|---|---|---|---|---|"]

    def cell(d):
        if not d["n"]:
            return "0"
        return f"{d['n']}, {d['median_flux_dev']:.3f}, {d['cov68']:.2f}, {d['median_sep_pix']:.3f}"

    for r in rows:
        lines.append(f"| {r['case']} | {r['file']} | {r['true_sources']} | {r['f1']:.3f} | {cell(r['above_level'])} "
                     f"| {cell(r['saturated'])} | {cell(r['bright'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    return command(argv, __doc__, 3, "runs/bench-saturation-levels", run, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
