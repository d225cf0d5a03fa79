"""Choose a CCD head's companion search on validation images: the peak significance a candidate needs, and its score.

Run (from the repository root; the shipped heads' ``companion_search`` come from these commands):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/choose_companions.py --instrument meerlicht [--fields 2,2] [--patches 8] \\
        [--drawn 8]

In crowded fields the network's commonest miss is the second star of a blend it took as one
(:func:`skyfm.detect.find_companions`; catalog ``fit`` 5). Validation seeds only (those of
``benchmarks/choose_kron.py``: field images of 1024^2 from seeds 951e6 and 952e6, crowded and cluster patches of
256^2; and ``--drawn`` patches of the instrument's drawn scenes from 951.02e6, as ``benchmarks/choose_unconfirmed.py``).
Every image is detected with the shipped detector once without the search and once per threshold of
:data:`THRESHOLDS`, the companions scored ``fit_snr / (1 + fit_snr)`` (intercept 0, slope 1), from which each one's
fit SNR is read back; then, at the best threshold, once per crowding limit of :data:`CROWDING_LIMITS` (the
``crowding`` a detection needs for a companion to be searched beside it).

Prints, per threshold, crowding limit and scene, as ``benchmarks/detect.py`` counts them (truth with SNR >= 5, a
detection within the match radius of any true source with SNR >= 1.5 is no false positive): F1 without and with the
search and the true and false positives it adds; chooses, among the settings that lose at most
:data:`MAX_SCENE_LOSS` F1 in any scene, the highest threshold and crowding limit within :data:`F1_TOLERANCE` of the
best mean F1 over the scenes (none if nothing adds :data:`MIN_GAIN` to it); fits the
logistic in ln(fit_snr) of a companion being a real source; detects again with that setting and score (companions
below the head's ``min_score`` leave) and prints its F1. Last, the head's ``companion_search`` (JSON).
"""

from __future__ import annotations

import copy
import json

import numpy as np

THRESHOLDS = (3.0, 4.0)  # 5 and 6 were never better on MeerLICHT or WISE (runs/exp22, first version)
CROWDING_LIMITS = (0.0, 0.02, 0.05, 0.1)  # a detection needs this crowding for a companion to be searched beside it
F1_TOLERANCE = 0.001  # the highest threshold within this of the best mean F1: fewer candidates to fit for the same F1
MIN_GAIN = 0.002  # mean F1 over the scenes the search must add to be set ...
MAX_SCENE_LOSS = 0.005  # ... losing at most this much in any scene (Hubble's fields lost 0.043 for its mean's +0.010)


def collect(inst_name: str, draws, search: dict | None, log) -> list[dict]:
    """Per image, detected with the head's ``companion_search`` set to ``search``: ``scene``, per row whether it
    is a companion, real (matched to a true source of SNR >= 1.5) and a target (matched to one of SNR >= 5), its
    ``crowding`` and (companions) its fit SNR read back from a score of intercept 0, slope 1; ``n_true``."""
    from skyfm.catalog import match_catalogs
    from skyfm.data.simulate import simulate_patch
    from skyfm.detect import detect_patch, get_detector
    from skyfm.finetune.evaluate import SNR_FAINT, SNR_MIN, match_radius_pix
    from skyfm.instruments import load_instrument

    inst = load_instrument(inst_name)
    det = copy.deepcopy(get_detector(None))
    det.head_config(inst_name).companion_search = search
    radius = match_radius_pix(inst)
    out = []
    for seed, size, scene in draws:
        p = simulate_patch(inst_name, seed, size=size, scene=scene)
        cat = detect_patch(p, det)
        x, y = (np.asarray(getattr(cat[c], "value", cat[c]), float) for c in ("x", "y"))
        companion = np.asarray(cat["fit"]) == 5
        score = np.asarray(cat["score"], float)
        tsnr = np.asarray(p.truth["snr"], float)
        t = p.truth[tsnr >= SNR_FAINT]
        di, ti, _ = match_catalogs((x, y), t, radius)
        real, target = np.zeros(len(cat), bool), np.zeros(len(cat), bool)
        real[di] = True
        target[di] = np.asarray(t["snr"], float)[ti] >= SNR_MIN
        out.append(dict(scene=scene or "drawn", companion=companion, real=real, target=target,
                        fit_snr=np.where(companion, score / np.clip(1 - score, 1e-12, None), np.nan),
                        crowding=np.nan_to_num(np.asarray(cat["crowding"], float), nan=0.0),
                        n_true=int((tsnr >= SNR_MIN).sum())))
    log(f"  {search}: {len(out)} images, {sum(int(o['companion'].sum()) for o in out)} companions")
    return out


