"""One-to-one cross-matching of two pixel catalogs.

:func:`match_catalogs` pairs each detection with at most one true source and vice versa, within ``radius_pix``.
Candidate pairs come from a k-d tree; each connected group of candidates is solved exactly with the Hungarian
algorithm (:func:`scipy.optimize.linear_sum_assignment`): first the most pairs, then the smallest summed
separation. In crowded fields this beats greedy nearest-neighbour matching, which can steal a true source from the
detection that has no other partner. ``method="greedy"`` (closest pairs first) is there for comparison.
"""

from __future__ import annotations

import astropy.units as u
import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from skyfm.errors import SkyfmError


def xy_of(table_or_xy) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) float arrays from a table with ``x``, ``y`` columns or an (x, y) pair / (N, 2) array."""
    if hasattr(table_or_xy, "colnames"):
        for name in ("x", "y"):
            if name not in table_or_xy.colnames:
                raise SkyfmError(f"the catalog has no '{name}' column (it has {', '.join(table_or_xy.colnames[:12])})")
        return (np.asarray(u.Quantity(table_or_xy["x"]).value, dtype=np.float64).reshape(-1),
                np.asarray(u.Quantity(table_or_xy["y"]).value, dtype=np.float64).reshape(-1))
    if isinstance(table_or_xy, tuple) and len(table_or_xy) == 2:
        return (np.asarray(table_or_xy[0], dtype=np.float64).reshape(-1),
                np.asarray(table_or_xy[1], dtype=np.float64).reshape(-1))
    arr = np.asarray(table_or_xy, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 2:
        return arr[:, 0].copy(), arr[:, 1].copy()
    raise SkyfmError("positions should be a table with x, y columns, an (x, y) pair or an (N, 2) array")


def match_catalogs(det, truth, radius_pix: float, method: str = "optimal") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matches of ``det`` to ``truth`` within ``radius_pix`` (module docstring).

    Args:
        det, truth: tables with ``x``, ``y`` (pixels) or (x, y) arrays.
        radius_pix: the largest separation of a match, pixels.
        method: ``"optimal"`` (per-group Hungarian assignment) or ``"greedy"`` (closest pairs first).

    Returns:
        ``(det_idx, truth_idx, sep_pix)``: int arrays of matched rows and float separations, sorted by det_idx.
    """
    if method not in ("optimal", "greedy"):
        raise ValueError(f"method should be 'optimal' or 'greedy', got {method!r}")
    dx, dy = xy_of(det)
    tx, ty = xy_of(truth)
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0))
    if len(dx) == 0 or len(tx) == 0 or not radius_pix > 0:
        return empty
    dpos = np.stack([dx, dy], axis=1)
    tpos = np.stack([tx, ty], axis=1)
    ok_d = np.isfinite(dpos).all(axis=1)
    ok_t = np.isfinite(tpos).all(axis=1)
    dpos[~ok_d] = 1e30
    tpos[~ok_t] = -1e30
    pairs = cKDTree(dpos).sparse_distance_matrix(cKDTree(tpos), float(radius_pix), output_type="ndarray")
    rows, cols, seps = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64), pairs["v"].astype(np.float64)
    if len(rows) == 0:
        return empty
    if method == "greedy":
        out = _greedy(rows, cols, seps)
    else:
        out = _optimal(rows, cols, seps, len(dx), len(tx), float(radius_pix))
    d, t, s = out
    order = np.argsort(d, kind="stable")
    return d[order].astype(np.int64), t[order].astype(np.int64), s[order].astype(np.float64)


def _greedy(rows, cols, seps):
    order = np.argsort(seps, kind="stable")
    used_d, used_t = set(), set()
    d, t, s = [], [], []
    for k in order:
        if rows[k] in used_d or cols[k] in used_t:
            continue
        used_d.add(rows[k])
        used_t.add(cols[k])
        d.append(rows[k])
        t.append(cols[k])
        s.append(seps[k])
    return np.asarray(d), np.asarray(t), np.asarray(s)


def _optimal(rows, cols, seps, n_det, n_truth, radius):
    n = n_det + n_truth
    graph = coo_matrix((np.ones(len(rows)), (rows, cols + n_det)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    group = labels[rows]
    order = np.argsort(group, kind="stable")
    rows, cols, seps, group = rows[order], cols[order], seps[order], group[order]
    bounds = np.flatnonzero(np.diff(group)) + 1
    d_out, t_out, s_out = [], [], []
    big = 10.0 * radius * (len(rows) + 1)  # any real pair beats "unmatched": most pairs first, then least distance
    for r, c, s in zip(np.split(rows, bounds), np.split(cols, bounds), np.split(seps, bounds)):
        if len(r) == 1:
            d_out.append(r)
            t_out.append(c)
            s_out.append(s)
            continue
        ur, ri = np.unique(r, return_inverse=True)
        uc, ci = np.unique(c, return_inverse=True)
        cost = np.full((len(ur), len(uc)), big)
        cost[ri, ci] = s
        a, b = linear_sum_assignment(cost)
        real = cost[a, b] < big
        d_out.append(ur[a[real]])
        t_out.append(uc[b[real]])
        s_out.append(cost[a[real], b[real]])
    return np.concatenate(d_out), np.concatenate(t_out), np.concatenate(s_out)
