"""``skyfm search``: the nearest neighbours of a query in an index folder, printed and drawn as a thumbnail grid.

A query is a row of the index (``row_id``, itself left out of its neighbours), or a file: an embeddings Parquet
(every row a query), a ``.npy`` array of vectors ((D,) or (n, D)), or a FITS image, embedded on the fly with the
index's model (or ``model_dir``) into one patch vector per tile.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from skyfm.errors import SkyfmError

GRID_MAX_QUERIES = 8


def row_label(meta: dict) -> str:
    """A short text for a metadata row: kind, instrument, position, class."""
    parts = [str(meta.get("kind") or "vector"), str(meta.get("instrument") or "")]
    if meta.get("x") is not None and meta.get("y") is not None:
        parts.append(f"({meta['x']:.0f},{meta['y']:.0f})")
    if meta.get("class"):
        parts.append(str(meta["class"]))
    return " ".join(p for p in parts if p)


def _rows(index, ids) -> list[dict]:
    """Metadata dicts of rows ``ids`` of an index, with their thumbnails."""
    table = index.metadata
    cols = [c for c in ("id", "kind", "file", "instrument", "x", "y", "class", "flux", "snr") if c in table.column_names]
    rows = table.select(cols).take(np.asarray(ids, dtype=np.int64)).to_pylist()
    for row, thumb in zip(rows, index.thumbnails(ids)):
        row["thumbnail"] = thumb
    return rows


def _filters(index, instrument: str | None, kind: str | None) -> np.ndarray | None:
    meta = index.metadata
    allowed = None
    for flag, column in ((instrument, "instrument"), (kind, "kind")):
        if flag is not None and column not in meta.column_names:
            raise SkyfmError(f"{index.directory} has no {column!r} column to filter on")
    if instrument is not None:
        names = np.asarray([str(v).lower() for v in meta.column("instrument").to_pylist()])
        wanted = instrument.lower()
        try:
            from skyfm.instruments import load_instrument

            wanted = load_instrument(instrument).name.lower()
        except SkyfmError:
            pass
        allowed = names == wanted
        if not allowed.any():
            raise SkyfmError(f"no vector of instrument {instrument!r} in {index.directory}; it holds "
                             f"{', '.join(sorted(set(names.tolist())))}")
    if kind is not None:
        kinds = np.asarray([str(v) for v in meta.column("kind").to_pylist()])
        mask = kinds == kind
        if not mask.any():
            raise SkyfmError(f"no {kind} vectors in {index.directory}")
        allowed = mask if allowed is None else allowed & mask
    return allowed


def _query_vectors(index, query: str | Path, model_dir) -> tuple[np.ndarray, list[dict]]:
    """(vectors (n, D), metadata dicts) of a query file."""
    path = Path(query)
    if not path.exists():
        raise SkyfmError(f"query file not found: {path}")
    name = path.name.lower()
    if name.endswith(".npy"):
        try:
            q = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise SkyfmError(f"{path} is not a NumPy array file ({e})") from None
        q = np.atleast_2d(np.asarray(q, dtype=np.float32))
        if q.ndim != 2:
            raise SkyfmError(f"{path} holds an array of shape {q.shape}; a query is (D,) or (n, D)")
        return q, [{"kind": "vector", "label": f"{path.name}[{i}]"} for i in range(len(q))]
    if name.endswith(".parquet"):
        from skyfm.latent.embed import read_embeddings

        meta, q, _ = read_embeddings(path)
        return q, meta.to_pylist()
    # a FITS image: embed its tiles with the index's model
    from skyfm.latent.embed import DEFAULT_OVERLAP, DEFAULT_TILE, Embedder, load_embedding_model

    model_dir = model_dir or index.params.get("model") or None
    if model_dir and " (detector backbone)" in str(model_dir):
        model_dir = str(model_dir).replace(" (detector backbone)", "")
    if model_dir == "default detector backbone":
        model_dir = None
    if model_dir and not Path(model_dir).exists():
        raise SkyfmError(f"the index was built from embeddings of {model_dir}, which no longer exists: pass "
                         "--model DIR to embed the query")
    model, _, _ = load_embedding_model(model_dir)
    emb_meta = index.params.get("embedding_meta", {})
    embedder = Embedder(model, tile=int(emb_meta.get("tile", DEFAULT_TILE)),
                        overlap=int(emb_meta.get("overlap", DEFAULT_OVERLAP)), with_sources=False)
    table = embedder.embed_files([path])
    from skyfm.latent.embed import vectors_of

    q = vectors_of(table.column("embedding"), str(path))
    return q, table.drop_columns(["embedding"]).to_pylist()


def search_command(index_dir, *, query=None, row_id: int | None = None, k: int = 10, instrument: str | None = None,
                   kind: str | None = None, grid=None, model_dir=None, max_queries: int = 5) -> tuple[list[str], list[dict]]:
    """What ``skyfm search`` does: (printed lines, results). Results: per query, ``query`` (metadata dict) and
    ``neighbours`` (metadata dicts with ``distance``)."""
    from skyfm.latent.index import load_index_dir
    from skyfm.latent.thumbs import save_neighbour_grid

    if (query is None) == (row_id is None):
        raise SkyfmError("give exactly one of --query FILE and --id N")
    if k < 1:
        raise SkyfmError(f"-k must be at least 1, got {k}")
    index = load_index_dir(index_dir)
    allowed = _filters(index, instrument, kind)
    exclude = None
    if row_id is not None:
        n = index.metadata.num_rows
        if not 0 <= row_id < n:
            raise SkyfmError(f"--id {row_id} is not a row of the index (0 to {n - 1})")
        q = np.asarray(index.vectors[row_id:row_id + 1], dtype=np.float32)
        qmeta = _rows(index, [row_id])
        exclude = [row_id]
    else:
        q, qmeta = _query_vectors(index, query, model_dir)
        q, qmeta = q[:max_queries], qmeta[:max_queries]
    distances, ids = index.search(q, k, allowed=allowed, exclude=exclude)
    metric = index.params["metric"]
    dname = "cos dist" if metric == "cosine" else "L2 dist"
    lines = [f"index {index.directory}: {index.params['n']} vectors, {index.params['kind']} ({metric}), "
             f"{index.params['dim']} dims" + (f"; filters: {_describe(instrument, kind)}" if allowed is not None else "")]
    results = []
    for qi in range(len(q)):
        qm = dict(qmeta[qi]) if qi < len(qmeta) else {}
        valid = ids[qi] >= 0
        neigh = _rows(index, ids[qi][valid])
        for m, d in zip(neigh, distances[qi][valid]):
            m["distance"] = float(d)
        results.append({"query": qm, "neighbours": neigh})
        label = qm.get("label") or row_label(qm)
        where = f" in {qm['file']}" if qm.get("file") else ""
        lines.append("")
        lines.append(f"query {qi + 1}: {label}{where}" + (f" (row {row_id})" if row_id is not None else ""))
        lines.append(f"  {'rank':>4} {'id':>7} {dname:>9}  {'kind':<6} {'instrument':<10} {'x':>7} {'y':>7} "
                     f"{'class':<8} {'flux':>10}  file")
        for r, m in enumerate(neigh, 1):
            flux = m.get("flux")
            flux_text = f"{flux:10.4g}" if flux is not None and math.isfinite(flux) else f"{'-':>10}"
            lines.append(f"  {r:>4} {m['id']:>7} {m['distance']:9.4f}  {str(m.get('kind') or ''):<6} "
                         f"{str(m.get('instrument') or ''):<10} {_num(m.get('x'))} {_num(m.get('y'))} "
                         f"{str(m.get('class') or '-'):<8} {flux_text}  {m.get('file') or ''}")
        if not neigh:
            lines.append("  (no neighbours)")
    if grid is not None:
        rows = []
        for res in results[:GRID_MAX_QUERIES]:
            qm = res["query"]
            rows.append({"query": {"thumbnail": qm.get("thumbnail"), "label": "query\n" + (qm.get("label") or row_label(qm))},
                         "neighbours": [{"thumbnail": m.get("thumbnail"),
                                         "label": f"{m['distance']:.4f}\n{row_label(m)}"} for m in res["neighbours"]]})
        save_neighbour_grid(rows, grid, title=f"skyfm search: {k} nearest ({dname})")
        lines.append("")
        lines.append(f"thumbnail grid: {grid}")
    return lines, results


def _num(v) -> str:
    return f"{v:7.1f}" if v is not None and math.isfinite(v) else f"{'-':>7}"


def _describe(instrument, kind) -> str:
    return ", ".join(x for x in (f"instrument {instrument}" if instrument else "", f"kind {kind}" if kind else "") if x)


__all__ = ["row_label", "search_command"]
