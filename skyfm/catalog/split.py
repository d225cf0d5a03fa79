"""Poisson likelihood test of a blend: is a fitted point source one source, or two closer than the TS maps resolve?

In a crowded field (the inner Galaxy seen by Fermi-LAT) two sources a PSF width apart or closer make one peak in
the TS map, and its fit settles between them, at their summed flux: the residuals show nothing where the fainter
one sits, so no later TS map finds it. The test here fits each bright source again as two point sources (positions
and counts per bin of both free, everything else held fixed), from starts placed along several directions, and
keeps the best pair when it improves the likelihood enough (the starts: the fainter one with
:data:`SPLIT_FAINT_SHARE` of the counts, the two twice ``min_separation`` apart, their centroid on the single fit,
along :data:`SPLIT_DIRECTIONS` directions; :func:`fit_pair` fits both jointly):

- ``TS_2pts`` = 2 delta ln L of the pair over the single source >= :data:`TS_SPLIT_MIN` (the second source's
  parameters: a new source's TS >= 25, as the 4FGL convention takes it);
- each of the two, fitted with the other held fixed, has TS >= ``min_ts``; they lie at least ``min_separation``
  apart and within ``max_move`` of the single fit (else the pair ran off to other light);
- the pair beats one extended source in the same place as the Akaike criterion weighs them (Lande et al. 2012
  compare ``TS_2pts`` with ``TS_ext`` the same way): ``TS_2pts - TS_ext >= 2 (1 + C)``, C bins, since the pair has
  ``1 + C`` more free parameters than a Gaussian of free size (:mod:`skyfm.catalog.extended`). A bright extended
  source is better fitted by two points than by one, but better still by one Gaussian: it is not split.

Each accepted component is tested again (a cluster of three or more comes apart one source at a time), at most
:data:`MAX_SPLITS_PER_SOURCE` times per original source.
"""

from __future__ import annotations

import numpy as np

from skyfm.catalog import extended, likelihood

TS_SPLIT_MIN = 25.0  # 2 delta ln L of two sources over one (a new source's parameters, the 4FGL TS >= 25)
TEST_MIN_TS = 50.0  # sources fainter than this are not tested (two sources of TS >= 25 each sum to more)
SPLIT_DIRECTIONS = 4  # starts of the pair's fit: the fainter one placed along this many directions
SPLIT_FAINT_SHARE = 0.3  # ... with this share of the flux, the brighter one moved the other way to keep the centroid
MAX_SPLITS_PER_SOURCE = 3  # a source and the pieces split from it are split at most this many times
PAIR_TOLERANCE = 1e-2  # the joint fit stops when ln L gains less (TS resolution 0.02)


def _loglike(n: np.ndarray, mu: np.ndarray) -> float:
    """Poisson log-likelihood (without the log n! term) of counts ``n`` under the model ``mu``."""
    mu = np.maximum(mu, 1e-300)
    return float(np.dot(n, np.log(mu)) - mu.sum())


_stamps, _add = extended._stamps, extended._add  # a source's clipped per-bin stamps; adding them into a box


class _PairWindows:
    """Per bin, the pixels within the PSF's radius plus ``margin`` of a centre, all bins in one flat vector: the
    only pixels two sources held within ``margin`` of the centre reach."""

    def __init__(self, counts, others, tables, cx: int, cy: int, margin: int):
        c_bins, h, w = counts.shape
        self.tables, self.cx, self.cy, self.margin = tables, cx, cy, margin
        self.views, nf, of = [], [], []
        for c, tab in enumerate(tables):
            r = tab.radius + margin
            y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, h), max(cx - r, 0), min(cx + r + 1, w)
            self.views.append((y0, y1, x0, x1))
            nf.append(counts[c, y0:y1, x0:x1].ravel())
            of.append(others[c, y0:y1, x0:x1].ravel())
        self.sizes = [len(v) for v in nf]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.n, self.others = np.concatenate(nf), np.concatenate(of)
        self.band = np.repeat(np.arange(c_bins), self.sizes)
        self.stack = likelihood._table_stack(tables)
        self._cache = {}

    def clip(self, x, y):
        m = self.margin - 1  # a source's stamp stays inside its bins' windows
        return np.clip(x, self.cx - m, self.cx + m), np.clip(y, self.cy - m, self.cy + m)

    def placed(self, x: float, y: float, grad: bool = True):
        """A source's unit stamp in every bin and its derivatives in x and y (None without ``grad``), as flat
        vectors over the windows."""
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        take, put = self._index(ix, iy)
        stamps = self.stack.stamps(x - ix, y - iy, grad, take)
        out = []
        for v in stamps:
            if v is None:
                out.append(None)
                continue
            flat = np.zeros(len(self.n))
            flat[put] = v
            out.append(flat)
        return tuple(out)

    def _index(self, ix: int, iy: int):
        """Which pixels of the stacked stamps (:class:`~skyfm.catalog.likelihood._TableStack`) of a source centred on
        pixel (ix, iy) fall in the windows, and where in the flat vector they go (cached per centre)."""
        hit = self._cache.get((ix, iy))
        if hit is not None:
            return hit
        take, put = [], []
        for c, tab in enumerate(self.tables):
            y0, y1, x0, x1 = self.views[c]
            r, k = tab.radius, tab.size
            rows, cols = np.arange(iy - r, iy + r + 1), np.arange(ix - r, ix + r + 1)
            ok_r, ok_c = (rows >= y0) & (rows < y1), (cols >= x0) & (cols < x1)
            sr, sc = np.flatnonzero(ok_r), np.flatnonzero(ok_c)
            take.append(self.stack.offsets[c] + (sr[:, None] * k + sc[None, :]).ravel())
            put.append(self.offsets[c] + ((rows[sr] - y0)[:, None] * (x1 - x0) + (cols[sc] - x0)[None, :]).ravel())
        hit = (np.concatenate(take), np.concatenate(put))
        self._cache[(ix, iy)] = hit
        return hit


