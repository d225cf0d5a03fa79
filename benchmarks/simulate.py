"""Simulation speed per instrument, on one core.

Run (from the repository root, after `make install`):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/simulate.py [--n 40] [--write]

Pins the process to one CPU core and one BLAS/FFT thread, simulates ``--n`` patches per instrument and scene
after one warm-up patch (which fills per-process caches: PSF kernels, shipped catalogs), and prints a markdown
table of patches/s (with ``--write``, including writing each patch as FITS to a temporary folder).
Targets from the data-layer issue: >= 20 patches/s for a 256x256 optical patch, >= 10/s for a 6-bin 256x256
Fermi-LAT cube.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from skyfm.data import write_patch  # noqa: E402
from skyfm.data.simulate import patch_seed, simulate_patch  # noqa: E402

CASES = [  # (label, instrument, options)
    ("Fermi-LAT 6x256x256, resampled 4FGL", "fermi-lat", {"population": "resampled"}),
    ("Fermi-LAT 6x256x256, real 4FGL sky", "fermi-lat", {"population": "real"}),
    ("CTAO 3x256x256, Galactic plane", "ctao", {"population": "plane"}),
    ("CTAO 3x512x512, 10x10 deg toy", "ctao", {"population": "toy", "size": 512}),
    ("MeerLICHT 1x256x256, field", "meerlicht", {"scene": "field"}),
    ("MeerLICHT 1x256x256, crowded", "meerlicht", {"scene": "crowded"}),
    ("MeerLICHT 1x256x256, cluster core", "meerlicht", {"scene": "cluster"}),
    ("Hubble 3x256x256, field", "hubble", {"scene": "field"}),
    ("WISE 4x256x256, field", "wise", {"scene": "field"}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=40, help="patches per case (after one warm-up)")
    parser.add_argument("--write", action="store_true", help="also write each patch as FITS")
    parser.add_argument("--only", default=None, help="run only cases whose label contains this text")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    try:
        import threadpoolctl

        threadpoolctl.threadpool_limits(1)
    except ImportError:
        pass

    print(f"# skyfm simulation speed: one core, {platform.processor() or platform.machine()}, numpy {np.__version__}")
    print(f"command: {' '.join(['python'] + sys.argv)}\n")
    print("| case | patches/s | ms/patch | sources/patch |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, name, options in CASES:
            if args.only and args.only.lower() not in label.lower():
                continue
            simulate_patch(name, patch_seed(99, 0), **options)  # warm-up: per-process caches
            n_sources = []
            t0 = time.perf_counter()
            for i in range(args.n):
                patch = simulate_patch(name, patch_seed(1, i), **options)
                n_sources.append(len(patch.truth))
                if args.write:
                    write_patch(patch, os.path.join(tmp, f"p{i}.fits"))
            dt = time.perf_counter() - t0
            print(f"| {label}{' + FITS write' if args.write else ''} | {args.n / dt:.1f} | {1000 * dt / args.n:.0f} "
                  f"| {np.mean(n_sources):.0f} |", flush=True)


if __name__ == "__main__":
    main()
