"""FAISS indexes over embeddings: exact for small sets, approximate (IVF, IVF-PQ, HNSW) for large ones.

Metric
------
``cosine`` (the default): vectors are scaled to unit length and indexed with L2, so that
``cosine distance = 1 - cos = ||a - b||^2 / 2`` exactly, and every FAISS index type (all of which support L2
best) ranks neighbours by cosine similarity. skyfm embeddings are unit vectors already (see
:mod:`skyfm.latent.embed`); normalising also makes vectors from other tools comparable however bright their
patch was. ``l2``: raw vectors, Euclidean distance (reported as the distance, not its square).

Which index, by the number of vectors N (``kind="auto"``)
---------------------------------------------------------
* N <= 20 000: ``flat`` (IndexFlatL2), exact; a query costs N x D multiply-adds (well under a millisecond here).
* N <= 5 000 000: ``ivf`` (IndexIVFFlat): ``nlist = 4 sqrt(N)`` k-means cells (at most N / 39, so that every cell
  trains on at least 39 points; k-means on at most 64 points per cell, 10 iterations) and ``nprobe`` tuned.
  From ``nlist >= 2048`` (N >= 262 144) the cells are found through an HNSW graph over their centroids (FAISS's
  "IVF4000_HNSW32"), in k-means too, which trains on 32 points per cell: assigning a million vectors to 4000 cells
  by brute force would cost more than the rest of the build.
* larger: ``ivfpq`` (IndexIVFPQ): the same cells, vectors compressed to ``m`` bytes (``m`` the largest divisor of
  D up to D / 4, 8-bit codes): ~16x less memory than float32, at some recall.
* ``hnsw`` (IndexHNSWFlat, M = 32, efConstruction = 80) on request (``--kind hnsw``): fast queries, slow builds.

The search parameter of an approximate index (``nprobe``, or HNSW's ``efSearch``) is tuned when the index is built:
the smallest value in 1, 2, 4, ... whose recall@10 against exact search on 256 vectors drawn from the set (128
above 200k vectors; each query's own row left out) reaches ``target_recall`` (0.95). The measured recall is saved with it.

An index folder holds ``index.faiss`` (``faiss.write_index``: FAISS's own format, not a pickle),
``index.json`` (kind, metric, dimension, N, the parameters and their measured recall, the embeddings file and its
model), ``metadata.parquet`` (the embeddings' metadata and thumbnails, row ``i`` = FAISS id ``i``; copied batch
by batch, and at search time thumbnails are read for the result rows only) and
``vectors.npy`` (the normalised float32 vectors: ``--id`` queries and exact filtered search read them).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from skyfm.errors import SkyfmError

INDEX_FILE = "index.faiss"
PARAMS_FILE = "index.json"
META_FILE = "metadata.parquet"
VECTORS_FILE = "vectors.npy"

FLAT_MAX = 20_000
IVF_MAX = 5_000_000
KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")
METRICS = ("cosine", "l2")
TUNE_QUERIES = 256
TUNE_QUERIES_LARGE = 128  # above 200k vectors: the exact search that grades the tuning costs N x D per query
HNSW_QUANTIZER_NLIST = 2048
TUNE_K = 10
EXACT_FILTER_MAX = 200_000  # a filtered search over at most this many allowed vectors is done exactly


def _faiss():
    import faiss

    return faiss


def prepare_vectors(vectors: np.ndarray, metric: str) -> np.ndarray:
    """float32 C-contiguous vectors, unit length for ``cosine``."""
    if metric not in METRICS:
        raise SkyfmError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise SkyfmError(f"expected a non-empty (N, D) array of vectors, got shape {x.shape}")
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if (norms == 0).any():
            raise SkyfmError(f"{int((norms == 0).sum())} vectors are all zeros: they have no direction (cosine)")
        x = np.ascontiguousarray(x / norms, dtype=np.float32)
    return x


def choose_params(n: int, dim: int, kind: str = "auto", metric: str = "cosine") -> dict:
    """The index kind and its build parameters for ``n`` vectors of ``dim`` dimensions (see the module docstring)."""
    if kind not in KINDS:
        raise SkyfmError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if n < 1:
        raise SkyfmError("cannot index an empty set of vectors")
    if kind == "auto":
        kind = "flat" if n <= FLAT_MAX else "ivf" if n <= IVF_MAX else "ivfpq"
    params: dict = {"kind": kind, "metric": metric, "dim": int(dim), "n": int(n)}
    if kind in ("ivf", "ivfpq"):
        nlist = int(max(1, min(round(4 * math.sqrt(n)), n // 39)))
        hnsw_quantizer = nlist >= HNSW_QUANTIZER_NLIST
        params.update(nlist=nlist, quantizer="hnsw32" if hnsw_quantizer else "flat",
                      train_points=int(min(n, (32 if hnsw_quantizer else 64) * nlist)), kmeans_iter=10)
        if kind == "ivfpq":
            divisors = [m for m in range(1, dim // 4 + 1) if dim % m == 0]
            params.update(pq_m=int(max(divisors)), pq_bits=8 if n >= 256 * 39 else 4)
    elif kind == "hnsw":
        params.update(hnsw_m=32, ef_construction=80)
    return params


def build_index(vectors: np.ndarray, params: dict, target_recall: float = 0.95, seed: int = 0,
                progress=None) -> tuple[object, dict]:
    """A trained, filled FAISS index over prepared ``vectors`` (:func:`prepare_vectors`), and ``params`` with the
    tuned search parameter, its recall@10 and the build time."""
    faiss = _faiss()
    n, dim = vectors.shape
    kind = params["kind"]
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    if kind == "flat":
        index = faiss.IndexFlatL2(dim)
    elif kind in ("ivf", "ivfpq"):
        hnsw_quantizer = params.get("quantizer") == "hnsw32"
        quantizer = faiss.IndexHNSWFlat(dim, 32) if hnsw_quantizer else faiss.IndexFlatL2(dim)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_L2)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["pq_m"], params["pq_bits"])
        index.cp.niter = params["kmeans_iter"]
        index.cp.seed = seed
        index.cp.max_points_per_centroid = params["train_points"] // params["nlist"] or 1
        if hnsw_quantizer:
            clustering_index = faiss.IndexHNSWFlat(dim, 32)
            index.clustering_index = clustering_index  # approximate assignment in k-means
            index.referenced_objects = [*getattr(index, "referenced_objects", []), clustering_index]  # keep it alive
        index.cp.min_points_per_centroid = 1  # the N / 39 cap keeps the cells trainable; no warnings
        sample = vectors if params["train_points"] >= n else vectors[np.sort(rng.choice(n, params["train_points"], replace=False))]
        index.train(sample)  # (FAISS's Python wrapper keeps the quantizer alive with the index)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["hnsw_m"], faiss.METRIC_L2)
        index.hnsw.efConstruction = params["ef_construction"]
    else:
        raise SkyfmError(f"unknown index kind {kind!r}")
    chunk = 200_000
    for start in range(0, n, chunk):
        index.add(vectors[start:start + chunk])
        if progress is not None:
            progress(min(start + chunk, n), n)
    params = dict(params, build_seconds=round(time.perf_counter() - t0, 3))
    if kind != "flat":
        params.update(tune_search(index, vectors, params, target_recall, rng))
    else:
        params.update(recall_at_10=1.0)
    return index, params


def _set_search_param(index, kind: str, value: int) -> None:
    faiss = _faiss()
    if kind in ("ivf", "ivfpq"):
        index.nprobe = int(value)
        quantizer = faiss.downcast_index(index.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efSearch = max(64, 2 * int(value))
    elif kind == "hnsw":
        index.hnsw.efSearch = int(value)


def search_param_name(kind: str) -> str | None:
    return {"ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "ef_search"}.get(kind)


def exact_knn(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared-L2 neighbours (FAISS brute force, no index copy)."""
    faiss = _faiss()
    return faiss.knn(np.ascontiguousarray(queries, np.float32), vectors, int(min(k, len(vectors))))


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` ids found in the same row of ``found``."""
    hits = [len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) / max(1, (t >= 0).sum()) for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 1.0


def tune_search(index, vectors: np.ndarray, params: dict, target_recall: float, rng) -> dict:
    """Smallest nprobe / efSearch (1, 2, 4, ...) reaching ``target_recall`` recall@10 on vectors of the set."""
    n = len(vectors)
    kind = params["kind"]
    k = min(TUNE_K, n - 1)
    if k < 1:
        _set_search_param(index, kind, 1 if kind != "hnsw" else 16)
        return {search_param_name(kind): 1 if kind != "hnsw" else 16, "recall_at_10": 1.0}
    rows = np.sort(rng.choice(n, min(TUNE_QUERIES if n <= 200_000 else TUNE_QUERIES_LARGE, n), replace=False))
    queries = vectors[rows]
    _, truth = exact_knn(queries, vectors, k + 1)
    truth = _drop_self(truth, rows, k)
    limit = params.get("nlist", 1024) if kind != "hnsw" else 2048
    value, best = 1 if kind != "hnsw" else 16, None
    while True:
        _set_search_param(index, kind, value)
        _, found = index.search(queries, k + 1)
        recall = recall_at_k(_drop_self(found, rows, k), truth)
        best = (value, recall)
        if recall >= target_recall or value >= limit:
            break
        value = min(value * 2, limit)
    value, recall = best
    _set_search_param(index, kind, value)
    return {search_param_name(kind): int(value), "recall_at_10": round(recall, 4), "target_recall": target_recall}


def _drop_self(ids: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for i, (row, r) in enumerate(zip(ids, rows)):
        kept = row[(row != r)][:k]
        out[i, :len(kept)] = kept
    return out


# ============================================================================================ index folders
@dataclass
class LoadedIndex:
    """An index folder read back: the FAISS index, its parameters, the metadata table and the vectors."""

    index: object
    params: dict
    metadata: object  # pyarrow Table, row i = FAISS id i (without the thumbnails: see thumbnails())
    vectors: np.ndarray  # (N, D) float32, memory-mapped
    directory: Path

    @property
    def dim(self) -> int:
        return int(self.params["dim"])

    def thumbnails(self, ids) -> list[bytes | None]:
        """PNG thumbnails of rows ``ids``, read from only the row groups that hold them."""
        import pyarrow.parquet as pq

        ids = [int(i) for i in ids]
        pf = pq.ParquetFile(self.directory / META_FILE)
        if "thumbnail" not in pf.schema_arrow.names or not ids:
            return [None] * len(ids)
        starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        groups = sorted({int(np.searchsorted(starts, i, side="right") - 1) for i in ids})
        found = {}
        for g in groups:
            col = pf.read_row_group(g, columns=["thumbnail"]).column("thumbnail").to_pylist()
            for i in ids:
                if starts[g] <= i < starts[g + 1]:
                    found[i] = col[i - starts[g]]
        return [found.get(i) for i in ids]

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               exclude: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids) of the ``k`` nearest rows to each query, ids -1 where fewer exist.

        ``allowed``: bool mask over rows (instrument / kind filters). ``exclude``: one row id per query to leave
        out (the query itself, for ``--id``). Distances: cosine distance (1 - cos) or L2 (see the module docstring).
        """
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.shape[1] != self.dim:
            raise SkyfmError(f"the query vectors have {q.shape[1]} dimensions but the index {self.directory} has "
                             f"{self.dim}: embed the query with the same model ({self.params.get('model') or '?'})")
        q = prepare_vectors(q, self.params["metric"])
        extra = 1 if exclude is not None else 0
        kk = int(k) + extra
        if allowed is not None:
            allowed_ids = np.flatnonzero(allowed)
            if allowed_ids.size == 0:
                raise SkyfmError("no indexed vector passes the filters (--instrument / --kind)")
            if allowed_ids.size <= EXACT_FILTER_MAX:
                d2, local = exact_knn(q, np.ascontiguousarray(self.vectors[allowed_ids]), kk)
                ids = np.where(local >= 0, allowed_ids[np.clip(local, 0, None)], -1)
            else:
                faiss = _faiss()
                sel = faiss.IDSelectorBatch(allowed_ids.astype(np.int64))
                d2, ids = self.index.search(q, kk, params=self._search_params(sel))
        else:
            d2, ids = self.index.search(q, min(kk, self.index.ntotal))
        if exclude is not None:
            d2, ids = _exclude(d2, ids, np.asarray(exclude), int(k))
        return self._distances(d2), ids

    def _search_params(self, sel):
        faiss = _faiss()
        kind = self.params["kind"]
        if kind in ("ivf", "ivfpq"):
            return faiss.SearchParametersIVF(sel=sel, nprobe=int(self.params["nprobe"]))
        if kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=sel, efSearch=int(self.params["ef_search"]))
        return faiss.SearchParameters(sel=sel)

    def _distances(self, d2: np.ndarray) -> np.ndarray:
        d2 = np.where(np.isfinite(d2) & (d2 < 1e37), np.maximum(d2, 0.0), np.nan)
        return d2 / 2.0 if self.params["metric"] == "cosine" else np.sqrt(d2)


def _exclude(d2: np.ndarray, ids: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    out_d = np.full((len(ids), k), np.nan, dtype=np.float32)
    out_i = np.full((len(ids), k), -1, dtype=np.int64)
    for r in range(len(ids)):
        keep = (ids[r] != exclude[r]) & (ids[r] >= 0)
        n = min(k, int(keep.sum()))
        out_d[r, :n], out_i[r, :n] = d2[r][keep][:n], ids[r][keep][:n]
    return out_d, out_i


def build_index_dir(embeddings: str | Path, out_dir: str | Path, kind: str = "auto", metric: str = "cosine",
                    target_recall: float = 0.95, seed: int = 0, progress: bool = False) -> tuple[Path, dict]:
    """What ``skyfm index`` does: read an embeddings Parquet, build the index, write the folder. (folder, params)."""
    from skyfm.latent.embed import read_embeddings

    if not 0 < target_recall <= 1:
        raise SkyfmError(f"--target-recall must be in (0, 1], got {target_recall}")
    _, vectors, meta = read_embeddings(embeddings, columns=[])  # the vectors only; metadata is streamed below
    x = prepare_vectors(vectors, metric)
    del vectors
    params = choose_params(len(x), x.shape[1], kind, metric)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(x), desc=f"indexing ({params['kind']})", unit="vector", disable=len(x) < 50_000)
    def report(done, total):
        if bar is not None:
            bar.n = done
            bar.refresh()
    index, params = build_index(x, params, target_recall=target_recall, seed=seed, progress=report)
    if bar is not None:
        bar.close()
    params.update(embeddings=str(Path(embeddings).resolve()), model=meta.get("model", ""),
                  model_name=meta.get("model_name", ""), embedding_meta=meta, faiss_version=_faiss().__version__)
    out = Path(out_dir)
    _write_index_folder(out, index, x, Path(embeddings), params)
    return out, params


def _copy_metadata(embeddings: Path, dest: Path) -> None:
    """Every column of an embeddings file but the vectors, batch by batch (thumbnails of millions of rows never sit
    in memory at once)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(embeddings)
    columns = [c for c in pf.schema_arrow.names if c != "embedding"]
    schema = pf.schema_arrow
    schema = schema.remove(schema.get_field_index("embedding"))
    with pq.ParquetWriter(dest, schema, compression="zstd") as writer:
        for batch in pf.iter_batches(batch_size=65_536, columns=columns):
            writer.write_batch(batch)


def _write_index_folder(out: Path, index, vectors: np.ndarray, embeddings: Path, params: dict) -> None:
    """Write the four files into a temporary folder beside ``out``, then swap it into place (all or nothing)."""
    import shutil
    import tempfile

    import pyarrow.parquet as pq

    faiss = _faiss()
    if out.exists() and not out.is_dir():
        raise SkyfmError(f"--out {out} is a file; give a folder for the index")
    if out.is_dir() and any(out.iterdir()) and not (out / PARAMS_FILE).is_file():
        raise SkyfmError(f"--out {out} is a folder that is not a skyfm index and not empty; give a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        np.save(tmp / VECTORS_FILE, vectors)
        _copy_metadata(embeddings, tmp / META_FILE)
        (tmp / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")
        tmp.chmod(0o755)
        old = None
        if out.exists():
            old = out.parent / f"{tmp.name}.old"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_index_dir(directory: str | Path) -> LoadedIndex:
    """Read an index folder written by :func:`build_index_dir`; one-line SkyfmError when it is not one."""
    import pyarrow.parquet as pq

    directory = Path(directory)
    if not directory.is_dir():
        raise SkyfmError(f"index folder not found: {directory} (make one with `skyfm index EMBEDDINGS --out DIR`)")
    for name in (PARAMS_FILE, INDEX_FILE, META_FILE, VECTORS_FILE):
        if not (directory / name).is_file():
            raise SkyfmError(f"{directory} is not a complete skyfm index: {name} is missing")
    try:
        params = json.loads((directory / PARAMS_FILE).read_text())
    except json.JSONDecodeError as e:
        raise SkyfmError(f"{directory / PARAMS_FILE} is not valid JSON ({e})") from None
    faiss = _faiss()
    try:
        index = faiss.read_index(str(directory / INDEX_FILE))
    except RuntimeError as e:
        raise SkyfmError(f"{directory / INDEX_FILE} is not a readable FAISS index ({str(e).splitlines()[0]})") from None
    kind = params.get("kind")
    if search_param_name(kind) is not None and search_param_name(kind) in params:
        _set_search_param(index, kind, params[search_param_name(kind)])
    vectors = np.load(directory / VECTORS_FILE, mmap_mode="r")
    try:
        meta_file = pq.ParquetFile(directory / META_FILE)
        names = [c for c in meta_file.schema_arrow.names if c != "thumbnail"]
        metadata = meta_file.read(columns=names)  # thumbnails are read per result row (LoadedIndex.thumbnails)
    except (OSError, ValueError) as e:
        raise SkyfmError(f"{directory / META_FILE} is not readable ({str(e).splitlines()[0]})") from None
    if not (index.ntotal == len(vectors) == metadata.num_rows == params.get("n")):
        raise SkyfmError(f"{directory} is inconsistent: {index.ntotal} indexed vectors, {len(vectors)} stored, "
                         f"{metadata.num_rows} metadata rows")
    return LoadedIndex(index=index, params=params, metadata=metadata, vectors=vectors, directory=directory)


__all__ = ["INDEX_FILE", "KINDS", "LoadedIndex", "META_FILE", "METRICS", "PARAMS_FILE", "VECTORS_FILE",
           "build_index", "build_index_dir", "choose_params", "exact_knn", "load_index_dir", "prepare_vectors",
           "recall_at_k", "tune_search"]
