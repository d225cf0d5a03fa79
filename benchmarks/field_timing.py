"""Wall time of ``detect_patch`` on simulated field images of three CCD instruments, with a digest of the catalogs:
to time a change against the checkout before it, and to tell whether the two write the same rows.

Run from the checkout to be timed, each version in turn on one quiet machine (a worktree of the commit before,
``git worktree add /tmp/skyfm-before COMMIT``, for the "before")::

    cd /tmp && MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_NUM_THREADS=1 \\
        PYTHONPATH=/path/to/checkout /work/main/.venv/bin/python /path/to/checkout/benchmarks/field_timing.py

Three field images per instrument (MeerLICHT and Hubble 1024^2, WISE 768^2; validation seeds 9.55e8, never used in
training or in the quality benchmarks), the default detector, one torch thread and the CCD fits in one thread, each
instrument after one warm-up call. Prints, per instrument, the seconds for the three images, the rows written and
the first 12 hex digits of a SHA-1 over every row's x, y, flux and flux_err: equal digests, equal catalogs.
"""

from __future__ import annotations

import argparse
import hashlib
import time

import numpy as np

SEED_BASE = 955_000_000
CASES = (("meerlicht", 1024), ("hubble", 1024), ("wise", 768))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3, help="field images per instrument (default 3)")
    args = parser.parse_args(argv)

    import torch

    from skyfm.data.simulate import simulate_patch
    from skyfm.detect import detect_patch
    from skyfm.heads import load_detector

    torch.set_num_threads(1)
    detector = load_detector()
    for name, size in CASES:
        patches = [simulate_patch(name, SEED_BASE + i, size=size, scene="field") for i in range(args.n)]
        detect_patch(patches[0], detector, refine_workers=1)  # warm-up: stamp tables, lazy imports
        start = time.perf_counter()
        catalogs = [detect_patch(p, detector, refine_workers=1) for p in patches]
        seconds = time.perf_counter() - start
        digest = hashlib.sha1()
        for catalog in catalogs:
            for key in ("x", "y", "flux", "flux_err"):
                digest.update(np.ascontiguousarray(np.asarray(catalog[key], float)).tobytes())
        print(f"{name}: {seconds:.1f} s for {args.n} images, {sum(map(len, catalogs))} rows, "
              f"digest {digest.hexdigest()[:12]}", flush=True)


if __name__ == "__main__":
    main()
