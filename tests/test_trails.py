"""Satellite trails: found in the image as straight ridges, never in star fields, clusters or bleed columns."""

from __future__ import annotations

import numpy as np
import pytest

from skyfm.catalog.trails import Trail, find_trails, on_trail

SIZE, FWHM, SKY, NOISE = 256, 3.5, 100.0, 5.0


def star_field(rng, n_stars=250, cluster=True) -> np.ndarray:
    """(H, W) sky + Gaussian stars (a uniform field and, optionally, a dense cluster) + Gaussian noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    image = np.full((SIZE, SIZE), SKY)
    xs, ys = rng.uniform(0, SIZE, n_stars), rng.uniform(0, SIZE, n_stars)
    if cluster:
        xs = np.concatenate([xs, rng.normal(90, 12, 150)])
        ys = np.concatenate([ys, rng.normal(160, 12, 150)])
    sigma = FWHM / 2.3548
    for x, y, flux in zip(xs, ys, 10 ** rng.uniform(2.0, 4.0, len(xs))):
        r = slice(max(0, int(y) - 10), int(y) + 11), slice(max(0, int(x) - 10), int(x) + 11)
        image[r] += flux / (2 * np.pi * sigma**2) * np.exp(-((xx[r] - x) ** 2 + (yy[r] - y) ** 2) / (2 * sigma**2))
    return image + rng.normal(0, NOISE, image.shape)


def add_line(image, theta_deg, rho, peak_sigma, extent=None) -> np.ndarray:
    """A straight line (x cos t + y sin t = rho) with a Gaussian line-spread profile of the PSF's FWHM; with
    ``extent`` = (lo, hi) only over that stretch of its length (a bleed column rather than a trail)."""
    t = np.deg2rad(theta_deg)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    d = xx * np.cos(t) + yy * np.sin(t) - rho
    line = peak_sigma * NOISE * np.exp(-d**2 / (2 * (FWHM / 2.3548) ** 2))
    if extent is not None:
        along = -xx * np.sin(t) + yy * np.cos(t)
        line *= (along >= extent[0]) & (along <= extent[1])
    return image + line


@pytest.mark.parametrize("theta_deg,rho,peak", [(30.0, 150.0, 200.0), (100.0, 40.0, 25.0), (0.0, 77.0, 50.0)])
def test_a_trail_across_a_crowded_field_is_found_where_it_is(theta_deg, rho, peak):
    rng = np.random.default_rng(int(theta_deg))
    image = add_line(star_field(rng), theta_deg, rho, peak)
    trails = find_trails(image[None], FWHM)
    assert len(trails) == 1
    trail = trails[0]
    dtheta = abs(((np.degrees(trail.theta) - theta_deg + 90) % 180) - 90)
    assert dtheta <= 1.5
    # the same line: points of the true line lie within a pixel or two of the found one across the image
    t = np.deg2rad(theta_deg)
    along = np.linspace(-180, 180, 50)
    x, y = rho * np.cos(t) - along * np.sin(t), rho * np.sin(t) + along * np.cos(t)
    inside = (x >= 0) & (x < SIZE) & (y >= 0) & (y < SIZE)
    assert np.all(trail.distance(x[inside], y[inside]) <= 2.5)
    assert trail.half_width >= FWHM and trail.excess > 5
    # detections on it are marked, those well off it are not
    assert on_trail(x[inside], y[inside], trails).all()
    assert not on_trail(x[inside] + 3 * trail.half_width * np.cos(t),
                        y[inside] + 3 * trail.half_width * np.sin(t), trails).any()


def test_no_trail_in_star_fields_clusters_or_bleed_columns():
    rng = np.random.default_rng(7)
    for seed in range(3):
        field = star_field(np.random.default_rng(seed))
        assert find_trails(field, FWHM) == []
    # a saturated star's bleed column lifts a line only over part of the image: not a satellite trail
    bleed = add_line(star_field(rng), 0.0, 120.0, 300.0, extent=(60.0, 140.0))
    assert find_trails(bleed, FWHM) == []
    # too small an image to tell
    assert find_trails(np.zeros((16, 16)), FWHM) == []


def test_drop_trail_detections_keeps_the_rest():
    """Detections on a trail's empty stretches go; those off it, and a star of its own under the trail, stay."""
    from scipy import ndimage

    from skyfm.detect import drop_trail_detections
    from skyfm.instruments import load_instrument

    class Tile:  # what drop_trail_detections reads of a tile
        bands = ["q"]

    inst = load_instrument("meerlicht")
    fwhm = inst.band("q").psf.fwhm_deg / inst.pixel_scale_deg
    rng = np.random.default_rng(3)
    stars = star_field(rng)
    t = np.deg2rad(45.0)
    along = lambda a: np.array([180 * np.cos(t) - a * np.sin(t), 180 * np.sin(t) + a * np.cos(t)])  # noqa: E731
    # trail points with no star near them (the matched-filtered star field below 1 sigma there)
    quiet = ndimage.gaussian_filter((stars - SKY) / NOISE, FWHM / 2.3548)
    empty = [a for a in np.arange(-100.0, 101.0, 5.0) if quiet[tuple(np.rint(along(a)[::-1]).astype(int))] < 1.0]
    assert len(empty) >= 4
    on = np.array([along(a) for a in empty[:3]])
    star_xy = along(empty[3])  # a star of its own under the trail, 20 sigma in the matched filter
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    sigma = FWHM / 2.3548
    stars = stars + 3000.0 / (2 * np.pi * sigma**2) * np.exp(-((xx - star_xy[0]) ** 2 + (yy - star_xy[1]) ** 2)
                                                              / (2 * sigma**2))
    Tile.data = add_line(stars, 45.0, 180.0, 100.0)[None]
    off = np.array([[30.0, 30.0], [220.0, 220.0]])
    xy = np.concatenate([on, off, star_xy[None]])
    d = {"x": xy[:, 0], "y": xy[:, 1], "score": np.linspace(0.9, 0.4, 6), "flux_band": np.ones((6, 1))}
    kept = drop_trail_detections(d, Tile, inst)
    np.testing.assert_allclose(np.c_[kept["x"], kept["y"]], np.concatenate([off, star_xy[None]]))
    assert kept["flux_band"].shape == (3, 1) and len(kept["score"]) == 3
    assert abs(fwhm - FWHM) < 3  # the test's image is near MeerLICHT's seeing
    assert isinstance(Trail(0.0, 1.0, 1.0, 1.0).distance(np.zeros(2), np.ones(2)), np.ndarray)


