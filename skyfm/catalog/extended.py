"""Poisson likelihood test of source extension for counts cubes: is a detection a point source, or one extended
source that the point fits have broken into pieces?

A point-source fit of an extended source (a supernova remnant, a pulsar wind nebula, a 4FGL template) finds its
brightest spot and leaves the rest of its light to more point sources beside it, each significant on its own: the
pieces are false detections and the centre's flux is short. Fermi-LAT catalogs test every bright source for
extension (TS_ext = 2 delta ln L of an extended model over the point model >= 16). Here the extended model is the
standard first one, a radial Gaussian convolved with each bin's PSF, fitted (position and counts per bin) by the
same Poisson fitter as the point sources (:func:`~skyfm.catalog.likelihood.fit_point_sources` with the convolved
kernels), on a grid of sizes (grown by x1.5 steps while its largest size fits best, up to what the kernels hold):
each size with the counts alone fitted at the flux-weighted centroid of the source and its would-be pieces, then
the best size with the position free.

The comparison holds the rest of the sky fixed: the point model is the source and the point sources within the
tested size (the fainter ones its would-be pieces) as fitted; the extended model is one Gaussian with those point
sources' counts fitted again beside it, the ones no longer significant dropped. The extended model has fewer free
parameters when it drops pieces, so it is compared as the Akaike criterion does, each dropped piece's parameters
(position and one count per bin) counting against the point model; with none dropped the test is
TS_ext >= :data:`TS_EXT_MIN` alone. After a source is found extended, the point sources within it are fitted
again (position and counts) against the extended model: those still significant (a pulsar inside its nebula) stay.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from scipy import signal
from scipy.special import erf

from skyfm.catalog import likelihood

TS_EXT_MIN = 16.0  # the Fermi-LAT catalogs' threshold for an extended source (2 delta ln L, one more parameter)
R68_GRID_PSF = (1.5, 2.5, 4.0, 6.0, 9.0, 13.0)  # extension sizes tried (r68), in units of the sharpest bin's r68
# where the grid's largest size fits best, sizes x1.5 larger are tried while they fit better, up to what the kernels
# hold (3 sigma inside MAX_KERNEL_RADIUS): the Cygnus cocoon (r68 3 deg) came out as seven rows of the grid's 1.3 deg
GROW_GRID = True
GRID_GROWTH = 1.5
# each size is scored with the point sources inside it fitted again beside the Gaussian: the pieces that stay
# significant kept (real sources within a large size had counted as pieces the Gaussian must replace) and the
# brighter ones giving up the Gaussian's light they held
REFIT_INSIDE = True
MAX_KERNEL_RADIUS = 96  # pixels: the convolved kernels are cut there (a 256 px patch's largest sources fit)
# after the grid, the sizes halfway (geometric) to the best one's neighbours: a Gaussian of r68 0.12 deg came out at
# the grid's 0.086 and its rim's light as a false source beside it (tests/test_detect.py, docs/benchmarks.md Run 49)
REFINE_SIZE = True
EXTENDED_PHASES = 4  # sub-pixel phases of the extended kernels' tables (smooth: no need for 16)
GAUSS_R68_PER_SIGMA = 1.5096  # 68% containment radius of a 2-D Gaussian / its sigma


def gaussian_kernels(psf_kernels, r68_pix: float, max_radius: int = MAX_KERNEL_RADIUS) -> list[np.ndarray]:
    """Each bin's PSF kernel convolved with a radial Gaussian of 68% containment radius ``r68_pix`` (pixels),
    pixel-integrated, out to the PSF's radius + 3 sigma (at most ``max_radius``); the kernels keep the PSF
    kernel's sum less what the cut loses."""
    sigma = float(r68_pix) / GAUSS_R68_PER_SIGMA
    out = []
    for k in psf_kernels:
        k = np.asarray(k, dtype=np.float64)
        r = (k.shape[0] - 1) // 2
        g_r = int(np.ceil(3.0 * sigma)) + 1
        edges = np.arange(-g_r - 0.5, g_r + 1.0)  # integrate the Gaussian over each pixel, separably
        cdf = 0.5 * (1 + erf(edges / (np.sqrt(2) * sigma)))
        g1 = np.diff(cdf)
        g = np.outer(g1, g1)
        g /= g.sum()
        full = signal.fftconvolve(k, g, mode="full")  # radius r + g_r
        big = r + g_r
        cut = min(big, int(max_radius))
        full = np.clip(full[big - cut:big + cut + 1, big - cut:big + cut + 1], 0.0, None)
        out.append(full)
    return out