def scene_f1(images: list[dict]) -> dict:
    """{scene: (F1, tp, fp)} pooled over each scene's images."""
    from choose_residual_search import f1

    acc: dict = {}
    for img in images:
        a = acc.setdefault(img["scene"], [0, 0, 0])
        a[0] += int(img["target"].sum())
        a[1] += int((~img["real"]).sum())
        a[2] += img["n_true"]
    return {s: (f1(*v), v[0], v[1]) for s, v in acc.items()}


def main(argv=None) -> int:
    from choose_kron import validation_draws, validation_fields, validation_parser
    from choose_unconfirmed import DRAWN_BASE

    from skyfm.detect import default_min_score, get_detector
    from skyfm.heads.classification import fit_logistic

    p = validation_parser(__doc__, "meerlicht", "2,2")
    p.add_argument("--drawn", type=int, default=8, help="patches of the instrument's drawn scenes (default 8)")
    args = p.parse_args(argv)
    fields = validation_fields(p, args)
    log = lambda s: print(s, flush=True)
    draws = validation_draws(fields, args.patches) + [(DRAWN_BASE + i, 256, None) for i in range(args.drawn)]
    mean = lambda per_scene: float(np.mean([v[0] for v in per_scene.values()]))
    base = scene_f1(collect(args.instrument, draws, None, log))
    log("no search: " + " | ".join(f"{s} F1 {v[0]:.4f}" for s, v in sorted(base.items())) + f" | mean {mean(base):.4f}")
    runs, means, worst = {}, {}, {}

    def run(threshold, limit):
        runs[threshold, limit] = collect(args.instrument, draws, {"min_snr": threshold, "intercept": 0.0,
                                                                  "slope": 1.0, "min_crowding": limit}, log)
        per = scene_f1(runs[threshold, limit])
        means[threshold, limit] = mean(per)
        worst[threshold, limit] = min(v[0] - base[s][0] for s, v in per.items())
        log(f"min_snr {threshold:g}, crowding >= {limit:g}: " + " | ".join(
            f"{s} F1 {base[s][0]:.4f} -> {v[0]:.4f} (+{v[1] - base[s][1]} TP, +{v[2] - base[s][2]} FP)"
            for s, v in sorted(per.items())) + f" | mean {mean(base):.4f} -> {means[threshold, limit]:.4f}")

    for threshold in THRESHOLDS:  # first the threshold, everywhere; then where the field must be crowded
        run(threshold, 0.0)
    at = max(t for t in THRESHOLDS if means[t, 0.0] >= max(means.values()) - F1_TOLERANCE)
    for limit in CROWDING_LIMITS[1:]:
        run(at, limit)
    eligible = {k: v for k, v in means.items() if worst[k] >= -MAX_SCENE_LOSS}
    best = max(eligible.values(), default=-np.inf)
    if best < mean(base) + MIN_GAIN:
        log(f"no setting adds {MIN_GAIN} mean F1 without losing more than {MAX_SCENE_LOSS} in a scene: "
            "no companion search")
        log(json.dumps({"companion_search": None}))
        return 0
    threshold, limit = max(k for k, v in eligible.items() if v >= best - F1_TOLERANCE)  # the fewest companions
    snr = np.concatenate([img["fit_snr"][img["companion"]] for img in runs[threshold, limit]])
    real = np.concatenate([img["real"][img["companion"]] for img in runs[threshold, limit]])
    if len(snr) < 5 or len(set(real)) < 2:
        log(f"min_snr {threshold:g}, crowding >= {limit:g}: too few companions (or all of one kind) to fit a score")
        return 0
    intercept, coef = fit_logistic(np.log(snr)[:, None], real, l2=0.01)
    chosen = {"min_snr": threshold, "intercept": round(intercept, 4), "slope": round(float(coef[0]), 4),
              "min_crowding": limit}
    det = get_detector(None)
    log(f"min_snr {threshold:g}, crowding >= {limit:g}: {len(snr)} companions, {real.mean():.2f} real; detecting "
        f"again with the score (min_score {default_min_score(det, det.head_config(args.instrument)):g})")
    final = scene_f1(collect(args.instrument, draws, chosen, log))
    log("chosen: " + " | ".join(f"{s} F1 {base[s][0]:.4f} -> {v[0]:.4f} (+{v[1] - base[s][1]} TP, "
                                f"+{v[2] - base[s][2]} FP)" for s, v in sorted(final.items()))
        + f" | mean {mean(base):.4f} -> {mean(final):.4f}")
    log(json.dumps({"companion_search": chosen}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