def test_a_bleed_column_across_the_tile_is_no_trail():
    """A saturated star whose bleed column runs the whole height of the tile is a straight ridge that the line
    search alone takes for a trail; drop_trail_detections leaves saturated pixels out, so nothing is dropped."""
    from skyfm.detect import drop_trail_detections
    from skyfm.instruments import load_instrument

    class Tile:
        bands = ["q"]

    inst = load_instrument("meerlicht")
    fwhm = inst.band("q").psf.fwhm_deg / inst.pixel_scale_deg
    image = star_field(np.random.default_rng(8), cluster=False)
    full_well = float(inst.noise["saturation"])
    image[:, 119:122] = full_well  # the bleed column, the whole tile high
    image[100:110, 112:129] = full_well  # the star's clipped core
    assert find_trails(image, fwhm)  # unmasked, the column is a ridge across the tile
    Tile.data = image[None]
    xy = np.array([[116.0, 40.0], [124.0, 200.0], [60.0, 60.0]])  # beside the column, and elsewhere
    d = {"x": xy[:, 0], "y": xy[:, 1], "score": np.ones(3), "flux_band": np.ones((3, 1))}
    kept = drop_trail_detections(d, Tile, inst)
    assert len(kept["x"]) == 3


def test_a_faint_trail_is_found_from_the_detections_it_breaks_into():
    """A trail of 4 noise sigma per pixel across a crowded field: too faint for the image-wide search, but the
    detections a detector makes along it are each a piece of a line, and together they find it. Without the trail
    the same detections (and the field's stars) find nothing."""
    from skyfm.catalog.trails import detection_lineness, trails_through_detections

    rng = np.random.default_rng(11)
    field = star_field(rng, n_stars=400, cluster=False)
    theta_deg, rho = 60.0, 130.0
    image = add_line(field, theta_deg, rho, 4.0)
    assert find_trails(image, FWHM) == []
    t = np.deg2rad(theta_deg)
    along = np.arange(-140.0, 141.0, 18.0)
    lx, ly = rho * np.cos(t) - along * np.sin(t), rho * np.sin(t) + along * np.cos(t)
    inside = (lx >= 8) & (lx < SIZE - 8) & (ly >= 8) & (ly < SIZE - 8)
    lx, ly = lx[inside], ly[inside]
    sx, sy = rng.uniform(0, SIZE, 300), rng.uniform(0, SIZE, 300)  # where the field's stars are detected
    x, y = np.concatenate([lx, sx]), np.concatenate([ly, sy])
    lineness, direction = detection_lineness(image, x, y, FWHM)
    assert np.median(lineness[: lx.size]) > 3 > np.median(lineness[lx.size:])
    trails = trails_through_detections(image, x, y, FWHM)
    assert len(trails) == 1
    assert abs(((np.degrees(trails[0].theta) - theta_deg + 90) % 180) - 90) <= 2.0
    assert np.all(trails[0].distance(lx, ly) <= 2.0)
    assert trails_through_detections(field, x, y, FWHM) == []
    # a line already known is not found again
    assert trails_through_detections(image, x, y, FWHM, known=trails) == []


