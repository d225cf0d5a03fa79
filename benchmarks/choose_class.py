"""Fit a CCD head's class calibration on validation images: star or galaxy, from the network and the Kron columns.

Run (from the repository root; the shipped heads' ``class_calibration`` come from these commands):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/choose_class.py --instrument meerlicht [--fields 10,10] [--patches 8] \\
        [--features net_logit,kron_excess,kron_snr,kron_size]

The shipped CCD heads rank galaxies above stars but, trained on patches where nearly every source is a star,
never give a galaxy a probability near 0.5 (:mod:`skyfm.heads.classification`). Where the refinement measures a
Kron aperture, a logistic regression on the network's logit and the aperture's measurements
(:data:`~skyfm.heads.classification.CALIBRATION_FEATURES`) gives the probability of a galaxy. Validation seeds
only (those of ``benchmarks/choose_kron.py``: field images of 1024^2 from seeds 951e6 and 952e6, crowded and
cluster patches of 256^2), the head's own calibration switched off while the catalogs are made (its Kron
settings kept, so the rows are those it will calibrate). Rows are the detections matched to true stars and
galaxies with SNR >= 5 that have every chosen feature.

Prints, with five-fold cross-validation over images (each image's rows predicted by a fit to the other images'),
for the network, the calibration and the calibration without each of its features in turn, per scene: accuracy,
the share of galaxies and of stars called what they are, ROC area and Brier score; then the fit to all rows as
the head's ``class_calibration`` (JSON).
"""

from __future__ import annotations

import copy
import json

import numpy as np

N_FOLDS = 5
CLASS = "galaxy"


def collect(inst_name: str, fields: tuple[int, int], patches: int, log) -> dict:
    from choose_kron import matched_rows, validation_draws

    from skyfm.detect import get_detector

    det = copy.deepcopy(get_detector(None))
    det.config.heads[inst_name].class_calibration = None
    columns = {"prob": "class_prob", "excess": "kron_excess", "kron": "flux_kron", "kron_err": "flux_kron_err",
               "size": "kron_size"}
    d = matched_rows(inst_name, det, validation_draws(fields, patches), columns, log)
    d["prob"] = d["prob"][:, list(det.config.heads[inst_name].class_names).index(CLASS)] if len(d["prob"]) else d["prob"]
    return d


def scores(p, y, scene) -> str:
    """:func:`field_fluxes.class_row` of all rows and of each scene's, as text."""
    from field_fluxes import class_row

    out = []
    for s in ["all", *sorted(set(scene))]:
        k = np.ones(len(y), bool) if s == "all" else scene == s
        if k.sum() < 5:
            continue
        c = class_row(y[k], p[k], probability=True)
        out.append(f"{s} n {c['n']} ({c['n_galaxies']} galaxies): accuracy {c['accuracy']:.3f}, galaxies "
                   f"{c['galaxies_called'] if c['galaxies_called'] is not None else float('nan'):.2f}, stars "
                   f"{c['stars_called'] if c['stars_called'] is not None else float('nan'):.3f}, AUC {c['auc']:.3f}, "
                   f"Brier {c['brier']:.3f}")
    return "\n    ".join(out)


def main(argv=None) -> int:
    from choose_kron import validation_fields, validation_parser

    from skyfm.heads.classification import CALIBRATION_FEATURES, calibration_features, fit_logistic

    p = validation_parser(__doc__, "meerlicht", "10,10")
    p.add_argument("--features", default=",".join(CALIBRATION_FEATURES),
                   help=f"comma-separated, from {', '.join(CALIBRATION_FEATURES)} (default all)")
    p.add_argument("--l2", type=float, default=0.1, help="L2 penalty of the coefficients (default 0.1)")
    args = p.parse_args(argv)
    fields = validation_fields(p, args)
    names = [f for f in args.features.split(",") if f]
    if not names or not set(names) <= set(CALIBRATION_FEATURES):
        p.error(f"--features: choose from {', '.join(CALIBRATION_FEATURES)}")
    log = lambda s: print(s, flush=True)
    d = collect(args.instrument, fields, args.patches, log)
    feats = calibration_features(d["prob"], d["excess"], d["kron"], d["kron_err"], d["size"])
    X = np.stack([feats[f] for f in names], axis=1)
    keep = np.isin(d["cls"], ["star", CLASS]) & np.isfinite(X).all(axis=1)
    X, y, scene, image = X[keep], d["cls"][keep] == CLASS, d["scene"][keep], d["image"][keep]
    if y.all() or not y.any():
        p.error(f"the validation rows hold only one class ({int(y.sum())} galaxies of {len(y)})")
    fold = np.random.default_rng(0).integers(0, N_FOLDS, int(image.max()) + 1)[image]

    def cross_validated(columns) -> np.ndarray:
        out = np.zeros(len(y))
        for k in range(N_FOLDS):
            b, c = fit_logistic(X[fold != k][:, columns], y[fold != k], l2=args.l2)
            out[fold == k] = 1.0 / (1.0 + np.exp(-(b + X[fold == k][:, columns] @ c)))
        return out

    log(f"{args.instrument}: {len(y)} rows with {', '.join(names)} (cross-validated over images)")
    log(f"  network:    {scores(d['prob'][keep], y, scene)}")
    log(f"  calibrated: {scores(cross_validated(list(range(len(names)))), y, scene)}")
    for i, name in enumerate(names if len(names) > 1 else []):  # what each feature adds
        log(f"  without {name}: {scores(cross_validated([j for j in range(len(names)) if j != i]), y, scene)}")
    b, c = fit_logistic(X, y, l2=args.l2)
    cal = {"class": CLASS, "intercept": round(b, 4), "coef": {f: round(float(v), 4) for f, v in zip(names, c)}}
    log(f"class_calibration: {json.dumps(cal)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
