"""PSF-fit refinement of CCD detections: positions and fluxes with Fisher errors, for many sources at once.

The network finds the sources; for point sources a least-squares fit of the instrument's PSF to the pixels is
the efficient estimator (its errors reach the Cramér–Rao bound when the PSF and noise model are right), as
SExtractor's PSF photometry and photutils' ``PSFPhotometry`` do. This module fits all sources of an image in one
vectorised Gauss–Newton loop:

* model, per band c: ``mu_c = B_c + sum_s F_sc P_c(x - x_s, y - y_s)``, the pixel-integrated PSF
  (:meth:`skyfm.instruments.psf.PSF.stamps`) in a (2r + 1)^2 box, one position per source shared by all bands and
  one flux per band;
* a constant sky offset per band and source, fitted with it (the background mesh is not exact near bright or
  crowded light);
* noise: variance ``rms_c^2 + max(F P + others, 0) / gain`` (sky and read noise from the background rms, plus the
  Poisson noise of the source's own and its neighbours' modelled light);
* neighbours: each source is fitted on the image minus the current models of all the others, in ``passes``
  rounds (after a pass 0 that fits the fluxes alone at the starting positions), so blends share their light
  instead of each taking all of it; the others' models reach out to
  ``wing_fwhm`` FWHM, not just the fit box, because a bright neighbour's wing (a Moffat's, say) lies across the
  box as a slope that no sky offset takes up;
* errors: the inverse Fisher matrix at the solution (position: the mean of the x and y variances).

The background B and its rms come from :func:`background_and_rms` (``sep``'s SExtractor background mesh, and a finer
one where the sky holds extended light that it misses, :func:`extended_light`). The PSF
width of each band comes from :func:`estimate_fwhm` (a grid fit on the brightest point sources, the other
detections subtracted), because the seeing of a real image is not the instrument's nominal one.
"""

from __future__ import annotations

import threading

import numpy as np

from skyfm.errors import SkyfmError

MAX_SHIFT_PIX = 1.5  # a fit that moves a source further than this from the detection is not trusted
WING_FWHM = 4.0  # neighbours' models reach this many FWHM (a Moffat beta 2.5 holds 99% of its flux within 4 FWHM)
WING_MIN_RMS = 0.1  # ... for sources whose wing just beyond the fit box exceeds this fraction of the background rms


EXTENDED_BOX_DIVISOR = 4  # the finer mesh that follows extended light: the background box / this (16 px for 64), ...
# ... and at least this many PSF FWHM (a finer box follows stars' own wings: MeerLICHT at 5.5" seeing, FWHM 9.8 px,
# with 16-px boxes, two crowded validation tiles lost 13 of 224 stars); a fine box over half the coarse one is no
# finer: then the coarse mesh alone
EXTENDED_BOX_FWHM = 3.5
# it is taken where it rises above the coarse mesh, smoothed over a fine box, by more than this many rms per pixel
# (validation fields and crowded fields of five bands: at most 1.1 in 58 of 60; a 10-sigma glow 90 px wide: 2-2.5),
# and within two fine boxes of there (a glow's outskirts, where the coarse mesh is off by less, are its too)
EXTENDED_MIN_RMS = 1.0
SLOPE_MAX_RMS = 1.0  # a sky that changes by more than this many rms across a box: its rms is measured about it


