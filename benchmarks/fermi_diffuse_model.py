"""Fermi-LAT background models made from the diffuse-emission files, against the simulator's true background.

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/fermi_diffuse_model.py [--n 8] [--out runs/bench-fermi-diffuse-model]

A Fermi-LAT user has no cube of expected background counts, but has the files they are made from: the
interstellar-emission model (``gll_iem_v07.fits``, a photon intensity per MeV and sr at 30 energies), the isotropic
spectrum (a text file) and the observation's exposure cube (``gtexpcube2``). ``skyfm detect --background gll.fits
--isotropic iso.txt --exposure expcube.fits`` makes the counts from them (:mod:`skyfm.catalog.background_model`).
This script checks that path against the truth: ``--n`` fresh 256^2 cubes of the real 4FGL-DR2 sky at |b| <= 8
deg (seeds ``1.79995e9 + i``, never used in training), simulated with the YAML's interstellar-emission model, whose
intensity maps (above 1 GeV, on the simulator's 0.3-deg nodes) are caught as the simulator draws them and written as
a gll_iem-like cube (the two components' spectral shapes at 30 energies from 50 MeV to 2 TeV, in the ``ENERGIES``
layout); the isotropic power law of the YAML as the FSSC's text file; the YAML's exposure per bin as a cube
(gammapy's ``EBOUNDS`` layout). Reported: the made model over the true expected background per bin (median and
1-99% over pixels), and ``skyfm detect`` (the shipped detector, likelihood selection) with the true model cube, with
the model made from the files, from files whose interstellar model is 13% low or 15% high, or the other
interstellar model with other clumps (the sky's model is never the sky), each with the model rescaled to the counts
(the default) and as is (``--background-as-is``), and with none (estimated from the counts): F1 at SNR >= 5 and 68%
flux coverage (:func:`skyfm.finetune.evaluate.score_patch`), and how many cubes' models failed the deficit test
(:func:`skyfm.catalog.likelihood.model_deficit`: a warning, and the model corrected over the image unless as is).

Writes ``OUT/results.json`` and ``OUT/results.md`` and prints the markdown.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
from image_units import command, f1_score

SEED_BASE = 1_799_950_000
PLANE_ENERGIES_MEV = np.geomspace(50.0, 2e6, 30)  # gll_iem_v07's range and plane count
# (label, the model's interstellar maps: "true" / a scale / "other", fit_background)
METHODS = (("true model cube", None, True), ("true model cube, as is", None, False),
           ("made from the diffuse files", "true", True), ("made from the diffuse files, as is", "true", False),
           ("diffuse model x0.87", 0.87, True), ("diffuse model x0.87, as is", 0.87, False),
           ("diffuse model x1.15", 1.15, True), ("diffuse model x1.15, as is", 1.15, False),
           ("the other interstellar model", "other", True), ("the other interstellar model, as is", "other", False),
           ("no model (estimated)", None, None))


def simulate_with_intensity(inst, seed: int):
    """(patch, caught): a fermi-plane patch and the interstellar maps the simulator drew for it (glon, glat, maps,
    model name), caught by wrapping :func:`skyfm.data.simulate.diffuse.interstellar_maps`."""
    from skyfm.data.simulate import diffuse, simulate_patch

    caught = {}
    original = diffuse.interstellar_maps

    def catch(model_name, glon, glat, step_deg, rng):
        maps = original(model_name, glon, glat, step_deg, rng)
        caught.update(model=model_name, glon=glon, glat=glat, maps=maps, step_deg=step_deg)
        return maps

    rng = np.random.default_rng([seed, 99])
    centre = (float(rng.uniform(0, 360)), float(rng.uniform(-8, 8)))
    diffuse.interstellar_maps = catch
    try:
        patch = simulate_patch(inst, seed, population="real", center=centre, size=256)
    finally:
        diffuse.interstellar_maps = original
    return patch, caught


def write_intensity_cube(path: Path, patch, caught, galactic_scale: float) -> None:
    """The caught maps as a gll_iem-like cube on their own nodes: intensity per MeV and sr at PLANE_ENERGIES_MEV."""
    from astropy.coordinates import SkyCoord
    from astropy.io import fits

    from skyfm.data.simulate import diffuse
    from skyfm.data.simulate.spectra import integrate_shape

    model = diffuse.INTERSTELLAR_MODELS[caught["model"]]
    glon, glat = caught["glon"], caught["glat"]
    nodes = SkyCoord(l=glon[[0, 0, 1], [0, 1, 0]], b=glat[[0, 0, 1], [0, 1, 0]], unit="deg", frame="galactic")
    px, py = patch.wcs.world_to_pixel(nodes)  # the nodes are every `step` pixels of the patch's own grid
    step = float(px[1] - px[0])
    wcs = patch.wcs.deepcopy()
    wcs.wcs.cdelt = [c * step for c in wcs.wcs.cdelt]
    wcs.wcs.crpix = [1 + (wcs.wcs.crpix[0] - 1 - px[0]) / step, 1 + (wcs.wcs.crpix[1] - 1 - py[0]) / step]
    planes = np.zeros((len(PLANE_ENERGIES_MEV),) + glon.shape)
    for name, intensity_above_1gev in caught["maps"].items():
        comp = getattr(model, name)
        norm = integrate_shape(comp.spectral_shape, diffuse.ONE_GEV_MEV, diffuse.HIGHEST_ENERGY_MEV)
        shape = np.asarray(comp.spectral_shape(PLANE_ENERGIES_MEV)) / norm  # per MeV, per unit above 1 GeV
        planes += shape[:, None, None] * intensity_above_1gev[None]
    header = wcs.to_header()
    header["BUNIT"] = "photon/(cm2 MeV s sr)"
    table = fits.BinTableHDU.from_columns([fits.Column("Energy", "D", unit="MeV", array=PLANE_ENERGIES_MEV)],
                                          name="ENERGIES")
    fits.HDUList([fits.PrimaryHDU((galactic_scale * planes).astype(np.float32), header=header), table]).writeto(
        path, overwrite=True)


def write_isotropic(path: Path, inst) -> None:
    """The YAML's isotropic power law (intensity above 1 GeV, index) as the FSSC's text file."""
    iso = inst.background["isotropic"]
    k, index = float(iso["intensity_above_1gev"]), float(iso["index"])
    per_mev = k * (index - 1) / 1e3 * (PLANE_ENERGIES_MEV / 1e3) ** -index
    path.write_text("".join(f"{e:.6e} {i:.6e} 0\n" for e, i in zip(PLANE_ENERGIES_MEV, per_mev)))


def run(n: int, log) -> list[dict]:
    import warnings

    from astropy.io import fits

    from skyfm.catalog.background_model import background_counts, diffuse_kernels, read_intensity_cube
    from skyfm.catalog.background_model import read_isotropic_spectrum
    from skyfm.catalog.exposure import read_exposure_cube
    from skyfm.data import write_patch
    from skyfm.data.simulate import diffuse
    from skyfm.data.fits_io import ebounds_hdu
    from skyfm.detect import detect_file, get_detector
    from skyfm.finetune.evaluate import score_patch
    from skyfm.instruments import load_instrument

    det = get_detector(None, device="cpu")
    inst = load_instrument("fermi-lat")
    scale = float(((inst.background or {}).get("galactic") or {}).get("scale", 1.0))
    ratios = [[] for _ in inst.bands]
    totals = {m[0]: {"tp": 0, "fp": 0, "n_true": 0, "cover": [], "local": 0, "warned": 0} for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {k: tmp / f"{k}.fits" for k in ("cube", "true", "gll", "exposure")}
        files.update({k: tmp / f"gll-{k}.fits" for k in (0.87, 1.15, "other")})
        iso = tmp / "iso.txt"
        write_isotropic(iso, inst)
        for i in range(n):
            patch, caught = simulate_with_intensity(inst, SEED_BASE + i)
            write_patch(dataclasses.replace(patch, background_image=None), files["cube"])
            fits.PrimaryHDU(patch.background_image).writeto(files["true"], overwrite=True)
            write_intensity_cube(files["gll"], patch, caught, scale)
            for factor in (0.87, 1.15):
                write_intensity_cube(files[factor], patch, {**caught, "maps": {k: factor * m for k, m in
                                                                               caught["maps"].items()}}, scale)
            other = "ic-halo" if caught["model"] == "gas-disk" else "gas-disk"  # and other clumps
            other_maps = diffuse.interstellar_maps(other, caught["glon"], caught["glat"], caught["step_deg"],
                                                   np.random.default_rng([SEED_BASE + i, 5]))
            write_intensity_cube(files["other"], patch, {**caught, "model": other, "maps": other_maps}, scale)
            exposure = np.array([b.exposure for b in inst.bands])[:, None, None] * np.ones(patch.data.shape)
            fits.HDUList([fits.PrimaryHDU(exposure.astype(np.float32), header=patch.wcs.to_header()),
                          ebounds_hdu(patch.energy_edges_kev)]).writeto(files["exposure"], overwrite=True)
            made = background_counts(patch.wcs, patch.data.shape[1:], patch.energy_edges_kev,
                                     read_exposure_cube(files["exposure"]), read_intensity_cube(files["gll"]),
                                     read_isotropic_spectrum(iso), diffuse_kernels(inst, inst.pixel_scale_deg,
                                                                                   inst.bands))
            for c in range(len(inst.bands)):
                ratios[c] += list((made[c] / patch.background_image[c]).ravel()[::7])
            for method, maps, fit in METHODS:
                extra = {} if fit is None else {"fit_background": fit}
                if maps is None and fit is not None:
                    extra["background"] = files["true"]
                elif maps is not None:
                    extra.update(background=files["gll" if maps == "true" else maps], isotropic=iso)
                with warnings.catch_warnings(record=True) as caught_warnings:
                    warnings.simplefilter("always")
                    cat = detect_file(files["cube"], model_dir=det, progress=False, exposure=files["exposure"],
                                      **extra)
                s = score_patch(cat, patch, inst)
                t = totals[method]
                t["local"] += str(cat.meta.get("background_correction", "")).startswith("local")
                t["warned"] += any("does not follow the counts" in str(w.message) for w in caught_warnings)
                t["tp"], t["fp"], t["n_true"] = t["tp"] + s["tp"], t["fp"] + s["fp"], t["n_true"] + s["n_true"]
                t["cover"] += s["cover"]
            log(f"  patch {i}: made / true background, bin medians "
                + " ".join(f"{np.median(r):.3f}" for r in ratios))
    rows = []
    for c, band in enumerate(inst.bands):
        q1, q50, q99 = np.percentile(ratios[c], [1, 50, 99])
        rows.append({"kind": "background", "band": band.name, "median": round(float(q50), 4),
                     "p1": round(float(q1), 4), "p99": round(float(q99), 4)})
    for method, t in totals.items():
        rows.append({"kind": "detection", "method": method, "tp": t["tp"], "fp": t["fp"], "true_sources": t["n_true"],
                     "f1": f1_score(t["tp"], t["fp"], t["n_true"]),
                     "flux_cov68": round(float(np.mean(t["cover"])), 3) if t["cover"] else None,
                     "cubes_corrected_locally": t["local"], "cubes_warned": t["warned"]})
        log(f"  {method:38s} F1 {rows[-1]['f1']:.3f}  flux cov68 {rows[-1]['flux_cov68']}")
    return rows


def markdown(rows: list[dict], n: int) -> str:
    lines = [f"Background models made from the diffuse files: {n} fresh 256^2 Fermi-LAT plane cubes (seeds from "
             f"{SEED_BASE}). The made model over the simulator's expected background, per bin, over pixels:", "",
             "| bin | median | 1% | 99% |", "|---|---|---|---|"]
    lines += [f"| {r['band']} | {r['median']:.4f} | {r['p1']:.4f} | {r['p99']:.4f} |" for r in rows
              if r["kind"] == "background"]
    lines += ["", "`skyfm detect --exposure` (likelihood selection with a model): F1 at SNR >= 5, 68% flux coverage, "
              "and the cubes whose model failed the deficit test (a warning; corrected over the image unless as is).",
              "", "| background | F1 | flux cov68 | cubes warned | cubes corrected locally |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['f1']:.3f} | {r['flux_cov68']} | {r['cubes_warned']} | "
              f"{r['cubes_corrected_locally']} |" for r in rows if r["kind"] == "detection"]
    return "\n".join(lines)


def main(argv=None) -> int:
    return command(argv, __doc__, 8, "runs/bench-fermi-diffuse-model", run, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
