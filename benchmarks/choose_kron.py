"""Choose a CCD head's Kron settings on validation images: which refined rows take the Kron aperture flux.

Run (from the repository root; the MeerLICHT head's shipped keys come from this command):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/choose_kron.py --instrument meerlicht [--fields 3,6] [--patches 8]

A row takes ``flux_kron`` when its ``kron_excess`` (the light beyond its PSF model, in sigma) reaches
``kron_excess_min`` and its ``crowding`` is below ``kron_max_crowding`` (:class:`~skyfm.heads.config.
InstrumentHeadConfig`); its error gets the relative floor ``kron_flux_err_floor`` that makes those rows' 68%
intervals hold 68% of the true fluxes. Validation seeds only (never the benchmarks' test seeds): field scenes of
1024^2 pixels (``--fields A,B``: A images from seed 951e6 and B from 952e6), where galaxies are half the sources,
and ``--patches`` 256^2 crowded and cluster patches (seeds 951e6 and 951.01e6), where an aperture holds
neighbours' light and must not be taken. The head's own Kron keys are switched off while the catalogs are made, so
``flux`` is the PSF or network flux each rule replaces (rows above :data:`skyfm.detect.KRON_MAX_CROWDING` are never
measured).

Prints, for each rule (threshold x crowding limit): the floor, and per scene and class the share of rows that take
the Kron flux (x), the median flux / true (r) and the 68% coverage (c) with it.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np

VALIDATION_BASES = (951_000_000, 952_000_000)
THRESHOLDS = (2.0, 3.0, 5.0)
CROWDING_LIMITS = (0.02, 0.05, 0.1)  # rows above skyfm.detect.KRON_MAX_CROWDING (0.1) are never measured
PLURAL = {"star": "stars", "galaxy": "galaxies"}


def validation_draws(fields: tuple[int, int], patches: int) -> list[tuple[int, int, str]]:
    """(seed, size, scene) of the validation images: field images of 1024^2 from both bases, crowded and cluster
    patches of 256^2."""
    draws = [(VALIDATION_BASES[0] + i, 1024, "field") for i in range(fields[0])]
    draws += [(VALIDATION_BASES[1] + i, 1024, "field") for i in range(fields[1])]
    draws += [(VALIDATION_BASES[0] + i, 256, "crowded") for i in range(patches)]
    draws += [(VALIDATION_BASES[0] + 10_000 + i, 256, "cluster") for i in range(patches)]
    return draws


def matched_rows(inst_name: str, det, draws, columns: dict, log) -> dict:
    """Catalog values of the detections matched to true sources with SNR >= 5 on each drawn image: ``scene``,
    ``image`` (its index in ``draws``), ``cls`` and ``true`` (the true class and flux), and ``columns`` (key:
    catalog column)."""
    from skyfm.catalog import match_catalogs
    from skyfm.data.simulate import simulate_patch
    from skyfm.detect import detect_patch
    from skyfm.finetune.evaluate import match_radius_pix
    from skyfm.instruments import load_instrument

    inst = load_instrument(inst_name)
    rows = {k: [] for k in ("scene", "image", "cls", "true", *columns)}
    for j, (seed, size, scene) in enumerate(draws):
        p = simulate_patch(inst_name, seed, size=size, scene=scene)
        cat = detect_patch(p, det)
        t = p.truth[np.asarray(p.truth["snr"], float) >= 5]
        if len(t) and len(cat):
            v = lambda c: np.asarray(getattr(cat[c], "value", cat[c]), float)
            di, ti, _ = match_catalogs((v("x"), v("y")), t, match_radius_pix(inst))
            rows["scene"] += [scene] * len(di)
            rows["image"] += [j] * len(di)
            rows["cls"] += list(np.asarray(t["class"])[ti])
            rows["true"] += list(np.asarray(getattr(t["flux"], "value", t["flux"]), float)[ti])
            for k, c in columns.items():
                rows[k] += list(v(c)[di])
        log(f"  {j + 1}/{len(draws)} {scene} {size}^2 done")
    return {k: np.asarray(v) for k, v in rows.items()}


def collect(inst_name: str, fields: tuple[int, int], patches: int, log) -> dict:
    from skyfm.detect import get_detector

    det = copy.deepcopy(get_detector(None))
    for head in det.config.heads.values():  # measure every row up to the module's crowding limit, take none
        head.kron_excess_min, head.kron_max_crowding = None, None
    columns = {k: k for k in ("flux", "flux_err", "crowding")}
    columns.update(kron="flux_kron", kron_err="flux_kron_err", excess="kron_excess", fit="fit")
    d = matched_rows(inst_name, det, validation_draws(fields, patches), columns, log)
    detected = d["fit"] != 4  # the residual search's rows have a flux rule of their own (residual_search)
    return {k: v[detected] for k, v in d.items()}


def coverage(flux, err, true) -> float:
    from field_fluxes import within_68

    ok = (flux > 0) & (true > 0) & np.isfinite(err)
    return float(np.mean(within_68(flux[ok], err[ok], true[ok]))) if ok.any() else float("nan")


def report(d: dict, log) -> None:
    from skyfm.finetune.ship import flux_err_floor

    for threshold in THRESHOLDS:
        for limit in CROWDING_LIMITS:
            takes = np.isfinite(d["kron"]) & (d["kron"] > 0) & (d["excess"] >= threshold) & (d["crowding"] < limit)
            if takes.sum() < 3:
                continue
            floor = flux_err_floor(d["kron"][takes], d["kron_err"][takes], d["true"][takes])
            flux = np.where(takes, d["kron"], d["flux"])
            err = np.where(takes, np.hypot(d["kron_err"], floor * d["kron"]), d["flux_err"])
            line = f"excess >= {threshold:g}, crowding < {limit:g}: floor {floor:.3f} |"
            for scene in np.unique(d["scene"]):
                for k in ("star", "galaxy"):
                    m = (d["scene"] == scene) & (d["cls"] == k)
                    if m.sum() >= 5:
                        line += (f" {scene} {PLURAL[k]} n {m.sum()} x {takes[m].mean():.2f} r {np.median(flux[m] / d['true'][m]):.2f}"
                                 f" c {coverage(flux[m], err[m], d['true'][m]):.2f} |")
            log(line)


def validation_parser(doc: str, instrument: str, fields: str) -> argparse.ArgumentParser:
    """The choose scripts' command line: ``--instrument``, ``--fields`` and ``--patches`` (which validation
    images, :func:`validation_draws`) and ``--threads``, with these defaults; the script adds its own options."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    p.add_argument("--instrument", default=instrument, help=f"a CCD instrument (default {instrument})")
    p.add_argument("--fields", default=fields,
                   help=f"field images from each of the two validation bases (default {fields})")
    p.add_argument("--patches", type=int, default=8, help="crowded and cluster patches each (default 8)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    return p


def validation_fields(p: argparse.ArgumentParser, args) -> tuple[int, int]:
    """``--fields`` as two numbers (an argparse error otherwise); also sets torch's threads from ``--threads``."""
    import torch

    torch.set_num_threads(args.threads)
    try:
        fields = tuple(int(v) for v in args.fields.split(","))
    except ValueError:
        fields = ()
    if len(fields) != 2:
        p.error("--fields takes two numbers, A,B")
    return fields


def main(argv=None) -> int:
    p = validation_parser(__doc__, "meerlicht", "3,6")
    args = p.parse_args(argv)
    fields = validation_fields(p, args)
    log = lambda s: print(s, flush=True)
    report(collect(args.instrument, fields, args.patches, log), log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
