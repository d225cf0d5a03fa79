"""UMAP maps of embeddings: a static PNG and a self-contained interactive HTML explorer.

:func:`umap_command` (``skyfm umap``) fits a 2-D UMAP (umap-learn) of the embeddings (unit vectors, Euclidean,
which ranks neighbours as cosine does), colours the points by ``instrument``, ``class``, ``kind``, ``origin``,
``file`` (categories) or ``flux``, ``snr`` (log10, a colour bar), and writes

* a PNG (matplotlib), and
* optionally an HTML page that opens from disk in any browser, with no server and nothing fetched: the points,
  their metadata, their PNG thumbnails (base64) and their precomputed nearest neighbours in the embedding space
  (cosine, exact, among the plotted points) are all inside the page, drawn by inline JavaScript on a canvas.
  Hover shows a point's thumbnail and metadata; click lists its nearest neighbours (with thumbnails and
  distances) and rings them on the map; the wheel zooms, dragging pans. The page writes its state into
  ``<div id="status">`` (``ready: N points ...``); opened as ``map.html#selftest`` it also hovers and clicks its
  first point by itself and reports what it showed there, which is how the tests check it in headless Chromium.

Large sets are subsampled to ``max_points`` (seeded; the page and the PNG say so): UMAP on 5 000 points takes a
few seconds here, plus 10-30 s the first time in a process while numba compiles it.
"""

from __future__ import annotations

import base64
import html as html_lib
import json
import math
from pathlib import Path

import numpy as np

from skyfm.errors import SkyfmError

CATEGORICAL = ("instrument", "class", "kind", "origin", "file", "bands")
NUMERIC = ("flux", "snr", "score")
COLOR_BY = CATEGORICAL + NUMERIC
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
           "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5"]
UNKNOWN_COLOR = "#9a9a9a"
META_FIELDS = ("id", "kind", "file", "tile", "instrument", "bands", "x", "y", "ra", "dec", "glon", "glat", "class",
               "flux", "snr", "score", "origin", "n_sources")


def fit_umap(vectors: np.ndarray, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0) -> np.ndarray:
    """(N, 2) UMAP coordinates of unit-normalised ``vectors`` (seeded: the same input gives the same map)."""
    import warnings

    n = len(vectors)
    if n < 5:
        raise SkyfmError(f"a UMAP map needs at least 5 vectors, got {n}")
    x = np.asarray(vectors, dtype=np.float32)
    x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # umap warns that a seed disables parallelism; numba's warnings
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=int(min(n_neighbors, n - 1)), min_dist=min_dist,
                            metric="euclidean", random_state=seed, init="spectral" if n >= 100 else "random",
                            n_jobs=1)
        return np.asarray(reducer.fit_transform(x), dtype=np.float32)


