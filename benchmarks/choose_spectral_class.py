"""Fit a counts head's spectral classifier on validation images, and measure it on test images: the class of a
gamma-ray source (Fermi-LAT: agn / pulsar / other) from the shape of its spectrum across the energy bins.

Run (from the repository root; the shipped head's ``spectral_classifier`` comes from the first command):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/choose_spectral_class.py [--instrument fermi-lat] [--patches 15] \\
        [--features shape,snr,net] [--out runs/choose-spectral-class]
    ... benchmarks/choose_spectral_class.py --seeds test [--patches 15]      # the shipped classifier, test seeds
    ... benchmarks/choose_spectral_class.py --estimated-background       # spectral_classifier_estbg: no model given
    ... benchmarks/choose_spectral_class.py --seeds test --estimated-background

The shipped counts heads' class channels call nearly every source an AGN (:mod:`skyfm.heads.classification`). The
likelihood refinement measures each detection's flux in every energy bin (catalog ``flux_band``,
``flux_band_err``, whose statistical part the classifier reads: the error calibration's scale, floor and growth with
``crowding`` taken out, so that a new calibration does not move it); a multinomial logistic regression on the shape
of that spectrum
(:data:`~skyfm.heads.classification.SPECTRAL_FEATURES`) gives the class probabilities of the rows it measured
(catalog ``fit`` 2). Images: ``--patches`` of each of two skies, 256^2 at the instrument's pixels: the resampled
4FGL sky anywhere and the real 4FGL-DR2 sky at |b| <= 8 deg (where the pulsars are), seeds ``951_700_000 + 10 i
(+1)`` (validation) or ``1_517_000_000 + ...`` (``--seeds test``, never used in choosing). The detector's own
classifier is switched off while the validation catalogs are made. Rows: detections matched to true sources with
SNR >= 5 (the truth's ``class_group``). The simulated background model is given to the refinement (as
``skyfm detect --background``), or with ``--estimated-background`` not (estimated from the counts, whose band
errors differ: the head's ``spectral_classifier_estbg``).

Validation: with five-fold cross-validation over images (each image's rows predicted by a fit to the others'),
the network and the classifier (and without each feature in turn): balanced accuracy (mean recall over the
classes), recall per class, accuracy; then the fit to all rows as the head's ``spectral_classifier`` (JSON, also
written to ``OUT/classifier.json``). Test: the same numbers for the network and the shipped classifier (applied
to the same catalogs as ``skyfm.detect.refine_counts`` applies it).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
import warnings
from pathlib import Path

import numpy as np

N_FOLDS = 5
SEEDS = {"validation": 951_700_000, "test": 1_517_000_000}


def collect(inst_name: str, patches: int, seeds: str, log, estimated: bool = False) -> dict:
    """Matched rows of ``patches`` images of each sky, the head's spectral classifier off: patch id, true class
    index, the network's class_prob, flux_band, flux_band_err (the fit's statistical errors, as the classifier reads
    them: :func:`skyfm.detect.fit_statistical_band_errors`) and fit."""
    from skyfm.catalog import match_catalogs
    from skyfm.data.simulate import simulate_patch
    from skyfm.detect import detect_patch, fit_statistical_band_errors, get_detector
    from skyfm.finetune.evaluate import match_radius_pix
    from skyfm.instruments import load_instrument

    det = copy.deepcopy(get_detector(None))
    det.config.heads[inst_name].spectral_classifier = det.config.heads[inst_name].spectral_classifier_estbg = None
    names = list(det.config.heads[inst_name].class_names)
    inst = load_instrument(inst_name)
    base = SEEDS[seeds]
    out = {k: [] for k in ("patch", "true", "prob", "flux_band", "flux_band_err", "fit")}
    for i in range(patches):
        for sky in (0, 1):
            seed = base + 10 * i + sky
            options = {"size": 256}
            if sky == 1:  # the real plane: pulsars and the unassociated sources of the Galaxy
                rng = np.random.default_rng(seed)
                options.update(population="real", center=(float(rng.uniform(0, 360)), float(rng.uniform(-8, 8))))
            else:
                options.update(population="resampled")
            patch = simulate_patch(inst_name, seed, **options)
            if estimated:  # no background model: the background estimated from the counts, as for a user without one
                patch = dataclasses.replace(patch, background_image=None)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cat = detect_patch(patch, det)
            truth = patch.truth[np.asarray(patch.truth["snr"], float) >= 5]
            if len(cat) and len(truth):
                di, ti, _ = match_catalogs((np.asarray(cat["x"], float), np.asarray(cat["y"], float)), truth,
                                           match_radius_pix(inst))
                out["patch"] += [seed] * len(di)
                out["true"] += [names.index(str(truth["class_group"][t])) for t in ti]
                out["prob"] += list(np.asarray(cat["class_prob"], float)[di])
                out["flux_band"] += list(np.asarray(cat["flux_band"], float)[di])
                stat = fit_statistical_band_errors(det.config.heads[inst_name], estimated, cat["flux_band"],
                                                   cat["flux_band_err"], cat["crowding"])  # what the classifier reads
                out["flux_band_err"] += list(stat[di])
                out["fit"] += list(np.asarray(cat["fit"], int)[di])
            log(f"  {seeds} image {seed}: {len(cat)} detections, {len(out['true'])} matched rows so far")
    return {"names": names, **{k: np.asarray(v) for k, v in out.items()}}


def summary(y, prob, names) -> dict:
    """Accuracy, balanced accuracy (mean recall over the classes) and recall of the argmax of ``prob`` (N, K);
    per class the ROC area of its probability against the rest (how well it ranks, whatever the threshold);
    the mean log loss (how honest the probabilities are)."""
    from skyfm.catalog.metrics import rank_auc

    called = prob.argmax(axis=1)
    recall = {n: float(np.mean(called[y == k] == k)) for k, n in enumerate(names) if np.any(y == k)}
    auc = {n: float(rank_auc(y == k, prob[:, k])) for k, n in enumerate(names) if 0 < np.sum(y == k) < len(y)}
    p_true = np.clip(prob[np.arange(len(y)), y], 1e-6, 1.0)
    return {"n": int(len(y)), "per_class": {n: int(np.sum(y == k)) for k, n in enumerate(names)},
            "balanced_accuracy": float(np.mean(list(recall.values()))), "recall": recall,
            "accuracy": float(np.mean(called == y)), "roc_auc": auc, "log_loss": float(-np.mean(np.log(p_true)))}


def text(label: str, s: dict) -> str:
    recall = ", ".join(f"{k} {v:.2f}" for k, v in s["recall"].items())
    auc = ", ".join(f"{k} {v:.3f}" for k, v in s["roc_auc"].items())
    return (f"{label}: accuracy {s['accuracy']:.3f}, balanced accuracy {s['balanced_accuracy']:.3f} (recall "
            f"{recall}); ROC area {auc}; log loss {s['log_loss']:.3f}")


def fit(d: dict, features: list[str], l2: float, balanced: bool = False) -> dict:
    """The classifier fitted to the rows the likelihood fit measured (fit 2); ``balanced``: classes weighted
    equally (probabilities then hold equal priors, not the sky's)."""
    from skyfm.heads.classification import fit_multinomial, spectral_features

    use = d["fit"] == 2
    X = spectral_features(d["flux_band"][use], d["flux_band_err"][use], features, d["prob"][use])
    y = d["true"][use]
    mean, scale = X.mean(axis=0), X.std(axis=0) + 1e-9
    K = len(d["names"])
    counts = np.bincount(y, minlength=K)
    coef, intercept = fit_multinomial((X - mean) / scale, y, K, l2=l2,
                                      class_weight=len(y) / (K * np.maximum(counts, 1)) if balanced else None)
    return {"features": list(features), "mean": mean.round(6).tolist(), "scale": scale.round(6).tolist(),
            "coef": coef.round(6).tolist(), "intercept": intercept.round(6).tolist()}


def prob_with(d: dict, classifier: dict | None, rows=None) -> np.ndarray:
    """(N, K) class probabilities of ``rows``: ``classifier``'s where the likelihood fit measured the row."""
    from skyfm.heads.classification import spectral_class_prob

    rows = np.ones(len(d["true"]), bool) if rows is None else rows
    prob = d["prob"][rows]
    if classifier is None:
        return prob
    return spectral_class_prob(prob, classifier, d["flux_band"][rows], d["flux_band_err"][rows],
                               rows=d["fit"][rows] == 2)


def cross_validated(d: dict, features: list[str], l2: float, balanced: bool = False) -> np.ndarray:
    """(N, K) probabilities of every row from a classifier fitted to the other folds' images."""
    images = sorted(set(d["patch"].tolist()))
    fold = np.array([images.index(p) % N_FOLDS for p in d["patch"]])
    prob = np.zeros(d["prob"].shape)
    for k in range(N_FOLDS):
        train = {key: (v[fold != k] if isinstance(v, np.ndarray) else v) for key, v in d.items()}
        prob[fold == k] = prob_with(d, fit(train, features, l2, balanced), fold == k)
    return prob


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instrument", default="fermi-lat", help="a counts instrument with a head (default fermi-lat)")
    ap.add_argument("--patches", type=int, default=15, help="images of each sky (default 15)")
    ap.add_argument("--features", default="shape,snr,net",
                    help="features of the classifier (skyfm.heads.classification.SPECTRAL_FEATURES)")
    ap.add_argument("--l2", type=float, default=1.0, help="L2 penalty on the coefficients (default 1)")
    ap.add_argument("--seeds", choices=list(SEEDS), default="validation",
                    help="validation: fit and cross-validate; test: measure the shipped classifier")
    ap.add_argument("--estimated-background", action="store_true",
                    help="detect without the simulated background model (estimated from the counts, skyfm-estbg)")
    ap.add_argument("--out", default="runs/choose-spectral-class", help="output folder")
    args = ap.parse_args()
    features = [f.strip() for f in args.features.split(",") if f.strip()]
    start = time.perf_counter()
    d = collect(args.instrument, args.patches, args.seeds, log=print, estimated=args.estimated_background)
    names, y = d["names"], d["true"]
    net = d["prob"]
    result = {"seeds": args.seeds, "rows": int(len(y)), "measured_rows": int(np.sum(d["fit"] == 2)),
              "network": summary(y, net, names)}
    how = ", background estimated from the counts" if args.estimated_background else ", background model given"
    lines = [f"{args.instrument}, {args.seeds} seeds{how}, {args.patches} images of each sky: {len(y)} matched rows "
             f"({result['measured_rows']} measured by the likelihood fit), "
             f"{', '.join(f'{n} {c}' for n, c in result['network']['per_class'].items())}",
             text("network", result["network"])]
    if args.seeds == "test":
        from skyfm.detect import get_detector

        shipped = get_detector(None).config.heads[args.instrument].spectral_classifier_terms(args.estimated_background)
        if shipped is None:
            lines.append("the shipped head has no classifier for this background: its catalogs are the network's")
        else:  # applied as refine_counts applies it (nothing else in the catalog depends on the class)
            result["shipped"] = summary(y, prob_with(d, shipped), names)
            key = "spectral_classifier_estbg" if args.estimated_background else "spectral_classifier"
            lines.append(text(f"shipped {key}", result["shipped"]))
    else:
        result["classifier_cv"] = summary(y, cross_validated(d, features, args.l2), names)
        lines.append(text(f"classifier {'+'.join(features)}, cross-validated", result["classifier_cv"]))
        lines.append(text("  the same with classes weighted equally",
                          summary(y, cross_validated(d, features, args.l2, balanced=True), names)))
        for drop in features if len(features) > 1 else []:
            rest = [f for f in features if f != drop]
            lines.append(text(f"  without {drop}", summary(y, cross_validated(d, rest, args.l2), names)))
        result["classifier"] = fit(d, features, args.l2)
        key = "spectral_classifier_estbg" if args.estimated_background else "spectral_classifier"
        lines.append(f"{key} (fit to all rows): " + json.dumps(result["classifier"]))
    lines.append(f"total {time.perf_counter() - start:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    if "classifier" in result:
        (out / "classifier.json").write_text(json.dumps(result["classifier"], indent=1))
    (out / "results.md").write_text("\n\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
