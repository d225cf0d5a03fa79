"""Speed and memory of ``skyfm detect``, beside sep, photutils and the Poisson TS map on the same images.

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/detect_speed.py [--threads 2] [--big 16384] [--nside 1024] [--out runs/bench-speed]

**Speed** (in this process, ``--threads`` torch threads; sep and photutils are single-threaded): three fresh
simulated images with seeds from 1.7e9 (never used in training) -

* MeerLICHT q, one band, 2048 x 2048 (the issue's Mpix/s figure);
* MeerLICHT, six bands, 1024 x 1024 (sep and photutils on the band sum);
* Fermi-LAT counts cube, six energy bins, 512 x 512 at 0.1 deg, Galactic plane (the TS map with an estimated
  background beside it; skyfm includes its Poisson likelihood refinement).

For skyfm four settings are timed: the default (``precision="auto"``, :func:`skyfm.detect.default_tiling`, PSF-fit
or likelihood refinement, the CCD tiles' fits in threads), the same with the fits in one thread, the same with
``refine=False`` (the network alone), and the previous release's network settings (float32, global attention, 256/128-px tiles, with refinement), each after one warm-up call, with
F1 against the simulated truth (SNR >= 5, the match radius of :mod:`skyfm.finetune.evaluate`), so speed is never
reported without the quality it came with. Mpix/s = image pixels (H x W) / wall seconds of the method alone.

**Memory** (each a separate ``skyfm detect`` process under ``/usr/bin/time -v``; peak resident set size): a
``--big`` x ``--big`` one-band MeerLICHT FITS (a simulated 2048^2 image tiled, written row block by row block, so
this script never holds it either) and an all-sky HEALPix Fermi-LAT counts map of ``--nside`` (Poisson counts of
a smooth Galactic background plus 3000 point sources). ``--big 0`` / ``--nside 0`` skip them.

Writes ``OUT/results.json`` and ``OUT/results.md`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SEED_BASE = 1_700_000_000
PREVIOUS = {"precision": "fp32", "attention_window": 0}  # the settings of the previous release


def _f1(cat, patch) -> float:
    from skyfm.finetune.evaluate import score_patch
    from skyfm.instruments import load_instrument

    s = score_patch(cat, patch, load_instrument(patch.instrument))
    p = s["tp"] / max(s["tp"] + s["fp"], 1)
    r = s["tp"] / max(s["n_true"], 1)
    return 2 * p * r / max(p + r, 1e-9)


def _timed(fn, warm=None):
    if warm is not None:
        warm()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def speed_cases(threads: int, log, device: str = "cpu", baselines: bool = True) -> list[dict]:
    """The speed table's rows: each image of the module docstring, each method, its time and F1. ``device``: where
    skyfm's network runs (the fits run on the CPU); ``baselines`` False: skyfm's rows only."""
    import torch

    from skyfm.baselines import photutils_detect, sep_detect, tsmap_detect
    from skyfm.data.simulate import simulate_patch
    from skyfm.detect import detect_patch, get_detector

    torch.set_num_threads(threads)
    det = get_detector(None, device=device)
    sync = torch.cuda.synchronize if det.device.type == "cuda" else (lambda: None)
    cases = [
        ("MeerLICHT q, 1 band, 2048^2", "meerlicht", {"size": 2048, "bands": ["q"]}, {"tile_size": 256}),
        # (MeerLICHT's simulations take one band per image unless told: six are asked for here)
        ("MeerLICHT, 6 bands, 1024^2", "meerlicht", {"size": 1024, "bands": ["u", "g", "q", "r", "i", "z"]},
         {"tile_size": 128}),
        ("Fermi-LAT plane, 6 bins, 512^2", "fermi-lat", {"size": 512, "population": "real", "center": (30.0, 1.0)},
         {"tile_size": 128}),
    ]
    rows = []
    for i, (label, name, options, previous_tiles) in enumerate(cases):
        log(f"simulating {label} ...")
        patch = simulate_patch(name, SEED_BASE + i, **options)
        warm = simulate_patch(name, SEED_BASE + 100 + i, **{**options, "size": 256})
        pix = patch.height * patch.width
        methods = {
            "skyfm (default)": (lambda p: detect_patch(p, det), True),
            "skyfm (default, the tiles' fits in 1 thread)": (lambda p: detect_patch(p, det, refine_workers=1), True),
            "skyfm --no-refine": (lambda p: detect_patch(p, det, refine=False), True),
            "skyfm (previous network settings: fp32, global attention)": (
                lambda p: detect_patch(p, det, **PREVIOUS, **previous_tiles), True),
            "sep": (sep_detect, False),
            "photutils-segmentation": (lambda p: photutils_detect(p, "segmentation"), False),
        }
        if not baselines:
            methods = {k: v for k, v in methods.items() if k.startswith("skyfm")}
        if name == "fermi-lat":
            if baselines:
                methods["tsmap-estimated"] = (lambda p: tsmap_detect(p, background="estimated"), False)
            for key in [k for k in methods if k.startswith("skyfm")]:
                fn = methods[key][0]
                methods[key] = ((lambda f: lambda p: f(_without_background(p)))(fn), True)
        for method, (fn, needs_warmup) in methods.items():
            cat, seconds = _timed(lambda: (fn(patch), sync())[0], (lambda: fn(warm)) if needs_warmup else None)
            row = {"image": label, "method": method, "pixels": pix, "seconds": round(seconds, 2),
                   "mpix_per_s": round(pix / seconds / 1e6, 3), "n_detections": len(cat), "f1": round(_f1(cat, patch), 3)}
            log(f"  {method:45s} {row['seconds']:8.2f} s {row['mpix_per_s']:7.3f} Mpix/s  F1 {row['f1']:.3f}")
            rows.append(row)
    return rows


def _without_background(patch):
    """The patch as a real counts cube would come: no simulator background to help the refinement."""
    from dataclasses import replace

    return replace(patch, background_image=None)


# ------------------------------------------------------------------------------------------------------ memory
def write_big_image(path: Path, side: int, log) -> Path:
    """A side x side one-band MeerLICHT FITS, a 2048^2 simulated image repeated, written in row blocks."""
    from astropy.io import fits

    from skyfm.data import write_patch
    from skyfm.data.simulate import simulate_patch

    block = 2048
    tile = simulate_patch("meerlicht", SEED_BASE + 50, size=block, bands=["q"], scene="field")
    small = path.with_name("tile.fits")
    write_patch(tile, small)
    with fits.open(small) as hdul:
        written = hdul[0].header
        header = fits.Header()
        header["SIMPLE"], header["BITPIX"], header["NAXIS"] = True, -32, 2
        header["NAXIS1"], header["NAXIS2"] = side, side
        header.update(tile.wcs.to_header())
        for key in ("TELESCOP", "INSTRUME", "FILTER", "BUNIT", "EXPTIME", "MAGZP", "GAIN", "RDNOISE", "SATURATE"):
            if key in written:
                header[key] = written[key]
    header["CRPIX1"] = header["CRPIX1"] + (side - block) / 2
    header["CRPIX2"] = header["CRPIX2"] + (side - block) / 2
    data = np.asarray(tile.data[0], dtype=np.float32)
    log(f"writing {path} ({side} x {side}, {side * side * 4 / 2**30:.1f} GiB) ...")
    stream = fits.StreamingHDU(path, header)
    reps = -(-side // block)
    for r in range(reps):
        rows = np.tile(data, (1, reps))[:, :side]
        stream.write(rows[: min(block, side - r * block)])
    stream.close()
    small.unlink()
    return path


def write_allsky_healpix(path: Path, nside: int, log) -> Path:
    """An all-sky Fermi-LAT counts map (RING, Galactic), one column per energy bin, with EBOUNDS."""
    from astropy.io import fits
    from astropy_healpix import HEALPix

    from skyfm.data.fits_io import ebounds_hdu
    from skyfm.instruments import load_instrument

    inst = load_instrument("fermi-lat")
    hp = HEALPix(nside=nside, order="ring", frame="galactic")
    rng = np.random.default_rng(SEED_BASE + 60)
    lon, lat = hp.healpix_to_lonlat(np.arange(hp.npix))
    b = lat.deg
    l_rad = lon.rad
    omega_sr = hp.pixel_area.to_value("sr")
    edges = np.array([[b.energy[0].to_value("keV"), b.energy[1].to_value("keV")] for b in inst.bands])
    log(f"writing {path} (nside {nside}, {hp.npix} pixels x {len(edges)} bins) ...")
    cols = []
    for k, (lo, hi) in enumerate(edges):
        e = np.sqrt(lo * hi) / 1e6  # GeV
        # counts per pixel: a Galactic disk (~2 at 0.3 GeV towards the centre) over an isotropic floor
        mean = (1.5 * np.exp(-np.abs(b) / 5.0) * (1 + 0.5 * np.cos(l_rad)) + 0.05) * (e / 0.3) ** -1.7
        mean *= omega_sr / 1e-6  # the figures above are for nside-1024 pixels (1e-6 sr)
        counts = rng.poisson(mean).astype(np.float32)
        cols.append(fits.Column(f"CHANNEL{k + 1}", "E", array=counts))
    src = rng.integers(0, hp.npix, 3000)  # point sources: a few tens of photons in a pixel and its neighbours
    for c in cols:
        np.add.at(c.array, src, rng.poisson(20, src.size).astype(np.float32))
    table = fits.BinTableHDU.from_columns(cols, name="SKYMAP")
    table.header.update({"PIXTYPE": "HEALPIX", "ORDERING": "RING", "NSIDE": nside, "COORDSYS": "G",
                         "INDXSCHM": "IMPLICIT", "TELESCOP": "GLAST", "INSTRUME": "LAT"})
    fits.HDUList([fits.PrimaryHDU(), table, ebounds_hdu(edges)]).writeto(path, overwrite=True)
    return path


def measure_process(cmd: list[str], threads: int, log) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    log("running " + " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    out = {"command": " ".join(cmd), "rc": proc.returncode, "seconds": round(wall, 1),
           "peak_rss_gb": round(int(rss.group(1)) / 2**20, 2) if rss else None,
           "stdout_tail": proc.stdout.strip().splitlines()[-1:] or [""]}
    if proc.returncode != 0:
        out["stderr_tail"] = proc.stderr.strip().splitlines()[-25:]
    log(f"  rc {proc.returncode}, {wall:.1f} s, peak RSS {out['peak_rss_gb']} GB: {out['stdout_tail'][0]}")
    return out


def memory_cases(args, log) -> list[dict]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    skyfm = str(Path(sys.executable).with_name("skyfm"))
    rows = []
    if args.big:
        img = write_big_image(work / f"meerlicht_q_{args.big}.fits", args.big, log)
        r = measure_process([skyfm, "detect", str(img), "--instrument", "meerlicht", "--band", "q",
                             "--out", str(work / f"big_{args.big}.fits")], args.threads, log)
        r.update(image=f"MeerLICHT q {args.big} x {args.big} FITS", mpix_per_s=round(args.big**2 / r["seconds"] / 1e6, 3))
        rows.append(r)
        img.unlink()
    if args.nside:
        hpx = write_allsky_healpix(work / f"fermi_allsky_nside{args.nside}.fits", args.nside, log)
        r = measure_process([skyfm, "detect", str(hpx), "--instrument", "fermi-lat",
                             "--out", str(work / f"allsky_{args.nside}.fits")], args.threads, log)
        r.update(image=f"Fermi-LAT all-sky HEALPix nside {args.nside}, 6 bins")
        rows.append(r)
        hpx.unlink()
    return rows


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}; torch threads {results['threads']}; network on "
             f"{results.get('device', 'cpu')}.", "",
             "| image | method | seconds | Mpix/s | detections | F1 (SNR >= 5) |", "|---|---|---|---|---|---|"]
    for r in results["speed"]:
        lines.append(f"| {r['image']} | {r['method']} | {r['seconds']} | {r['mpix_per_s']} | {r['n_detections']} | "
                     f"{r['f1']} |")
    if results["memory"]:
        lines += ["", "| `skyfm detect` on | rc | wall s | Mpix/s | peak RSS (GB) |", "|---|---|---|---|---|"]
        for r in results["memory"]:
            lines.append(f"| {r['image']} | {r['rc']} | {r['seconds']} | {r.get('mpix_per_s', '')} | {r['peak_rss_gb']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2: this machine's cores)")
    ap.add_argument("--big", type=int, default=16384, help="side of the large FITS image (0: skip)")
    ap.add_argument("--nside", type=int, default=1024, help="NSIDE of the all-sky HEALPix map (0: skip)")
    ap.add_argument("--no-speed", action="store_true", help="only the memory runs")
    ap.add_argument("--device", default="cpu", help="where skyfm's network runs in the speed runs: cpu, cuda, auto")
    ap.add_argument("--work", default="/tmp/skyfm-bench-speed", help="scratch folder for the large files")
    ap.add_argument("--out", default="runs/bench-speed", help="output folder for results.json and results.md")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
               "threads": args.threads, "device": args.device, "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
               "speed": [] if args.no_speed else speed_cases(args.threads, log, args.device), "memory": memory_cases(args, log)}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    md = markdown(results)
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
