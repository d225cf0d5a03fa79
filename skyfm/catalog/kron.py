"""Kron aperture fluxes for the CCD detections that a PSF does not hold: galaxies.

A PSF fit measures a point source's flux as well as the data allow, and a galaxy's only in part: the light beyond
the PSF's core stays in the residual image. On simulated MeerLICHT fields (galaxies of half-light radius about
0.6 FWHM) PSF fluxes hold ~0.65 of a galaxy's flux; on Hubble fields, where galaxies are many PSFs wide, ~0.2
(``docs/benchmarks.md``, Run 16). Catalogs of galaxies use an aperture that grows with the object, as SExtractor's
``FLUX_AUTO`` does (Kron 1980; Bertin & Arnouts 1996): the first moment of the light ``r1 = sum r I / sum I``
within a window of :data:`KRON_WINDOW` ``r1``, and the flux inside :data:`KRON_FACTOR` ``r1``, which holds about
90% or more of the light of most galaxy profiles.

Here ``I`` is the image with every *other* detection's PSF model subtracted (the residual image plus the source's
own model), so neighbours' modelled light does not enter the aperture; what their models leave (a neighbouring
galaxy's outer light) is kept out too: r1 is measured over the pixels nearer to the source than to any other
detection, and in the flux sum a pixel nearer to another detection counts as its mirror image through the source's
centre (SExtractor's ``MASK_TYPE CORRECT``). Apertures are circles (one for all bands, its radius from the bands'
sum weighted by their noise). The aperture flux is divided by the PSF's containment within the aperture
radius (the aperture correction that makes a point source's Kron flux its total flux), so for a point source it is
its PSF flux plus noise; ``excess``, the aperture-corrected flux in the residual over its noise, says how much more
light the source holds than its PSF model: a few sigma or more for a galaxy.

The same light gives each source's windowed centroid (SExtractor's ``XWIN_IMAGE``): the centre of its light
weighted by a Gaussian window of its size, iterated. A PSF fit of a resolved galaxy sees only its core, flat and
noisy for a faint one; the window weighs more of the galaxy (``x_win``, ``y_win``, ``pos_err_win``).
"""

from __future__ import annotations

import numpy as np

KRON_FACTOR = 2.5  # aperture radius / r1 (SExtractor's PHOT_AUTOPARAMS 2.5)
KRON_WINDOW = 6.0  # r1 is measured within this many r1 (SExtractor: 6 x the isophotal size)
KRON_ITERATIONS = 3  # window -> r1 -> window, from the PSF's r1 (SExtractor has its isophotal size to start from)
MIN_APERTURE_CONTAINMENT = 0.9  # the aperture holds at least this share of a point source's light
MIRROR_MASKED = True  # masked pixels inside an aperture take their mirror through the centre (_aperture_sums)
MAX_OUTSIDE_SHARE = 0.1  # an aperture with more of its area off the image or masked gives no flux
EXP_DISK_R1_PER_RE = 1.19  # an exponential disk's Kron radius / its half-light radius
WINDOW_SIGMA_PER_R1 = 2.0 / (2.3548 * EXP_DISK_R1_PER_RE)  # XWIN's window sigma: half-light diameter / 2.35
WINDOW_MAX_PSF_SIGMA = 2.0  # ... but at most this many PSF sigmas: a faint source's Kron radius is mostly noise, and a
# wider window takes its centre from the noise and its neighbours' misfits (validation field images: with no limit
# Hubble's Kron rows lay at a median 0.83 px from their true centre against 0.38 px for their PSF fit)
WINDOW_ITERATIONS = 16  # windowed-centroid steps at most (SExtractor: 16), stopping below 2e-4 px


def _psf_radii(psf, scale: float, window_pix: float) -> tuple[float, float]:
    """(r1 within ``window_pix``, radius holding MIN_APERTURE_CONTAINMENT of the light), pixels, of a PSF."""
    r = np.linspace(0, window_pix, 2048)[1:] * scale
    dens = psf.profile(r) * 2 * np.pi * r
    r1 = float(np.sum(r * dens) / np.sum(dens)) / scale
    return r1, psf.containment_radius(MIN_APERTURE_CONTAINMENT) / scale


