"""Validation of a detector on fresh simulated patches (seeds VAL_SEED_BASE + i, never used in training).

    python -m skyfm.finetune.evaluate MODEL_DIR [--config configs/finetune/default.yaml] [--n 24] [--size 64]

Thresholds: ``--sweep`` picks each instrument's best-F1 threshold on one seed range (``--seed-offset 0``);
report the shipped model on another (``--seed-offset 1000``), so the reported F1 is not tuned on its own patches.

Per instrument, at the detector's threshold: precision, recall and F1 against true sources with SNR >= 5
(detections matched to fainter true sources, 1.5 <= SNR < 5, count neither way), recall per SNR bin, median
position error of matches, flux coverage (share of true fluxes inside the predicted 68% interval), and the
number of unmatched detections on contaminant pixels (cosmic rays, trails, ...).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

SNR_MIN = 5.0
SNR_FAINT = 1.5


def match_radius_pix(inst) -> float:
    """The benchmark's match radius (:func:`skyfm.catalog.evaluate.default_radius_pix`): 3 px for counts cubes,
    else 0.75 FWHM of the sharpest band, at least 2 px."""
    from skyfm.catalog.evaluate import default_radius_pix

    return float(default_radius_pix(inst))


def score_patch(cat, patch, inst, radius: float | None = None) -> dict:
    from skyfm.catalog import match_catalogs

    radius = match_radius_pix(inst) if radius is None else radius
    truth = patch.truth
    snr = np.asarray(truth["snr"], float) if len(truth) else np.zeros(0)
    usable = snr >= SNR_FAINT
    t = truth[usable]
    tsnr = snr[usable]
    dx = np.asarray(cat["x"].value if hasattr(cat["x"], "value") else cat["x"], float)
    dy = np.asarray(cat["y"].value if hasattr(cat["y"], "value") else cat["y"], float)
    if len(dx) and len(t):
        di, ti, sep = match_catalogs((dx, dy), t, radius)
    else:
        di, ti, sep = np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    bright = tsnr >= SNR_MIN
    matched_t = np.zeros(len(t), bool)
    matched_t[ti] = True
    matched_d = np.zeros(len(dx), bool)
    matched_d[di] = True
    tp = int(bright[ti].sum())
    fp = int((~matched_d).sum())
    out = {"tp": tp, "fp": fp, "n_true": int(bright.sum()), "n_det": len(dx),
           "sep": list(sep[bright[ti]]) if len(ti) else []}
    for lo, hi in ((3, 5), (5, 10), (10, np.inf)):
        sel = (tsnr >= lo) & (tsnr < hi)
        out[f"recall_{lo}_{hi}"] = (int(matched_t[sel].sum()), int(sel.sum()))
    # flux coverage of matched bright sources: is the true flux inside flux +- flux_err?
    cover = []
    if len(ti) and "flux" in cat.colnames:
        f = np.asarray(getattr(cat["flux"], "value", cat["flux"]), float)[di]
        fe = np.asarray(getattr(cat["flux_err"], "value", cat["flux_err"]), float)[di]
        ft = np.asarray(getattr(t["flux"], "value", t["flux"]), float)[ti]
        ok = bright[ti] & np.isfinite(f) & np.isfinite(fe) & (ft > 0) & (f > 0)
        # the error is of ln flux: the 68% interval is [f / e^s, f * e^s] with s = fe / f
        s = fe[ok] / f[ok]
        cover = list((np.abs(np.log(ft[ok] / f[ok])) <= s).astype(float))
        out["flux_ratio"] = list(f[ok] / ft[ok])
    out["cover"] = cover
    if patch.contaminant_mask is not None and len(dx):
        cm = np.asarray(patch.contaminant_mask).any(axis=0)
        ix = np.clip(np.rint(dx).astype(int), 0, patch.width - 1)
        iy = np.clip(np.rint(dy).astype(int), 0, patch.height - 1)
        out["artefact_det"] = int((cm[iy, ix] & ~matched_d).sum())
    else:
        out["artefact_det"] = 0
    return out


def _aggregate(rows: list[dict], seconds: float) -> dict:
    tp, fp, nt = (sum(r[k] for r in rows) for k in ("tp", "fp", "n_true"))
    prec = tp / max(tp + fp, 1)
    rec = tp / max(nt, 1)
    seps = np.concatenate([r["sep"] for r in rows]) if any(r["sep"] for r in rows) else np.zeros(0)
    cover = np.concatenate([r["cover"] for r in rows]) if any(r["cover"] for r in rows) else np.zeros(0)
    res = {"precision": round(prec, 3), "recall": round(rec, 3), "f1": round(2 * prec * rec / max(prec + rec, 1e-9), 3),
           "n_true_snr5": nt, "n_det": sum(r["n_det"] for r in rows),
           "median_sep_pix": round(float(np.median(seps)), 3) if len(seps) else None,
           "flux_68_coverage": round(float(cover.mean()), 3) if len(cover) else None,
           "artefact_detections": sum(r["artefact_det"] for r in rows), "seconds": round(seconds, 1)}
    for key in ("recall_3_5", "recall_5_10", "recall_10_inf"):
        m, tot = sum(r[key][0] for r in rows), sum(r[key][1] for r in rows)
        res[key] = round(m / tot, 3) if tot else None
    return res


def evaluate(detector, config, n: int = 24, size: int = 64, min_score: float | None = None,
             instruments: list[str] | None = None, refine: bool = False,
             thresholds: list[float] | None = None, seed_offset: int = 0) -> dict:
    """Per instrument: the metrics at ``min_score`` (default: the instrument's own threshold) and, with
    ``thresholds``, at each of them (``sweep``) and the threshold of best F1 (``best_threshold``)."""
    from skyfm.detect import default_min_score, detect_patch, get_detector
    from skyfm.finetune.data import validation_patches
    from skyfm.instruments import load_instrument

    det = get_detector(detector)
    specs = {load_instrument(k).name: v for k, v in config.instrument_specs().items()}
    results = {}
    for name, spec in specs.items():
        if instruments and name not in instruments:
            continue
        inst = load_instrument(name)
        head = det.head_config(name)
        th0 = default_min_score(det, head) if min_score is None else float(min_score)
        ths = sorted(set([th0] + list(thresholds or [])))
        t0 = time.perf_counter()
        per = {th: [] for th in ths}
        scenes = []
        for p in validation_patches(inst, spec, n, size, seed_offset=seed_offset):
            cat = detect_patch(p, det, ths[0], refine=refine, selection="network")  # sweeps over the probability
            scenes.append(str(p.meta.get("scene") or p.meta.get("population") or "patch"))
            for th in ths:
                per[th].append(score_patch(cat[np.asarray(cat["score"]) >= th], p, inst))
        seconds = time.perf_counter() - t0
        res = _aggregate(per[th0], seconds)
        res["min_score"] = th0
        names = sorted(set(scenes))

        def by_scene(rows):
            return {sc: _aggregate([r for r, s2 in zip(rows, scenes) if s2 == sc], 0.0) for sc in names}

        res["per_scene"] = {sc: {m: v[m] for m in ("precision", "recall", "f1", "n_true_snr5", "n_det")}
                            for sc, v in by_scene(per[th0]).items()}
        if thresholds:
            sweep = {f"{th:.2f}": _aggregate(per[th], seconds) for th in ths}
            res["sweep"] = {k: {m: v[m] for m in ("precision", "recall", "f1")} for k, v in sweep.items()}

            def mean_scene_f1(th):  # every scene counts alike (a cluster core must not outvote the field)
                f1s = [v["f1"] for v in by_scene(per[th]).values() if v["n_true_snr5"] > 0]
                return float(np.mean(f1s)) if f1s else 0.0

            best = max(ths, key=lambda th: (round(mean_scene_f1(th), 3), -abs(th - 0.3)))
            res["best_threshold"] = float(best)
            res["best_threshold_mean_scene_f1"] = round(mean_scene_f1(best), 3)
        results[name] = res
    return results


def main() -> None:
    import torch

    from skyfm.finetune.config import load_finetune_config

    parser = argparse.ArgumentParser(description="Validate a detector on fresh simulated patches")
    parser.add_argument("model_dir")
    parser.add_argument("--config", default="default")
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--min-score", type=float, default=None)
    parser.add_argument("--instrument", action="append", default=None)
    parser.add_argument("--refine", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sweep", action="store_true", help="F1 at thresholds 0.1 .. 0.7 and the best one")
    parser.add_argument("--seed-offset", type=int, default=0,
                        help="validation seeds VAL_SEED_BASE + offset + i (choose thresholds on one offset, report "
                             "on another)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    res = evaluate(args.model_dir, load_finetune_config(args.config), n=args.n, size=args.size,
                   min_score=args.min_score, instruments=args.instrument, refine=args.refine,
                   thresholds=[0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7] if args.sweep else None,
                   seed_offset=args.seed_offset)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
