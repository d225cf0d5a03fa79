"""HEALPix maps cut into flat tiles: counts conserved, positions right, RING and NESTED alike, cut lazily."""

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy_healpix import HEALPix

import skyfm.data.healpix as healpix_module
from skyfm.cli import main
from skyfm.data import healpix_tiles, healpix_to_patch, read_healpix, sky_tiles
from skyfm.data.fits_io import ebounds_hdu
from skyfm.data.healpix import HealpixMap, pixel_solid_angle, sky_wcs
from skyfm.errors import SkyfmError
from skyfm.instruments import load_instrument

FERMI = load_instrument("fermi-lat")


def write_healpix(path, maps, nside, order="RING", coordsys="G", telescop="GLAST", edges_kev=None, unit=None,
                  pixels=None):
    """A HEALPix FITS map as gtbin and healpy write them: one column per band, header keys in the table HDU."""
    cols = []
    if pixels is not None:
        cols.append(fits.Column("PIXEL", "J", array=pixels))
    for k, values in enumerate(maps):
        cols.append(fits.Column(f"CHANNEL{k + 1}", "E", array=np.asarray(values, np.float32), unit=unit))
    table = fits.BinTableHDU.from_columns(cols, name="SKYMAP")
    table.header.update({"PIXTYPE": "HEALPIX", "ORDERING": order, "NSIDE": nside, "COORDSYS": coordsys,
                         "INDXSCHM": "EXPLICIT" if pixels is not None else "IMPLICIT", "TELESCOP": telescop})
    hdus = [fits.PrimaryHDU(), table]
    if edges_kev is not None:
        hdus.append(ebounds_hdu(edges_kev))
    fits.HDUList(hdus).writeto(path)
    return path


def area_weighted_counts(hp, counts, patch, oversample=5):
    """The counts of the HEALPix pixels under a tile, each weighted by the share of its area inside the tile.

    Measured independently of the reprojection: every tile pixel is cut into oversample^2 sub-pixels, each takes
    the counts density of the HEALPix pixel it falls in. A sum over whole HEALPix pixels "with their centre in
    the tile" would not do: HEALPix rings run parallel to a tile's edges, so whole rows of pixels fall in or out.
    """
    height, width = patch.data.shape[1:]
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    yy, xx = np.indices((height, width))
    x = (xx[..., None, None] + sub[None, :]).ravel()
    y = (yy[..., None, None] + sub[:, None]).ravel()
    sky = patch.wcs.pixel_to_world(x, y).galactic
    density = counts[hp.lonlat_to_healpix(sky.l, sky.b)].reshape(height, width, -1).mean(axis=-1)
    return float((density * pixel_solid_angle(patch.wcs, (height, width))).sum() / hp.pixel_area.to_value(u.sr))


@pytest.mark.parametrize("order", ["RING", "NESTED"])
def test_reading_a_multi_band_counts_map(tmp_path, order, rng):
    nside = 64
    maps = rng.poisson(3.0, size=(6, 12 * nside**2))
    path = write_healpix(tmp_path / "hp.fits", maps, nside, order=order, edges_kev=fermi_edges_kev())
    hmap = read_healpix(path)
    assert hmap.nside == nside and hmap.nested == (order == "NESTED") and hmap.frame == "galactic"
    assert hmap.bands == [b.name for b in FERMI.bands] and hmap.counts and hmap.instrument.name == "fermi-lat"
    np.testing.assert_array_equal(hmap.values, maps)


def test_a_counts_map_binned_finer_than_the_instrument_is_summed_into_its_bands(tmp_path, rng):
    nside = 16
    maps = rng.poisson(3.0, size=(12, 12 * nside**2))
    lo, hi = fermi_edges_kev().T
    mid = np.sqrt(lo * hi)
    edges = np.stack([np.stack([lo, mid], 1), np.stack([mid, hi], 1)], 1).reshape(-1, 2)
    path = write_healpix(tmp_path / "hp12.fits", maps, nside, edges_kev=edges)
    with pytest.warns(UserWarning, match="12 energy planes are not fermi-lat's bands"):
        hmap = read_healpix(path)
    assert hmap.bands == [b.name for b in FERMI.bands] and hmap.columns[0] == "CHANNEL1+CHANNEL2"
    np.testing.assert_array_equal(hmap.values, maps[0::2] + maps[1::2])
    np.testing.assert_allclose(hmap.energy_edges_kev, fermi_edges_kev())


def fermi_edges_kev():
    return np.array([[b.energy[0].to_value("keV"), b.energy[1].to_value("keV")] for b in FERMI.bands])