def kron_photometry(resid, rms, psfs, pixel_scale_deg: float, x, y, flux_band, *, gain: float = 1.0, mask=None,
                    max_radius_pix: float | None = None, seed: int = 0, select=None, windowed: bool = True) -> dict:
    """Kron aperture fluxes of N sources with their neighbours' models subtracted.

    Args:
        resid: (C, H, W) image minus background minus every source's PSF model
            (:func:`~skyfm.catalog.psf_fit.residual_image`).
        rms: (C, H, W) background rms (ADU).
        psfs: one PSF per band (at the image's seeing); flux_band: (N, C) the PSF fluxes the residual was made
            with (each source's own model is added back).
        x, y: (N,) positions, pixels. gain: e-/ADU (the sources' Poisson noise). mask: (H, W) or (C, H, W) bool.
        max_radius_pix: the largest aperture (default a quarter of the image's shorter side).
        seed: of the blank places where the residual's scatter is measured.
        select: (N,) bool, the sources to measure (None: all); the others get NaN, but still own their pixels.
        windowed: also the windowed centroids (False: ``x_win``, ``y_win``, ``pos_err_win`` stay NaN).
    Returns:
        dict of ``flux_band``, ``flux_band_err`` (N, C), ``flux``, ``flux_err`` (N,): the aperture-corrected Kron
        fluxes (NaN where the aperture runs off the image or is masked beyond MAX_OUTSIDE_SHARE), their errors the
        sky and Poisson noise in the aperture or, where larger, the scatter of the residual in apertures of that
        size at blank places nearby (confusion); ``radius`` (N,) the aperture radius and ``r1`` the Kron radius
        (pixels); ``excess`` (N,) the aperture-corrected residual flux over its error (sigma of light beyond the
        PSF model); ``r1_psf`` the PSF's own Kron radius (pixels); ``x_win``, ``y_win``, ``pos_err_win`` (N,) the
        windowed centroid and its error per axis (pixels; NaN where it ran off, see :func:`_windowed_centroids`),
        the window's sigma :data:`WINDOW_SIGMA_PER_R1` x r1 between one and :data:`WINDOW_MAX_PSF_SIGMA` PSF sigmas;
        ``cut`` (N,) bool: the aperture runs off the array, so that its flux (if not NaN) is of the part on it;
        where the array is a tile of a larger image, a wider cut-out measures all of it
        (:func:`skyfm.detect.detect_tiles` does).
    """
    resid = np.asarray(resid, dtype=np.float64)
    C, H, W = resid.shape
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    n = x.size
    flux_band = np.nan_to_num(np.asarray(flux_band, dtype=np.float64).reshape(n, C))
    var_sky = np.broadcast_to(np.asarray(rms, dtype=np.float64) ** 2, (C, H, W))
    bad = np.zeros((H, W), bool) if mask is None else np.asarray(mask, bool).reshape(-1, H, W).any(axis=0)
    gain = float(gain) if gain and gain > 0 else 1.0
    scale = float(pixel_scale_deg)
    max_r = float(max_radius_pix) if max_radius_pix else 0.25 * min(H, W)
    weights = 1.0 / np.sqrt([float(np.median(var_sky[c])) for c in range(C)])  # bands summed at equal noise
    widest = max(psfs, key=lambda p: p.fwhm_deg)
    r1_psf, r_min = _psf_radii(widest, scale, KRON_WINDOW * widest.fwhm_deg / scale)
    out = dict(flux_band=np.full((n, C), np.nan), flux_band_err=np.full((n, C), np.nan), flux=np.full(n, np.nan),
               flux_err=np.full(n, np.nan), radius=np.full(n, np.nan), r1=np.full(n, np.nan),
               excess=np.full(n, np.nan), r1_psf=r1_psf, x_win=np.full(n, np.nan), y_win=np.full(n, np.nan),
               pos_err_win=np.full(n, np.nan), cut=np.zeros(n, bool))
    ids = np.arange(n) if select is None else np.flatnonzero(np.asarray(select, bool).ravel())
    if ids.size == 0:
        return out
    owner = _nearest_detection(x, y, H, W)  # every detection owns its cell, measured or not
    x, y, flux_band = x[ids], y[ids], flux_band[ids]
    m = ids.size
    detection = np.tensordot(weights, resid, axes=1)  # (H, W): the bands' residuals at equal noise
    own_weight = flux_band @ weights  # (m,): the source's own model in the same sum, per unit PSF
    r1 = np.full(m, r1_psf)
    for _ in range(KRON_ITERATIONS):  # the window follows the source's size
        window = np.minimum(KRON_WINDOW * np.maximum(r1, r1_psf), max_r)
        r1 = _first_moments(detection, bad, owner, ids, widest, scale, x, y, own_weight, window, r1_psf)
    radius = np.clip(KRON_FACTOR * r1, r_min, max_r)
    if windowed:
        var_detection = np.tensordot(weights ** 2, var_sky, axes=1)  # (H, W): the equal-noise sum's sky variance
        psf_sigma = widest.fwhm_deg / scale / 2.3548
        sigma = psf_sigma * np.clip(WINDOW_SIGMA_PER_R1 * r1 / psf_sigma, 1.0, WINDOW_MAX_PSF_SIGMA)
        out["x_win"][ids], out["y_win"][ids], out["pos_err_win"][ids] = _windowed_centroids(
            detection, var_detection, bad, owner, ids, widest, scale, x, y, own_weight, sigma,
            float(weights.max()) / gain)
    rng = np.random.default_rng(seed)
    excess_num, excess_var = np.zeros(m), np.zeros(m)  # the residual's light in the apertures, over all bands
    band, band_err = np.full((m, C), np.nan), np.full((m, C), np.nan)
    for c, p in enumerate(psfs):
        contained = p.containment(radius * scale)  # (m,): the own model's share inside the aperture
        summed, var, outside, off = _aperture_sums(resid[c], var_sky[c], bad, x, y, radius, owner, ids)
        total = summed + flux_band[:, c] * contained  # the aperture's light: residual plus the own model
        # the residual's scatter in apertures of this size at blank places: sky noise, and in crowded fields the
        # light of undetected stars and the misfits of the detected ones (confusion), which the sky rms misses
        blank = _blank_aperture_scatter(resid[c], bad, x, y, radius, rng)
        var = np.maximum(var, blank ** 2) + np.clip(total, 0, None) / gain
        good = outside <= MAX_OUTSIDE_SHARE
        out["cut"][ids] |= off > 0
        band[:, c] = np.where(good, total / contained, np.nan)
        band_err[:, c] = np.where(good, np.sqrt(var) / contained, np.nan)
        excess_num += summed / contained
        excess_var += var / contained ** 2
    out["flux_band"][ids], out["flux_band_err"][ids] = band, band_err
    out["flux"][ids] = band.sum(axis=1)
    out["flux_err"][ids] = np.sqrt((band_err ** 2).sum(axis=1))
    out["radius"][ids], out["r1"][ids] = radius, r1
    out["excess"][ids] = np.where(np.isfinite(band.sum(axis=1)),
                                  excess_num / np.sqrt(np.maximum(excess_var, 1e-300)), np.nan)
    return out