def test_the_search_through_detections_runs_on_one_band_tiles_only():
    """drop_trail_detections: a faint trail in a one-band tile takes the rows along it; the same trail in one band of
    a two-band tile (a trail crosses one exposure) takes none: there the lines of rows were as often stars seen in
    the other bands."""
    from types import SimpleNamespace

    from skyfm.detect import drop_trail_detections
    from skyfm.instruments import load_instrument

    inst = load_instrument("meerlicht")
    scale = inst.band("q").psf.fwhm_deg / FWHM  # the test images' PSF in the instrument's band
    rng = np.random.default_rng(11)
    field = star_field(rng, n_stars=400, cluster=False)
    theta_deg, rho = 60.0, 130.0
    trail = add_line(field, theta_deg, rho, 4.0)
    t = np.deg2rad(theta_deg)
    along = np.arange(-140.0, 141.0, 18.0)
    lx, ly = rho * np.cos(t) - along * np.sin(t), rho * np.sin(t) + along * np.cos(t)
    inside = (lx >= 8) & (lx < SIZE - 8) & (ly >= 8) & (ly < SIZE - 8)
    x = np.concatenate([lx[inside], rng.uniform(0, SIZE, 300)])
    y = np.concatenate([ly[inside], rng.uniform(0, SIZE, 300)])
    rows = {"x": x, "y": y, "score": np.ones(x.size)}
    one = drop_trail_detections(rows, SimpleNamespace(data=trail[None], bands=["q"]), inst, pixel_scale=scale)
    assert x.size - len(one["x"]) >= inside.sum() - 2  # the trail's rows, give or take a star under it
    assert len(one["x"]) >= x.size - inside.sum() - 10
    # brighter in its band than in the one-band tile, still too faint for the image-wide search of that band
    bright = add_line(field, theta_deg, rho, 4.0 * np.sqrt(2.0))
    other = SKY + np.random.default_rng(12).normal(0, NOISE, field.shape)  # a band where the stars are faint
    two = drop_trail_detections(rows, SimpleNamespace(data=np.stack([bright, other]), bands=["q", "q"]), inst,
                                pixel_scale=scale)
    assert len(two["x"]) == x.size


