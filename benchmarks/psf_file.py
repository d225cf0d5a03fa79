"""Counts cubes whose PSF is not the instrument YAML's, with and without the observation's PSF file (``--psf``).

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/psf_file.py [--instrument fermi-lat|ctao] [--n 8] [--widths 0.6,1.0,1.6] \\
        [--out runs/bench-psf-file]

The YAML gives each band one typical PSF. A real analysis has its own: Fermi-LAT's event selection changes it (the
PSF3 quartile's PSF is about 0.6 times as wide as all event types together, PSF0's about 1.6 times), and ``gtpsf``
writes the PSF of the data at hand; an IACT's PSF changes with the offset from the pointing and the event
reconstruction, and its instrument response gives it per energy and offset. This script simulates ``--n`` fresh
256^2 Galactic-plane cubes (Fermi-LAT: the real 4FGL-DR2 sky at |b| <= 8, seeds ``1.801e9 + i``; CTAO: its plane
population, seeds ``1.802e9 + i``; never used in training) once per ``--widths`` factor, the same sky and sources
with each band's PSF at that multiple of the YAML's r68 (its shape kept; the counts are the same: only the PSF
changes), and writes each PSF as the instrument's tools do: for Fermi-LAT gtpsf's layout (a ``PSF`` table of 8
energies inside each band, each with the band's King function, so that the file gives a band the PSF its counts
were drawn with, and a ``THETA`` table of 301 angles to 30 deg); for CTAO an IRF ``psf_table`` (8 energy bins inside
each band, radii to 10 times the broadest r68, and five field-of-view offsets, of which the one at 1 deg, the one
skyfm reads, holds the simulated PSF and the others one 1.5 times as wide). ``skyfm detect`` (the shipped
detector) runs on every cube with the true background model cube (likelihood selection, as ``benchmarks/detect.py``
does) and with none (the head's selection: the network's for Fermi-LAT, the fitted TS for CTAO), each with the
YAML's PSF and with ``--psf``. Reported: F1 at SNR >= 5, 68% flux coverage, the median separation of the matched
SNR >= 5 sources (pixels) and the r68 that skyfm read from the file for the lowest and highest bands.

Writes ``OUT/results.json`` and ``OUT/results.md`` and prints the markdown.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
from image_units import command, f1_score

SEED_BASE = {"fermi-lat": 1_801_000_000, "ctao": 1_802_000_000}
WIDTHS = (0.6, 1.0, 1.6)  # each band's r68 over the YAML's: PSF3-like, as the YAML, PSF0-like
GTPSF_PER_BAND = 8  # energies per band in the written file, just inside its edges
GTPSF_THETA_DEG = np.concatenate([[0.0], np.geomspace(1e-3, 30.0, 300)])
IRF_OFFSETS_DEG = np.array([0.0, 0.5, 0.8, 1.2, 2.0, 3.0])  # bin edges: the third bin is centred on 1 deg
METHODS = (("true model, the YAML's PSF", True, False), ("true model, --psf", True, True),
           ("no model, the YAML's PSF", False, False), ("no model, --psf", False, True))


def scaled_instrument(inst, factor: float):
    """``inst`` with every band's PSF ``factor`` times as wide (same shape)."""
    from skyfm.instruments.psf import PSF

    return inst.with_psfs({b.name: PSF(b.psf.model, b.psf.width_deg * factor, b.psf.beta) for b in inst.bands})