def _boxes(x, y, half_size, H: int, W: int):
    """Square pixel boxes around the sources, grouped by their half-size (``half_size``, (N,) int), in chunks of a
    few million pixels: yields ``(chunk, iy, ix, yy, xx, inside, yc, xc, r)`` with ``chunk`` the sources' indices,
    (iy, ix) their pixels, (yy, xx) the boxes' pixel coordinates (n, k, k), ``inside`` those on the image, (yc,
    xc) the same clipped to it, and ``r`` their distance from the source's position."""
    for s in np.unique(half_size):
        idx = np.flatnonzero(half_size == s)
        off = np.arange(-int(s), int(s) + 1)
        for chunk in np.array_split(idx, max(1, int(np.ceil(idx.size * (2 * s + 1) ** 2 / 4e6)))):
            ix, iy = np.rint(x[chunk]).astype(int), np.rint(y[chunk]).astype(int)
            yy, xx = iy[:, None, None] + off[None, :, None], ix[:, None, None] + off[None, None, :]
            inside = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            yc, xc = np.clip(yy, 0, H - 1), np.clip(xx, 0, W - 1)
            r = np.hypot(xx - x[chunk, None, None], yy - y[chunk, None, None])
            yield chunk, iy, ix, yy, xx, inside, yc, xc, r