def neighbours(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine kNN among ``vectors`` themselves, each point's own row left out: (ids (N, k), distances)."""
    from skyfm.latent.index import exact_knn, prepare_vectors

    x = prepare_vectors(vectors, "cosine")
    k = int(min(k, len(x) - 1))
    if k < 1:
        return np.zeros((len(x), 0), dtype=np.int64), np.zeros((len(x), 0), dtype=np.float32)
    d2, ids = exact_knn(x, x, k + 1)
    out_i = np.zeros((len(x), k), dtype=np.int64)
    out_d = np.zeros((len(x), k), dtype=np.float32)
    for r in range(len(x)):
        keep = ids[r] != r
        out_i[r] = ids[r][keep][:k]
        out_d[r] = d2[r][keep][:k] / 2.0
    return out_i, out_d


def _colours(table, color_by: str) -> dict:
    """Point colours (hex) and the legend / colour bar for ``color_by``."""
    import matplotlib

    if color_by not in COLOR_BY:
        raise SkyfmError(f"--color-by must be one of {', '.join(COLOR_BY)}, got {color_by!r}")
    if color_by not in table.column_names:
        raise SkyfmError(f"the embeddings have no {color_by!r} column")
    values = table.column(color_by).to_pylist()
    if color_by in CATEGORICAL:
        labels = ["unknown" if v is None or str(v) == "" else str(v) for v in values]
        counts: dict[str, int] = {}
        for lab in labels:
            counts[lab] = counts.get(lab, 0) + 1
        order = sorted((lab for lab in counts if lab != "unknown"), key=lambda s: (-counts[s], s))
        if len(order) > len(PALETTE):
            order, rest = order[:len(PALETTE) - 1], order[len(PALETTE) - 1:]
            labels = ["other" if lab in rest else lab for lab in labels]
            counts["other"] = sum(counts[r] for r in rest)
            order.append("other")
        cmap = {lab: PALETTE[i] for i, lab in enumerate(order)}
        cmap["unknown"] = UNKNOWN_COLOR
        legend = [[lab, cmap[lab], counts[lab]] for lab in order + (["unknown"] if "unknown" in counts else [])]
        return {"colors": [cmap[lab] for lab in labels], "legend": legend, "numeric": None, "labels": labels}
    v = np.asarray([np.nan if x is None else float(x) for x in values], dtype=float)
    ok = np.isfinite(v) & (v > 0)
    if not ok.any():
        raise SkyfmError(f"no row has a positive {color_by}: colour by instrument or class instead")
    logv = np.full_like(v, np.nan)
    logv[ok] = np.log10(v[ok])
    lo, hi = np.percentile(logv[ok], [2, 98])
    hi = hi if hi > lo else lo + 1
    cm = matplotlib.colormaps["viridis"]
    colors = [matplotlib.colors.to_hex(cm(float(np.clip((lv - lo) / (hi - lo), 0, 1)))) if np.isfinite(lv)
              else UNKNOWN_COLOR for lv in logv]
    stops = [matplotlib.colors.to_hex(cm(t)) for t in np.linspace(0, 1, 9)]
    return {"colors": colors, "legend": None, "labels": None,
            "numeric": {"label": f"log10 {color_by}", "lo": float(lo), "hi": float(hi), "stops": stops,
                        "missing": int((~ok).sum())}, "values": logv}


def save_map_png(xy: np.ndarray, colours: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap, Normalize
    from matplotlib.lines import Line2D

    from skyfm.plotting import save_figure

    fig, ax = plt.subplots(figsize=(7.5, 6.2))
    size = float(np.clip(3000 / max(len(xy), 1), 2, 30))
    cols = np.asarray(colours["colors"])
    order = np.argsort(cols == UNKNOWN_COLOR, kind="stable")[::-1]  # unknown first, underneath
    ax.scatter(xy[order, 0], xy[order, 1], c=cols[order], s=size, linewidths=0, alpha=0.85)
    if colours["legend"]:
        handles = [Line2D([], [], marker="o", ls="", color=c, label=f"{lab} ({n})") for lab, c, n in colours["legend"]]
        ax.legend(handles=handles, fontsize=7, loc="best", frameon=True, markerscale=1.2)
    elif colours["numeric"]:
        num = colours["numeric"]
        cmap = LinearSegmentedColormap.from_list("stops", num["stops"])
        sm = plt.cm.ScalarMappable(norm=Normalize(num["lo"], num["hi"]), cmap=cmap)
        fig.colorbar(sm, ax=ax, label=num["label"] + (f" (grey: {num['missing']} unknown)" if num["missing"] else ""))
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return save_figure(fig, path, dpi=130)


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, float):
        return round(v, 6)
    return v


def explorer_html(xy: np.ndarray, table, colours: dict, knn_ids: np.ndarray, knn_dist: np.ndarray, title: str,
                  note: str) -> str:
    """The self-contained HTML explorer page (see the module docstring)."""
    meta = {f: [_clean(v) for v in table.column(f).to_pylist()] for f in META_FIELDS if f in table.column_names}
    thumbs = []
    if "thumbnail" in table.column_names:
        for t in table.column("thumbnail").to_pylist():
            thumbs.append(base64.b64encode(t).decode("ascii") if t else "")
    data = {
        "title": title, "note": note, "n": int(len(xy)),
        "x": [round(float(v), 4) for v in xy[:, 0]], "y": [round(float(v), 4) for v in xy[:, 1]],
        "color": colours["colors"], "legend": colours["legend"], "numeric": colours["numeric"],
        "meta": meta, "thumbs": thumbs, "knn": knn_ids.tolist(),
        "knnDist": [[round(float(d), 4) for d in row] for row in knn_dist],
    }
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return (_TEMPLATE.replace("__TITLE__", html_lib.escape(title)).replace("__DATA__", payload))


def umap_command(embeddings, out, *, html=None, color_by: str = "instrument", kind: str | None = None,
                 max_points: int = 5000, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0, knn: int = 10,
                 instrument: str | None = None) -> dict:
    """What ``skyfm umap`` does; returns a summary (points, fit seconds, outputs)."""
    import time

    from skyfm.latent.embed import read_embeddings

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise SkyfmError(f"--out {out} should end in .png")
    if html is not None and Path(html).suffix.lower() not in (".html", ".htm"):
        raise SkyfmError(f"--html {html} should end in .html")
    if max_points < 5:
        raise SkyfmError(f"--max-points must be at least 5, got {max_points}")
    if color_by not in COLOR_BY:
        raise SkyfmError(f"--color-by must be one of {', '.join(COLOR_BY)}, got {color_by!r}")
    table, vectors, meta = read_embeddings(embeddings)
    n_all = table.num_rows
    keep = np.ones(n_all, dtype=bool)
    if kind is not None:
        keep &= np.asarray(table.column("kind").to_pylist()) == kind
    if instrument is not None:
        keep &= np.asarray([str(v).lower() for v in table.column("instrument").to_pylist()]) == instrument.lower()
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        raise SkyfmError(f"no embeddings pass the filters ({_filters_text(kind, instrument)}) in {embeddings}")
    subsampled = rows.size > max_points
    if subsampled:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_points, replace=False))
    table, vectors = table.take(rows), vectors[rows]
    colours = _colours(table, color_by)
    t0 = time.perf_counter()
    xy = fit_umap(vectors, n_neighbors=n_neighbors, min_dist=min_dist, seed=seed)
    fit_seconds = time.perf_counter() - t0
    what = f"{len(rows)} of {n_all}" if len(rows) != n_all else f"{len(rows)}"
    note = (f"{what} embeddings from {Path(embeddings).name}"
            + (f" (random subsample, seed {seed})" if subsampled else "")
            + (f"; filters: {_filters_text(kind, instrument)}" if kind or instrument else "")
            + f"; model {meta.get('model', '?')}; UMAP n_neighbors={min(n_neighbors, len(rows) - 1)}, min_dist={min_dist}")
    title = f"skyfm latent map, coloured by {color_by}"
    save_map_png(xy, colours, out, f"{title}\n{what} embeddings" + (" (subsample)" if subsampled else ""))
    summary = {"points": int(len(rows)), "total": int(n_all), "fit_seconds": round(fit_seconds, 2), "png": str(out)}
    if html is not None:
        from skyfm.utils import atomic_path

        ids, dist = neighbours(vectors, knn)
        page = explorer_html(xy, table, colours, ids, dist, title, note)
        with atomic_path(html) as tmp:
            tmp.write_text(page, encoding="utf-8")
        summary["html"] = str(html)
        summary["html_bytes"] = len(page.encode("utf-8"))
    return summary