_EXT_CACHE: "OrderedDict[tuple, list]" = OrderedDict()
EXT_CACHE_SIZE = 16  # sets of tables (one instrument's bins at one size) kept


def extended_tables(psf_kernels, r68_pix: float) -> list:
    """:class:`~skyfm.catalog.likelihood.PSFTable` per bin of :func:`gaussian_kernels`, cached by the kernels and
    the size (built once per instrument, pixel scale and size per process)."""
    key = (round(float(r68_pix), 6),) + tuple((np.asarray(k).shape, np.asarray(k, dtype=np.float64).tobytes())
                                              for k in psf_kernels)
    hit = _EXT_CACHE.get(key)
    if hit is not None:
        _EXT_CACHE.move_to_end(key)
        return hit
    tables = [likelihood.PSFTable.from_kernel(k, EXTENDED_PHASES) for k in gaussian_kernels(psf_kernels, r68_pix)]
    _EXT_CACHE[key] = tables
    while len(_EXT_CACHE) > EXT_CACHE_SIZE:
        _EXT_CACHE.popitem(last=False)
    return tables


def _loglike(n, mu) -> float:
    mu = np.maximum(mu, 1e-12)
    return float(np.sum(n * np.log(mu) - mu))


def _stamps(tables, x: float, y: float, flux_band, h: int, w: int) -> list:
    """A source's image as per-bin stamps clipped to the (h, w) image: [(bin, y0, y1, x0, x1, values)]."""
    stamps = ((c, likelihood.clipped_stamp(table, x, y, float(flux_band[c]), h, w)) for c, table in enumerate(tables))
    return [(c, *st) for c, st in stamps if st is not None]


def _add(image, stamps, sign: float, oy: int = 0, ox: int = 0) -> None:
    """Add ``sign`` x the stamps into ``image`` in place; ``image`` may be a box whose corner is (oy, ox)."""
    _, h, w = image.shape
    for c, y0, y1, x0, x1, v in stamps:
        a0, a1, b0, b1 = max(y0 - oy, 0), min(y1 - oy, h), max(x0 - ox, 0), min(x1 - ox, w)
        if a1 > a0 and b1 > b0:
            image[c, a0:a1, b0:b1] += sign * v[a0 + oy - y0:a1 + oy - y0, b0 + ox - x0:b1 + ox - x0]


