"""Choose a CCD head's residual search on validation images: the peak significance a find needs, and its score.

Run (from the repository root; the shipped heads' ``residual_search`` come from these commands):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/choose_residual_search.py --instrument hubble [--fields 3,3] [--patches 8]

The PSF fit's residual image is searched for faint or diffuse sources that no detection stands for
(:mod:`skyfm.catalog.residual_search`; catalog ``fit`` 4). Validation seeds only (those of
``benchmarks/choose_kron.py``: field images of 1024^2 from seeds 951e6 and 952e6, crowded and cluster patches of
256^2). Each image is detected once with the search at its lowest threshold (:data:`SEARCH_MIN_SNR`) and the
score ``snr / (1 + snr)`` (intercept 0, slope 1), from which each find's peak significance is read back; the
thresholds are then applied to those finds. The finds below a threshold still shape the others' measurements (they
are fitted together and own their Voronoi cells in the Kron pass), so the images are detected again with the search
at the chosen threshold for the score and the fluxes.

Prints, per threshold and scene, pooled over images, as ``benchmarks/detect.py`` counts them (truth with SNR >= 5,
a detection within the match radius of any true source with SNR >= 1.5 is no false positive): F1 without and with
the finds, and the true and false positives they add; then, for the chosen
threshold (``--min-snr``, default the highest within :data:`F1_TOLERANCE` of the best F1 over all images), the
logistic in ln(snr) of a find being a real source (never falling with snr: a fitted slope below 0 becomes 0, the
score the share of real finds) and, for each rule of :data:`KRON_RULES` (the ``kron_excess`` from
which a find takes its Kron flux), the relative error floor that makes the finds' 68% intervals hold 68% of the
true fluxes; the rule with the smallest floor is chosen; the scale that makes the finds' position errors match
their separations from the true sources (median separation = 1.1774 pos_err, a 2-D Gaussian's). Last, the head's
``residual_search`` (JSON).
"""

from __future__ import annotations

import copy
import json

import numpy as np

SEARCH_MIN_SNR = 2.5  # skyfm.catalog.residual_search.REGION_SNR: no region peaks lower
THRESHOLDS = (2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0)
F1_TOLERANCE = 0.001  # the highest threshold within this of the best F1: fewer false finds for the same F1
KRON_RULES = (-1e9, 0.0, 1.0, 2.0, 3.0, 5.0, 1e9)  # kron_excess_min: -1e9 every find takes its Kron flux, 1e9 none
NEVER = 1e9


def collect(inst_name: str, fields: tuple[int, int], patches: int, log, min_snr: float = SEARCH_MIN_SNR
            ) -> list[dict]:
    """Per image: ``scene``, the old rows' and the finds' match results against the truth."""
    import astropy.units as u
    from choose_kron import validation_draws

    from skyfm.catalog import match_catalogs
    from skyfm.catalog.table import wcs_pixel_scale_deg
    from skyfm.data.simulate import simulate_patch
    from skyfm.detect import detect_patch, get_detector
    from skyfm.finetune.evaluate import SNR_FAINT, SNR_MIN, match_radius_pix
    from skyfm.instruments import load_instrument

    inst = load_instrument(inst_name)
    det = copy.deepcopy(get_detector(None))
    # every find whose PSF fit converged takes its PSF flux (the Kron columns hold the other), no error floor
    det.head_config(inst_name).residual_search = {"min_snr": min_snr, "intercept": 0.0, "slope": 1.0,
                                                  "kron_excess_min": NEVER}
    radius = match_radius_pix(inst)
    out = []
    draws = validation_draws(fields, patches)
    for j, (seed, size, scene) in enumerate(draws):
        p = simulate_patch(inst_name, seed, size=size, scene=scene)
        cat = detect_patch(p, det)
        v = lambda c: np.asarray(getattr(cat[c], "value", cat[c]), float)
        found = np.asarray(cat["fit"]) == 4
        score = v("score")
        snr = np.where(found, score / np.clip(1 - score, 1e-12, None), np.inf)
        truth = p.truth
        tsnr = np.asarray(truth["snr"], float)
        usable = tsnr >= SNR_FAINT
        t = truth[usable]
        tsnr = tsnr[usable]
        tflux = np.asarray(getattr(t["flux"], "value", t["flux"]), float)
        pos_err = u.Quantity(cat["pos_err"])  # pixels, whatever the catalog's unit
        pos_err = (pos_err.to_value(u.deg) / wcs_pixel_scale_deg(p.wcs) if pos_err.unit.physical_type == "angle"
                   else pos_err.value)
        out.append(dict(scene=scene, n_true=int((tsnr >= SNR_MIN).sum()), found=found, snr=snr, pos_err=pos_err,
                        x=v("x"), y=v("y"), flux=v("flux"), flux_err=v("flux_err"), kron=v("flux_kron"),
                        kron_err=v("flux_kron_err"), excess=v("kron_excess"), tx=t, tsnr=tsnr, tflux=tflux))
        log(f"  {j + 1}/{len(draws)} {scene} {size}^2: {found.sum()} finds")
    for img in out:  # matched once per threshold below; keep what matching needs
        img["match"] = lambda keep, img=img: match_catalogs((img["x"][keep], img["y"][keep]), img["tx"], radius)
    return out