def _filters_text(kind, instrument) -> str:
    return ", ".join(x for x in (f"kind {kind}" if kind else "", f"instrument {instrument}" if instrument else "") if x)


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
  body { margin: 0; font: 13px/1.35 system-ui, sans-serif; color: #222; display: flex; height: 100vh; }
  #left { flex: 1; display: flex; flex-direction: column; min-width: 0; }
  header { padding: 6px 10px; border-bottom: 1px solid #ddd; }
  header h1 { font-size: 15px; margin: 0 0 2px 0; }
  #note { color: #666; font-size: 11px; }
  #status { font-size: 11px; color: #2a7; }
  #wrap { position: relative; flex: 1; min-height: 0; }
  canvas { position: absolute; inset: 0; width: 100%; height: 100%; cursor: crosshair; }
  #tip { position: absolute; pointer-events: none; background: rgba(255,255,255,0.97); border: 1px solid #999;
         border-radius: 4px; padding: 5px; display: none; font-size: 11px; box-shadow: 0 2px 6px rgba(0,0,0,.2);
         max-width: 260px; z-index: 2; }
  #tip img, #panel img { image-rendering: pixelated; width: 96px; height: 96px; background: #000; display: block; }
  #tip table td { padding: 0 4px 0 0; vertical-align: top; }
  #side { width: 330px; border-left: 1px solid #ddd; overflow-y: auto; padding: 8px; box-sizing: border-box; }
  #legend div { display: flex; align-items: center; gap: 6px; font-size: 12px; cursor: default; }
  #legend span.sw { width: 11px; height: 11px; border-radius: 50%; display: inline-block; }
  #colorbar { height: 12px; border: 1px solid #aaa; margin: 4px 0; }
  #panel .nb { display: flex; gap: 8px; align-items: center; padding: 3px; border-radius: 3px; cursor: pointer; }
  #panel .nb:hover { background: #eef; }
  #panel .nb img { width: 48px; height: 48px; }
  #panel h3 { font-size: 13px; margin: 10px 0 4px; }
  .muted { color: #777; }
</style>
</head>
<body>
<div id="left">
  <header><h1>__TITLE__</h1><div id="note"></div><div id="status" data-state="loading">loading...</div></header>
  <div id="wrap"><canvas id="map"></canvas><div id="tip"></div></div>
</div>
<div id="side">
  <div id="legend"></div>
  <div class="muted" style="margin-top:6px">Hover a point: its thumbnail and metadata. Click: its nearest neighbours
    in the embedding space (cosine). Wheel: zoom; drag: pan; double-click: reset.</div>
  <div id="panel"></div>
</div>
<script id="skyfm-data" type="application/json">__DATA__</script>
<script>
(function () {
  "use strict";
  var statusEl = document.getElementById("status");
  function setStatus(text, state) { statusEl.textContent = text; statusEl.setAttribute("data-state", state); }
  var D;
  try { D = JSON.parse(document.getElementById("skyfm-data").textContent); }
  catch (e) { setStatus("error: cannot read the embedded data (" + e + ")", "error"); return; }
  var N = D.n, canvas = document.getElementById("map"), ctx = canvas.getContext("2d");
  var tip = document.getElementById("tip"), panel = document.getElementById("panel");
  document.getElementById("note").textContent = D.note;
  var xmin = Math.min.apply(null, D.x), xmax = Math.max.apply(null, D.x);
  var ymin = Math.min.apply(null, D.y), ymax = Math.max.apply(null, D.y);
  var view = {scale: 1, dx: 0, dy: 0}, W = 0, H = 0, selected = -1, hovered = -1, px = new Float32Array(N), py = new Float32Array(N);
  var radius = Math.max(2, Math.min(6, 900 / Math.sqrt(N + 1) / 6));

  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) { return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]; }); }
  function fmt(v) {
    if (v === null || v === undefined) return "-";
    if (typeof v === "number") return Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-2 && v !== 0) ? v.toExponential(3) : (Math.round(v * 1e4) / 1e4).toString();
    return String(v);
  }
  function thumb(i) { return D.thumbs.length && D.thumbs[i] ? "data:image/png;base64," + D.thumbs[i] : ""; }
  function metaRows(i) {
    var keys = Object.keys(D.meta), out = [];
    for (var k = 0; k < keys.length; k++) {
      var v = D.meta[keys[k]][i];
      if (v !== null && v !== undefined && v !== "") out.push("<tr><td class='muted'>" + esc(keys[k]) + "</td><td>" + esc(fmt(v)) + "</td></tr>");
    }
    return out.join("");
  }
  function label(i) {
    var m = D.meta, parts = [];
    ["kind", "instrument", "class"].forEach(function (k) { if (m[k] && m[k][i]) parts.push(m[k][i]); });
    return parts.join(" ");
  }

  function resize() {
    var r = canvas.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
    W = Math.max(r.width, 50); H = Math.max(r.height, 50);
    canvas.width = W * dpr; canvas.height = H * dpr; ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    draw();
  }
  function project() {
    var pad = 20, sx = (W - 2 * pad) / ((xmax - xmin) || 1), sy = (H - 2 * pad) / ((ymax - ymin) || 1), s = Math.min(sx, sy);
    var ox = (W - s * (xmax - xmin)) / 2, oy = (H - s * (ymax - ymin)) / 2;
    for (var i = 0; i < N; i++) {
      px[i] = (ox + s * (D.x[i] - xmin)) * view.scale + view.dx;
      py[i] = (H - oy - s * (D.y[i] - ymin)) * view.scale + view.dy;
    }
  }
  function draw() {
    project();
    ctx.clearRect(0, 0, W, H);
    ctx.globalAlpha = 0.85;
    for (var i = 0; i < N; i++) {
      ctx.fillStyle = D.color[i];
      ctx.beginPath(); ctx.arc(px[i], py[i], radius, 0, 6.2832); ctx.fill();
    }
    ctx.globalAlpha = 1;
    if (selected >= 0) {
      ctx.strokeStyle = "#d00"; ctx.lineWidth = 1.5;
      D.knn[selected].forEach(function (j) { ctx.beginPath(); ctx.arc(px[j], py[j], radius + 3, 0, 6.2832); ctx.stroke(); });
      ctx.strokeStyle = "#000"; ctx.lineWidth = 2.5;
      ctx.beginPath(); ctx.arc(px[selected], py[selected], radius + 5, 0, 6.2832); ctx.stroke();
    }
    if (hovered >= 0) {
      ctx.strokeStyle = "#000"; ctx.lineWidth = 1;
      ctx.beginPath(); ctx.arc(px[hovered], py[hovered], radius + 2, 0, 6.2832); ctx.stroke();
    }
  }
  function nearest(mx, my) {
    var best = -1, bd = (radius + 6) * (radius + 6);
    for (var i = 0; i < N; i++) {
      var dx = px[i] - mx, dy = py[i] - my, d = dx * dx + dy * dy;
      if (d < bd) { bd = d; best = i; }
    }
    return best;
  }
  function showTip(i, mx, my) {
    hovered = i;
    if (i < 0) { tip.style.display = "none"; draw(); return; }
    var t = thumb(i);
    tip.innerHTML = (t ? "<img alt='thumbnail' src='" + t + "'>" : "") + "<b>" + esc(label(i)) + "</b><table>" + metaRows(i) + "</table>";
    tip.style.display = "block";
    var left = mx + 14, top = my + 14;
    if (left + 270 > W) left = Math.max(0, mx - 280);
    if (top + 300 > H) top = Math.max(0, my - 300);
    tip.style.left = left + "px"; tip.style.top = top + "px";
    draw();
  }
  function select(i) {
    selected = i;
    if (i < 0) { panel.innerHTML = ""; draw(); return; }
    var t = thumb(i), html = "<h3>Selected: point " + i + "</h3>" + (t ? "<img alt='thumbnail' src='" + t + "'>" : "") +
      "<table>" + metaRows(i) + "</table><h3>" + D.knn[i].length + " nearest neighbours</h3><div id='nblist'>";
    D.knn[i].forEach(function (j, r) {
      var tj = thumb(j);
      html += "<div class='nb' data-i='" + j + "'>" + (tj ? "<img alt='' src='" + tj + "'>" : "") + "<div>" + (r + 1) + ". " +
        esc(label(j)) + "<br><span class='muted'>distance " + fmt(D.knnDist[i][r]) + " · " + esc(fmt(D.meta.file ? D.meta.file[j] : "")) + "</span></div></div>";
    });
    panel.innerHTML = html + "</div>";
    Array.prototype.forEach.call(panel.querySelectorAll(".nb"), function (el) {
      el.addEventListener("click", function () { select(+el.getAttribute("data-i")); });
    });
    draw();
  }
  function legend() {
    var el = document.getElementById("legend"), h = "";
    if (D.legend) {
      D.legend.forEach(function (e) { h += "<div><span class='sw' style='background:" + e[1] + "'></span>" + esc(e[0]) + " <span class='muted'>(" + e[2] + ")</span></div>"; });
    } else if (D.numeric) {
      h = "<div>" + esc(D.numeric.label) + "</div><div id='colorbar' style='background:linear-gradient(to right," + D.numeric.stops.join(",") + ")'></div>" +
          "<div class='muted'>" + fmt(D.numeric.lo) + " ... " + fmt(D.numeric.hi) + (D.numeric.missing ? " · grey: " + D.numeric.missing + " unknown" : "") + "</div>";
    }
    el.innerHTML = h;
  }

  var drag = null;
  canvas.addEventListener("mousemove", function (ev) {
    var r = canvas.getBoundingClientRect(), mx = ev.clientX - r.left, my = ev.clientY - r.top;
    if (drag) { view.dx = drag.dx + mx - drag.x; view.dy = drag.dy + my - drag.y; drag.moved = true; draw(); return; }
    showTip(nearest(mx, my), mx, my);
  });
  canvas.addEventListener("mouseleave", function () { showTip(-1, 0, 0); });
  canvas.addEventListener("mousedown", function (ev) {
    var r = canvas.getBoundingClientRect();
    drag = {x: ev.clientX - r.left, y: ev.clientY - r.top, dx: view.dx, dy: view.dy, moved: false};
  });
  window.addEventListener("mouseup", function (ev) {
    if (drag && !drag.moved) {
      var r = canvas.getBoundingClientRect();
      select(nearest(ev.clientX - r.left, ev.clientY - r.top));
    }
    drag = null;
  });
  canvas.addEventListener("wheel", function (ev) {
    ev.preventDefault();
    var r = canvas.getBoundingClientRect(), mx = ev.clientX - r.left, my = ev.clientY - r.top;
    var f = ev.deltaY < 0 ? 1.2 : 1 / 1.2;
    view.dx = mx - (mx - view.dx) * f; view.dy = my - (my - view.dy) * f; view.scale *= f; draw();
  }, {passive: false});
  canvas.addEventListener("dblclick", function () { view = {scale: 1, dx: 0, dy: 0}; draw(); });
  window.addEventListener("resize", resize);

  legend();
  resize();
  var withThumbs = D.thumbs.filter(function (t) { return t; }).length;
  setStatus("ready: " + N + " points, " + withThumbs + " thumbnails, " + (D.knn[0] ? D.knn[0].length : 0) + " neighbours each", "ready");
  statusEl.setAttribute("data-points", N);

  if (location.hash === "#selftest" && N > 0) {
    showTip(0, px[0], py[0]);
    var tipImg = tip.querySelector("img"), tipOk = tip.style.display === "block" && tip.textContent.length > 0;
    select(0);
    var items = panel.querySelectorAll(".nb").length;
    var imgs = panel.querySelectorAll("img").length;
    setStatus("selftest ok: hover=" + (tipOk ? "shown" : "missing") + " thumb=" + (tipImg && tipImg.complete !== undefined ? "yes" : "no") +
              " neighbours=" + items + " images=" + imgs + " points=" + N, "selftest");
  }
})();
</script>
</body>
</html>
"""


__all__ = ["COLOR_BY", "explorer_html", "fit_umap", "neighbours", "save_map_png", "umap_command"]