def extension_test(counts, background, psf_kernels, x, y, flux_band, ts, *, min_ts: float = 25.0,
                   r68_grid_pix=None, ts_ext_min: float = TS_EXT_MIN, piece_params: int | None = None) -> dict:
    """Test each source (brightest first) for extension against ``background`` plus every other source.

    Args:
        counts, background: (C, H, W) counts and expected background counts (the model the point sources were
            fitted against).
        psf_kernels: one centred PSF kernel per bin (:func:`~skyfm.catalog.likelihood.psf_kernels`).
        x, y, flux_band, ts: the point-source fits (pixels; counts per bin (N, C); TS).
        min_ts: sources below it are not tested, and pieces fitted again must reach it to stay.
        r68_grid_pix: sizes to try (68% radius before the PSF, pixels); default :data:`R68_GRID_PSF` times the
            sharpest bin's r68.
        ts_ext_min: TS_ext an extended model must reach over the point model with no pieces.
        piece_params: free parameters each replaced piece counts against the point model (default 2 + the
            number of bins, as the point fits have).

    Returns:
        dict of (N,) arrays: ``x``, ``y``, ``flux_band`` (N, C), ``flux_band_err`` (N, C) and ``pos_err_pix``
        (NaN where the point fit stands), ``ts`` (the extended fit's, or the pieces' new fit), ``extension_pix``
        (r68 before the PSF, 0 for point sources), ``ts_ext`` (of the accepted size; NaN otherwise), ``kept``
        (False: a piece absorbed by an extended source, no longer significant), ``changed`` (True: fitted here,
        an extended source or a piece fitted again).
    """
    n = np.nan_to_num(np.asarray(counts, dtype=np.float64))
    b = np.asarray(background, dtype=np.float64)
    if n.ndim == 2:
        n, b = n[None], b[None]
    c_bins, h, w = n.shape
    kernels = [np.asarray(k, dtype=np.float64) for k in psf_kernels]
    point_tables = likelihood.psf_tables(kernels)
    point_reach = max(t.radius for t in point_tables)
    x = np.asarray(x, dtype=np.float64).copy()
    y = np.asarray(y, dtype=np.float64).copy()
    fb = np.nan_to_num(np.asarray(flux_band, dtype=np.float64).reshape(len(x), c_bins)).clip(0, None)
    ts = np.nan_to_num(np.asarray(ts, dtype=np.float64), nan=-np.inf).copy()
    ns = len(x)
    out = {"x": x, "y": y, "flux_band": fb, "flux_band_err": np.full((ns, c_bins), np.nan),
           "pos_err_pix": np.full(ns, np.nan), "ts": ts, "extension_pix": np.zeros(ns),
           "ts_ext": np.full(ns, np.nan), "kept": np.ones(ns, dtype=bool), "changed": np.zeros(ns, dtype=bool)}
    if ns == 0:
        return out
    if r68_grid_pix is None:
        r68_sharp = min(likelihood._r68_pix(likelihood._kernel_fwhm_pix(k)) for k in kernels)
        r68_grid_pix = [f * r68_sharp for f in R68_GRID_PSF]
    piece_params = 2 + c_bins if piece_params is None else int(piece_params)
    max_r68 = GAUSS_R68_PER_SIGMA * MAX_KERNEL_RADIUS / 3.0
    placed = np.isfinite(x) & np.isfinite(y)
    point = np.ones(ns, dtype=bool)
    stamps = {i: _stamps(point_tables, x[i], y[i], fb[i], h, w) for i in np.flatnonzero(placed)}
    model = b.copy()  # the background and every source
    for st in stamps.values():
        _add(model, st, +1.0)

    def try_size(a, r68, fit_position):
        """(score, r68, inside, fit, x, y, stamps, ts_ext) of source ``a`` as a Gaussian of ``r68`` in place of
        itself and its pieces (the fainter point sources within ``r68``), or None when the fit fails or wanders
        off. ``inside``: the point sources the test fits again beside the Gaussian (the pieces, and with
        :data:`REFIT_INSIDE` the brighter ones within ``r68`` and those within ``r68`` of the Gaussian's fit)."""
        d = np.hypot(x - x[a], y - y[a])
        inside = out["kept"] & placed & point & (d <= r68)
        inside[a] = False
        pieces = np.flatnonzero(inside & (ts < ts[a]))
        brighter = np.flatnonzero(inside & (ts >= ts[a]))
        group = np.r_[a, pieces]
        tabs = extended_tables(kernels, r68)
        half = max(t.radius for t in tabs) + point_reach + 1  # every pixel the change can touch
        ia, ja = int(np.floor(y[a] + 0.5)), int(np.floor(x[a] + 0.5))
        oy, ox = max(ia - half, 0), max(ja - half, 0)
        box = (slice(None), slice(oy, min(ia + half + 1, h)), slice(ox, min(ja + half + 1, w)))
        n_box, model_box = n[box], model[box]
        others = model_box.copy()
        for j in group:
            _add(others, stamps[j], -1.0, oy, ox)
        np.maximum(others, 0.0, out=others)
        flux = fb[group].sum(axis=1)
        wsum = max(flux.sum(), 1e-12)
        x0, y0 = float(np.sum(x[group] * flux) / wsum), float(np.sum(y[group] * flux) / wsum)

        def fit_gaussian(against, gx, gy, gflux):
            fit = likelihood.fit_point_sources(n_box, against, tabs, [gx - ox], [gy - oy], [gflux], n_pass=1,
                                               fit_position=fit_position, marginal_errors=False)
            fx, fy = fit["x"][0] + ox, fit["y"][0] + oy
            if not (np.isfinite(fx) and np.isfinite(fy) and np.isfinite(fit["flux"][0]) and fit["flux"][0] > 0):
                return None
            if np.hypot(fx - x[a], fy - y[a]) > max(r68, 2.0):
                return None  # it wandered off to other light
            ext = _stamps(tabs, fx, fy, fit["flux_band"][0], h, w)
            with_ext = against.copy()
            _add(with_ext, ext, +1.0, oy, ox)
            return fit, fx, fy, ext, with_ext

        got = fit_gaussian(others, x0, y0, flux.sum())
        if got is None:
            return None
        fit, fx, fy, ext, with_ext = got
        dropped = len(pieces)
        rest = pieces
        if REFIT_INSIDE:
            # the point sources inside (the pieces, the brighter ones, and those within r68 of where the Gaussian
            # went: a bright piece off its centre may be the one tested) have their counts fitted again against the
            # Gaussian: pieces still significant (real sources within it) stay in the extended model, so only the
            # dropped ones earn the Akaike credit, the brighter ones give up the light they had taken from it, and
            # the Gaussian is fitted again beside them (the final fit, its position free, goes round twice: the
            # Gaussian's first fit had the pieces' light, so it leans toward them)
            near = out["kept"] & placed & point & (np.hypot(x - fx, y - fy) <= r68)
            near[np.r_[a, pieces, brighter]] = False
            rest = np.r_[pieces, brighter, np.flatnonzero(near)].astype(np.int64)
        if REFIT_INSIDE and len(rest):
            for j in rest[len(pieces):]:
                _add(others, stamps[j], -1.0, oy, ox)
            np.maximum(others, 0.0, out=others)
            base = others
            for _round in range(2 if fit_position else 1):
                with_ext = base.copy()
                _add(with_ext, ext, +1.0, oy, ox)
                refit = likelihood.fit_point_sources(n_box, with_ext, point_tables, x[rest] - ox, y[rest] - oy,
                                                     fb[rest].sum(axis=1), fit_position=False, n_pass=1,
                                                     marginal_errors=False)
                stay = np.isfinite(refit["ts"]) & (refit["ts"] >= min_ts)
                others = base.copy()
                for k in np.flatnonzero(stay):
                    _add(others, _stamps(point_tables, x[rest[k]], y[rest[k]], refit["flux_band"][k], h, w), +1.0,
                         oy, ox)
                got = fit_gaussian(others, fx, fy, fit["flux"][0])
                if got is None:
                    return None
                fit, fx, fy, ext, with_ext = got
            dropped = int(np.sum(~stay))
        ts_ext = 2.0 * (_loglike(n_box, with_ext) - _loglike(n_box, model_box))
        score = ts_ext + 2.0 * piece_params * dropped  # Akaike: the dropped pieces' parameters count against
        return score, r68, rest, fit, fx, fy, ext, ts_ext

    for a in np.argsort(-ts, kind="stable"):
        if not (out["kept"][a] and placed[a] and point[a] and ts[a] >= min_ts):
            continue
        # the size from fits at the pieces' centroid (counts only: cheap), then position and counts at that size
        scans = [t for t in (try_size(a, r68, False) for r68 in r68_grid_pix) if t is not None]
        if not scans:
            continue
        grid = list(r68_grid_pix)
        while GROW_GRID and max(scans, key=lambda t: t[0])[1] == grid[-1] and grid[-1] * GRID_GROWTH <= max_r68:
            grid.append(grid[-1] * GRID_GROWTH)
            scan = try_size(a, grid[-1], False)
            if scan is None:
                break
            scans.append(scan)
        if REFINE_SIZE:  # the grid steps by x1.5: the sizes halfway to the best one's neighbours too
            i = grid.index(max(scans, key=lambda t: t[0])[1])  # a scan returns the grid size it was given
            halfway = [float(np.sqrt(grid[i] * grid[j])) for j in (i - 1, i + 1) if 0 <= j < len(grid)]
            scans += [t for t in (try_size(a, r68, False) for r68 in halfway) if t is not None]
        best = try_size(a, max(scans, key=lambda t: t[0])[1], True)
        if best is None or best[0] < ts_ext_min:
            continue
        _, r68, pieces, fit, fx, fy, ext, ts_ext = best  # pieces: every point source inside (see try_size)
        for j in np.r_[a, pieces]:
            _add(model, stamps.pop(j), -1.0)
        np.maximum(model, b, out=model)  # what is left of the sources stays >= 0
        _add(model, ext, +1.0)
        stamps[a], point[a] = ext, False
        x[a], y[a], fb[a], ts[a] = fx, fy, fit["flux_band"][0], fit["ts"][0]
        out["extension_pix"][a], out["ts_ext"][a], out["changed"][a] = r68, ts_ext, True
        out["flux_band_err"][a], out["pos_err_pix"][a] = fit["flux_band_err"][0], fit["pos_err_pix"][0]
        out["kept"][pieces] = False
        if len(pieces):  # each point source inside again, against the extended source and everything else
            refit = likelihood.fit_point_sources(n, model, point_tables, x[pieces], y[pieces],
                                                 fb[pieces].sum(axis=1), marginal_errors=False)
            for k, j in enumerate(pieces):
                if np.isfinite(refit["x"][k]) and np.isfinite(refit["ts"][k]) and refit["ts"][k] >= min_ts:
                    x[j], y[j], fb[j], ts[j] = refit["x"][k], refit["y"][k], refit["flux_band"][k], refit["ts"][k]
                    out["flux_band_err"][j], out["pos_err_pix"][j] = refit["flux_band_err"][k], refit["pos_err_pix"][k]
                    out["kept"][j] = out["changed"][j] = True
                    stamps[j] = _stamps(point_tables, x[j], y[j], fb[j], h, w)
                    _add(model, stamps[j], +1.0)
    out["ts"] = np.where(np.isfinite(ts), ts, np.nan)
    return out
