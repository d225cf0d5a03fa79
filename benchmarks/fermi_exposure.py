"""Counts cubes of another exposure than the instrument YAML's: physical fluxes with and without an exposure cube.

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/fermi_exposure.py [--n 8] [--out runs/bench-fermi-exposure]

A counts catalog's ``flux_phys`` (ph cm-2 s-1) divides each band's fitted counts by the band's exposure: the YAML's
one number per band, unless ``skyfm detect --exposure`` gives the observation's exposure cube
(:mod:`skyfm.catalog.exposure`). Real cubes seldom have the YAML's exposure (another mission length, event class,
the sky's uneven coverage). Each case simulates ``--n`` fresh 256^2 Fermi-LAT cubes of the real 4FGL-DR2 sky at
|b| <= 8 deg (seeds ``1.7999e9 + 100 * case + i``, never used in training) with every band's exposure x0.5, x1 and
x3, and x3 thinned across the image from 0.3 to 1 of it (binomial thinning of the counts, a Poisson process's
own: the exposure rises from west to east); writes each as a FITS cube, its true background model and its exposure
cube (one plane per energy bin with an EBOUNDS table, gammapy's layout: the simulator's exposure is constant over
each bin; the same on the image's grid), and runs ``skyfm detect --background MODEL --exposure EXPOSURE``
(:func:`skyfm.detect.detect_file`, the shipped default detector). Reported per case, for detections matched to
true sources of SNR >= 10: the median and the 16-84% spread of ``flux_phys`` over the true photon flux, from the
exposure cube and from the YAML (the same detections, their ``flux_band`` over the YAML's exposures), and F1 at
SNR >= 5 (:func:`skyfm.finetune.evaluate.score_patch`).

Writes ``OUT/results.json`` and ``OUT/results.md`` and prints the markdown.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
from image_units import command, f1_score

SEED_BASE = 1_799_900_000
CASES = {"x0.5": (0.5, None), "x1": (1.0, None), "x3": (3.0, None), "x3, thinned 0.3-1 across": (3.0, (0.3, 1.0))}
FLUX_SNR_MIN = 10.0


def observed(inst, seed: int, factor: float, thinning):
    """A fermi-lat patch whose bands had ``factor`` times the YAML's exposure, thinned by a west-to-east ramp
    ``thinning`` = (low, high) when given; (patch, exposure planes (C, H, W) in cm2 s)."""
    from skyfm.data.simulate import simulate_patch

    longer = dataclasses.replace(inst, bands=tuple(dataclasses.replace(b, exposure=b.exposure * factor)
                                                   for b in inst.bands))
    rng = np.random.default_rng([seed, 99])
    centre = (float(rng.uniform(0, 360)), float(rng.uniform(-8, 8)))
    patch = simulate_patch(longer, seed, population="real", center=centre, size=256)
    patch = dataclasses.replace(patch, instrument=inst.name)
    exposure = np.array([b.exposure for b in longer.bands])[:, None, None] * np.ones(patch.data.shape)
    if thinning is not None:
        ramp = np.linspace(*thinning, patch.width)[None, None, :] * np.ones(patch.data.shape)
        kept = np.random.default_rng([seed, 7]).binomial(patch.data.astype(np.int64), ramp)
        patch = dataclasses.replace(patch, data=kept.astype(np.float32),
                                    background_image=(patch.background_image * ramp).astype(np.float32))
        exposure = exposure * ramp
    return patch, exposure


def run(n: int, log) -> list[dict]:
    from astropy.io import fits

    from skyfm.catalog import match_catalogs
    from skyfm.data import write_patch
    from skyfm.data.fits_io import ebounds_hdu
    from skyfm.detect import detect_file, get_detector
    from skyfm.finetune.evaluate import score_patch
    from skyfm.heads.flux import flux_phys
    from skyfm.instruments import load_instrument

    det = get_detector(None, device="cpu")
    inst = load_instrument("fermi-lat")
    yaml_exposure = np.array([b.exposure for b in inst.bands])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for c, (label, (factor, thinning)) in enumerate(CASES.items()):
            ratios = {"cube": [], "yaml": []}
            tp = fp = n_true = 0
            for i in range(n):
                patch, exposure = observed(inst, SEED_BASE + 100 * c + i, factor, thinning)
                cube = write_patch(dataclasses.replace(patch, background_image=None), tmp / "cube.fits")
                fits.PrimaryHDU(patch.background_image).writeto(tmp / "model.fits", overwrite=True)
                fits.HDUList([fits.PrimaryHDU(exposure.astype(np.float32), header=patch.wcs.to_header()),
                              ebounds_hdu(patch.energy_edges_kev)]).writeto(tmp / "exposure.fits", overwrite=True)
                cat = detect_file(cube, background=tmp / "model.fits", exposure=tmp / "exposure.fits",
                                  model_dir=det, progress=False)
                s = score_patch(cat, patch, inst)
                tp, fp, n_true = tp + s["tp"], fp + s["fp"], n_true + s["n_true"]
                truth = patch.truth[np.asarray(patch.truth["snr"], float) >= FLUX_SNR_MIN]
                if not len(cat) or not len(truth):
                    continue
                xy = (np.asarray(cat["x"], float), np.asarray(cat["y"], float))
                di, ti, _ = match_catalogs(xy, truth, 3.0)
                true_flux = np.asarray(getattr(truth["flux_phys"], "value", truth["flux_phys"]), float)[ti]
                from_cube = np.asarray(getattr(cat["flux_phys"], "value", cat["flux_phys"]), float)[di]
                band = np.clip(np.asarray(getattr(cat["flux_band"], "value", cat["flux_band"]), float)[di], 0, None)
                ratios["cube"] += list(from_cube / true_flux)
                ratios["yaml"] += list(flux_phys(band, yaml_exposure) / true_flux)
            row = {"case": label, "factor": factor, "thinning": thinning, "matched": len(ratios["cube"]),
                   "true_sources": n_true, "tp": tp, "fp": fp, "f1": f1_score(tp, fp, n_true)}
            for key, values in ratios.items():
                values = np.asarray(values, float)
                row[f"{key}_nan"] = int(np.isnan(values).sum())  # off the exposure cube
                q16, q50, q84 = np.nanpercentile(values, [16, 50, 84]) if np.isfinite(values).any() else [np.nan] * 3
                row[key] = {"median": round(float(q50), 3), "p16": round(float(q16), 3), "p84": round(float(q84), 3)}
            log(f"  {label:26s} F1 {row['f1']:.3f}  flux_phys / true, exposure cube {row['cube']['median']:.3f} "
                f"[{row['cube']['p16']:.3f}, {row['cube']['p84']:.3f}], YAML {row['yaml']['median']:.3f} "
                f"({row['matched']} sources)")
            rows.append(row)
    return rows


def markdown(rows: list[dict], n: int) -> str:
    lines = [f"Fermi-LAT cubes of another exposure than the YAML's: {n} fresh 256^2 plane cubes per case (seeds from "
             f"{SEED_BASE}), `skyfm detect --background --exposure`. flux_phys / true photon flux of the detections "
             f"matched to sources of SNR >= {FLUX_SNR_MIN:g}: median [16%, 84%].", "",
             "| exposure (x the YAML's) | F1 | sources | from the exposure cube | from the YAML |",
             "|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k]['median']:.3f} [{r[k]['p16']:.3f}, {r[k]['p84']:.3f}]" for k in ("cube", "yaml")]
        lines.append(f"| {r['case']} | {r['f1']:.3f} | {r['matched']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    return command(argv, __doc__, 8, "runs/bench-fermi-exposure", run, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