def _nearest_detection(x, y, H: int, W: int) -> np.ndarray:
    """(H, W) int: the index of the detection nearest to each pixel (the Voronoi cells of the detections)."""
    from scipy import ndimage

    ix, iy = np.clip(np.rint(x).astype(int), 0, W - 1), np.clip(np.rint(y).astype(int), 0, H - 1)
    label = np.full((H, W), -1)
    label[iy, ix] = np.arange(x.size)
    _, (ny, nx) = ndimage.distance_transform_edt(label < 0, return_indices=True)
    return label[ny, nx]


def _first_moments(detection, bad, owner, ids, psf, scale, x, y, own_weight, window, r1_default) -> np.ndarray:
    """(N,) Kron radius r1 = sum r I / sum I within each source's ``window`` (pixels), I the residual plus the
    source's own model (its PSF at the pixel centres, ``own_weight`` x profile), over the pixels nearer to it than
    to any other detection (``owner``, which holds the sources' indices ``ids``): a neighbour's light, a galaxy's
    that its PSF model left, must not pull the window open. Sources whose light sums to <= 0 keep ``r1_default``.
    Sources are taken in groups of similar windows, each group in one array operation."""
    r1 = np.full(x.size, float(r1_default))
    for chunk, _, _, _, _, inside, yc, xc, r in _boxes(x, y, np.ceil(window).astype(int), *detection.shape):
        use = inside & ~bad[yc, xc] & (r <= window[chunk, None, None]) & (owner[yc, xc] == ids[chunk, None, None])
        light = detection[yc, xc] + own_weight[chunk, None, None] * psf.profile(r * scale) * scale ** 2
        light = np.where(use, light, 0.0)
        total = light.sum(axis=(1, 2))
        moment = (light * r).sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            r1[chunk] = np.where(total > 0, moment / np.where(total > 0, total, 1.0), r1_default)
    return np.clip(r1, 0.0, None)


def _windowed_centroids(detection, var, bad, owner, ids, psf, scale, x, y, own_weight, sigma, poisson_per_unit):
    """(x, y, error) of each source's windowed centroid (SExtractor's XWIN_IMAGE, YWIN_IMAGE, ERRAWIN_IMAGE): the
    centre of its light I (the residual plus its own PSF model, as :func:`_first_moments`) weighted by a Gaussian
    window of ``sigma`` px centred on the current estimate, iterated: x += 2 sum w I (x_i - x) / sum w I. For a
    symmetric source, however extended, it converges on the centre, where a PSF fit of a galaxy settles on its core
    or on the side a neighbour's model left. Pixels nearer to another detection count as their mirror image
    through the source (SExtractor's ``MASK_TYPE CORRECT``), so a neighbour's light does not pull it. The error per
    axis is SExtractor's, sqrt(4 sum w^2 var_i (x_i - x)^2) / sum w I, averaged over the axes; ``var`` the sky
    variance of ``detection`` and ``poisson_per_unit`` x the light its Poisson part. NaN where the windowed light
    is not positive or the centroid runs off by more than 2 sigma (then the caller keeps its position)."""
    H, W = detection.shape
    n = x.size
    xw, yw = x.astype(float).copy(), y.astype(float).copy()
    err = np.full(n, np.nan)
    half = np.ceil(4.0 * sigma + 2.0).astype(int)
    # each box's light is read once (the box stays on the detection, only the window moves), then iterated
    for chunk, iy, ix, yy, xx, inside, yc, xc, _ in _boxes(x, y, half, H, W):
        mine = ids[chunk][:, None, None]
        foreign = owner[yc, xc] != mine
        my, mx = 2 * iy[:, None, None] - yy, 2 * ix[:, None, None] - xx
        m_in = (my >= 0) & (my < H) & (mx >= 0) & (mx < W)
        myc, mxc = np.clip(my, 0, H - 1), np.clip(mx, 0, W - 1)
        src_y, src_x = np.where(foreign, myc, yc), np.where(foreign, mxc, xc)
        use = inside & ~bad[src_y, src_x] & (~foreign | (m_in & (owner[myc, mxc] == mine)))
        r0 = np.hypot(xx - x[chunk, None, None], yy - y[chunk, None, None])
        light = detection[src_y, src_x] + own_weight[chunk, None, None] * psf.profile(
            np.hypot(src_x - x[chunk, None, None], src_y - y[chunk, None, None]) * scale) * scale ** 2
        light = np.where(use & (r0 <= half[chunk, None, None]), light, 0.0)
        s2 = sigma[chunk, None, None] ** 2
        cx, cy = xw[chunk], yw[chunk]
        done = np.zeros(chunk.size, bool)
        with np.errstate(invalid="ignore", divide="ignore"):
            for _ in range(WINDOW_ITERATIONS):
                if done.all():
                    break
                dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
                wl = np.exp(-0.5 * (dx ** 2 + dy ** 2) / s2) * light
                total = wl.sum(axis=(1, 2))
                sx = np.where(total > 0, 2 * (wl * dx).sum(axis=(1, 2)) / total, 0.0)
                sy = np.where(total > 0, 2 * (wl * dy).sum(axis=(1, 2)) / total, 0.0)
                cx, cy = np.where(done, cx, cx + sx), np.where(done, cy, cy + sy)
                done |= (np.hypot(sx, sy) < 2e-4) | ~(total > 0)
            dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
            wgt = np.exp(-0.5 * (dx ** 2 + dy ** 2) / s2)
            total = (wgt * light).sum(axis=(1, 2))
            v = np.where(use, var[src_y, src_x] + np.clip(light, 0, None) * poisson_per_unit, 0.0)
            ex = np.sqrt(4 * (wgt ** 2 * v * dx ** 2).sum(axis=(1, 2))) / total
            ey = np.sqrt(4 * (wgt ** 2 * v * dy ** 2).sum(axis=(1, 2))) / total
        xw[chunk], yw[chunk] = cx, cy
        err[chunk] = np.where(total > 0, 0.5 * (ex + ey), np.nan)
    off = np.hypot(xw - x, yw - y) > 2.0 * sigma
    bad_row = off | ~np.isfinite(err) | ~np.isfinite(xw) | ~np.isfinite(yw)
    return np.where(bad_row, np.nan, xw), np.where(bad_row, np.nan, yw), np.where(bad_row, np.nan, err)


