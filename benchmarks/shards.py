"""Shard streaming speed: patches/s from tar shards through ShardDataset, DataLoader and collate_patches.

Run (from the repository root, after `make install`):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/shards.py [--n 1000] [--batch-size 32] [--synthetic]

Writes two shard sets of 256x256 patches into a temporary folder, one of a 1-band instrument (MeerLICHT, with
its contaminant mask) and one of a 6-bin counts cube (Fermi-LAT): with the real simulators (``--workers``
processes) unless ``--synthetic`` asks for random patches of the same shapes, with truth tables of 50 rows. Then
streams each set through ``ShardDataset`` (shuffle buffer 256) and a ``DataLoader`` with ``collate_patches``,
with 0 and 2 worker processes, endlessly (``resample=True``), and prints patches/s (wall and per CPU-second of
all processes) and MB/s of raw data (image + source-only image) in steady state. The shards sit in the page
cache (just written), so this measures the reader, not the disk.
Target from the data-layer issue: >= 1000 patches/s.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader

from skyfm.data.shards import ShardDataset, collate_patches, write_simulated_shards

SETS = [("MeerLICHT 1x256x256", "meerlicht"), ("Fermi-LAT 6x256x256", "fermi-lat")]


def synthetic_patch(name: str, seed: int, size: int = 256, **_):
    """Random data of the real shapes and dtypes, with a 50-row truth table (what the reader pays for)."""
    from astropy.table import Table
    from astropy.wcs import WCS

    from skyfm.data import Patch
    from skyfm.instruments import load_instrument

    inst = load_instrument(name)
    rng = np.random.default_rng(seed)
    c = inst.n_bands if inst.is_counts else 1
    shape = (c, size, size)
    data = rng.poisson(2.0, shape).astype(np.float32) if inst.is_counts else rng.normal(300, 10, shape).astype(np.float32)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["GLON-CAR", "GLAT-CAR"] if inst.is_counts else ["RA---TAN", "DEC--TAN"]
    wcs.wcs.cdelt = [-inst.pixel_scale_deg, inst.pixel_scale_deg]
    truth = Table({"x": rng.uniform(0, size, 50), "y": rng.uniform(0, size, 50), "flux": rng.lognormal(size=50),
                   "flux_band": rng.lognormal(size=(50, c)), "class": np.array(["psr"] * 50)})
    return Patch(data, inst.name, [b.name for b in inst.bands][:c], wcs, truth=truth,
                 source_image=rng.random(shape, dtype=np.float32),
                 contaminant_mask=None if inst.is_counts else np.zeros(shape, np.uint8), meta={"seed": seed})


def real_simulators_available() -> bool:
    try:
        import skyfm.data.simulate.ccd  # noqa: F401
        import skyfm.data.simulate.gamma  # noqa: F401
    except ImportError:
        return False
    return True


# What each case decodes: everything (fine-tuning with truth), no truth tables, or what pretraining reads.
READS = {"all": dict(with_truth=True, with_targets=True),
         "no truth": dict(with_truth=False, with_targets=True),
         "pretraining (image only)": dict(with_truth=False, with_targets=False)}


def stream(folder, num_workers: int, batch_size: int, n_patches: int, reads: dict) -> tuple[float, float, float]:
    """(patches/s of wall time, patches per CPU-second of all processes, MB/s of arrays batched) in steady state.

    The stream is endless (``resample=True``); timing starts after four batches per worker, once every worker
    has started and filled its shuffle buffer, and covers ``n_patches`` patches. The CPU-time rate is what the
    reader costs whatever else runs on the machine; the wall-time rate is what a training loop would see.
    """
    dataset = ShardDataset(folder, seed=0, shuffle_buffer=256, resample=True, **reads)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_patches)
    batches = iter(loader)
    for _ in range(4 * max(1, num_workers)):
        next(batches)
    pids = [os.getpid()] + [w.pid for w in getattr(batches, "_workers", [])]
    n, nbytes = 0, 0
    t0, cpu0 = time.perf_counter(), sum(map(_cpu_seconds, pids))
    while n < n_patches:
        batch = next(batches)
        n += len(batch["key"])
        nbytes += sum(batch[k].nbytes for k in ("image", "scaled", "source", "contaminant") if k in batch)
    wall, cpu = time.perf_counter() - t0, sum(map(_cpu_seconds, pids)) - cpu0
    del batches
    return n / wall, n / cpu, nbytes / wall / 1e6


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="patches per shard set, and patches timed per case")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="processes simulating the shard sets")
    parser.add_argument("--synthetic", action="store_true", help="random patches instead of the simulators")
    parser.add_argument("--dir", default=None, help="keep the shard sets in this folder and reuse them next time")
    parser.add_argument("--shards", default=None, help="stream this existing shard set instead (e.g. a pretraining "
                        "run's OUT/shards) and skip the two made-up sets")
    args = parser.parse_args()
    torch.set_num_threads(1)
    simulator = None if (real_simulators_available() and not args.synthetic) else synthetic_patch
    source = "skyfm simulators" if simulator is None else "synthetic random patches"

    print(f"# skyfm shard streaming: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, numpy {np.__version__}")
    print(f"command: {' '.join(['python'] + sys.argv)}")
    print(f"data: {args.n} patches per set from {source}, shards of 250, batch {args.batch_size}, warm page cache\n")
    print(f"load average before: {os.getloadavg()[0]:.1f}\n")
    print("| shard set | DataLoader workers | decoded | patches/s | patches per CPU-s | MB/s |")
    print("|---|---:|---|---:|---:|---:|")
    if args.shards:
        for num_workers in (0, 2):
            for reads_label, reads in READS.items():
                rate, cpu_rate, mbps = stream(args.shards, num_workers, args.batch_size, args.n, reads)
                print(f"| {args.shards} | {num_workers} | {reads_label} | {rate:.0f} | {cpu_rate:.0f} | {mbps:.0f} |",
                      flush=True)
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for label, name in SETS:
            folder = os.path.join(args.dir or tmp, f"{name}-{args.n}-{'synthetic' if simulator else 'simulated'}")
            if not os.path.exists(os.path.join(folder, "manifest.json")):
                # Simulate in a separate process: DataLoader workers forked from a process whose heap holds
                # thousands of freed patches would pay copy-on-write faults that a training process does not.
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    pool.submit(write_simulated_shards, folder, {name: args.n}, seed=1, patches_per_shard=250,
                                size=256, workers=args.workers, progress=False, simulator=simulator).result()
            for num_workers in (0, 2):
                for reads_label, reads in READS.items():
                    rate, cpu_rate, mbps = stream(folder, num_workers, args.batch_size, args.n, reads)
                    print(f"| {label} | {num_workers} | {reads_label} | {rate:.0f} "
                          f"| {cpu_rate:.0f} | {mbps:.0f} |", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores; above that, others share them)")

if __name__ == "__main__":
    main()