def background_and_rms(image: np.ndarray, mask: np.ndarray | None = None, box: int = 64, extended: bool = True,
                       fwhm_pix: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(background, rms) maps of a 2-D image: sep's SExtractor-style background mesh (box ``box`` px, 3x3 filter),
    computed twice, the second time with the pixels of sources (> 2.5 rms above the first background, grown by
    two pixels) masked, so that the wings of many sources do not inflate the noise. With ``extended``, where the
    sky holds light on scales between the PSF's and the box's (nebulosity) that the coarse mesh cannot follow,
    the background follows it there (:func:`extended_light`, boxes of ``box`` / :data:`EXTENDED_BOX_DIVISOR` and at
    least :data:`EXTENDED_BOX_FWHM` x ``fwhm_pix``, the PSF's FWHM in pixels, where given); elsewhere the maps are
    the mesh's as they are. Where the sky changes across a box by more than :data:`SLOPE_MAX_RMS` rms, or extended
    light was taken, the rms is measured again about the sky (a box's rms is its scatter about one level)."""
    import sep

    data = np.ascontiguousarray(image, dtype=np.float32)
    h, w = data.shape
    b = int(min(box, max(8, min(h, w) // 2)))
    base = np.zeros((h, w), bool) if mask is None else np.asarray(mask, dtype=bool)
    bkg = sep.Background(data, mask=np.ascontiguousarray(base), bw=b, bh=b, fw=3, fh=3)
    keep = _without_sources(base, data - bkg.back() > 2.5 * bkg.rms())
    if keep is not base:
        bkg = sep.Background(data, mask=keep, bw=b, bh=b, fw=3, fh=3)
    back, rms = bkg.back().astype(np.float64), np.maximum(bkg.rms().astype(np.float64), 1e-12)
    fine = max(8, b // EXTENDED_BOX_DIVISOR, int(np.ceil(EXTENDED_BOX_FWHM * fwhm_pix)) if fwhm_pix else 0)
    followed = extended_light(data, base, back, rms, fine) if extended and fine <= b // 2 else back
    # a box's rms is the scatter about the box's one level: where the sky changes across a box (a glow taken out
    # above; a steep gradient: 30 sigma across a 512^2 field inflated it 1.5x) it is measured again about the sky
    coarse = followed[::8, ::8]
    step = max(np.abs(np.diff(coarse, axis=0)).max(initial=0.0), np.abs(np.diff(coarse, axis=1)).max(initial=0.0))
    if followed is not back or step * b / 8 > SLOPE_MAX_RMS * float(np.median(rms)):
        back = followed
        rest = np.ascontiguousarray(data - back, dtype=np.float32)
        keep = np.ascontiguousarray(_without_sources(base, rest > 2.5 * rms))
        again = sep.Background(rest, mask=keep, bw=b, bh=b, fw=3, fh=3).rms()
        rms = np.clip(again.astype(np.float64), 0.5 * rms, rms)  # (boxes with too little sky left: ~0)
    return back, rms


def _without_sources(base: np.ndarray, above: np.ndarray) -> np.ndarray:
    """The pixels a second mesh leaves out: ``base`` and the sources (``above``, grown by two pixels), so that the
    wings of many sources do not inflate the noise; ``base`` itself where that would leave under 30% of the image
    (keep enough sky for the mesh)."""
    from scipy import ndimage

    sources = ndimage.binary_dilation(above, iterations=2)
    return np.ascontiguousarray(base | sources) if (base | sources).mean() < 0.7 else base


def extended_light(data: np.ndarray, mask: np.ndarray, back: np.ndarray, rms: np.ndarray, box: int) -> np.ndarray:
    """``back`` (a coarse background mesh) with the sky's extended light added where the mesh misses it.

    A nebula or a halo a few boxes wide leaves the 64-px mesh several rms below the sky it spans (a 20-sigma,
    60-px glow: 6 rms at its median), and a network trained on flat skies, and a PSF fit, take what is left for
    hundreds of stars. A finer mesh (``box`` px, unfiltered) measured with the compact sources masked (pixels 2.5
    rms above a first fine mesh, grown by two pixels) follows it. It is taken, in full, where its departure from
    ``back`` smoothed over a fine box exceeds :data:`EXTENDED_MIN_RMS` rms upwards (light added to the sky), and
    within two fine boxes of there (where it may also go below: a glow's outskirts, which the coarse mesh smears).
    Where nothing departs (the simulators' flat skies) ``back`` itself is returned."""
    import sep
    from scipy import ndimage

    data = np.ascontiguousarray(data, dtype=np.float32)
    base = np.ascontiguousarray(mask, dtype=bool)
    first = sep.Background(data, mask=base, bw=box, bh=box, fw=1, fh=1).back()  # unfiltered: it follows a glow's peak
    noise = np.maximum(rms, 0.5 * float(np.median(rms[::8, ::8])))  # masked boxes' rms can be tiny (a smooth map)
    # both meshes are smooth on the fine box's scale: the test runs on every (box / 4)-th pixel
    step = max(1, box // 4)

    def rises(mesh):  # where a fine mesh rises above the coarse one by more than EXTENDED_MIN_RMS, smoothed
        grid = ((mesh - back) / noise)[step // 2::step, step // 2::step]
        return ndimage.gaussian_filter(grid, box / step, mode="nearest") > EXTENDED_MIN_RMS

    if not rises(first).any():  # masking the compact sources would only lower it (flat skies: no more work)
        return back
    # compact sources, and pixels far below the sky (dead or cold ones: a W3 tile's corner pulled the mesh 28 rms down)
    rest = data - first
    compact = ndimage.binary_dilation((rest > 2.5 * noise) | (rest < -5.0 * noise), iterations=2) & ~base
    if (base | compact).mean() > 0.7:  # too little sky left to follow
        return back
    fine = sep.Background(data, mask=np.ascontiguousarray(base | compact), bw=box, bh=box, fw=1, fh=1).back()
    # light added to the sky: a mesh pulled down (dead pixels, a bleed column's masked surroundings) is no nebula
    found = rises(fine)
    if not found.any():
        return back
    # in full where it is taken: a glow taken out in part leaves a slope of its own for the network to tile
    region = ndimage.maximum_filter(found, size=2 * (2 * box // step) + 1, mode="nearest")
    weight = ndimage.gaussian_filter(region.astype(np.float64), box / 2 / step, mode="nearest")  # no edge where it ends
    weight = _upsample(weight, step, data.shape)
    return back + weight * (fine - back)


def _upsample(grid: np.ndarray, step: int, shape: tuple[int, int]) -> np.ndarray:
    """A map sampled at every ``step``-th pixel from ``step // 2`` (``grid``), interpolated linearly to ``shape``."""
    out = grid
    for axis, n in enumerate(shape):
        at = (np.arange(n) - step // 2) / step  # each pixel's position on the grid
        i0 = np.clip(np.floor(at).astype(int), 0, grid.shape[axis] - 1)
        i1 = np.minimum(i0 + 1, grid.shape[axis] - 1)
        t = np.clip(at - i0, 0.0, 1.0)
        shape_t = (-1, 1) if axis == 0 else (1, -1)
        t = t.reshape(shape_t)
        out = np.take(out, i0, axis=axis) * (1 - t) + np.take(out, i1, axis=axis) * t
    return out


def _stamp_indices(x: np.ndarray, y: np.ndarray, r: int, h: int, w: int):
    """Integer stamp centres, (N, k, k) flat pixel indices (clipped) and an in-image mask, k = 2 r + 1."""
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    off = np.arange(-r, r + 1)
    yy = iy[:, None, None] + off[None, :, None]
    xx = ix[:, None, None] + off[None, None, :]
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    flat = np.clip(yy, 0, h - 1) * w + np.clip(xx, 0, w - 1)
    return ix, iy, flat, inside


def _oversample(psf, scale: float) -> int:
    """Sub-pixels per side for stamps accurate to well under 1% per pixel: a fit at the Cramér–Rao bound of a
    bright undersampled star (0.01 px) needs the pixel integral far better than the simulator's default."""
    return int(np.clip(np.ceil(16.0 * scale / psf.fwhm_deg), 4, 10))


TABLE_PHASES = 32  # sub-pixel phases per pixel of a StampTable (bilinear between them)
TABLE_REACH_PIX = 1.5  # offsets from the box centre the table covers: a fit may move a source off its pixel
_TABLES: dict = {}
_TABLES_LOCK = threading.Lock()
LOCUS_QUANTILE = 0.2  # estimate_fwhm(locus=...): the widths up to locus x this quantile's are the stellar locus
SEEING_PHASES = 4  # the seeing search's tables: 13 widths per band, built once per process, kept


class StampTable:
    """Pixel-integrated PSF stamps on a grid of sub-pixel offsets (|dx|, |dy| <= TABLE_REACH_PIX from the box
    centre), interpolated bilinearly: the stamps (and their derivatives) of N sources in a few array gathers
    instead of N x k^2 x oversample^2 profile evaluations."""

    def __init__(self, psf, scale: float, r: int, phases: int = TABLE_PHASES):
        n = int(round(2 * TABLE_REACH_PIX * phases))
        k = 2 * r + 1
        # Every entry is the profile integrated over one pixel, and the table's offsets step by 1 / phases px:
        # on a fine grid of cells 1 / (phases q) px wide, each entry is a box of (phases q)^2 cells, so one
        # summed-area table of the profile gives them all (the midpoint rule at >= _oversample cells per pixel).
        q = max(1, int(np.ceil(_oversample(psf, scale) / phases)))
        per_pix = phases * q
        cells = (k * phases + n) * q  # fine cells per axis: the stamp plus the table's reach on both sides
        h = 1.0 / per_pix
        centres = -(r + 0.5 + TABLE_REACH_PIX) + (np.arange(cells) + 0.5) * h  # pixels from the box centre
        rr = np.hypot(centres[:, None], centres[None, :]) * scale
        summed = np.zeros((cells + 1, cells + 1))
        summed[1:, 1:] = (psf.profile(rr) * (h * scale) ** 2).cumsum(0).cumsum(1)
        # first cell of pixel j (0..k-1) for table offset m (0..n, offset -reach + m / phases): (j phases + n - m) q
        start = (np.arange(k)[None, :] * phases + n - np.arange(n + 1)[:, None]) * q  # (n + 1, k)
        table = np.empty((n + 1, n + 1, k, k))
        ax = start[None, :, None, :]  # (1, n + 1, 1, k): the x offset and column
        for m in range(n + 1):  # one row of y offsets at a time: the gathers stay small
            ay = start[m][None, :, None]  # (1, k, 1)
            table[m] = (summed[ay + per_pix, ax[0] + per_pix] - summed[ay, ax[0] + per_pix]
                        - summed[ay + per_pix, ax[0]] + summed[ay, ax[0]])
        self.table = table
        self.steps = n

    @classmethod
    def get(cls, psf, scale: float, r: int, phases: int = TABLE_PHASES) -> "StampTable":
        key = (psf.model, round(psf.width_deg / scale, 4), round(float(psf.beta), 4), r)
        with _TABLES_LOCK:  # tiles may be refined in threads (skyfm.detect.detect_tiles)
            cache = _TABLES.setdefault(phases, {})  # coarse tables (the seeing search) never evict the fit's
            if key not in cache:
                if len(cache) >= (16 if phases >= TABLE_PHASES else 128):  # a fit table ~20 MB, a coarse one ~1 MB
                    cache.pop(next(iter(cache)))
                cache[key] = cls(psf, scale, r, phases)
            return cache[key]

    def __call__(self, dx: np.ndarray, dy: np.ndarray, grad: bool = False):
        n, reach = self.steps, TABLE_REACH_PIX
        per_pix = n / (2 * reach)
        fx = (np.clip(dx, -reach, reach) + reach) * per_pix
        fy = (np.clip(dy, -reach, reach) + reach) * per_pix
        ix = np.minimum(fx.astype(np.int64), n - 1)
        iy = np.minimum(fy.astype(np.int64), n - 1)
        tx, ty = (fx - ix)[:, None, None], (fy - iy)[:, None, None]
        # one flat gather per corner (np.take on the first axis is several times faster than indexing two axes),
        # and the differences computed in place: the same arithmetic, so the same stamps to the last bit
        flat = self.table.reshape(-1, *self.table.shape[2:])
        corner = iy * (n + 1) + ix
        a, b = np.take(flat, corner, axis=0), np.take(flat, corner + 1, axis=0)
        c, d = np.take(flat, corner + n + 1, axis=0), np.take(flat, corner + n + 2, axis=0)
        b -= a  # b - a
        d -= c  # d - c
        low = tx * b
        low += a
        high = tx * d
        high += c
        high -= low  # high - low
        stamp = ty * high
        stamp += low
        if not grad:
            return stamp, None, None
        ddx = (1 - ty) * b
        ddx += ty * d
        ddx *= per_pix
        high *= per_pix
        return stamp, ddx, high


def _stamps(psf, dx, dy, scale, r, phases=TABLE_PHASES):
    return StampTable.get(psf, scale, r, phases)(np.asarray(dx, float), np.asarray(dy, float))[0]


def _psf_and_gradient(psf, dx, dy, scale, r, grad: bool, phases=TABLE_PHASES):
    return StampTable.get(psf, scale, r, phases)(np.asarray(dx, float), np.asarray(dy, float), grad)


def fit_radius_pix(psfs, pixel_scale_deg: float) -> int:
    """The default half-size (pixels) of a source's fit box: 1.5 x the widest band's FWHM, at least 2."""
    return int(max(2, np.ceil(1.5 * max(p.fwhm_deg for p in psfs) / pixel_scale_deg)))


def _band_boxes(psfs, pixel_scale_deg: float, r: int) -> np.ndarray:
    """(C, 2r + 1, 2r + 1) bool: each band's fit box (1.5 of its own FWHM) inside the common array of half-size r.
    A sharp band's position is then not confused by neighbours that only the broadest band's box reaches (WISE:
    W1 4.4 px FWHM, W4 8.7 px)."""
    off = np.abs(np.arange(-r, r + 1))
    ring = np.maximum(off[:, None], off[None, :])
    return np.stack([ring <= min(r, fit_radius_pix([p], pixel_scale_deg)) for p in psfs])


def _wing_radii(psfs, pixel_scale_deg: float, r: int, wing_fwhm: float = WING_FWHM) -> list:
    """Per band, the half-size of the neighbours' models: ``wing_fwhm`` of its FWHM, at least the fit box r."""
    return [max(r, int(np.ceil(wing_fwhm * p.fwhm_deg / pixel_scale_deg))) for p in psfs]


def fit_psf_sources(data, background, rms, psfs, pixel_scale_deg: float, x0, y0, flux0=None, *,
                    gain: float = 1.0, mask=None, radius_pix: int | None = None, passes: int = 3,
                    n_iter: int = 5, phases: int = TABLE_PHASES, wing_fwhm: float = WING_FWHM,
                    warm_start: bool = True) -> dict:
    """Fit position (shared by bands) and per-band flux of N point sources; see the module docstring.

    Args:
        data, background, rms: (C, H, W) image, background and background rms, ADU.
        psfs: one :class:`~skyfm.instruments.psf.PSF` per band (at the image's seeing).
        x0, y0: (N,) starting positions, pixels (0-based, pixel centres on integers).
        flux0: (N, C) starting fluxes (ADU) or None (from the data).
        gain: e-/ADU, for the sources' own Poisson noise.
        mask: (H, W) or (C, H, W) bool, True = a pixel not to use (saturated, cosmic ray, off the image).
        radius_pix: fit box half-size, every band; default 1.5 x each band's FWHM (at least 2), in a common array
            of the widest band's size.
        phases: sub-pixel phases of the stamp tables (:class:`StampTable`).
        wing_fwhm: half-size, in each band's FWHM, of the neighbours' models subtracted from a source's box (the
            fit box itself if smaller; 0: the fit box).
        warm_start: first fit the fluxes alone at the starting positions (pass 0), so that the ``passes`` full
            passes start from fluxes the data gave, not from ``flux0``.
    Returns:
        dict of ``x``, ``y``, ``pos_err`` (pixels), ``flux_band``, ``flux_band_err`` (N, C), ``flux``, ``flux_err``
        (sums over bands), ``ok`` (N,) (the fit converged and stayed within MAX_SHIFT_PIX), ``chi2_red`` (N,)
        (the reduced chi-square of each source's box, the others' models subtracted: about 1 where the model
        explains the pixels).
    """
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 3:
        raise SkyfmError(f"fit_psf_sources needs a (C, H, W) image, got shape {data.shape}")
    C, H, W = data.shape
    if len(psfs) != C:
        raise SkyfmError(f"{len(psfs)} PSFs for {C} bands")
    x0 = np.asarray(x0, dtype=np.float64).ravel()
    y0 = np.asarray(y0, dtype=np.float64).ravel()
    n = x0.size
    if n == 0:
        return dict(x=x0, y=y0, pos_err=np.zeros(0), flux_band=np.zeros((0, C)), flux_band_err=np.zeros((0, C)),
                    flux=np.zeros(0), flux_err=np.zeros(0), ok=np.zeros(0, bool), chi2_red=np.zeros(0))
    resid_src = data - np.asarray(background, dtype=np.float64)  # (C, H, W): sources + noise
    var_sky = np.asarray(rms, dtype=np.float64) ** 2
    bad = np.zeros((C, H, W), bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), (C, H, W))
    r = fit_radius_pix(psfs, pixel_scale_deg) if radius_pix is None else int(radius_pix)
    band_box = _band_boxes(psfs, pixel_scale_deg, r) if radius_pix is None else np.ones((C, 2 * r + 1, 2 * r + 1), bool)
    gain = float(gain) if gain and gain > 0 else 1.0
    wing_r = _wing_radii(psfs, pixel_scale_deg, r, wing_fwhm)
    wing_min = _wing_min(np.broadcast_to(np.asarray(rms, dtype=np.float64), (C, H, W)))

    x, y = x0.copy(), y0.copy()
    flux = np.zeros((n, C))
    if flux0 is not None:
        flux[:] = np.nan_to_num(np.asarray(flux0, dtype=np.float64).reshape(n, -1)[:, :C], nan=0.0)
    # pass 0 fits the fluxes alone at the starting positions (others' models at the starting fluxes subtracted):
    # the full passes then start from fluxes the data gave, whatever the starting ones were
    first = 0 if warm_start else 1
    for pass_index in range(first, max(1, passes) + 1):
        iterations = 0 if pass_index == 0 else n_iter
        x_prev, y_prev, flux_prev = x.copy(), y.copy(), flux.copy()
        models = _render(x, y, flux, psfs, pixel_scale_deg, r, (C, H, W), phases, wing_r, wing_min)  # all sources
        ix, iy, flat, inside = _stamp_indices(x0, y0, r, H, W)  # boxes stay on the detections
        # each source sees the data minus everyone else's model: add its own model back below
        others = np.stack([resid_src[c].ravel()[flat] - models[c].ravel()[flat] for c in range(C)],
                          axis=1)  # (N, C, k, k), gathered before the difference: the boxes, not the image
        use = inside[:, None] & ~np.stack([bad[c].ravel()[flat] for c in range(C)], axis=1) & band_box[None]
        own = _own_models(x, y, flux, ix, iy, psfs, pixel_scale_deg, r, phases)  # (N, C, k, k) at the current fit
        target = others + own
        # the noise of a pixel holds the photons of every source there: beside a star 100x brighter its wing's
        # Poisson noise, not the sky's, is what the faint star's pixels carry, and weighting them by the sky alone
        # lets the residual of the bright one's model swamp the faint one's fit. Not in the first pass, whose models
        # carry the starting fluxes, which may be far off
        sky = np.stack([var_sky[c].ravel()[flat] for c in range(C)], axis=1)
        if pass_index > first:
            light = np.stack([models[c].ravel()[flat] for c in range(C)], axis=1) - own  # (N, C, k, k): the others'
            sky = sky + np.clip(light, 0, None) / gain
        for it in range(iterations + 1):
            dxs, dys = x - ix, y - iy
            P, GX, GY = zip(*(_psf_and_gradient(psfs[c], dxs, dys, pixel_scale_deg, r, True, phases) for c in range(C)))
            P, GX, GY = np.stack(P, 1), np.stack(GX, 1), np.stack(GY, 1)  # (N, C, k, k)
            # variable projection: at the current position the fluxes and sky offsets are linear; solve them
            # exactly (so they can never run away), then take a Gauss-Newton step in position alone
            flux, sky_offset, wgt = _linear_fit(P, target, use, sky, gain, flux)
            if it == iterations:
                break
            res = target - flux[:, :, None, None] * P - sky_offset[:, :, None, None]
            A, g = _normal_equations(P, GX, GY, flux, wgt, res)
            S = _position_schur(A, C)  # the position step with the fluxes and offsets re-optimised
            step = np.nan_to_num(_solve(S, g[:, :2]))
            step = np.clip(step, -0.3, 0.3)
            x, y = x + step[:, 0], y + step[:, 1]
        res = target - flux[:, :, None, None] * P - sky_offset[:, :, None, None]
        fisher, _ = _normal_equations(P, GX, GY, flux, wgt, res)
        if pass_index > 1:  # relaxed (Jacobi) updates: overlapping sources converge instead of oscillating
            x, y = 0.5 * (x + x_prev), 0.5 * (y + y_prev)
            flux = 0.5 * (flux + flux_prev)
        moved = np.hypot(x - x0, y - y0)
        enough = use.sum((1, 2, 3)) >= 9  # a source needs usable pixels for a position
        ok = enough & np.isfinite(x) & np.isfinite(y) & (moved < MAX_SHIFT_PIX) & np.isfinite(flux).all(axis=1)
        x, y = np.where(ok, x, x0), np.where(ok, y, y0)  # a failed source goes back to where it was found
        flux = np.where(ok[:, None], flux, np.nan_to_num(flux))
    dof = use.sum((1, 2, 3)) - (2 + 2 * C)  # the last pass's residuals, in each source's box
    with np.errstate(invalid="ignore", divide="ignore"):
        chi2_red = np.where(dof > 0, (wgt * res ** 2).sum((1, 2, 3)) / np.maximum(dof, 1), np.nan)
        try:
            cov = np.linalg.pinv(fisher)
        except np.linalg.LinAlgError:
            cov = np.full_like(fisher, np.nan)
    var = np.diagonal(cov, axis1=1, axis2=2)
    pos_err = np.sqrt(np.clip(0.5 * (var[:, 0] + var[:, 1]), 0, None))
    flux_err = np.sqrt(np.clip(var[:, 2:2 + C], 0, None))
    total_err = np.sqrt(np.clip(cov[:, 2:2 + C, 2:2 + C].sum((1, 2)), 0, None))
    ok &= np.isfinite(pos_err) & (pos_err > 0)
    return dict(x=x, y=y, pos_err=pos_err, flux_band=flux, flux_band_err=flux_err, flux=flux.sum(axis=1),
                flux_err=total_err, ok=ok, chi2_red=chi2_red)


def _linear_fit(P, target, use, sky, gain, flux_guess):
    """Fluxes (N, C) and sky offsets (N, C) of the weighted least-squares fit ``target ~ F P + b`` per band, and
    the weights used (inverse variance with the sources' own Poisson noise at the guessed flux)."""
    model = np.clip(flux_guess, 0, None)[:, :, None, None] * P
    wgt = use / (sky + model / gain)  # (N, C, k, k)
    wp = wgt * P  # products shared by the sums below: (w P) P is w P P to the last bit
    s_w, s_p, s_pp = wgt.sum((2, 3)), wp.sum((2, 3)), (wp * P).sum((2, 3))
    s_t, s_pt = (wgt * target).sum((2, 3)), (wp * target).sum((2, 3))
    det = s_pp * s_w - s_p ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        flux = np.where(det > 0, (s_pt * s_w - s_p * s_t) / det, 0.0)
        offset = np.where(s_w > 0, (s_t - flux * s_p) / np.maximum(s_w, 1e-30), 0.0)
    return flux, offset, wgt


def _normal_equations(P, GX, GY, flux, wgt, res):
    """J^T W J (N, 2 + 2C, 2 + 2C) and J^T W r for the parameters (x, y, F_1..F_C, b_1..b_C)."""
    n, C = flux.shape
    jx = flux[:, :, None, None] * GX  # the stamps are parameterised by the source's offset: d/dx = F dP/d(dx)
    jy = flux[:, :, None, None] * GY
    fi, bi = 2 + np.arange(C), 2 + C + np.arange(C)
    nb = 2 + 2 * C
    A = np.zeros((n, nb, nb))
    g = np.zeros((n, nb))
    wjx, wjy, wp = wgt * jx, wgt * jy, wgt * P  # shared by the sums below: (w a) b is w a b to the last bit
    A[:, 0, 0] = (wjx * jx).sum((1, 2, 3))
    A[:, 1, 1] = (wjy * jy).sum((1, 2, 3))
    A[:, 0, 1] = A[:, 1, 0] = (wjx * jy).sum((1, 2, 3))
    A[:, fi, fi] = (wp * P).sum((2, 3))
    A[:, bi, bi] = wgt.sum((2, 3))
    A[:, fi, bi] = A[:, bi, fi] = wp.sum((2, 3))
    A[:, 0, fi] = A[:, fi, 0] = (wjx * P).sum((2, 3))
    A[:, 1, fi] = A[:, fi, 1] = (wjy * P).sum((2, 3))
    A[:, 0, bi] = A[:, bi, 0] = wjx.sum((2, 3))
    A[:, 1, bi] = A[:, bi, 1] = wjy.sum((2, 3))
    g[:, 0] = (wjx * res).sum((1, 2, 3))
    g[:, 1] = (wjy * res).sum((1, 2, 3))
    g[:, fi] = (wp * res).sum((2, 3))
    g[:, bi] = (wgt * res).sum((2, 3))
    A += np.eye(nb)[None] * 1e-12 * np.maximum(np.trace(A, axis1=1, axis2=2), 1e-30)[:, None, None]
    return A, g


def _position_schur(A: np.ndarray, C: int) -> np.ndarray:
    """(N, 2, 2) Schur complement of the linear block of :func:`_normal_equations`' ``A`` (x, y, F_1..F_C,
    b_1..b_C): ``A_pp - A_pl A_ll^-1 A_lp``. A band's flux and sky offset touch no other band's, so ``A_ll`` is C
    independent 2x2 blocks, inverted in closed form (a batched pseudo-inverse of the whole block cost a tenth of
    the fit); a block that is nearly singular (a band with one or two usable pixels) takes the pseudo-inverse."""
    fi, bi = 2 + np.arange(C), 2 + C + np.arange(C)
    a, b, d = A[:, fi, fi], A[:, fi, bi], A[:, bi, bi]  # (N, C): the blocks [[a, b], [b, d]]
    u, v = A[:, :2, fi], A[:, :2, bi]  # (N, 2, C): the position rows against the fluxes and the offsets
    det = a * d - b * b
    fine = (det > 1e-9 * np.abs(a * d)).all(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        inv_det = np.where(fine[:, None], 1.0 / det, 0.0)[:, None, :]  # (N, 1, C)
    # [u v] [[a, b], [b, d]]^-1 [u v]^T, band by band: (d u - b v) u^T / det + (a v - b u) v^T / det
    with_u = (d[:, None] * u - b[:, None] * v) * inv_det  # (N, 2, C)
    with_v = (a[:, None] * v - b[:, None] * u) * inv_det
    S = A[:, :2, :2] - with_u @ u.transpose(0, 2, 1) - with_v @ v.transpose(0, 2, 1)
    if not fine.all():
        lin = slice(2, None)
        rest = ~fine
        S[rest] = A[rest, :2, :2] - A[rest, :2, lin] @ np.linalg.pinv(A[rest, lin, lin]) @ A[rest, lin, :2]
    return S


def _solve(A: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Batched A x = g; a singular system (a source with no usable pixel) gets the pseudo-inverse, not an error
    that would stop every other source's step."""
    try:
        return np.linalg.solve(A, g[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return (np.linalg.pinv(A) @ g[..., None])[..., 0]


def _own_models(x, y, flux, ix, iy, psfs, scale, r, phases=TABLE_PHASES):
    P = np.stack([_stamps(p, x - ix, y - iy, scale, r, phases) for p in psfs], axis=1)
    return flux[:, :, None, None] * P


def _render(x, y, flux, psfs, scale, r, shape, phases=TABLE_PHASES, wing_r=None, wing_min=None) -> np.ndarray:
    """(C, H, W) sum of every source's PSF model: stamps of half-size r from the ``phases`` table and, where
    ``wing_r`` (one half-size per band) reaches further, the wings beyond r from a coarse table (SEEING_PHASES:
    the profile is smooth there, and a wide fine table would cost hundreds of MB), for the sources whose wing just
    beyond r exceeds ``wing_min`` (one value per band, ADU per pixel; None: every source)."""
    C, H, W = shape
    out = np.zeros((C, H * W))
    ix, iy, flat, inside = _stamp_indices(x, y, r, H, W)
    for c, p in enumerate(psfs):
        stamps = flux[:, c, None, None] * _stamps(p, x - ix, y - iy, scale, r, phases)
        out[c] += np.bincount(flat[inside], weights=stamps[inside], minlength=H * W)
        R = r if wing_r is None else int(wing_r[c])
        bright = np.ones(len(x), bool)
        if wing_min is not None:  # most sources of a crowded field are faint: their wings are below the noise
            edge = float(p.profile(np.array([(r + 1) * scale]))[0]) * scale ** 2  # flux share of a pixel there
            bright = np.abs(flux[:, c]) * edge > wing_min[c]
        if R > r and bright.any():
            xb, yb, fb = x[bright], y[bright], flux[bright, c]
            wix, wiy, wflat, winside = _stamp_indices(xb, yb, R, H, W)
            off = np.abs(np.arange(-R, R + 1))
            ring = np.maximum(off[:, None], off[None, :]) > r  # (k, k): outside the fine stamp
            wings = fb[:, None, None] * _stamps(p, xb - wix, yb - wiy, scale, R, SEEING_PHASES)
            keep = winside & ring[None]
            out[c] += np.bincount(wflat[keep], weights=wings[keep], minlength=H * W)
    return out.reshape(C, H, W)


def _wing_min(rms) -> list:
    """Per band, the wing (ADU per pixel) below which a source's light beyond its fit box is not rendered: a tenth
    of the band's median background rms."""
    rms = np.asarray(rms, dtype=np.float64)
    return [WING_MIN_RMS * float(np.median(rms[c])) for c in range(rms.shape[0])]


def residual_image(data, background, rms, psfs, pixel_scale_deg: float, fit: dict) -> np.ndarray:
    """(C, H, W) data minus background minus every fitted source's model (``fit``: :func:`fit_psf_sources`'s
    result, failed fits at their starting fluxes), wings out to WING_FWHM as in the fit."""
    data = np.asarray(data, dtype=np.float64)
    r = fit_radius_pix(psfs, pixel_scale_deg)
    models = _render(fit["x"], fit["y"], np.nan_to_num(fit["flux_band"]), psfs, pixel_scale_deg, r, data.shape,
                     TABLE_PHASES, _wing_radii(psfs, pixel_scale_deg, r), _wing_min(rms))
    return data - np.asarray(background, dtype=np.float64) - models


def blank_flux_scatter(resid, rms, psfs, pixel_scale_deg: float, x, y, mask=None, cell: int | None = None,
                       per_cell: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The flux error that the image itself shows: PSF fluxes (with a sky offset, as the fit's) measured at random
    positions of the residual image, their robust scatter (1.4826 MAD) per cell of ``cell`` px (default 8 fit boxes,
    at least 64 px: a cell must hold some 60 independent boxes for a ~10% estimate), read at ``x, y``.

    The fit's Fisher errors know the sky's white noise and the source's own photons; what else the image holds
    under a source, the light of neighbours too faint to detect and the misfit of the detected ones' models
    (confusion, strong in clusters and crowded fields), they do not. Blank positions measure it the way deep-field
    photometry does with random apertures. Returns ``(band, total)``: (N, C) per band and (N,) of the fluxes summed
    over bands (one undetected star adds to every band at once, so the total's scatter is measured, not summed in
    quadrature). Cells with fewer than 32 samples take the image's value.
    """
    resid = np.asarray(resid, dtype=np.float64)
    C, H, W = resid.shape
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    r = fit_radius_pix(psfs, pixel_scale_deg)
    if H <= 2 * r + 1 or W <= 2 * r + 1 or x.size == 0:
        return np.zeros((x.size, C)), np.zeros(x.size)
    boxes = _band_boxes(psfs, pixel_scale_deg, r)
    cell = int(cell) if cell else max(64, 8 * (2 * r + 1))
    rng = np.random.default_rng(seed)
    n = int(max(per_cell, per_cell * H * W / cell ** 2))
    bx, by = rng.uniform(r, W - 1 - r, n), rng.uniform(r, H - 1 - r, n)
    ix, iy, flat, inside = _stamp_indices(bx, by, r, H, W)
    bad = np.zeros((C, H, W), bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), (C, H, W))
    var = np.broadcast_to(np.asarray(rms, dtype=np.float64) ** 2, (C, H, W))
    flux = np.zeros((n, C))
    for c, p in enumerate(psfs):
        use = (inside & ~bad[c].ravel()[flat] & boxes[c][None])[:, None]
        P = _stamps(p, bx - ix, by - iy, pixel_scale_deg, r)[:, None]
        f, _, _ = _linear_fit(P, resid[c].ravel()[flat][:, None], use, var[c].ravel()[flat][:, None], 1.0,
                              np.zeros((n, 1)))
        # a place with almost every pixel masked (a saturated star) measures nothing: its 0 would shrink the scatter
        flux[:, c] = np.where(use.sum((1, 2, 3)) >= 9, f[:, 0], np.nan)
    values = np.concatenate([flux, flux.sum(axis=1, keepdims=True)], axis=1)  # (n, C + 1)
    ny, nx = -(-H // cell), -(-W // cell)
    cells = np.minimum(by // cell, ny - 1).astype(int) * nx + np.minimum(bx // cell, nx - 1).astype(int)
    measured = np.isfinite(values).all(axis=1)
    if measured.sum() < 32:  # an image all but masked: no scatter to add
        return np.zeros((x.size, C)), np.zeros(x.size)
    values, cells = values[measured], cells[measured]

    def mad(v):
        return 1.4826 * np.median(np.abs(v - np.median(v, axis=0)), axis=0)

    table = np.tile(mad(values), (ny * nx, 1))  # (cells, C + 1): the image's value where a cell has too few
    for k in np.unique(cells):
        sel = cells == k
        if sel.sum() >= 32:
            table[k] = mad(values[sel])
    at = (np.clip(y // cell, 0, ny - 1).astype(int) * nx + np.clip(x // cell, 0, nx - 1).astype(int))
    return table[at, :C], table[at, C]


BLEND_REACH_FWHM = 3.0  # neighbours beyond this many FWHM share no light with a source


def neighbour_light(x, y, flux, fwhm_pix: float, reach_fwhm: float = BLEND_REACH_FWHM) -> np.ndarray:
    """The light of the other sources that overlaps each one's PSF: ``sum_j max(F_j, 0) exp(-d_ij^2 / 4 s^2)``
    over the sources within ``reach_fwhm`` FWHM (s the PSF sigma; the factor is the overlap of two Gaussian PSFs at
    separation d, relative to a PSF with itself), per column of ``flux`` ((N,) or (N, C), flux units).

    A simultaneous fit shares such light between neighbours, and how it is shared depends on what no model is exact
    about (the PSF's shape, the positions, a third star too faint to detect): the flux errors of blended rows grow
    with it (:meth:`~skyfm.heads.config.InstrumentHeadConfig.blend_flux_error_weight`)."""
    from scipy import sparse
    from scipy.spatial import cKDTree

    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    f = np.clip(np.nan_to_num(np.asarray(flux, float)), 0.0, None)
    if x.size < 2 or not np.isfinite(fwhm_pix) or fwhm_pix <= 0:
        return np.zeros(f.shape)
    pairs = cKDTree(np.c_[x, y]).query_pairs(reach_fwhm * float(fwhm_pix), output_type="ndarray")
    if not len(pairs):
        return np.zeros(f.shape)
    i, j = pairs[:, 0], pairs[:, 1]
    s2 = float(fwhm_pix) ** 2 / (8.0 * np.log(2.0))  # the PSF sigma squared
    w = np.exp(-((x[i] - x[j]) ** 2 + (y[i] - y[j]) ** 2) / (4 * s2))
    W = sparse.coo_matrix((np.r_[w, w], (np.r_[i, j], np.r_[j, i])), shape=(x.size, x.size)).tocsr()
    return np.asarray(W @ f)


CROWDING_SMOOTH_FWHM = 3.0  # the crowding of a source: its detected neighbours' density within a few FWHM


def crowding(x, y, shape, fwhm_pix: float, smooth_fwhm: float = CROWDING_SMOOTH_FWHM) -> np.ndarray:
    """Detections per PSF FWHM^2 around each of the detections ``x, y`` (itself left out): the density of the
    others, Gaussian-weighted with sigma ``smooth_fwhm`` FWHM and normalised by the weight that falls inside the
    image of ``shape`` (H, W), so that a source at the edge is not taken for an isolated one.

    What it measures is the chance that a star has a companion too close to split (the fraction of a FWHM-wide
    disc that other stars cover, in units of the detected ones): in a globular cluster's core 0.5-1, in a crowded
    field 0.05-0.2, a high-latitude field 0.01. A PSF flux there also holds part of that companion's light, an
    error that grows with the crowding, not with the noise; the calibrated flux-error floor grows with it
    (``fit_flux_err_floor_crowding`` of :class:`~skyfm.heads.config.InstrumentHeadConfig`).
    """
    from scipy import ndimage
    from scipy.spatial import cKDTree

    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    h, w = int(shape[0]), int(shape[1])
    if x.size == 0 or h < 1 or w < 1:
        return np.zeros(x.size)
    iy, ix = np.clip(np.rint(y).astype(int), 0, h - 1), np.clip(np.rint(x).astype(int), 0, w - 1)
    # scipy's sampled Gaussian (truncated at 3 sigma), as ndimage.gaussian_filter would smooth a map of the
    # detections' counts, evaluated only at the detections: the pairs within the kernel's square reach
    sigma = smooth_fwhm * float(fwhm_pix)
    reach = int(3.0 * sigma + 0.5)
    delta = np.zeros(2 * reach + 1)
    delta[reach] = 1.0
    kernel = ndimage.gaussian_filter1d(delta, sigma, mode="constant", truncate=3.0)  # (2 reach + 1,)
    grid = np.c_[ix, iy].astype(float)
    pairs = cKDTree(grid).query_pairs(reach, p=np.inf, output_type="ndarray")  # (M, 2), i < j
    density = np.zeros(x.size)
    if len(pairs):
        i, j = pairs[:, 0], pairs[:, 1]
        weight = kernel[reach + ix[j] - ix[i]] * kernel[reach + iy[j] - iy[i]]
        density += np.bincount(i, weights=weight, minlength=x.size) + np.bincount(j, weights=weight, minlength=x.size)
    # the share of the kernel inside the image (1 in the middle, about 1/2 on an edge), per axis
    cumulative = np.concatenate([[0.0], np.cumsum(kernel)])

    def inside(i, n):
        lo, hi = np.maximum(i - reach, 0) - (i - reach), np.minimum(i + reach, n - 1) - (i - reach) + 1
        return cumulative[hi] - cumulative[lo]

    # other detections on the same pixel count as neighbours (the pairs hold them), the source itself does not
    return density / (inside(iy, h) * inside(ix, w)) * float(fwhm_pix) ** 2


def _ellipticity(boxes: np.ndarray, inside: np.ndarray, r: int) -> np.ndarray:
    """(n,) ellipticity |(Ixx - Iyy, 2 Ixy)| / (Ixx + Iyy) of the positive light of (n, k, k) boxes within radius r
    of their centres, Gaussian-windowed (second moments about the light's own centroid): a round source gives 0, a
    line across the box about 0.6 (the window makes it look shorter than it is)."""
    off = np.arange(-r, r + 1, dtype=float)
    yy, xx = np.meshgrid(off, off, indexing="ij")
    window = np.exp(-0.5 * (xx ** 2 + yy ** 2) / (0.5 * r) ** 2)  # a Gaussian window: the noise far out weighs little
    light = np.where(inside & (np.hypot(xx, yy) <= r), np.clip(boxes, 0.0, None) * window, 0.0)  # (n, k, k)
    total = np.maximum(light.sum((1, 2)), 1e-30)
    cx, cy = (light * xx).sum((1, 2)) / total, (light * yy).sum((1, 2)) / total
    dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
    ixx, iyy, ixy = ((light * dx * dx).sum((1, 2)) / total, (light * dy * dy).sum((1, 2)) / total,
                     (light * dx * dy).sum((1, 2)) / total)
    return np.hypot(ixx - iyy, 2.0 * ixy) / np.maximum(ixx + iyy, 1e-30)


def estimate_fwhm(data, background, rms, psf_for_fwhm, nominal_fwhm_deg: float, pixel_scale_deg: float, x, y,
                  snr, *, subtract_others: bool = True, point=None, factors=np.linspace(0.6, 1.8, 13),
                  n_max: int = 30, min_sources: int = 5, locus: float | None = None,
                  max_ellipticity: float | None = None) -> float:
    """The PSF FWHM (deg) of one band from its brightest isolated point sources, or the nominal FWHM when fewer
    than ``min_sources`` such sources give an estimate.

    Each source is fitted (position and flux) at every width of a grid of ``factors`` x nominal, on the same
    pixels (a box of 1.5 nominal FWHM); its best width is the minimum of its chi-square curve (a parabola through
    the lowest three points), and the estimate is the median over sources, so that a few bad ones (a compact
    galaxy, a saturated star, a blend) do not pull it. Sources whose minimum lies on the grid's edge give none.

    ``psf_for_fwhm(fwhm_deg)`` gives the band's PSF at that width; x, y, snr: (N,) detections of the band.
    ``subtract_others``: first subtract every detection not used for the estimate (fluxes from a linear fit at
    the nominal PSF, positions as given), so that a source need only be two nominal FWHM from its nearest
    detection to be used. Without it a source needs its fit box clear of other detections, which few sources of a
    crowded field are: the estimate then falls back to the nominal seeing. ``point``: (N,) bool, the detections
    preferred (point-like ones); all are candidates when fewer than ``min_sources`` of them qualify. Without such
    labels, ``locus`` takes the median of the widths up to ``locus`` x the :data:`LOCUS_QUANTILE` quantile's (the
    stellar locus), and ``max_ellipticity`` only sources that round (:func:`_ellipticity`).
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    snr = np.asarray(snr, float)
    H, W = data.shape
    fwhm_pix = nominal_fwhm_deg / pixel_scale_deg
    r = int(max(2, np.ceil(1.5 * fwhm_pix)))  # the nominal core: the same pixels judge every trial width
    if x.size < min_sources:
        return nominal_fwhm_deg
    from scipy.spatial import cKDTree

    d, _ = cKDTree(np.c_[x, y]).query(np.c_[x, y], k=2) if x.size > 1 else (np.full((1, 2), np.inf), None)
    clear = 2.0 * fwhm_pix if subtract_others else 1.5 * r * factors.max()
    isolated = (d[:, 1] > clear) & (x > r) & (x < W - 1 - r) & (y > r) & (y < H - 1 - r) & (snr > 20)
    if point is not None and np.sum(isolated & np.asarray(point, bool)) >= min_sources:
        isolated &= np.asarray(point, bool)
    idx = np.flatnonzero(isolated)
    if idx.size < min_sources:
        return nominal_fwhm_deg
    idx = idx[np.argsort(-snr[idx])][:n_max]
    sub = np.asarray(data, float) - np.asarray(background, float)
    var = np.asarray(rms, float) ** 2
    if subtract_others:  # the other detections' light, wings included, out of the chosen sources' boxes
        nominal = psf_for_fwhm(nominal_fwhm_deg)
        wings = int(max(r, np.ceil(3.0 * fwhm_pix)))
        others = np.ones(x.size, bool)
        others[idx] = False
        linear = fit_psf_sources(sub[None], np.zeros((1, H, W)), np.sqrt(var)[None], [nominal], pixel_scale_deg,
                                 x[others], y[others], radius_pix=r, passes=2, n_iter=0, phases=SEEING_PHASES,
                                 wing_fwhm=0, warm_start=False)
        sub = sub - _render(x[others], y[others], np.clip(linear["flux_band"], 0, None), [nominal], pixel_scale_deg,
                            wings, (1, H, W), phases=SEEING_PHASES)[0]
    # Every trial width fits the chosen sources alone, each on its own box (their fluxes start at zero, so no model
    # reaches another's box): the boxes, stacked into a (n k, k) mosaic, hold every pixel those fits read, and a
    # width costs n boxes instead of the whole image (the same fits: 1 Mpix images spent seconds on the rest)
    k = 2 * r + 1
    ix, iy, flat, inside = _stamp_indices(x[idx], y[idx], r, H, W)  # every box inside the image (isolated, above)
    box_sub, box_var = sub.ravel()[flat], var.ravel()[flat]  # (n, k, k)
    box_rms = np.sqrt(box_var).reshape(1, idx.size * k, k)
    mosaic_x, mosaic_y = x[idx] - ix + r, y[idx] - iy + r + k * np.arange(idx.size)  # the offsets kept exactly
    centre_x, centre_y = np.full(idx.size, r), r + k * np.arange(idx.size)
    chi2 = np.zeros((idx.size, len(factors)))  # (sources, widths)
    for j, f in enumerate(factors):
        psf = psf_for_fwhm(f * nominal_fwhm_deg)
        fit = fit_psf_sources(box_sub.reshape(1, idx.size * k, k), np.zeros_like(box_rms), box_rms, [psf],
                              pixel_scale_deg, mosaic_x, mosaic_y, radius_pix=r, passes=1, n_iter=4,
                              phases=SEEING_PHASES, wing_fwhm=0, warm_start=False)
        model = fit["flux_band"][:, 0, None, None] * _stamps(psf, fit["x"] - centre_x, fit["y"] - centre_y,
                                                                pixel_scale_deg, r, SEEING_PHASES)
        res = (box_sub - model) ** 2 / box_var
        chi2[:, j] = np.where(fit["ok"], np.where(inside, res, 0.0).sum((1, 2)), np.nan)
    best = np.argmin(np.nan_to_num(chi2, nan=np.inf), axis=1)
    usable = np.isfinite(chi2).all(axis=1) & (best > 0) & (best < len(factors) - 1)
    if max_ellipticity is not None:  # round sources only: a satellite trail's peaks, crossing the box, are no PSF
        usable &= _ellipticity(box_sub, inside, r) <= max_ellipticity
    if usable.sum() < min_sources:
        return nominal_fwhm_deg
    rows, b = np.flatnonzero(usable), best[usable]
    c0, c1, c2 = chi2[rows, b - 1], chi2[rows, b], chi2[rows, b + 1]
    denom = c0 - 2 * c1 + c2
    shift = np.where(denom > 0, 0.5 * (c0 - c2) / np.where(denom > 0, denom, 1.0), 0.0)
    step = factors[1] - factors[0]
    widths = factors[b] + np.clip(shift, -1, 1) * step
    if locus is not None:  # the stellar locus: the narrowest sources' widths (a galaxy only comes out broader)
        widths = widths[widths <= locus * np.quantile(widths, LOCUS_QUANTILE, method="lower")]
    return float(np.median(widths) * nominal_fwhm_deg)


__all__ = ["background_and_rms", "blank_flux_scatter", "estimate_fwhm", "extended_light", "fit_psf_sources",
           "fit_radius_pix", "residual_image"]