def write_gtpsf(path: Path, inst) -> None:
    """A gtpsf-layout file of ``inst``'s PSF: :data:`GTPSF_PER_BAND` energies inside each band, each with the band's
    PSF (per sr), so that the PSF the file gives a band is the one the simulator drew its counts with (a real
    gtpsf file's PSF changes smoothly with energy, and the band's counts see its average)."""
    from astropy.io import fits

    energies, rows = [], []
    for band in inst.bands:
        lo, hi = (q.to_value("MeV") for q in band.energy)
        energies += list(np.geomspace(lo * 1.0001, hi * 0.9999, GTPSF_PER_BAND))
        rows += [band.psf.profile(GTPSF_THETA_DEG) * (180.0 / np.pi) ** 2] * GTPSF_PER_BAND
    psf = fits.BinTableHDU.from_columns([
        fits.Column("Energy", "D", unit="MeV", array=np.array(energies)),
        fits.Column("Exposure", "D", unit="cm^2 s", array=np.full(len(energies), 3e11)),
        fits.Column("Psf", f"{len(GTPSF_THETA_DEG)}D", unit="sr^-1", array=np.array(rows))], name="PSF")
    theta = fits.BinTableHDU.from_columns([fits.Column("Theta", "D", unit="deg", array=GTPSF_THETA_DEG)],
                                          name="THETA")
    fits.HDUList([fits.PrimaryHDU(), psf, theta]).writeto(path, overwrite=True)


def write_psf_table(path: Path, inst) -> None:
    """An IACT IRF ``psf_table`` (gamma-astro-data-formats) of ``inst``'s PSF at the 1-deg offset (the others 1.5
    times as wide): 8 energy bins inside each band, each with the band's PSF (per sr)."""
    from astropy.io import fits

    from skyfm.instruments.psf import PSF

    e_lo, e_hi, bands = [], [], []
    for band in inst.bands:
        lo, hi = (q.to_value("TeV") for q in band.energy)
        edges = np.geomspace(lo * 1.0001, hi * 0.9999, GTPSF_PER_BAND + 1)
        e_lo, e_hi, bands = e_lo + list(edges[:-1]), e_hi + list(edges[1:]), bands + [band] * GTPSF_PER_BAND
    reach = 10 * max(b.psf.containment_radius() for b in inst.bands)
    rad = np.linspace(0.0, reach, 501)
    mid = 0.5 * (rad[1:] + rad[:-1])
    rpsf = np.zeros((len(mid), len(IRF_OFFSETS_DEG) - 1, len(e_lo)))  # numpy (rad, offset, energy)
    for k in range(len(IRF_OFFSETS_DEG) - 1):
        for j, band in enumerate(bands):
            psf = band.psf if k == 2 else PSF(band.psf.model, 1.5 * band.psf.width_deg, band.psf.beta)
            rpsf[:, k, j] = psf.profile(mid) * (180.0 / np.pi) ** 2
    cols = [fits.Column(name, f"{len(v)}E", unit=unit, array=np.asarray(v)[None]) for name, v, unit in (
        ("ENERG_LO", e_lo, "TeV"), ("ENERG_HI", e_hi, "TeV"), ("THETA_LO", IRF_OFFSETS_DEG[:-1], "deg"),
        ("THETA_HI", IRF_OFFSETS_DEG[1:], "deg"), ("RAD_LO", rad[:-1], "deg"), ("RAD_HI", rad[1:], "deg"))]
    cols.append(fits.Column("RPSF", f"{rpsf.size}E", unit="sr-1", dim=str(rpsf.shape[::-1]), array=rpsf[None]))
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols, name="PSF")]).writeto(path, overwrite=True)


def simulate(inst, seed: int):
    """A fresh Galactic-plane cube of ``inst`` (module docstring)."""
    from skyfm.data.simulate import simulate_patch

    if inst.name == "ctao":
        return simulate_patch(inst, seed, population="plane")
    rng = np.random.default_rng(seed)
    centre = (float(rng.uniform(0, 360)), float(rng.uniform(-8, 8)))
    return simulate_patch(inst, seed, population="real", center=centre)


