"""Does the denoiser help sep in crowded fields once sep is set up for each image? Every sep setting on both.

Run (from the repository root):

    OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/denoise_sep_settings.py [--n 8] [--seed-offset 700000] [--case meerlicht-crowded]

``benchmarks/denoise.py`` runs sep with one setting on the raw and the clean image. This runs a grid of settings
(detection threshold, minimum area, deblend contrast, SExtractor's default.conv filter on or off) on both, the same
patches and seeds as that benchmark's case (``--seed-offset 700000``: its diagnostic seeds), and prints the best F1
over sep's SNR (truth: snr >= 5, the benchmark's matching) for each setting, then the best setting per image. The
question is symmetric: is the best clean-image F1 above the best raw-image F1?
"""

from __future__ import annotations

import argparse
import itertools
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import denoise as bench  # noqa: E402  (the denoising benchmark's cases, seeds and helpers)

from skyfm import baselines  # noqa: E402
from skyfm.catalog.metrics import best_f1, concat_sweeps, score_sweep  # noqa: E402
from skyfm.data.simulate import simulate_patch  # noqa: E402
from skyfm.heads.denoise.apply import denoise_patch, load_denoiser  # noqa: E402

GRID = {"thresh": (1.5, 3.0), "minarea": (5, 3), "deblend_cont": (1e-4, 1e-3, 5e-3), "filter": (True, False)}


def sep_catalog(patch, thresh: float, minarea: int, deblend_cont: float, use_filter: bool):
    """skyfm.baselines.sep_detect with the filter as a choice (the baseline always filters)."""
    import sep

    prep = baselines._Prepared(patch, None, "sep")
    sep.set_extract_pixstack(3_000_000)
    sep.set_sub_object_limit(4096)
    objs = sep.extract(np.ascontiguousarray(prep.detect), thresh, err=prep.detect_rms, mask=prep.mask,
                       minarea=minarea, filter_kernel=sep.default_kernel if use_filter else None, filter_type="matched",
                       deblend_nthresh=32, deblend_cont=deblend_cont, clean=True, clean_param=1.0)
    x, y = np.asarray(objs["x"], float), np.asarray(objs["y"], float)
    ok = baselines._inside(x, y, patch.data.shape[1:])
    flux, err, score = prep.aperture_photometry(x[ok], y[ok])
    return baselines._catalog(patch, x[ok], y[ok], flux, err, score, "snr", "sep")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8, help="patches (default 8)")
    ap.add_argument("--seed-offset", type=int, default=700_000, help="as benchmarks/denoise.py (default: its "
                                                                     "diagnostic seeds)")
    ap.add_argument("--case", default="meerlicht-crowded", help="a case of benchmarks/denoise.py")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = [c[0] for c in bench.CASES]
    if args.case not in names:
        ap.error(f"--case should be one of {', '.join(names)}")
    ci = names.index(args.case)
    _, inst_name, options, size = bench.CASES[ci]
    rng = np.random.default_rng([ci, 99] if args.seed_offset == 0 else [ci, 99, args.seed_offset])
    model = load_denoiser()
    pairs = []
    for i in range(args.n):  # the same patches and denoiser seeds as benchmarks/denoise.py
        seed = bench.BENCH_SEED_BASE + args.seed_offset + 1000 * ci + i
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            patch = simulate_patch(inst_name, seed, size=size, **options(rng))
        clean, _ = denoise_patch(patch, model, seed=i)
        pairs.append((patch, bench.clean_patch(patch, clean)))
    radius = bench.match_radius(pairs[0][0])
    print(f"{args.case}: {args.n} patches, seeds {bench.BENCH_SEED_BASE} + {args.seed_offset} + {1000 * ci} + i")
    print("| threshold | min area | deblend contrast | filter | F1 raw | F1 clean |\n|---|---|---|---|---|---|")
    best = {"raw": (-1.0, None), "clean": (-1.0, None)}
    for setting in itertools.product(*GRID.values()):
        f1 = {}
        for k, image in enumerate(("raw", "clean")):
            sweeps = [score_sweep(sep_catalog(pair[k], *setting), pair[0].truth, radius) for pair in pairs]
            f1[image] = best_f1(concat_sweeps(sweeps), bench.TRUTH_SNR)["f1"]
            if f1[image] > best[image][0]:
                best[image] = (f1[image], setting)
        t, a, c, f = setting
        print(f"| {t} | {a} | {c:g} | {'on' if f else 'off'} | {f1['raw']:.3f} | {f1['clean']:.3f} |", flush=True)
    for image, (f1, setting) in best.items():
        print(f"best on the {image} image: F1 {f1:.3f} with {dict(zip(GRID, setting))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