def window_loglike(win: _PairWindows, x, y, flux_band) -> float:
    """Poisson log-likelihood over ``win``'s pixels of its ``others`` plus point sources at ``x``, ``y`` with
    counts ``flux_band`` (N, C)."""
    mu = win.others.copy()
    flux_band = np.asarray(flux_band, dtype=np.float64).reshape(-1, len(win.tables))
    for xs, ys, fb in zip(np.atleast_1d(x), np.atleast_1d(y), flux_band):
        mu += fb[win.band] * win.placed(float(xs), float(ys))[0]
    return _loglike(win.n, mu)


def fit_pair(counts, others, tables, x, y, flux_band, *, centre: tuple | None = None, margin: int | None = None,
             max_iter: int = 30) -> dict:
    """Joint Poisson fit of two point sources (positions and counts per bin of both, 4 + 2 C parameters) against
    ``others`` (C, H, W), by Fisher scoring with step halving, fluxes kept >= 0: two sources closer than a PSF
    width pull on each other's parameters, which one-at-a-time fits follow slowly.

    Args:
        x, y: (2,) starting positions (pixels); flux_band: (2, C) starting counts.
        centre: (x, y) the sources stay near (default the starts' midpoint); margin: how far (pixels) they may go
            from it (default the starts' separation + 4). The likelihood is summed over the pixels that sources
            there reach, :class:`_PairWindows` (``windows`` in the result).

    Returns:
        dict: ``x``, ``y`` (2,), ``flux_band`` (2, C), ``flux`` (2,), ``loglike`` (over ``windows``: compare it
        with :func:`window_loglike` of other models on the same windows), ``ts`` (2,): each source's 2 delta ln L
        against the model without it (the other held fixed), ``windows``.
    """
    n_img = np.asarray(counts, dtype=np.float64)
    c_bins = n_img.shape[0]
    x, y = np.array(x, dtype=np.float64), np.array(y, dtype=np.float64)
    amps = np.clip(np.array(flux_band, dtype=np.float64).reshape(2, c_bins), 0, None)
    cx, cy = (x.mean(), y.mean()) if centre is None else centre
    cx, cy = int(np.floor(cx + 0.5)), int(np.floor(cy + 0.5))
    if margin is None:
        margin = int(np.ceil(np.hypot(*np.diff([x, y], axis=1).ravel()))) + 4
    win = _PairWindows(n_img, np.asarray(others, dtype=np.float64), tables, cx, cy, margin)
    n, band = win.n, win.band
    x, y = win.clip(x, y)

    def state(x, y, amps, grad=True):
        parts = [win.placed(x[s], y[s], grad) for s in range(2)]
        mu = np.maximum(win.others + amps[0][band] * parts[0][0] + amps[1][band] * parts[1][0], 1e-300)
        return parts, mu, _loglike(n, mu)

    starts = win.offsets[:-1]
    bsum = lambda v: np.add.reduceat(v, starts)  # noqa: E731  (per-bin sums; every window holds pixels)
    parts, mu, ll = state(x, y, amps)
    npar = 4 + 2 * c_bins
    for _ in range(max_iter):
        inv, resid = 1.0 / mu, n / mu - 1.0
        pos = [amps[s][band] * parts[s][g] for s in range(2) for g in (1, 2)]  # d mu / d (x1, y1, x2, y2)
        unit = [parts[s][0] for s in range(2)]  # d mu / d A_s,c (in bin c)
        cols = [4 + s * c_bins + np.arange(c_bins) for s in range(2)]
        fisher, grad = np.zeros((npar, npar)), np.zeros(npar)
        for i in range(4):
            grad[i] = np.dot(pos[i], resid)
            wpos = pos[i] * inv
            for j in range(i, 4):
                fisher[i, j] = fisher[j, i] = np.dot(wpos, pos[j])
            for s in range(2):
                fisher[i, cols[s]] = fisher[cols[s], i] = bsum(wpos * unit[s])
        for s in range(2):
            grad[cols[s]] = bsum(unit[s] * resid)
            for t in range(s, 2):
                v = bsum(unit[s] * unit[t] * inv)
                fisher[cols[s], cols[t]] = fisher[cols[t], cols[s]] = v
        reg = 1e-9 * np.maximum(np.diag(fisher), 1e-12)
        try:
            step = np.linalg.solve(fisher + np.diag(reg), grad)
        except np.linalg.LinAlgError:
            break
        step[:4] = np.clip(step[:4], -1.0, 1.0)
        improved = False
        for _half in range(8):
            nx, ny = win.clip(x + step[[0, 2]], y + step[[1, 3]])
            na = np.maximum(amps + step[4:].reshape(2, c_bins), 0.0)
            trial = state(nx, ny, na, grad=False)
            if trial[2] >= ll - 1e-9:
                improved = trial[2] > ll + PAIR_TOLERANCE  # the accepted pairs are fitted again (refine_counts)
                x, y, amps, ll = nx, ny, na, trial[2]
                parts, mu, _ = state(x, y, amps) if improved else trial
                break
            step = step * 0.5
        if not improved:
            break
    ts = np.zeros(2)
    for s in range(2):
        ts[s] = max(2.0 * (ll - _loglike(n, mu - amps[s][band] * parts[s][0])), 0.0)
    return {"x": x, "y": y, "flux_band": amps, "flux": amps.sum(axis=1), "loglike": ll, "ts": ts, "windows": win}