def run(n: int, log, widths: str = ",".join(map(str, WIDTHS)), instrument: str = "fermi-lat") -> list[dict]:
    from astropy.io import fits

    from skyfm.data import write_patch
    from skyfm.detect import detect_file, get_detector
    from skyfm.finetune.evaluate import score_patch
    from skyfm.instruments import load_instrument

    det = get_detector(None, device="cpu")
    yaml = load_instrument(instrument)
    base = SEED_BASE[yaml.name]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for factor in (float(w) for w in widths.split(",")):
            inst = scaled_instrument(yaml, factor)
            psf_file = tmp / f"psf-{factor}.fits"
            (write_gtpsf if yaml.name == "fermi-lat" else write_psf_table)(psf_file, inst)
            totals = {m[0]: {"tp": 0, "fp": 0, "n_true": 0, "cover": [], "sep": [], "r68": ""} for m in METHODS}
            for i in range(n):
                patch = simulate(inst, base + i)
                cube, model = tmp / "cube.fits", tmp / "model.fits"
                write_patch(dataclasses.replace(patch, background_image=None), cube)
                fits.PrimaryHDU(patch.background_image).writeto(model, overwrite=True)
                for method, with_model, with_psf in METHODS:
                    cat = detect_file(cube, model_dir=det, progress=False, background=model if with_model else None,
                                      psf=psf_file if with_psf else None)
                    s = score_patch(cat, patch, inst)
                    t = totals[method]
                    t["tp"], t["fp"], t["n_true"] = t["tp"] + s["tp"], t["fp"] + s["fp"], t["n_true"] + s["n_true"]
                    t["cover"] += s["cover"]
                    t["sep"] += s["sep"]
                    t["r68"] = cat.meta.get("psf_r68", "")
                log(f"  x{factor} cube {i}: " + ", ".join(
                    f"{m} F1 {f1_score(t['tp'], t['fp'], t['n_true']):.3f}" for m, t in totals.items()))
            for method, t in totals.items():
                r68 = [float(v) for v in t["r68"].split(",")] if t["r68"] else []
                rows.append({"psf_width": factor, "method": method, "tp": t["tp"], "fp": t["fp"],
                             "true_sources": t["n_true"], "f1": f1_score(t["tp"], t["fp"], t["n_true"]),
                             "flux_cov68": round(float(np.mean(t["cover"])), 3) if t["cover"] else None,
                             "median_sep_pix": round(float(np.median(t["sep"])), 3) if t["sep"] else None,
                             "r68_read_first_last": [round(r68[0], 3), round(r68[-1], 3)] if r68 else None,
                             "r68_true_first_last": [round(inst.bands[0].psf.containment_radius(0.68), 3),
                                                     round(inst.bands[-1].psf.containment_radius(0.68), 3)]})
                log(f"  x{factor} {method:28s} F1 {rows[-1]['f1']:.3f}  cov68 {rows[-1]['flux_cov68']}  "
                    f"sep {rows[-1]['median_sep_pix']}")
    return rows


def markdown(rows: list[dict], n: int, widths: str = "", instrument: str = "fermi-lat") -> str:
    lines = [f"{n} fresh 256^2 {instrument} plane cubes (seeds from {SEED_BASE[instrument]}), each simulated with "
             "every band's PSF at the given multiple of the YAML's r68; `skyfm detect` with the YAML's PSF and with "
             "the cube's PSF file (`--psf`). F1 at SNR >= 5, 68% flux coverage, median separation of the matched "
             "sources (px), r68 of the first and last band as read from the file (deg; true in brackets).", "",
             "| PSF (x YAML r68) | method | F1 | TP / FP / true | flux cov68 | median sep (px) | r68 read (true) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        read = "-" if r["r68_read_first_last"] is None else (
            f"{r['r68_read_first_last'][0]} / {r['r68_read_first_last'][1]}")
        lines.append(f"| {r['psf_width']} | {r['method']} | {r['f1']:.3f} | {r['tp']} / {r['fp']} / "
                     f"{r['true_sources']} | {r['flux_cov68']} | {r['median_sep_pix']} | {read} "
                     f"({r['r68_true_first_last'][0]} / {r['r68_true_first_last'][1]}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    return command(argv, __doc__, 8, "runs/bench-psf-file", run, markdown,
                   {"widths": (",".join(map(str, WIDTHS)), "the PSF widths simulated, over the YAML's r68"),
                    "instrument": ("fermi-lat", "fermi-lat (a gtpsf file) or ctao (an IRF psf_table)")})


if __name__ == "__main__":
    raise SystemExit(main())