def _aperture_sums(image, var, bad, x, y, radius, owner=None, ids=None):
    """Per source: the sum of ``image`` and of ``var`` over the pixels whose centres lie within ``radius`` of (x,
    y), the share of the aperture's pixels off the image or masked (those are not summed), and the share off the
    image alone. With ``owner``
    ((H, W) index of the nearest detection; the sources' own indices ``ids``, default 0..N-1), a pixel nearer to
    another detection counts as its mirror image through the source's centre where that one is the source's own,
    else as nothing (SExtractor's ``MASK_TYPE CORRECT``): a neighbour's light left in the residual stays out of the
    aperture. A masked pixel counts as its mirror image too where that is the source's own and not masked (with
    :data:`MIRROR_MASKED`; a dead column beside a galaxy's centre would otherwise take ~14% of its light); only
    the masked pixels without one count towards the share."""
    H, W = image.shape
    n = x.size
    summed, variance, outside, off = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    for chunk, iy, ix, yy, xx, inside, yc, xc, r in _boxes(x, y, np.ceil(radius).astype(int) + 1, H, W):
        within = r <= radius[chunk, None, None]
        use = within & inside & ~bad[yc, xc]
        values, variances = image[yc, xc], var[yc, xc]
        if owner is not None:
            mine = (chunk if ids is None else ids[chunk])[:, None, None]
            foreign = owner[yc, xc] != mine
            my, mx = 2 * iy[:, None, None] - yy, 2 * ix[:, None, None] - xx  # the mirror through the centre
            m_in = (my >= 0) & (my < H) & (mx >= 0) & (mx < W)
            myc, mxc = np.clip(my, 0, H - 1), np.clip(mx, 0, W - 1)
            mirrored = m_in & (owner[myc, mxc] == mine) & ~bad[myc, mxc]
            if MIRROR_MASKED:  # a masked pixel (a dead column, a cosmic ray) takes its mirror too, where it has one
                repaired = within & inside & bad[yc, xc] & mirrored
                use = use | repaired
                foreign = foreign | repaired
            values = np.where(foreign, np.where(mirrored, image[myc, mxc], 0.0), values)
            variances = np.where(foreign, np.where(mirrored, var[myc, mxc], 0.0), variances)
        summed[chunk] = np.where(use, values, 0.0).sum(axis=(1, 2))
        variance[chunk] = np.where(use, variances, 0.0).sum(axis=(1, 2))
        n_within = np.maximum(within.sum(axis=(1, 2)), 1)
        outside[chunk] = 1.0 - use.sum(axis=(1, 2)) / n_within
        off[chunk] = 1.0 - (within & inside).sum(axis=(1, 2)) / n_within
    return summed, variance, outside, off