def find_flux(img: dict, rule: float) -> tuple[np.ndarray, np.ndarray]:
    """(flux, raw error) of every row with the finds' Kron rule ``rule`` (``kron_excess_min``): a find collected
    with its PSF flux (not equal to its Kron flux) keeps it below the rule, else takes the Kron flux."""
    psf = img["found"] & (img["flux"] != img["kron"]) & np.isfinite(img["flux"])
    take_kron = img["found"] & (~psf | (img["excess"] >= rule))
    return (np.where(take_kron, img["kron"], img["flux"]), np.where(take_kron, img["kron_err"], img["flux_err"]))


def score_images(images: list[dict], threshold: float, rule: float = NEVER, floor: float = 0.0) -> dict:
    """Pooled per scene (and "all"): tp / fp / n_true without and with the finds at ``threshold``; the finds'
    fluxes (Kron rule ``rule``, relative error floor ``floor``): ratios to the truth and 68% coverage, and their
    fluxes, raw errors and true fluxes; their snr and whether each is real (matched to a usable true source)."""
    from field_fluxes import within_68

    from skyfm.finetune.evaluate import SNR_MIN

    acc: dict = {}
    for img in images:
        rows = []
        for with_finds in (False, True):
            keep = ~img["found"] | (with_finds & (img["snr"] >= threshold))
            di, ti, sep = img["match"](keep)
            idx = np.flatnonzero(keep)
            matched = np.zeros(len(img["x"]), bool)
            matched[idx[di]] = True
            tp = int((img["tsnr"][ti] >= SNR_MIN).sum())
            rows.append((tp, int(keep.sum() - len(di)), matched, idx[di], ti, sep))
        flux, err = find_flux(img, rule)
        for scene in (img["scene"], "all"):
            a = acc.setdefault(scene, dict(tp0=0, fp0=0, tp1=0, fp1=0, n_true=0, ratio=[], cover=[], snr=[], real=[],
                                           flux=[], err=[], true=[], sep_per_err=[]))
            a["tp0"] += rows[0][0]
            a["fp0"] += rows[0][1]
            a["tp1"] += rows[1][0]
            a["fp1"] += rows[1][1]
            a["n_true"] += img["n_true"]
            finds = img["found"] & (img["snr"] >= threshold)
            a["snr"] += list(img["snr"][finds])
            a["real"] += list(rows[1][2][finds])
            d_idx, t_idx = rows[1][3], rows[1][4]
            found = img["found"][d_idx] & (img["snr"][d_idx] >= threshold)
            a["sep_per_err"] += list(rows[1][5][found] / img["pos_err"][d_idx[found]])
            sel = img["found"][d_idx] & (img["tsnr"][t_idx] >= SNR_MIN)
            f, fe, ft = flux[d_idx[sel]], err[d_idx[sel]], img["tflux"][t_idx[sel]]
            ok = np.isfinite(f) & (f > 0) & np.isfinite(fe)
            f, fe, ft = f[ok], fe[ok], ft[ok]
            a["ratio"] += list(f / ft)
            a["cover"] += list(within_68(f, np.hypot(fe, floor * f), ft))
            a["flux"] += list(f)
            a["err"] += list(fe)
            a["true"] += list(ft)
    return acc


def ln_flux_err_floor(flux, err, true, level: float = 0.68) -> float:
    """The relative floor r for which ``|ln(true / flux)| <= hypot(err, r flux) / flux`` (the benchmarks' 68%
    coverage, in ln flux) holds for ``level`` of the pairs: each pair needs sqrt(max(ln^2 - (err / flux)^2, 0))."""
    need = np.sqrt(np.clip(np.log(true / flux) ** 2 - (err / flux) ** 2, 0.0, None))
    return float(np.quantile(need, level)) if need.size else 0.0