@pytest.mark.parametrize("projection", ["CAR", "TAN"])
def test_a_uniform_counts_map_gives_counts_in_proportion_to_solid_angle(projection):
    nside, mu = 64, 7.0
    hmap = HealpixMap(np.full((1, 12 * nside**2), mu), nside, False, "galactic", ["C"], ["E1"], counts=True,
                      instrument=FERMI)
    patch = healpix_to_patch(hmap, (120.0, 55.0), (60, 80), 0.25, projection)
    omega = pixel_solid_angle(patch.wcs, (60, 80))
    np.testing.assert_allclose(patch.data[0], mu * omega / hmap.pixel_area_sr, rtol=1e-5)
    # Oblique CAR and TAN pixels near the tile centre have the solid angle of a flat square pixel.
    assert omega[30, 40] == pytest.approx(np.radians(0.25) ** 2, rel=1e-4)


def test_pixel_solid_angles_of_a_car_grid():
    wcs = sky_wcs(0.0, 0.0, (180, 360), 1.0, "CAR")  # the whole sky in 1-degree CAR pixels
    omega = pixel_solid_angle(wcs, (180, 360))
    # Pixels are bounded by parallels, the triangles by great circles: the difference is (pixel size)^2 small.
    assert omega.sum() == pytest.approx(4 * np.pi, rel=1e-4)
    lat_lo = np.radians(np.arange(-90, 90))
    expected = np.radians(1.0) * (np.sin(lat_lo + np.radians(1.0)) - np.sin(lat_lo))
    np.testing.assert_allclose(omega[:, 0], expected, rtol=1e-4)


@pytest.mark.parametrize("nside", [64, 128])
@pytest.mark.parametrize("order", ["RING", "NESTED"])
def test_poisson_counts_are_conserved_over_a_tile(tmp_path, nside, order, rng):
    hp = HEALPix(nside=nside, order=order.lower(), frame="galactic")
    lon, lat = hp.healpix_to_lonlat(np.arange(hp.npix))
    # A Galactic-plane-like sky: bright at low latitude, Poisson sampled.
    expected = 20.0 + 200.0 * np.exp(-0.5 * (lat.deg / 5.0) ** 2)
    counts = rng.poisson(expected)
    path = write_healpix(tmp_path / "hp.fits", [counts], nside, order=order)
    for projection in ("CAR", "TAN"):
        patch = healpix_to_patch(path, (lon[1000].deg, 3.0), (100, 120), 0.1, projection)
        reference = area_weighted_counts(hp, counts, patch)
        assert patch.data.sum() == pytest.approx(reference, rel=0.015), (projection, patch.data.sum() / reference)
        assert patch.mask is None and patch.instrument == "fermi-lat"


@pytest.mark.parametrize("nside", [64, 128])
@pytest.mark.parametrize("order", ["ring", "nested"])
def test_a_hot_pixel_lands_at_its_sky_position_with_its_counts(nside, order):
    hp = HEALPix(nside=nside, order=order, frame="galactic")
    hot = int(hp.lonlat_to_healpix(33.3 * u.deg, 41.1 * u.deg))
    values = np.zeros((1, hp.npix))
    values[0, hot] = 1000.0
    hmap = HealpixMap(values, nside, order == "nested", "galactic", ["C"], ["E2"], counts=True, instrument=FERMI)
    truth = hp.healpix_to_skycoord(hot)
    for centre in [(32.0, 40.0), (34.013, 41.531)]:  # two phases of the tile grid against the HEALPix grid
        patch = healpix_to_patch(hmap, centre, 96, 0.1, "TAN")
        image = patch.data[0]
        yy, xx = np.indices(image.shape)
        x, y = (image * xx).sum() / image.sum(), (image * yy).sum() / image.sum()
        assert patch.wcs.pixel_to_world(x, y).separation(truth) < 0.05 * hmap.resolution_deg * u.deg
        assert image.sum() == pytest.approx(1000.0, rel=0.01)


def test_ring_and_nested_files_of_the_same_sky_give_the_same_tile(tmp_path, rng):
    nside = 64
    ring = HEALPix(nside=nside, order="ring")
    counts_ring = rng.poisson(10.0, ring.npix)
    counts_nested = counts_ring[ring.nested_to_ring(np.arange(ring.npix))]  # nested pixel i = ring pixel ...
    a = healpix_to_patch(write_healpix(tmp_path / "r.fits", [counts_ring], nside, "RING"), (200.0, -30.0), 64, 0.2)
    b = healpix_to_patch(write_healpix(tmp_path / "n.fits", [counts_nested], nside, "NESTED"), (200.0, -30.0), 64, 0.2)
    np.testing.assert_allclose(a.data, b.data, rtol=1e-6)


