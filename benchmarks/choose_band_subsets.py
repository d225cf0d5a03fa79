"""Choose a CCD head's thresholds for images with only some of its bands (``band_subsets``), on validation images.

Run (from the repository root; the shipped heads' ``band_subsets`` come from these commands):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/choose_band_subsets.py --instrument wise --subsets W1,W2,W3,W4,W1+W2 \\
        [--fields 1,1] [--patches 4] [--drawn 8] [--threads 1]

The shipped detector's WISE and Hubble heads are trained on images with every band of the instrument (their
simulations draw them all), and their thresholds (``min_score``, ``unconfirmed_min_score``) are chosen on such
images. A user's image often has one band (a WISE W1 tile, one HST filter), and the network's probabilities on it
are not calibrated alike: on 12 validation WISE W1 images (the scene mix) the shipped thresholds gave precision
0.19 (``runs/exp23/oneband.py``). For each subset (bands joined with ``+``) this script detects validation images
simulated with those bands only (``benchmarks/choose_kron.py``'s field images of 1024^2 and crowded and cluster
patches of 256^2, and ``--drawn`` patches of the simulator's drawn scenes, as ``benchmarks/choose_unconfirmed.py``
draws them), once, with the head as shipped but no ``unconfirmed_min_score`` and no ``band_subsets``; each
candidate pair (``min_score`` m, ``unconfirmed_min_score`` u >= m) then keeps the rows of score >= m whose fit
confirms them (as :func:`skyfm.detect.detect_tiles` counts it, the head's crowding and chi-square limits kept) or
whose score is >= u. The pair of best mean F1 over the scenes (as ``choose_unconfirmed.py`` pools and weighs them)
is chosen where it beats the shipped thresholds by :data:`MIN_GAIN`; it is then checked by detecting the same
images again with it set, since rows below m also leave the PSF fit's neighbour models (the offline cut cannot
see that): the subset is written only if that run keeps the gain.

The other way round, MeerLICHT's head is trained on images of one band (its YAML's ``simulation.bands_per_image``)
and an image of several is what it never saw: there the network is less sure, not more (six-band validation images:
precision 0.99, recall 0.4-0.55), so for subsets of more bands than the training images held (all of them included,
``--subsets u+g+q+r+i+z``) the images are detected at the lowest of :data:`LOWER_MIN_SCORES` and every threshold
of both lists is a candidate, also below the head's.

Prints each subset's sweep and check, and the ``band_subsets`` JSON to write into the head's config.
"""

from __future__ import annotations

import copy
import json

import numpy as np

