"""Latent space measured: kNN quality of skyfm embeddings, FAISS index speed and recall, UMAP time.

Run (from the repository root):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        .venv/bin/python benchmarks/latent.py --model runs/pretrain-tiny/model --out runs/bench-latent
    ... benchmarks/latent.py --random-only --sizes 100000 --out /tmp/bench   # a dry run without a trained model

Writes OUT/latent.json and OUT/latent.md (the tables below), OUT/embeddings.parquet (the evaluation vectors of
the pretrained backbone, with metadata and thumbnails) and OUT/map.png + OUT/map.html (their UMAP, the explorer).
Default sizes take about 5-8 minutes on the shared 2-core CPU.

1. kNN quality. ``--n`` fresh simulated 64 x 64 patches per instrument (Fermi-LAT, CTAO, MeerLICHT, Hubble, WISE)
   with truth. Their seeds come from base seed ``LATENT_SEED_OFFSET + --seed`` = 20 000 (patch ``i`` of
   instrument ``name``: ``patch_seed(instrument_seed(20000 + seed, name), i)``), a stream distinct from pretraining
   (base 0) and from the pretraining probe (base 10 000). In each patch, vectors (:func:`skyfm.latent.embed.embed_tiles`,
   the same as ``skyfm embed``) are taken at

   * sources: true sources with ``snr >= 5`` (at most ``--max-sources`` per patch, rarer classes kept first);
   * background: random positions with no true source of ``snr >= 1`` within ``max(2 FWHM, 3)`` pixels: as many
     as the patch's sources (at least 4) are evaluated; more, up to ``--max-background`` per patch, only fill
     the map (section 3).

   A cosine kNN classifier (k = 10, votes weighted by similarity) is fit on the first 2/3 of each instrument's
   patches and scored on the rest (so a source never sits on both sides): source vs background, and source class
   (Fermi-LAT: 4FGL class group agn / pulsar / other; CTAO: class; optical/IR: star / galaxy). Balanced accuracy
   (mean recall over the classes in the test set: chance = 1 / classes, independent of the class mix) is the
   headline; plain accuracy is in the JSON. Across instruments: fit on one instrument's training patches, score on
   another's test patches. Representations compared: the pretrained backbone's embedding (token + dense blocks,
   what ``skyfm embed`` stores) and each block alone, the same architecture randomly initialised, and raw
   pixels (an 8 x 8 stamp of the scaled image, band-averaged, median-subtracted, unit length).

2. FAISS. Index build and query time and recall@10 against exact search at ``--sizes`` vectors (10^5 and 10^6).
   The vectors are SYNTHETIC (the model's dimension, 160 for skyfm-tiny; a mixture of 1000 Gaussian clusters,
   unit length) because a million real embeddings would take hours to compute here; 200 held-out queries from
   the same mixture. ``auto`` is what ``skyfm index`` picks by size (IVF-Flat with nprobe tuned to 0.95 recall on
   the set itself); exact = IndexFlatL2 brute force; HNSW at the smallest size. Query time: 200 queries in one
   batch on ``--threads`` threads, per query.

3. UMAP: the fit time of ``skyfm umap`` on ``--umap-points`` (5000) of the evaluation embeddings (a seeded
   subsample), after a separate warm-up fit that pays numba's compilation (reported too).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LATENT_SEED_OFFSET = 20_000
INSTRUMENTS = ("fermi-lat", "ctao", "meerlicht", "hubble", "wise")
K = 10


# ================================================================================================= data
def latent_patch_seed(instrument: str, index: int, seed: int) -> int:
    from skyfm.data.shards import instrument_seed
    from skyfm.data.simulate import patch_seed

    return patch_seed(instrument_seed(LATENT_SEED_OFFSET + seed, instrument), index)


def class_label(instrument: str, row) -> str:
    if instrument == "fermi-lat":
        return str(row["class_group"])
    return str(row["class"])


def positions(patch, rng, max_sources: int, max_background: int, min_snr: float = 5.0, clean_snr: float = 1.0):
    """(source xy, source classes, source snr/flux, background xy) of one patch (tile pixels)."""
    from skyfm.pretrain.evaluate import patch_fwhm_pix

    t = patch.truth
    h, w = patch.height, patch.width
    x, y, snr = (np.asarray(t[c], dtype=float) for c in ("x", "y", "snr"))
    cls = np.asarray([class_label(patch.instrument, r) for r in t]) if len(t) else np.zeros(0, dtype=str)
    ok = (snr >= min_snr) & (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    idx = np.flatnonzero(ok)
    if idx.size > max_sources:  # keep the rarer classes first, then a random subset of the commonest
        values, counts = np.unique(cls[idx], return_counts=True)
        common = values[np.argmax(counts)]
        rare, usual = idx[cls[idx] != common], rng.permutation(idx[cls[idx] == common])
        idx = np.sort(np.concatenate([rare[:max_sources], usual[:max(0, max_sources - rare.size)]]))
    fwhm = float(np.median(patch_fwhm_pix(patch)))
    clear = max(2.0 * fwhm, 3.0)
    near = snr >= clean_snr
    n_bg = int(max_background)  # the first max(4, n sources) are evaluated, the rest only fill the map
    bg = []
    for _ in range(50 * n_bg):
        if len(bg) >= n_bg:
            break
        px, py = rng.uniform(2, w - 3), rng.uniform(2, h - 3)
        if not near.any() or np.min((x[near] - px) ** 2 + (y[near] - py) ** 2) > clear**2:
            bg.append((px, py))
    flux = np.asarray(t["flux"], dtype=float)
    return (np.stack([x[idx], y[idx]], axis=1), cls[idx], snr[idx], flux[idx],
            np.asarray(bg, dtype=float).reshape(-1, 2))


def simulate(n: int, size: int, seed: int, max_sources: int, max_background: int):
    from skyfm.data.simulate import simulate_patch

    items = []
    rng = np.random.default_rng(seed)
    for name in INSTRUMENTS:
        for i in range(n):
            patch = simulate_patch(name, latent_patch_seed(name, i, seed), size=size)
            src, cls, snr, flux, bg = positions(patch, rng, max_sources, max_background)
            items.append({"patch": patch, "instrument": name, "index": i, "split": "train" if i < round(2 * n / 3) else "test",
                          "src": src, "cls": cls, "snr": snr, "flux": flux, "bg": bg})
    return items


def pixel_stamps(scaled: np.ndarray, xy: np.ndarray, half: int = 4) -> np.ndarray:
    from skyfm.latent.thumbs import source_stamp

    out = []
    for x, y in xy:
        s = np.nan_to_num(source_stamp(scaled, x, y, half=half).mean(axis=0), nan=0.0).reshape(-1)
        s = s - np.median(s)
        out.append(s / max(np.linalg.norm(s), 1e-6))
    return np.asarray(out, dtype=np.float32).reshape(-1, (2 * half) ** 2)


def collect(model, items, batch_size: int, with_pixels: bool, with_thumbs: bool = False):
    """Vectors of every source / background position: dict of arrays (one row per position)."""
    from skyfm.latent.embed import embed_tiles
    from skyfm.latent.thumbs import source_thumbnail

    rows = {k: [] for k in ("vec", "pix", "is_source", "cls", "instrument", "patch", "split", "x", "y", "snr", "flux",
                            "thumb", "eval")}
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        # a batch holds one instrument's patches at a time only where they are consecutive; collate pads bands
        pos = [np.concatenate([it["src"], it["bg"]]) for it in chunk]
        out = embed_tiles(model, [it["patch"] for it in chunk], pos)
        for b, it in enumerate(chunk):
            n_src, n_bg = len(it["src"]), len(it["bg"])
            scaled = out.scaled[b][out.band_valid[b]]
            coord = out.band_coord[b][out.band_valid[b]]
            rows["vec"].append(out.sources[b])
            if with_pixels:
                rows["pix"].append(pixel_stamps(scaled, pos[b]))
            rows["is_source"] += [1] * n_src + [0] * n_bg
            n_eval_bg = min(n_bg, max(4, n_src))
            rows["eval"] += [True] * (n_src + n_eval_bg) + [False] * (n_bg - n_eval_bg)
            rows["cls"] += list(it["cls"]) + [""] * n_bg
            rows["instrument"] += [it["instrument"]] * (n_src + n_bg)
            rows["patch"] += [f"{it['instrument']}-{it['index']}"] * (n_src + n_bg)
            rows["split"] += [it["split"]] * (n_src + n_bg)
            rows["x"] += list(pos[b][:, 0])
            rows["y"] += list(pos[b][:, 1])
            rows["snr"] += list(it["snr"]) + [np.nan] * n_bg
            rows["flux"] += list(it["flux"]) + [np.nan] * n_bg
            if with_thumbs:
                rows["thumb"] += [source_thumbnail(scaled, x, y, coord) for x, y in pos[b]]
    out = {k: (np.concatenate(v) if k in ("vec", "pix") and v else np.asarray(v)) for k, v in rows.items()}
    return out


# ================================================================================================== kNN
def knn_predict(train_x, train_y, test_x, k: int = K):
    a = train_x / np.clip(np.linalg.norm(train_x, axis=1, keepdims=True), 1e-12, None)
    b = test_x / np.clip(np.linalg.norm(test_x, axis=1, keepdims=True), 1e-12, None)
    sims = b @ a.T
    k = min(k, len(a))
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    labels = np.unique(train_y)
    votes = np.zeros((len(b), len(labels)))
    lab_idx = np.searchsorted(labels, train_y)
    for j in range(k):
        np.add.at(votes, (np.arange(len(b)), lab_idx[top[:, j]]), np.maximum(sims[np.arange(len(b)), top[:, j]], 0) + 1e-6)
    return labels[np.argmax(votes, axis=1)]


def scores(truth, pred) -> dict:
    classes = np.unique(truth)
    recalls = [float(np.mean(pred[truth == c] == c)) for c in classes]
    return {"balanced_accuracy": round(float(np.mean(recalls)), 4), "accuracy": round(float(np.mean(pred == truth)), 4),
            "n_test": int(len(truth)), "classes": [str(c) for c in classes]}


def evaluate(data: dict, reps: dict[str, np.ndarray]) -> dict:
    inst = data["instrument"]
    train, test = data["split"] == "train", data["split"] == "test"
    src = data["is_source"] == 1
    res = {"source_vs_background": {}, "source_vs_background_cross": {}, "class": {}, "class_cross": {}}
    for rep, X in reps.items():
        sb, cross, cl, clx = {}, {}, {}, {}
        y = data["is_source"]
        for a in INSTRUMENTS:
            tr = train & (inst == a)
            for b in INSTRUMENTS:
                te = test & (inst == b)
                if tr.sum() < K or te.sum() == 0 or len(np.unique(y[te])) < 2:
                    continue
                s = scores(y[te], knn_predict(X[tr], y[tr], X[te]))
                (sb.__setitem__(a, s) if a == b else cross.setdefault(a, {}).__setitem__(b, s["balanced_accuracy"]))
        tr = train
        for b in INSTRUMENTS:
            te = test & (inst == b)
            if te.sum() and len(np.unique(y[te])) == 2:
                cross.setdefault("all", {})[b] = scores(y[te], knn_predict(X[tr], y[tr], X[te]))["balanced_accuracy"]
        cls = data["cls"]
        for a in INSTRUMENTS:
            tr = train & src & (inst == a)
            for b in INSTRUMENTS:
                te = test & src & (inst == b)
                shared = np.intersect1d(np.unique(cls[tr]), np.unique(cls[te]))
                if tr.sum() < K or len(shared) < 2:
                    continue
                te = te & np.isin(cls, shared)
                s = scores(cls[te], knn_predict(X[tr], cls[tr], X[te]))
                if a == b:
                    counts = {str(c): int((cls[te] == c).sum()) for c in np.unique(cls[te])}
                    s["test_counts"] = counts
                    cl[a] = s
                else:
                    clx.setdefault(a, {})[b] = s["balanced_accuracy"]
        res["source_vs_background"][rep] = sb
        res["source_vs_background_cross"][rep] = cross
        res["class"][rep] = cl
        res["class_cross"][rep] = clx
    return res


# ================================================================================================ FAISS
def synthetic(n: int, dim: int, rng, centres=None, sigma: float = 0.8) -> np.ndarray:
    centres = rng.standard_normal((1000, dim), dtype=np.float32) if centres is None else centres
    x = centres[rng.integers(0, len(centres), n)]
    x += sigma * rng.standard_normal(x.shape, dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x)


def time_indexes(sizes, dim: int, seed: int, hnsw_max: int) -> list[dict]:
    import faiss

    from skyfm.latent.index import build_index, choose_params, exact_knn, recall_at_k

    out = []
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dim), dtype=np.float32)
    for n in sizes:
        t0 = time.perf_counter()
        x = synthetic(n, dim, rng, centres)
        q = synthetic(200, dim, rng, centres)
        gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        flat = faiss.IndexFlatL2(dim)
        flat.add(x)
        flat_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, truth = flat.search(q, 10)
        flat_query = (time.perf_counter() - t0) / len(q)
        row = {"n": n, "dim": dim, "generate_s": round(gen, 2),
               "exact": {"build_s": round(flat_build, 3), "query_ms": round(1e3 * flat_query, 3), "recall_at_10": 1.0}}
        kinds = ["auto"] + (["hnsw"] if n <= hnsw_max else [])
        del flat
        for kind in kinds:
            params = choose_params(n, dim, kind)
            t0 = time.perf_counter()
            index, params = build_index(x, params, target_recall=0.95, seed=seed)
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            _, found = index.search(q, 10)
            query = (time.perf_counter() - t0) / len(q)
            key = "auto" if kind == "auto" else kind
            row[key] = {"kind": params["kind"], "build_s": round(build, 2), "query_ms": round(1e3 * query, 3),
                        "recall_at_10": round(recall_at_k(found, truth), 4),
                        "tuned_recall_at_10": params.get("recall_at_10"),
                        **{k: params[k] for k in ("nlist", "nprobe", "quantizer", "ef_search", "hnsw_m") if k in params}}
            del index
        out.append(row)
        print(f"  index {n}: {json.dumps(row)}", flush=True)
        del x
    return out


# ================================================================================================ report
def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown(res: dict) -> str:
    L = []
    L.append(f"# Latent space (benchmarks/latent.py)\n")
    L.append(f"Command: `{res['command']}`  ")
    L.append(f"Machine: {res['machine']}; load average before/after {res['load_before']} / {res['load_after']}; "
             f"total {res['total_s']:.0f} s.  ")
    L.append(f"Patches: {res['n_per_instrument']} per instrument, {res['size']}x{res['size']} px, seeds from base "
             f"{LATENT_SEED_OFFSET} + {res['seed']} (distinct from pretraining, base 0, and the probe, base 10000); "
             f"train on the first 2/3 of each instrument's patches, test on the rest.  ")
    L.append(f"Pretrained model: {res['model']}\n")
    q = res.get("knn")
    if q:
        counts = res["counts"]
        reps = list(q["source_vs_background"].keys())
        L.append("## kNN (k=10, cosine) source vs background, balanced accuracy (chance 0.5)\n")
        L.append("| instrument | test src/bg | " + " | ".join(reps) + " |")
        L.append("|---|---|" + "---|" * len(reps))
        for inst in INSTRUMENTS:
            c = counts.get(inst, {})
            L.append(f"| {inst} | {c.get('test_sources', 0)}/{c.get('test_background', 0)} | " + " | ".join(
                fmt(q["source_vs_background"][r].get(inst, {}).get("balanced_accuracy")) for r in reps) + " |")
        for rep in [r for r in ("pretrained", "random-init") if r in q["source_vs_background_cross"]]:
            cross = q["source_vs_background_cross"][rep]
            L.append(f"\n### across instruments ({rep}): fit on row, test on column (diagonal: within)\n")
            L.append("| fit \\ test | " + " | ".join(INSTRUMENTS) + " |")
            L.append("|---|" + "---|" * len(INSTRUMENTS))
            for a in INSTRUMENTS + ("all",):
                cells = []
                for b in INSTRUMENTS:
                    v = q["source_vs_background"][rep].get(b, {}).get("balanced_accuracy") if a == b else cross.get(a, {}).get(b)
                    cells.append(fmt(v))
                L.append(f"| {a} | " + " | ".join(cells) + " |")
        L.append("\n## kNN source class, balanced accuracy (chance 1/classes)\n")
        L.append("| instrument | test counts | " + " | ".join(reps) + " |")
        L.append("|---|---|" + "---|" * len(reps))
        for inst in INSTRUMENTS:
            any_rep = next((q["class"][r][inst] for r in reps if inst in q["class"][r]), None)
            if any_rep is None:
                L.append(f"| {inst} | fewer than 2 classes in train and test | " + " | ".join("-" for _ in reps) + " |")
                continue
            counts_text = ", ".join(f"{k} {v}" for k, v in any_rep["test_counts"].items())
            L.append(f"| {inst} | {counts_text} | " + " | ".join(
                fmt(q["class"][r].get(inst, {}).get("balanced_accuracy")) for r in reps) + " |")
        for rep in [r for r in ("pretrained", "random-init") if r in q["class_cross"]]:
            cross = q["class_cross"][rep]
            pairs = [(a, b, v) for a, d in cross.items() for b, v in d.items()]
            if pairs:
                L.append(f"\nClass across instruments ({rep}, shared classes only): " +
                         "; ".join(f"{a} -> {b} {v:.3f}" for a, b, v in pairs))
    if res.get("index"):
        L.append("\n## FAISS (synthetic unit vectors: 1000-cluster Gaussian mixture, "
                 f"{res['index'][0]['dim']} dims; 200 held-out queries; {res['threads']} threads)\n")
        L.append("| N | index | parameters | build s | query ms/query | recall@10 vs exact |")
        L.append("|---|---|---|---|---|---|")
        for row in res["index"]:
            L.append(f"| {row['n']:,} | exact (flat) | - | {row['exact']['build_s']:.2f} | {row['exact']['query_ms']:.3f} | 1 |")
            for key in ("auto", "hnsw"):
                if key in row:
                    r = row[key]
                    p = ", ".join(f"{k} {r[k]}" for k in ("nlist", "nprobe", "quantizer", "hnsw_m", "ef_search") if k in r)
                    name = f"{r['kind']}" + (" (auto)" if key == "auto" else "")
                    L.append(f"| {row['n']:,} | {name} | {p} | {r['build_s']:.1f} | {r['query_ms']:.3f} | "
                             f"{r['recall_at_10']:.3f} (tuned on the set: {r['tuned_recall_at_10']}) |")
    if res.get("umap"):
        u = res["umap"]
        L.append(f"\n## UMAP\n\nWarm-up (numba compilation + {u['warmup_points']} points): {u['warmup_s']:.1f} s; "
                 f"`skyfm umap` fit of {u['points']} evaluation embeddings: {u['fit_s']:.1f} s "
                 f"(map: {u.get('png')}, explorer: {u.get('html')}, {u.get('html_mb', 0):.1f} MB).")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "runs/pretrain-tiny/model"),
                        help="pretrained FoundationModel folder (default runs/pretrain-tiny/model)")
    parser.add_argument("--random-only", action="store_true", help="no pretrained model: the random backbone only")
    parser.add_argument("--n", type=int, default=24, help="patches per instrument (default 24: 16 train, 8 test)")
    parser.add_argument("--size", type=int, default=64, help="patch side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed (patches: base 20000 + seed)")
    parser.add_argument("--max-sources", type=int, default=48, help="sources per patch at most (default 48)")
    parser.add_argument("--max-background", type=int, default=40,
                        help="background positions per patch (default 40; the evaluation uses max(4, sources))")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sizes", default="100000,1000000", help="index sizes, comma separated ('' to skip)")
    parser.add_argument("--hnsw-max", type=int, default=100_000, help="also time HNSW up to this size")
    parser.add_argument("--skip-umap", action="store_true")
    parser.add_argument("--umap-points", type=int, default=5000, help="points of the UMAP map and timing (5000)")
    parser.add_argument("--threads", type=int, default=2, help="torch / FAISS threads (default 2)")
    parser.add_argument("--out", default=str(REPO / "runs/bench-latent"), help="output folder")
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import faiss
    import torch

    import skyfm
    from skyfm.foundation.model import FoundationModel

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    res = {"command": "python benchmarks/latent.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "load_before": round(os.getloadavg()[0], 2), "seed": args.seed, "n_per_instrument": args.n,
           "size": args.size, "threads": args.threads, "seed_offset": LATENT_SEED_OFFSET}

    models = {}
    if not args.random_only:
        if not Path(args.model).is_dir():
            raise SystemExit(f"benchmarks/latent.py: no model at {args.model} (pass --model DIR or --random-only)")
        models["pretrained"] = FoundationModel.from_pretrained(args.model)
        res["model"] = str(args.model)
        name = models["pretrained"].config.name
    else:
        res["model"] = "(none: --random-only)"
        name = "skyfm-tiny"
    torch.manual_seed(args.seed)
    models["random-init"] = skyfm.create_model(name).eval()

    print(f"simulating {args.n} patches x {len(INSTRUMENTS)} instruments ...", flush=True)
    t0 = time.perf_counter()
    items = simulate(args.n, args.size, args.seed, args.max_sources, args.max_background)
    res["simulate_s"] = round(time.perf_counter() - t0, 1)
    reps, data = {}, None
    for label, model in models.items():
        t0 = time.perf_counter()
        d = collect(model, items, args.batch_size, with_pixels=data is None, with_thumbs=data is None)
        print(f"  embedded with {label}: {len(d['vec'])} positions in {time.perf_counter() - t0:.1f} s", flush=True)
        if data is None:
            data = d
            reps["pixels"] = d["pix"]
        dim_tok = model.embed_dim
        v = d["vec"]
        reps[label] = v
        if label == "pretrained":
            reps["pretrained token block"] = v[:, :dim_tok]
            reps["pretrained dense block"] = v[:, dim_tok:]
            data["thumb"] = d["thumb"]
            data["vec_pretrained"] = v
    order = [r for r in ("pretrained", "pretrained token block", "pretrained dense block", "random-init", "pixels") if r in reps]
    reps = {r: reps[r] for r in order}
    counts = {}
    for inst in INSTRUMENTS:
        te = (data["split"] == "test") & (data["instrument"] == inst) & data["eval"]
        counts[inst] = {"test_sources": int((te & (data["is_source"] == 1)).sum()),
                        "test_background": int((te & (data["is_source"] == 0)).sum()),
                        "train_positions": int(((data["split"] == "train") & (data["instrument"] == inst)
                                                & data["eval"]).sum())}
    res["counts"] = counts
    t0 = time.perf_counter()
    keep = data["eval"]
    res["knn"] = evaluate({k: (v[keep] if isinstance(v, np.ndarray) and len(v) == len(keep) else v)
                           for k, v in data.items()}, {r: x[keep] for r, x in reps.items()})
    res["positions"] = {"evaluated": int(keep.sum()), "map_only_background": int((~keep).sum())}
    res["knn_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res["knn"]["source_vs_background"], indent=None)[:2000], flush=True)

    # the evaluation embeddings as a skyfm embeddings file, and their map
    from skyfm.latent.embed import make_table, write_embeddings

    main_vec = data.get("vec_pretrained", reps["random-init"])
    cols = {"kind": ["source" if s else "background" for s in data["is_source"]], "file": list(data["patch"]),
            "instrument": list(data["instrument"]), "x": data["x"], "y": data["y"],
            "class": [c if c else None for c in data["cls"]], "snr": data["snr"], "flux": data["flux"],
            "origin": ["truth" if s else "background" for s in data["is_source"]],
            "thumbnail": list(data["thumb"]) if len(data["thumb"]) else None}
    emb_path = write_embeddings(make_table(cols, main_vec, {"model": res["model"], "benchmark": "benchmarks/latent.py"}),
                                out / "embeddings.parquet")
    res["embeddings"] = str(emb_path)

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if sizes:
        dim = int(main_vec.shape[1])
        print(f"FAISS at {sizes} synthetic vectors of {dim} dims ...", flush=True)
        res["index"] = time_indexes(sizes, dim, args.seed, args.hnsw_max)

    if not args.skip_umap:
        from skyfm.latent.explore import fit_umap, umap_command

        t0 = time.perf_counter()
        fit_umap(main_vec[:300], seed=args.seed)
        warm = time.perf_counter() - t0
        summary = umap_command(emb_path, out / "map.png", html=out / "map.html", color_by="instrument",
                               max_points=args.umap_points, seed=args.seed)
        res["umap"] = {"warmup_s": round(warm, 1), "warmup_points": 300, "points": summary["points"],
                       "fit_s": summary["fit_seconds"], "png": summary["png"], "html": summary.get("html"),
                       "html_mb": summary.get("html_bytes", 0) / 1e6}
        print(f"UMAP: {res['umap']}", flush=True)

    res["load_after"] = round(os.getloadavg()[0], 2)
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    (out / "latent.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    text = markdown(res)
    (out / "latent.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