def test_a_partial_sky_map_masks_what_it_does_not_cover(tmp_path):
    nside = 64
    hp = HEALPix(nside=nside, order="ring", frame="icrs")
    lon, lat = hp.healpix_to_lonlat(np.arange(hp.npix))
    pixels = np.flatnonzero(lon.deg < 180.0)  # half the sky
    path = write_healpix(tmp_path / "part.fits", [np.full(len(pixels), 5.0)], nside, coordsys="C", pixels=pixels)
    hmap = read_healpix(path)
    assert hmap.frame == "icrs" and np.isnan(hmap.values).mean() == pytest.approx(0.5, abs=0.01)
    patch = healpix_to_patch(hmap, SkyCoord(180 * u.deg, 0 * u.deg), 64, 0.25, "CAR", frame="icrs")
    # RA increases to the left: the half east of 180 deg (x < 32) has no data.
    assert patch.mask[:, :28].all() and not patch.mask[:, 40:].any()  # bilinear: ~1 HEALPix pixel of margin
    assert (patch.data[0][patch.mask] == 0).all()


def test_sky_tiles_cover_the_sky_and_own_every_position_once(rng):
    lon = rng.uniform(0, 360, 20000)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, 20000)))
    lon, lat = np.append(lon, [0.0, 10.0]), np.append(lat, [90.0, -90.0])  # the poles too
    for projection in ("TAN", "CAR"):
        tiles = sky_tiles(64, 0.5, overlap=8, projection=projection)
        owners = np.zeros(lon.size, int)
        for tile in tiles:
            owned = tile.owns(lon, lat)
            owners += owned
            x, y = tile.wcs.wcs_world2pix(lon[owned], lat[owned], 0)
            assert ((x >= -0.5) & (x <= 63.5) & (y >= -0.5) & (y <= 63.5)).all()  # owned positions lie in the tile
        np.testing.assert_array_equal(owners, 1)
        assert len(tiles) < 1.5 * 41253 / (28.0 * 28.0)  # near the ideal count of 28-deg cells


def test_a_region_is_covered_lazily_one_tile_at_a_time(tmp_path, monkeypatch, rng):
    nside = 128
    path = write_healpix(tmp_path / "hp.fits", [rng.poisson(5.0, 12 * nside**2)], nside)
    calls = []
    real = healpix_module.reproject_map
    monkeypatch.setattr(healpix_module, "reproject_map", lambda *a, **k: calls.append(1) or real(*a, **k))
    tiles = healpix_tiles(path, 64, 0.1, overlap=8, lon_range=(350, 10), lat_range=(-2.5, 2.5))
    first_tile, first = next(tiles)
    assert len(calls) == 1 and first.shape == (1, 64, 64)  # nothing reprojected before it was asked for
    rest = list(tiles)
    assert len(calls) == 1 + len(rest) == 4  # 20 x 5 deg in cells of at most 5.6 deg: 4 x 1
    lons = [t.lon for t, _ in [(first_tile, first)] + rest]
    assert all(((lon - 350) % 360) < 20 for lon in lons)


def test_info_describes_a_healpix_map(tmp_path, capsys):
    nside = 64
    write_healpix(tmp_path / "hp.fits", [np.ones(12 * nside**2)] * 2, nside, "NESTED", edges_kev=[[1e5, 1e6], [1e6, 1e7]])
    assert main(["info", str(tmp_path / "hp.fits")]) == 0
    captured = capsys.readouterr()
    # 0.1-1 GeV has most of its photons below fermi-lat's bands: left out, said on stderr
    for words in ("HEALPix map (counts)", "NSIDE 64, NESTED ordering, galactic frame", "E1 (1-10 GeV)", "fermi-lat",
                  "coverage:    100%", "counts:      49152"):
        assert words in captured.out, (words, captured.out)
    assert "plane 1 left out" in captured.err


def test_healpix_errors_are_one_line(tmp_path):
    nside = 16
    path = write_healpix(tmp_path / "hp.fits", [np.ones(12 * nside**2)], nside, order="NUNIQ")
    with pytest.raises(SkyfmError, match="ORDERING = 'NUNIQ'"):
        read_healpix(path)
    fits.PrimaryHDU(np.ones((4, 4))).writeto(tmp_path / "image.fits")
    with pytest.raises(SkyfmError, match="no HEALPix table"):
        read_healpix(tmp_path / "image.fits")
    unknown = write_healpix(tmp_path / "u.fits", [np.ones(12 * nside**2)], nside, telescop="JWST")
    with pytest.raises(SkyfmError, match="unknown instrument"):
        healpix_to_patch(unknown, (0.0, 0.0), 16, 1.0)
    from skyfm.data import read_image

    with pytest.raises(SkyfmError, match="is a HEALPix map, not an image"):
        read_image(unknown)
