"""Tiling images of any size: every pixel owned once, positions mapped back to the full image and the sky."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from skyfm.data import Patch, iter_tiles, open_image, tile_grid, to_full_image, to_sky
from skyfm.errors import SkyfmError


def _tan_wcs(height, width, scale_deg=0.56 / 3600):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.1, 2.2]
    w.wcs.crpix = [width / 2 + 0.5, height / 2 + 0.5]
    # A rotated CD matrix: tile WCSs must carry rotation through.
    angle = np.radians(20.0)
    w.wcs.cd = scale_deg * np.array([[-np.cos(angle), np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return w


@pytest.mark.parametrize("height, width", [(700, 1000), (1000, 700)])
def test_every_pixel_is_owned_exactly_once(height, width):
    tiles = tile_grid(height, width, 256, 32)
    owners = np.zeros((height, width), int)
    yy, xx = np.mgrid[0:height, 0:width]
    for t in tiles:
        assert t.shape == (256, 256)
        assert 0 <= t.y0 and t.y1 <= height and 0 <= t.x0 and t.x1 <= width  # larger than a tile: never padded
        owners += t.owns(xx, yy)
    np.testing.assert_array_equal(owners, 1)
    # The last tile along each axis is shifted inward to end exactly at the image edge.
    assert max(t.y1 for t in tiles) == height and max(t.x1 for t in tiles) == width


def test_sub_pixel_positions_have_one_owner_and_cores_keep_context(rng):
    height, width, overlap = 700, 1000, 32
    tiles = tile_grid(height, width, 256, overlap)
    x = rng.uniform(-0.5, width - 0.5, 20000)
    y = rng.uniform(-0.5, height - 0.5, 20000)
    # Positions exactly on a core boundary must also have one owner.
    boundaries = sorted({t.core_x1 - 0.5 for t in tiles if t.core_x1 < width})
    x = np.concatenate([x, boundaries])
    y = np.concatenate([y, np.full(len(boundaries), 100.0)])
    np.testing.assert_array_equal(sum(t.owns(x, y).astype(int) for t in tiles), 1)
    for t in tiles:  # a core keeps >= overlap/2 pixels of context wherever the tile has a neighbour
        if t.core_x0 > 0:
            assert t.core_x0 - t.x0 >= overlap // 2
        if t.core_x1 < width:
            assert t.x1 - t.core_x1 >= overlap // 2
        if t.core_y0 > 0:
            assert t.core_y0 - t.y0 >= overlap // 2
        if t.core_y1 < height:
            assert t.y1 - t.core_y1 >= overlap // 2


def test_positions_map_back_to_the_full_image_and_the_sky(rng):
    height, width = 700, 1000
    data = rng.normal(100, 5, size=(2, height, width)).astype(np.float32)
    wcs = _tan_wcs(height, width)
    truth = Table({"x": rng.uniform(-0.5, width - 0.5, 300), "y": rng.uniform(-0.5, height - 0.5, 300),
                   "id": np.arange(300)})
    image = Patch(data, "meerlicht", ["q", "r"], wcs, truth=truth)
    kept = []
    n_tiles = 0
    for tile, patch in iter_tiles(image, 256, 32):
        n_tiles += 1
        assert patch.shape == (2, 256, 256) and patch.mask is None
        x, y = rng.integers(0, 256, 50), rng.integers(0, 256, 50)
        fx, fy = to_full_image(x, y, tile)
        np.testing.assert_array_equal(patch.data[:, y, x], data[:, fy.astype(int), fx.astype(int)])
        # The tile's own WCS and the full image's WCS agree on where a tile pixel is on the sky.
        sky_tile = patch.wcs.pixel_to_world(x + 0.3, y - 0.2)
        sky_full = to_sky(x + 0.3, y - 0.2, tile, wcs)
        assert sky_tile.separation(sky_full).max().to_value("arcsec") < 1e-6
        # Truth moves with the tile; a source detected in several tiles is kept once, by its owner.
        tx, ty = to_full_image(patch.truth["x"], patch.truth["y"], tile)
        owned = tile.owns(tx, ty)
        kept += list(patch.truth["id"][owned])
    assert n_tiles == 3 * 5
    assert sorted(kept) == list(range(300))


def test_an_image_smaller_than_a_tile_is_padded_and_masked(rng):
    data = rng.poisson(3.0, size=(6, 100, 60)).astype(np.float32)
    image = Patch(data, "fermi-lat", [f"E{i}" for i in range(6)], None)
    tiles = list(iter_tiles(image, 128, 16))
    assert len(tiles) == 1
    tile, patch = tiles[0]
    assert patch.shape == (6, 128, 128)
    np.testing.assert_array_equal(patch.data[:, :100, :60], data)
    assert (patch.data[:, 100:, :] == 0).all() and (patch.data[:, :, 60:] == 0).all()
    assert patch.mask[100:, :].all() and patch.mask[:, 60:].all() and not patch.mask[:100, :60].any()
    assert (tile.core_y1, tile.core_x1) == (100, 60)  # the tile owns the image, not the padding


def test_tiles_read_lazily_from_disk_match_tiles_in_memory(tmp_path, rng):
    height, width = 300, 420
    data = rng.normal(0, 1, size=(height, width)).astype(np.float32)
    data[10:20, 30:40] = np.nan
    header = _tan_wcs(height, width).to_header()
    header["TELESCOP"] = "MeerLICHT"
    header["FILTER"] = "q"
    fits.PrimaryHDU(data, header=header).writeto(tmp_path / "big.fits")
    from skyfm.data import read_image

    in_memory = dict((t, p) for t, p in iter_tiles(read_image(tmp_path / "big.fits"), 128, 16))
    with open_image(tmp_path / "big.fits") as image:
        for tile, lazy in iter_tiles(image, 128, 16):
            eager = in_memory[tile]
            np.testing.assert_array_equal(lazy.data, eager.data)
            np.testing.assert_array_equal(lazy.mask, eager.mask)
            assert lazy.wcs.to_header() == eager.wcs.to_header()
        assert not image._hdul[0]._data_loaded  # read through sections, never the whole array


@pytest.mark.parametrize("tile, overlap", [(0, 0), (64, 64), (64, -1), ((64, 64, 2), 0)])
def test_bad_tile_sizes_are_one_line_errors(tile, overlap):
    with pytest.raises(SkyfmError):
        tile_grid(100, 100, tile, overlap)


def test_tiles_carry_their_part_of_the_source_and_background_images(rng):
    data = rng.poisson(3.0, size=(2, 40, 50)).astype(np.float32)
    source = rng.random((2, 40, 50)).astype(np.float32)
    background = rng.random((2, 40, 50)).astype(np.float32)
    patch = Patch(data=data, instrument="fermi-lat", bands=["E0", "E1"], source_image=source,
                  background_image=background)
    for tile, sub in iter_tiles(patch, tile=32, overlap=8):
        ys = slice(tile.y0, min(tile.y1, 40))
        xs = slice(tile.x0, min(tile.x1, 50))
        h, w = ys.stop - ys.start, xs.stop - xs.start
        np.testing.assert_array_equal(sub.background_image[:, :h, :w], background[:, ys, xs])
        np.testing.assert_array_equal(sub.source_image[:, :h, :w], source[:, ys, xs])


def test_masked_pixels_are_filled_with_their_mirror_across_the_nearest_valid_edge():
    from skyfm.data.tiling import mirror_fill

    rng = np.random.default_rng(0)
    data = rng.normal(100.0, 5.0, (1, 20, 30)).astype(np.float32)
    mask = np.zeros((20, 30), bool)
    mask[:, 20:] = True  # columns 20-29 masked: column 20 + k takes column 19 - k (the edge column 19 is its own)
    out = mirror_fill(data, mask)
    np.testing.assert_array_equal(out[0][:, 20:], data[0][:, 19 - np.arange(1, 11)])
    np.testing.assert_array_equal(out[0][:, :20], data[0][:, :20])
    assert data[0, 0, 25] != out[0, 0, 25]  # a copy: the input is left as it was
    full = np.ones((20, 30), bool)
    full[:, :3] = False  # mirrors beyond the 3 valid columns fall back to the sky's level and scatter
    deep = mirror_fill(data, full)[0][:, 10:]
    assert abs(np.median(deep) - 100.0) < 3.0 and 2.0 < np.std(deep) < 8.0