def f1(tp: int, fp: int, n_true: int) -> float:
    return 2 * tp / max(2 * tp + fp + (n_true - tp), 1)


def main(argv=None) -> int:
    from choose_kron import validation_fields, validation_parser

    from skyfm.heads.classification import fit_logistic

    p = validation_parser(__doc__, "hubble", "3,3")
    p.add_argument("--min-snr", type=float, default=None, help="the threshold to fit the score at (default: best F1)")
    args = p.parse_args(argv)
    fields = validation_fields(p, args)
    log = lambda s: print(s, flush=True)
    images = collect(args.instrument, fields, args.patches, log)
    f1_all = {}
    for threshold in THRESHOLDS:
        acc = score_images(images, threshold)
        line = f"snr >= {threshold:g}:"
        for scene, a in sorted(acc.items()):
            before, after = f1(a["tp0"], a["fp0"], a["n_true"]), f1(a["tp1"], a["fp1"], a["n_true"])
            line += f" | {scene} F1 {before:.3f} -> {after:.3f} (+{a['tp1'] - a['tp0']} TP, +{a['fp1'] - a['fp0']} FP)"
        log(line)
        a = acc["all"]
        f1_all[threshold] = f1(a["tp1"], a["fp1"], a["n_true"])
    best = max(f1_all.values())
    threshold = max(t for t, v in f1_all.items() if v >= best - F1_TOLERANCE) if args.min_snr is None else args.min_snr
    if threshold != SEARCH_MIN_SNR:
        log(f"detecting again with the search at snr >= {threshold:g}")
        images = collect(args.instrument, fields, args.patches, log, min_snr=threshold)
    a = score_images(images, threshold)["all"]
    current_pos_err_scale = 1.0  # collect's search setting has none: pos_err as the search gives it
    if len(a["snr"]) < 5 or len(set(a["real"])) < 2:
        log(f"snr >= {threshold:g}: too few finds (or all of one kind) to fit a score")
        return 0
    intercept, coef = fit_logistic(np.log(np.asarray(a["snr"]))[:, None], np.asarray(a["real"], bool), l2=0.01)
    if coef[0] <= 0:  # no rise with significance (the few false finds of any significance): the share of real ones
        share = float(np.clip(np.mean(a["real"]), 0.01, 0.99))
        intercept, coef = float(np.log(share / (1 - share))), np.zeros(1)
    log(f"{len(a['snr'])} finds at snr >= {threshold:g}, {np.mean(a['real']):.2f} real; their fluxes by Kron rule "
        f"(kron_excess_min), per scene: median flux / true, 68% coverage with the rule's floor")
    floors = {}
    for rule in KRON_RULES:
        acc = score_images(images, threshold, rule)
        floors[rule] = ln_flux_err_floor(np.asarray(acc["all"]["flux"]), np.asarray(acc["all"]["err"]),
                                         np.asarray(acc["all"]["true"]))
        acc = score_images(images, threshold, rule, floors[rule])
        log(f"  kron_excess_min {rule:g}: floor {floors[rule]:.3f} | " + " | ".join(
            f"{scene} {np.median(b['ratio']):.2f} / {np.mean(b['cover']):.2f} ({len(b['ratio'])})"
            for scene, b in sorted(acc.items()) if b["ratio"]))
    rule = min(floors, key=floors.get)  # the tightest intervals that hold 68%: the least biased and scattered
    # a 2-D Gaussian's separations have median 1.1774 sigma; those beyond the match radius are not seen, so the
    # scale is a lower bound where the errors are a good part of the radius
    ratio = np.asarray(a["sep_per_err"]) * current_pos_err_scale
    pos_err_scale = float(np.median(ratio) / 1.1774) if ratio.size else 1.0
    log(f"position errors: {ratio.size} matched finds, median separation / pos_err {np.median(ratio):.3f} "
        f"(1.1774 if calibrated): pos_err_scale {pos_err_scale:.3f}")
    log(json.dumps({"residual_search": {"min_snr": threshold, "intercept": round(intercept, 4),
                                        "slope": round(float(coef[0]), 4), "flux_err_floor": round(floors[rule], 3),
                                        "kron_excess_min": rule, "pos_err_scale": round(pos_err_scale, 3)}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