def test_a_star_under_a_trail_through_a_crowded_field_stays():
    """In a crowded field the filtered values along a trail scatter with the field's stars, and a bright star under
    the trail rarely stands 3 of that scatter above their median; it is still a peak along the trail, which the
    trail's empty stretches are not."""
    from scipy import ndimage

    from skyfm.catalog.trails import point_sources_on_trail

    rng = np.random.default_rng(1)
    field = star_field(rng, n_stars=1500, cluster=False)
    theta_deg, rho = 30.0, 150.0
    t = np.deg2rad(theta_deg)
    along = lambda a: np.array([rho * np.cos(t) - a * np.sin(t), rho * np.sin(t) + a * np.cos(t)])  # noqa: E731
    star_at = np.arange(-90.0, 91.0, 30.0)
    stars = np.array([along(a) for a in star_at])
    quiet = ndimage.gaussian_filter((field - SKY) / NOISE, FWHM / 2.3548)
    empty = np.array([along(a) for a in np.arange(-120.0, 121.0, 3.0)  # off the stars, and no star of the field
                      if np.min(np.abs(star_at - a)) > 3 * FWHM
                      and quiet[tuple(np.rint(along(a)[::-1]).astype(int))] < 1.0])
    assert len(empty) >= 2
    image = add_line(field, theta_deg, rho, 60.0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    sigma = FWHM / 2.3548
    for x, y in stars:  # matched-filter SNR 110 each
        image = image + 3000.0 / (2 * np.pi * sigma**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    trails = find_trails(image[None], FWHM)
    assert len(trails) == 1
    kept = point_sources_on_trail(image[None], trails, stars[:, 0], stars[:, 1], FWHM)
    scatter_only = point_sources_on_trail(image[None], trails, stars[:, 0], stars[:, 1], FWHM, peak_snr=np.inf)
    assert kept.sum() >= 5 and scatter_only.sum() <= 1
    assert not point_sources_on_trail(image[None], trails, empty[:, 0], empty[:, 1], FWHM).any()


def test_a_trail_in_one_band_of_many_takes_only_what_the_other_bands_do_not_see():
    """Bands are separate exposures: a trail across one band's image takes the rows on its empty stretches; a star
    under it that another band shows stays (the trail drowns it in its own band); a trail across both bands (one
    exposure through two filters) takes its rows, no band vouching for them."""
    from types import SimpleNamespace

    from skyfm.detect import drop_trail_detections
    from skyfm.instruments import load_instrument

    inst = load_instrument("meerlicht")
    scale = inst.band("q").psf.fwhm_deg / FWHM
    rng = np.random.default_rng(21)
    sky = [SKY + rng.normal(0, NOISE, (SIZE, SIZE)) for _ in range(2)]
    theta_deg, rho = 60.0, 150.0
    t = np.deg2rad(theta_deg)
    along = lambda a: np.array([rho * np.cos(t) - a * np.sin(t), rho * np.sin(t) + a * np.cos(t)])  # noqa: E731
    star = along(-30.0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    sigma = FWHM / 2.3548
    psf = np.exp(-((xx - star[0]) ** 2 + (yy - star[1]) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
    faint = sky[0] + 150.0 * psf  # matched-filter SNR 6: under a 400-sigma trail, not a peak along it
    seen = sky[1] + 600.0 * psf  # SNR 23 in the other band
    pieces = np.array([along(a) for a in (-120.0, -60.0, 0.0, 60.0)])
    xy = np.concatenate([pieces, star[None], [[200.0, 200.0]]])
    rows = {"x": xy[:, 0], "y": xy[:, 1], "score": np.ones(len(xy))}
    one_band = np.stack([add_line(faint, theta_deg, rho, 400.0), seen])
    kept = drop_trail_detections(rows, SimpleNamespace(data=one_band, bands=["q", "r"]), inst, pixel_scale=scale)
    np.testing.assert_allclose(np.c_[kept["x"], kept["y"]], xy[4:])
    both = np.stack([add_line(faint, theta_deg, rho, 400.0), add_line(seen, theta_deg, rho, 400.0)])
    kept = drop_trail_detections(rows, SimpleNamespace(data=both, bands=["q", "r"]), inst, pixel_scale=scale)
    np.testing.assert_allclose(np.c_[kept["x"], kept["y"]], xy[5:])


def test_line_medians_are_the_medians_of_the_lines(monkeypatch):
    """The Radon median: at angle 0 its lines are the image's columns, at 90 degrees its rows (NaN pixels left
    out); with the sample grid cached or worked out per call, the same; the NaN-aware median of its side lines is
    numpy's."""
    import warnings

    import skyfm.catalog.trails as T

    rng = np.random.default_rng(4)
    z = rng.normal(size=(41, 57))  # odd sides: the lines about the centre run through pixel centres
    z[rng.random(z.shape) < 0.2] = np.nan
    thetas = np.deg2rad(np.arange(0.0, 180.0, 1.0))
    med, count, rho = T._radon_median(z, thetas)
    cx, cy = (z.shape[1] - 1) / 2.0, (z.shape[0] - 1) / 2.0
    for col in (0, 17, 56):
        k = int(np.argmin(np.abs(rho - (col - cx))))
        assert med[0, k] == np.nanmedian(z[:, col]) and count[0, k] == np.isfinite(z[:, col]).sum()
    for row in (3, 40):
        k = int(np.argmin(np.abs(rho - (row - cy))))
        assert med[90, k] == np.nanmedian(z[row]) and count[90, k] == np.isfinite(z[row]).sum()
    monkeypatch.setattr(T, "RADON_CACHE_BYTES", 0)
    T._radon_indices.cache_clear()
    uncached = T._radon_median(z, thetas)
    T._radon_indices.cache_clear()
    np.testing.assert_array_equal(uncached[0], med)
    np.testing.assert_array_equal(uncached[1], count)
    stack = rng.normal(size=(4, 30, 20))
    stack[rng.random(stack.shape) < 0.5] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices
        for axis in (0, 1, 2):
            np.testing.assert_array_equal(T._nanmedian(stack, axis), np.nanmedian(stack, axis=axis))


def test_a_saturated_stars_halo_through_a_cluster_is_no_trail():
    """Hubble F606W clusters (validation seeds, no trail drawn) with saturated stars: with only their cores grown
    by 2 FWHM left out, the line search takes a line through a bright star's halo and the cluster for a trail; with
    a disc that grows with each star's core (``_saturated_halos``), nothing; where the discs miss it, the line is
    broader than a trail (``MAX_WIDTH_FWHM``). The discs: a round core's radius counts, a trail's narrow saturated
    line adds little."""
    from scipy import ndimage

    from skyfm.data.simulate import simulate_patch
    from skyfm.detect import TRAIL_HALO_CORE_RADII, _saturated_halos, saturation_mask
    from skyfm.instruments import load_instrument

    inst = load_instrument("hubble")
    fwhm = inst.band("F606W").psf.fwhm_deg / inst.pixel_scale_deg
    p = simulate_patch(inst, 971_000_071, scene="cluster", bands=["F606W"])
    assert not (p.contaminant_mask & 2).any()
    cores = saturation_mask(np.asarray(p.data, float), inst).any(axis=0)
    grown = ndimage.binary_dilation(cores, iterations=int(np.ceil(2 * fwhm)))
    assert find_trails(p.data, fwhm, mask=grown, max_width=np.inf)  # the old mask, any width: a false trail
    halos = grown | _saturated_halos(cores, 2 * fwhm, TRAIL_HALO_CORE_RADII)
    assert find_trails(p.data, fwhm, mask=halos, max_width=np.inf) == []
    # where the halos' discs do not reach it, the line is still too broad for a trail (2.7 PSF FWHM at half its peak)
    p = simulate_patch(inst, 971_000_009, scene="cluster", bands=["F606W"])
    cores = saturation_mask(np.asarray(p.data, float), inst).any(axis=0)
    halos = ndimage.binary_dilation(cores, iterations=int(np.ceil(2 * fwhm))) | _saturated_halos(cores, 2 * fwhm,
                                                                                                 TRAIL_HALO_CORE_RADII)
    assert find_trails(p.data, fwhm, mask=halos, max_width=np.inf) and find_trails(p.data, fwhm, mask=halos) == []
    shapes = np.zeros((200, 200), bool)
    yy, xx = np.mgrid[0:200, 0:200]
    shapes |= (yy - 50) ** 2 + (xx - 50) ** 2 <= 6 ** 2  # a star's core, radius 6
    shapes[150:153, :] = True  # a trail's saturated line, 3 px wide
    halos = _saturated_halos(shapes, 4.0, 2.0)
    assert halos[50, 50 + 4 + 12 - 1] and not halos[50, 50 + 4 + 14 + 1]  # 4 + 2 x 6-7 (the inscribed radius)
    assert halos[130:175].sum() <= np.pi * 9 ** 2  # the line: one disc of 4 + 2 x 2 px (its inscribed radius)