def split_test(counts, background, psf_kernels, x, y, flux_band, ts, *, min_ts: float = 25.0,
               test_min_ts: float = TEST_MIN_TS, ts_split_min: float = TS_SPLIT_MIN, min_separation: float = 1.0,
               start_separation: float | None = None, max_move: float = 3.0, extension_check: bool = True) -> dict:
    """Test each point source (brightest first) for being two, against ``background`` plus every other source.

    Args:
        counts, background: (C, H, W) counts and expected background counts (the model the sources were fitted
            against).
        psf_kernels: one centred PSF kernel per bin (:func:`~skyfm.catalog.likelihood.psf_kernels`).
        x, y, flux_band, ts: the point-source fits (pixels; counts per bin (N, C); TS).
        min_ts: each of a pair must reach it (fitted with the other fixed).
        test_min_ts: sources below it are not tested.
        ts_split_min: the pair's TS over the single source that a split needs.
        min_separation: pixels the pair must be apart at least (closer, they count as one).
        start_separation: pixels between the pair's starts (default twice ``min_separation``).
        max_move: pixels each of the pair may lie from the single fit at most.
        extension_check: the pair must also beat one extended source (module docstring).

    Returns:
        dict: ``x``, ``y`` (M,), ``flux_band`` (M, C), ``ts`` (M,) for the M >= N sources after the splits (the
        first N are the input rows, refitted where split; the rest are new), ``parent`` (M,) the input row each
        descends from, ``ts_split`` (M,) the pair's TS over the single source of each split that made or changed
        the row (NaN where none did), ``changed`` (M,) True where a split made or changed the row.
    """
    n = np.nan_to_num(np.asarray(counts, dtype=np.float64))
    b = np.asarray(background, dtype=np.float64)
    if n.ndim == 2:
        n, b = n[None], b[None]
    c_bins, h, w = n.shape
    tables = likelihood.psf_tables(psf_kernels)
    kernels = [t.stamp(0.0, 0.0) for t in tables]  # the centred kernels (the extension check convolves them)
    reach = max(t.radius for t in tables)
    xs = list(np.asarray(x, dtype=np.float64))
    ys = list(np.asarray(y, dtype=np.float64))
    fb = [np.clip(np.nan_to_num(v), 0, None) for v in np.asarray(flux_band, dtype=np.float64).reshape(len(xs), c_bins)]
    tss = list(np.nan_to_num(np.asarray(ts, dtype=np.float64), nan=-np.inf))
    parent = list(range(len(xs)))
    ts_split = [np.nan] * len(xs)
    splits = [0] * len(xs)  # splits so far of each input row's family
    placed = [bool(np.isfinite(a) and np.isfinite(c)) for a, c in zip(xs, ys)]
    stamps = {i: _stamps(tables, xs[i], ys[i], fb[i], h, w) for i in range(len(xs)) if placed[i]}
    model = b.copy()  # the background and every source
    for st in stamps.values():
        _add(model, st, +1.0)
    angles = 2 * np.pi * np.arange(SPLIT_DIRECTIONS) / SPLIT_DIRECTIONS
    queue = sorted((i for i in range(len(xs)) if placed[i] and tss[i] >= test_min_ts), key=lambda i: -tss[i])
    while queue:
        a = queue.pop(0)
        if splits[parent[a]] >= MAX_SPLITS_PER_SOURCE:
            continue
        # a box holding every pixel the source, its pair and their wings touch
        half = 2 * reach + int(np.ceil(max_move)) + 2
        iy, ix = int(np.floor(ys[a] + 0.5)), int(np.floor(xs[a] + 0.5))
        oy, ox = max(iy - half, 0), max(ix - half, 0)
        box = (slice(None), slice(oy, min(iy + half + 1, h)), slice(ox, min(ix + half + 1, w)))
        n_box = n[box]
        others = model[box].copy()
        _add(others, stamps[a], -1.0, oy, ox)
        np.maximum(others, 0.0, out=others)
        single = likelihood.fit_point_sources(n_box, others, tables, [xs[a] - ox], [ys[a] - oy], [float(fb[a].sum())],
                                              n_pass=1, marginal_errors=False)
        if not np.isfinite(single["x"][0]):
            continue
        sx, sy, fb1 = float(single["x"][0]), float(single["y"][0]), single["flux_band"][0]
        # the pair's starts: the fainter (a share q of the counts) and the brighter on either side of the single fit,
        # d apart, their centroid on it
        d = 2.0 * min_separation if start_separation is None else float(start_separation)
        q = SPLIT_FAINT_SHARE
        margin = int(np.ceil(max(d, max_move))) + 2
        best = None
        for t in angles:
            u, v = np.cos(t), np.sin(t)
            pair = fit_pair(n_box, others, tables, [sx - q * d * u, sx + (1 - q) * d * u],
                            [sy - q * d * v, sy + (1 - q) * d * v], [(1 - q) * fb1, q * fb1], centre=(sx, sy),
                            margin=margin)
            if np.all(np.isfinite(pair["x"])) and np.all(np.isfinite(pair["flux"])):
                if best is None or pair["loglike"] > best["loglike"]:
                    best = pair
        if best is None:
            continue
        pair = best
        ts_2pts = 2.0 * (pair["loglike"] - window_loglike(pair["windows"], sx, sy, fb1))
        sep = float(np.hypot(pair["x"][0] - pair["x"][1], pair["y"][0] - pair["y"][1]))
        moves = np.hypot(pair["x"] - sx, pair["y"] - sy)
        if (ts_2pts < ts_split_min or sep < min_separation or np.any(moves > max_move)
                or np.any(pair["ts"] < min_ts)):
            continue
        if extension_check:
            ext = extended.extension_test(n_box, others, kernels, single["x"], single["y"], single["flux_band"],
                                          single["ts"], min_ts=0.0, ts_ext_min=-np.inf)
            ts_ext = float(np.nan_to_num(ext["ts_ext"][0], nan=0.0))
            if ts_2pts - max(ts_ext, 0.0) < 2.0 * (1 + c_bins):
                continue
        # accepted: the brighter of the pair keeps the row, the fainter is a new one
        order = np.argsort(-pair["flux"], kind="stable")
        model[box] = others  # the single source out; the pair's stamps go in below
        rows = [a, len(xs)]
        xs.append(np.nan), ys.append(np.nan), fb.append(None), tss.append(-np.inf)
        parent.append(parent[a]), ts_split.append(np.nan), placed.append(True)
        splits[parent[a]] += 1
        for row, k in zip(rows, order):
            xs[row], ys[row] = float(pair["x"][k]) + ox, float(pair["y"][k]) + oy
            fb[row], tss[row], ts_split[row] = pair["flux_band"][k].copy(), float(pair["ts"][k]), ts_2pts
            stamps[row] = _stamps(tables, xs[row], ys[row], fb[row], h, w)
            _add(model, stamps[row], +1.0)
            if tss[row] >= test_min_ts:
                queue.append(row)
        queue.sort(key=lambda i: -tss[i])
    m = len(xs)
    return {"x": np.array(xs), "y": np.array(ys), "flux_band": np.array(fb).reshape(m, c_bins),
            "ts": np.where(np.isfinite(tss), tss, np.nan), "parent": np.array(parent, dtype=np.int64),
            "ts_split": np.array(ts_split), "changed": np.isfinite(np.array(ts_split))}