BLANK_PER_CELL = 48  # blank apertures per cell (a MAD of 48 values is good to ~15%)
BLANK_RADIUS_STEP = 1.5  # blank apertures are measured at radii this factor apart and interpolated


def _blank_aperture_scatter(image, bad, x, y, radius, rng) -> np.ndarray:
    """(N,) robust scatter (1.4826 MAD) of ``image`` summed in apertures of each source's ``radius`` at random
    places, per cell of max(64, 4 radii) px around the source (the image's value where a cell holds too few), at
    radii BLANK_RADIUS_STEP apart, interpolated in log radius. The blank apertures are squares of the circle's
    area, summed from an integral image (thousands per tile at no cost; a scatter does not need the circle)."""
    H, W = image.shape
    clean = np.where(bad, 0.0, image)
    summed = np.zeros((H + 1, W + 1))
    summed[1:, 1:] = clean.cumsum(axis=0).cumsum(axis=1)
    masked = np.zeros((H + 1, W + 1))
    masked[1:, 1:] = bad.cumsum(axis=0).cumsum(axis=1)

    def box(table, y0, x0, side):
        return table[y0 + side, x0 + side] - table[y0, x0 + side] - table[y0 + side, x0] + table[y0, x0]

    def mad(v):
        return 1.4826 * np.median(np.abs(v - np.median(v))) if v.size else np.nan

    lo, hi = float(np.min(radius)), float(np.max(radius))
    grid = lo * BLANK_RADIUS_STEP ** np.arange(int(np.ceil(np.log(hi / lo) / np.log(BLANK_RADIUS_STEP))) + 1)
    per_radius = []
    for r in grid:
        side = int(np.clip(round(np.sqrt(np.pi) * r), 1, min(H, W)))
        cell = int(max(64, 4 * r))
        ny, nx = -(-H // cell), -(-W // cell)
        m = BLANK_PER_CELL * ny * nx
        y0, x0 = rng.integers(0, H - side + 1, m), rng.integers(0, W - side + 1, m)
        good = box(masked, y0, x0, side) <= MAX_OUTSIDE_SHARE * side ** 2
        values = box(summed, y0, x0, side)[good]
        by, bx = (y0 + 0.5 * side)[good], (x0 + 0.5 * side)[good]
        cells = (np.minimum(by // cell, ny - 1) * nx + np.minimum(bx // cell, nx - 1)).astype(int)
        table = np.full(ny * nx, mad(values))
        for k in np.unique(cells):
            sel = cells == k
            if sel.sum() >= 16:
                table[k] = mad(values[sel])
        at = (np.clip(y // cell, 0, ny - 1) * nx + np.clip(x // cell, 0, nx - 1)).astype(int)
        per_radius.append(table[at])
    per_radius = np.nan_to_num(np.array(per_radius), nan=0.0)  # (radii, N)
    if len(grid) == 1:
        return per_radius[0]
    pos = np.clip(np.log(radius / lo) / np.log(BLANK_RADIUS_STEP), 0, len(grid) - 1)
    i = np.minimum(pos.astype(int), len(grid) - 2)
    t = pos - i
    n = np.arange(radius.size)
    return (1 - t) * per_radius[i, n] + t * per_radius[i + 1, n]


def half_light_radius_pix(r1, r1_psf) -> np.ndarray:
    """A source's half-light radius (pixels) from its Kron radius, the PSF's taken out in quadrature, as an
    exponential disk's (0 where r1 is not above the PSF's)."""
    r1 = np.asarray(r1, float)
    return np.sqrt(np.clip(r1 ** 2 - float(r1_psf) ** 2, 0.0, None)) / EXP_DISK_R1_PER_RE


__all__ = ["half_light_radius_pix", "kron_photometry"]
