"""Images in other units than the instrument's ADU, and with their sky subtracted, as real pipelines write them.

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/image_units.py [--n 4] [--out runs/bench-image-units]

skyfm's CCD models work in the instrument's ADU: its gain and read noise describe the noise that the PSF fit
weights by, and every fit-SNR rule rests on that. Hubble's drizzled images (``_drc``, ``_drz``) are in e-/s, its
``_flt`` images in electrons. Each case simulates ``--n`` fresh 256^2 single-band images per instrument (seeds
``1.78e9 + 100 * case + i``, never used in training; Hubble F606W and WISE W1 in their instruments' scene mix,
MeerLICHT q crowded) and writes each as a FITS file six ways:

* ``adu``: the pixels as simulated (no BUNIT), the reference;
* ``e-/s``: pixels x gain / EXPTIME, ``BUNIT = 'ELECTRONS/S'`` in the image HDU and ``EXPTIME`` in the primary (a
  drizzled HST file's layout): read back into ADU by :func:`skyfm.data.readers.image_units`;
* ``e-/s, no BUNIT``: the same pixels without the keyword (before Run 23, skyfm read every file so);
* ``adu, sky subtracted``: the simulated sky level taken off every pixel (survey coadds, SDSS frames);
* ``e-/s, sky subtracted``: both, as MAST's drizzled Hubble files are (their ``MDRIZSKY`` records the level; the
  file here carries it too, though skyfm does not read it);
* ``e-/s, no BUNIT, sky subtracted``: both, without the keyword.

A file with no BUNIT is read in the unit its sky's noise gives where that is far finer than the ADU
(:func:`skyfm.data.readers.units_from_noise`; before Run 36, as ADU).

Each file goes through ``skyfm detect`` (:func:`skyfm.detect.detect_file`, the shipped default detector). Reported:
F1 against the simulated truth (:func:`skyfm.finetune.evaluate.score_patch`), the number of detections, and the
median ratio of each detection's flux (back in ADU) to the ``adu`` run's flux of the detection at the same place
(within 0.5 px; 1.00 means the same photometry), and the range over the images of the ADU per unit that skyfm read the
file in, against the truth (1: read right).

Writes ``OUT/results.json`` and ``OUT/results.md`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

SEED_BASE = 1_780_000_000
CASES = {"hubble": ("F606W", None), "meerlicht": ("q", "crowded"), "wise": ("W1", None)}  # None: the scene mix
VARIANTS = ("adu", "e-/s", "e-/s, no BUNIT", "adu, sky subtracted", "e-/s, sky subtracted",
            "e-/s, no BUNIT, sky subtracted")


def write_image(patch, band: str, path: Path, variant: str, inst, keywords: dict | None = None) -> float:
    """Write ``patch``'s ``band`` as a FITS file in ``variant``'s units (``keywords``: more primary-header cards);
    returns ADU per unit of the file."""
    from astropy.io import fits

    exptime = float(inst.band(band).exposure_time)
    gain = float(inst.noise["gain"])
    adu_per_unit = 1.0 if variant.startswith("adu") else exptime / gain
    header = patch.wcs.to_header()
    header["FILTER"] = band
    if variant.startswith("e-/s") and "no BUNIT" not in variant:
        header["BUNIT"] = "ELECTRONS/S"
    primary = fits.PrimaryHDU()
    primary.header["EXPTIME"] = exptime
    primary.header.update(keywords or {})
    sky = float(patch.meta[f"sky_{band}"]) if variant.endswith("sky subtracted") else 0.0  # ADU
    if sky:
        header["MDRIZSKY"] = (sky / adu_per_unit, "sky level subtracted, in the file's unit")
    data = ((patch.data[patch.bands.index(band)] - sky) / adu_per_unit).astype(np.float32)
    fits.HDUList([primary, fits.ImageHDU(data, header=header, name="SCI")]).writeto(path)
    return adu_per_unit


def f1_score(tp: int, fp: int, n_true: int) -> float:
    """F1 (3 decimals) of ``tp`` true and ``fp`` false detections of ``n_true`` true sources: 2 TP / (2 TP + FP +
    FN), the harmonic mean of precision and recall (0 where nothing is found)."""
    return round(2 * tp / max(2 * tp + fp + (n_true - tp), 1), 3)


def catalog_of(method: str, patch, detector):
    """``method``'s catalog of ``patch``: ``skyfm`` (:func:`skyfm.detect.detect_patch` with ``detector``) or a
    baseline of :data:`skyfm.baselines.BASELINES` at SNR 5 (the detection benchmark's fixed threshold)."""
    from skyfm.baselines import BASELINES
    from skyfm.detect import detect_patch

    if method == "skyfm":
        return detect_patch(patch, detector)
    cat = BASELINES[method](patch)
    return cat[np.asarray(cat["score"], float) >= 5]


def flux_ratio(cat, reference) -> float:
    """Median flux ratio of ``cat``'s rows to ``reference``'s rows within 0.5 px (NaN if none match)."""
    if not len(cat) or not len(reference):
        return float("nan")
    rx, ry, rf = (np.asarray(reference[c], float) for c in ("x", "y", "flux"))
    ratios = []
    for x, y, f in zip(np.asarray(cat["x"], float), np.asarray(cat["y"], float), np.asarray(cat["flux"], float)):
        d = np.hypot(rx - x, ry - y)
        k = int(np.argmin(d))
        if d[k] < 0.5 and rf[k] > 0:
            ratios.append(f / rf[k])
    return float(np.median(ratios)) if ratios else float("nan")


def run(n: int, log) -> list[dict]:
    from skyfm.data.readers import open_image
    from skyfm.data.simulate import simulate_patch
    from skyfm.detect import detect_file, get_detector
    from skyfm.finetune.evaluate import score_patch
    from skyfm.instruments import load_instrument

    det = get_detector(None, device="cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for c, (name, (band, scene)) in enumerate(CASES.items()):
            inst = load_instrument(name)
            totals = {v: {"tp": 0, "fp": 0, "n_true": 0, "n_det": 0, "ratios": [], "seconds": 0.0,
                          "scales": []} for v in VARIANTS}
            for i in range(n):
                patch = simulate_patch(name, SEED_BASE + 100 * c + i, size=256, bands=[band], scene=scene)
                reference = None
                for v, variant in enumerate(VARIANTS):
                    path = Path(tmp) / f"{name}-{i}-{v}.fits"
                    adu_per_unit = write_image(patch, band, path, variant, inst)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # detect_file below says it
                        with open_image(path, instrument=name) as image:
                            totals[variant]["scales"].append(image.adu_per_unit / adu_per_unit)
                    t0 = time.perf_counter()
                    cat = detect_file(path, instrument=name, model_dir=det, progress=False)
                    totals[variant]["seconds"] += time.perf_counter() - t0
                    s = score_patch(cat, patch, inst)
                    t = totals[variant]
                    t["tp"], t["fp"], t["n_true"] = t["tp"] + s["tp"], t["fp"] + s["fp"], t["n_true"] + s["n_true"]
                    t["n_det"] += len(cat)
                    flux = np.asarray(cat["flux"], float)
                    # e-/s: the catalog is in e-/s; no BUNIT: read as ADU, so in the file's e-/s too
                    flux = flux * adu_per_unit
                    in_adu = {"x": cat["x"], "y": cat["y"], "flux": flux}
                    if variant == "adu":
                        reference = in_adu
                    else:
                        t["ratios"].append(flux_ratio(in_adu, reference))
            for variant, t in totals.items():
                ratios = [x for x in t["ratios"] if np.isfinite(x)]
                row = {"instrument": name, "band": band, "scene": scene or "scene mix", "file": variant,
                       "detections": t["n_det"],
                       "true_sources": t["n_true"], "f1": f1_score(t["tp"], t["fp"], t["n_true"]),
                       "flux_ratio_to_adu": round(float(np.median(ratios)), 3) if ratios else None,
                       "scale_read_to_true": [round(float(x), 3) for x in (min(t["scales"]), max(t["scales"]))],
                       "seconds": round(t["seconds"], 1)}
                log(f"  {name:9s} {variant:15s} F1 {row['f1']:.3f}  {row['detections']:5d} detections  "
                    f"flux / adu run {row['flux_ratio_to_adu']}")
                rows.append(row)
    return rows


def markdown(rows: list[dict], n: int) -> str:
    lines = [f"Images in other units: {n} fresh 256^2 single-band images per instrument, each written "
             f"{len(VARIANTS)} ways (seeds from {SEED_BASE}); `skyfm detect` with the shipped default detector.", "",
             "| instrument (band, scene) | file | true sources (SNR >= 5) | detections | F1 | "
             "median flux / the adu run's | ADU per unit read / true (range) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["flux_ratio_to_adu"] is None else f"{r['flux_ratio_to_adu']:.3f}"
        lines.append(f"| {r['instrument']} ({r['band']}, {r['scene']}) | {r['file']} | {r['true_sources']} | "
                     f"{r['detections']} | "
                     f"{r['f1']:.3f} | {ratio if r['file'] != 'adu' else '1 (reference)'} | "
                     f"{r['scale_read_to_true'][0]:.3g}-{r['scale_read_to_true'][1]:.3g} |")
    return "\n".join(lines)


def command(argv, doc: str, n: int, out: str, run, markdown, options=None) -> int:
    """The command line of this script and ``benchmarks/no_data_edges.py``: ``--n`` images per instrument,
    ``--out`` folder; ``run(n, log, **options)`` gives the rows, ``markdown(rows, n, **options)`` the table written
    beside their JSON. ``options``: {name: (default, help)}, each a ``--name`` string option."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--n", type=int, default=n, help=f"images per instrument (default {n})")
    parser.add_argument("--out", type=Path, default=Path(out), help=f"output folder (default {out})")
    for name, (default, text) in (options or {}).items():
        parser.add_argument(f"--{name}", default=default, help=f"{text} (default {default})")
    args = parser.parse_args(argv)
    extra = {name: getattr(args, name) for name in (options or {})}
    rows = run(args.n, lambda m: print(m, flush=True), **extra)
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, args.n, **extra)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    (args.out / "results.md").write_text(text + "\n")
    print(text)
    return 0


def main(argv=None) -> int:
    return command(argv, __doc__, 4, "runs/bench-image-units", run, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