MIN_SCORES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
LOWER_MIN_SCORES = (0.1, 0.15)  # ... and these where the head's own thresholds may be lowered (``lower``)
UNCONFIRMED = (None, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # None: u = m, every unconfirmed row at m
MIN_GAIN = 0.005  # mean F1 over the scenes a subset's thresholds must add to the shipped ones


def detect_images(det, inst_name: str, bands: list[str], draws, log, override: dict | None = None,
                  min_score: float | None = None) -> list[dict]:
    """Per image: ``scene``, the rows' ``x``, ``y``, ``score``, whether the fit confirmed them, ``crowding``, and
    the truth; with ``override`` the head's ``band_subsets`` holds it for these bands, else the head has no
    ``unconfirmed_min_score`` (every row the fit leaves unconfirmed is kept, for the thresholds to cut);
    ``min_score``: the network's threshold (default the head's)."""
    from skyfm.data.simulate import simulate_patch
    from skyfm.detect import detect_patch
    from skyfm.heads.config import subset_key

    det = copy.deepcopy(det)
    head = det.head_config(inst_name)
    if override is None:
        head.unconfirmed_min_score = None
        head.band_subsets = None
    else:
        head.band_subsets = {subset_key(head.bands, bands): override}
    chi2_limit = head.unconfirmed_chi2_limit()
    out = []
    for j, (seed, size, scene) in enumerate(draws):
        p = simulate_patch(inst_name, seed, size=size, scene=scene, bands=bands)
        cat = detect_patch(p, det) if min_score is None else detect_patch(p, det, min_score=min_score)
        v = lambda c: np.asarray(getattr(cat[c], "value", cat[c]), float)  # noqa: E731
        fit = np.asarray(cat["fit"])
        chi2 = np.nan_to_num(v("fit_chi2"), nan=0.0)
        out.append(dict(scene=scene or "drawn", x=v("x"), y=v("y"), score=v("score"),
                        confirmed=(fit != 0) & ~((fit != 4) & (chi2 > chi2_limit)),
                        crowding=np.nan_to_num(v("crowding"), nan=0.0), truth=p.truth))
        if j == len(draws) - 1 or (j + 1) % 8 == 0:
            log(f"    {j + 1}/{len(draws)} images detected")
    return out


def scene_f1(images: list[dict], min_score: float, unconfirmed: float | None, max_crowding: float,
             radius: float) -> dict:
    """Per scene, F1 at ``min_score`` of the images' rows, those the fit leaves unconfirmed below ``unconfirmed``
    (where their crowding is below ``max_crowding``) dropped; pooled as ``benchmarks/detect.py`` pools them."""
    from astropy.table import Table

    from skyfm.catalog.metrics import concat_sweeps, metrics_at_threshold, score_sweep

    sweeps: dict = {}
    for img in images:
        keep = np.ones(len(img["score"]), bool)
        if unconfirmed is not None:
            keep = img["confirmed"] | (img["score"] >= unconfirmed) | (img["crowding"] >= max_crowding)
        sw = score_sweep(Table({k: img[k][keep] for k in ("x", "y", "score")}), img["truth"], radius)
        sweeps.setdefault(img["scene"], []).append(sw)
    return {scene: metrics_at_threshold(concat_sweeps(parts), min_score)["f1"] for scene, parts in sweeps.items()}


def describe(f1: dict) -> str:
    return f"mean {np.mean(list(f1.values())):.4f} | " + " | ".join(f"{s} {v:.3f}" for s, v in sorted(f1.items()))


def choose_subset(det, inst_name: str, bands: list[str], draws, radius: float, log,
                  lower: bool = False) -> dict | None:
    """The subset's thresholds (``{"min_score": m, "unconfirmed_min_score": u}``) or None (the head's own).
    ``lower``: also thresholds below the head's (images of more bands than its training images held, on which the
    network is less sure, not more: detected at the lowest of :data:`LOWER_MIN_SCORES`)."""
    from skyfm.detect import default_min_score

    head = det.head_config(inst_name)
    shipped = (default_min_score(det, head), head.unconfirmed_min_score)
    max_crowding = head.unconfirmed_crowding_limit()
    scores = LOWER_MIN_SCORES + MIN_SCORES if lower else MIN_SCORES
    images = detect_images(det, inst_name, bands, draws, log, min_score=min(scores) if lower else None)
    mean = {}
    pairs = [shipped] + [(m, u) for m in scores for u in UNCONFIRMED
                         if (lower or m >= shipped[0]) and (u is None or u > m)]
    for m, u in pairs:
        f1 = scene_f1(images, m, u, max_crowding, radius)
        mean[(m, u)] = float(np.mean(list(f1.values())))
        log(f"  min_score {m:g}, unconfirmed {u if u is not None else '-'}: {describe(f1)}")
    best = max(pairs, key=mean.get)
    if mean[best] < mean[shipped] + MIN_GAIN:
        log(f"  {'+'.join(bands)}: the shipped thresholds stay (best {mean[best]:.4f}, shipped {mean[shipped]:.4f})")
        return None
    # Rows below a threshold also leave the fit's neighbour models and the residual search's view, so the offline
    # sweep of rows detected at a lower threshold is only a guide: the check runs with the thresholds set. With
    # ``lower`` (detected at the lowest threshold, which biases the sweep towards low ones) each threshold up to the
    # head's is checked with its best offline partner, and the best check is chosen.
    if lower:
        candidates = [max((q for q in pairs if q[0] == m), key=mean.get) for m in scores if m <= shipped[0]]
    else:
        candidates = [best]
    log(f"  offline best: {best} {mean[best]:.4f} against the shipped {mean[shipped]:.4f}; checking "
        f"{', '.join(map(str, candidates))} with each set ...")
    shipped_run = np.mean(list(scene_f1(detect_images(det, inst_name, bands, draws, log, override={}),
                                        shipped[0], None, 0, radius).values()))
    log(f"  check, shipped thresholds: mean {shipped_run:.4f}")
    checked = {}
    for m, u in candidates:
        setting = {"min_score": m} if u is None else {"min_score": m, "unconfirmed_min_score": u}
        run = scene_f1(detect_images(det, inst_name, bands, draws, log, override=setting), m, None, 0, radius)
        checked[(m, u)] = float(np.mean(list(run.values())))
        log(f"  check, {setting}: {describe(run)}")
    m, u = max(checked, key=checked.get)
    if checked[(m, u)] < shipped_run + MIN_GAIN:
        log(f"  {'+'.join(bands)}: the check does not keep the gain; the shipped thresholds stay")
        return None
    return {"min_score": m} if u is None else {"min_score": m, "unconfirmed_min_score": u}


def main(argv=None) -> int:
    from choose_kron import validation_draws, validation_fields, validation_parser
    from choose_unconfirmed import DRAWN_BASE

    from skyfm.catalog.evaluate import default_radius_pix
    from skyfm.detect import _bands_per_training_image, get_detector
    from skyfm.heads.config import subset_key
    from skyfm.instruments import load_instrument

    p = validation_parser(__doc__, "wise", "1,1")
    p.set_defaults(patches=4)
    p.add_argument("--drawn", type=int, default=8, help="patches of the simulator's drawn scenes (default 8)")
    p.add_argument("--subsets", default="W1,W2,W3,W4,W1+W2",
                   help="band subsets, comma-separated, bands of one subset joined with + (default: WISE's)")
    args = p.parse_args(argv)
    fields = validation_fields(p, args)
    log = lambda s: print(s, flush=True)  # noqa: E731
    det = get_detector(None)
    inst = load_instrument(args.instrument)
    head = det.head_config(inst.name)
    radius = float(default_radius_pix(inst))
    draws = validation_draws(fields, args.patches) + [(DRAWN_BASE + i, 256, None) for i in range(args.drawn)]
    chosen = {}
    trained = _bands_per_training_image(inst)
    for subset in args.subsets.split(","):
        bands = subset.split("+")
        unknown = [b for b in bands if b not in head.bands]
        if unknown or (subset_key(head.bands, bands) == "+".join(head.bands) and trained >= len(head.bands)):
            p.error(f"{subset}: a subset of {inst.name}'s bands {'+'.join(head.bands)} is needed (all of them only "
                    f"where its training images held fewer)")
        log(f"{subset} ({len(draws)} validation images):")
        pick = choose_subset(det, inst.name, bands, draws, radius, log, lower=len(bands) > trained)
        if pick is not None:
            chosen[subset_key(head.bands, bands)] = pick
    log(json.dumps({"band_subsets": chosen or None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
