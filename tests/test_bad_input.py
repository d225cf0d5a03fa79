"""Bad input: one clear line on stderr (`skyfm: error: ...`), a non-zero exit, never a traceback; a test for each."""

import os

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from skyfm.cli import main
from skyfm.data import NoWCSWarning, read_image
from skyfm.errors import SkyfmError


def _wcs_header(cdelt=1.375 / 3600):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [8.5, 8.5]
    header = w.to_header()
    header["CDELT1"], header["CDELT2"] = -cdelt, cdelt
    header["TELESCOP"] = "WISE"
    header["BAND"] = 1
    return header


def _image(path, data, header=None):
    fits.PrimaryHDU(data, header=header).writeto(path)
    return path


def _write(path, content: bytes):
    path.write_bytes(content)
    return path


def _truncated(path):
    _image(path, np.ones((64, 64), np.float32), _wcs_header())
    content = path.read_bytes()
    return _write(path, content[: len(content) // 2])


def _compressed(path, cut: bool = False):
    """A tile-compressed image (``.fits.fz``, as survey archives serve them); ``cut``: its last 4000 bytes lost
    (more than the padding of its last block)."""
    data = np.random.default_rng(1).normal(100.0, 5.0, (64, 64)).astype(np.float32)
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=_wcs_header(), compression_type="RICE_1")]
                 ).writeto(path)
    if cut:
        content = path.read_bytes()
        _write(path, content[: len(content) - 4000])
    return path


def _corrupt_header(path):
    rng = np.random.default_rng(0)
    return _write(path, b"SIMPLE  =                    T".ljust(80) + rng.integers(0, 256, 2800, np.uint8).tobytes())


# Each case: (make the file in tmp_path, extra CLI arguments, words the error line must contain).
FILE_CASES = {
    "missing file": (lambda d: d / "nope.fits", [], "file not found"),
    "a folder": (lambda d: d, [], "is not a file"),
    "text file": (lambda d: _write(d / "notes.fits", b"RA DEC FLUX\n10 20 3\n"), [], "is not a FITS file"),
    "empty file": (lambda d: _write(d / "empty.fits", b""), [], "is empty"),
    "PNG": (lambda d: _write(d / "sky.png", b"\x89PNG\r\n\x1a\n" + bytes(100)), [], "is a PNG image, not a FITS file"),
    "no image data": (lambda d: fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
        [fits.Column("FLUX", "E", array=np.ones(3))])]).writeto(d / "t.fits") or d / "t.fits", [], "has no image data"),
    "1-D": (lambda d: _image(d / "spec.fits", np.ones(100, np.float32)), [], "is 1-D"),
    "4-D": (lambda d: _image(d / "h.fits", np.ones((2, 3, 8, 8), np.float32)), [], "is 4-D"),
    "all NaN": (lambda d: _image(d / "nan.fits", np.full((16, 16), np.nan, np.float32), _wcs_header()), [],
                "every pixel is NaN"),
    "zero pixel scale": (lambda d: _image(d / "z.fits", np.ones((16, 16), np.float32), _wcs_header(cdelt=0.0)), [],
                         "zero or singular pixel scale"),
    "truncated": (lambda d: _truncated(d / "cut.fits"), [], "is truncated"),
    "truncated, tile-compressed": (lambda d: _compressed(d / "cut.fits.fz", cut=True), [], "is truncated"),
    "corrupt header": (lambda d: _corrupt_header(d / "bad.fits"), [], "is a corrupt FITS file"),
    "unknown instrument": (lambda d: _image(d / "ok.fits", np.ones((16, 16), np.float32), _wcs_header()),
                           ["--instrument", "jwst"], "unknown instrument 'jwst'"),
    "no such HDU": (lambda d: _image(d / "ok.fits", np.ones((16, 16), np.float32), _wcs_header()),
                    ["--hdu", "SCI"], "no HDU named 'SCI'"),
    "unknown band": (lambda d: _image(d / "ok.fits", np.ones((16, 16), np.float32), _wcs_header()),
                     ["--band", "W7"], "wise has no band 'W7'"),
}


def _one_error_line(capsys, code, words):
    captured = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("skyfm: error:") and words in lines[0], lines[0]


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_bad_files_are_one_line_errors(tmp_path, capsys, case):
    make, extra, words = FILE_CASES[case]
    path = make(tmp_path)
    _one_error_line(capsys, main(["info", str(path), *extra]), words)


@pytest.mark.parametrize("case", [c for c in FILE_CASES if c not in ("no such HDU",)])
def test_read_image_raises_the_same_errors(tmp_path, case):
    make, extra, words = FILE_CASES[case]
    options = {"instrument": extra[1]} if extra[:1] == ["--instrument"] else {}
    options.update({"band": extra[1]} if extra[:1] == ["--band"] else {})
    with pytest.raises(SkyfmError, match=words.replace("'", ".").replace("(", ".")):
        read_image(make(tmp_path), **options)


@pytest.mark.parametrize("mask, bits, words", [
    ("wrong size", None, "(the mask, HDU 0) is 8 x 16 pixels but the image is 16 x 16"),
    ("missing", None, "file not found"),
    ("table", None, "(the mask) has no image data"),
    (None, "1,2", "--mask-bits needs --mask"),
    ("ok", "one,two", "--mask-bits should be bit values"),
])
def test_a_bad_mask_file_or_mask_bits_are_one_line_errors(tmp_path, capsys, mask, bits, words):
    image = _image(tmp_path / "w1.fits", np.ones((16, 16), np.float32), _wcs_header())
    files = {"wrong size": lambda: _image(tmp_path / "m.fits", np.zeros((8, 16), np.uint8)),
             "missing": lambda: tmp_path / "nope.fits",
             "table": lambda: fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
                 [fits.Column("X", "E", array=np.ones(3))])]).writeto(tmp_path / "t.fits") or tmp_path / "t.fits",
             "ok": lambda: _image(tmp_path / "m.fits", np.zeros((16, 16), np.uint8))}
    args = ["detect", str(image), "--out", str(tmp_path / "c.fits")]
    args += [] if mask is None else ["--mask", str(files[mask]())]
    args += [] if bits is None else ["--mask-bits", bits]
    _one_error_line(capsys, main(args), words)
    assert not (tmp_path / "c.fits").exists()


def test_a_tile_compressed_image_is_read_not_taken_for_a_truncated_one(tmp_path):
    """A ``.fits.fz`` holds its image as a compressed table, far smaller than the image: its size is checked
    against the table's (a whole file read, a cut one a clear error above), not the image's."""
    patch = read_image(_compressed(tmp_path / "sky.fits.fz"), instrument="wise", band="W1")
    assert patch.shape == (1, 64, 64) and abs(float(np.median(patch.data)) - 100.0) < 1.0


def test_an_image_without_a_wcs_works_in_pixels_and_says_so(tmp_path, capsys):
    path = _image(tmp_path / "pix.fits", np.ones((16, 24), np.float32))
    assert main(["info", str(path), "--instrument", "wise", "--band", "W2"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.strip().splitlines() == [f"skyfm: warning: {path}: no celestial WCS: working in pixels"]
    assert "WCS:         none" in captured.out
    with pytest.warns(NoWCSWarning, match="no celestial WCS: working in pixels"):
        patch = read_image(path, instrument="wise", band="W2")
    assert patch.wcs is None and patch.shape == (1, 16, 24)


def test_an_unrecognised_telescope_asks_for_the_instrument(tmp_path, capsys):
    header = _wcs_header()
    header["TELESCOP"] = "JWST"
    path = _image(tmp_path / "jwst.fits", np.ones((16, 16), np.float32), header)
    with pytest.raises(SkyfmError, match="unknown instrument in .*TELESCOP='JWST'.*--instrument"):
        read_image(path)
    assert main(["info", str(path)]) == 0  # info still says what it sees, and what is missing
    assert "TELESCOP='JWST'" in capsys.readouterr().out


BAD_YAML = {
    "syntax error": ("name: broken\nbands: [unclosed\n", "not valid YAML"),
    "missing key": ("name: mine\nkind: ccd\nbands: []\n", "'pixel_scale' is missing"),
    "wrong type": ("name: mine\nkind: counts\npixel_scale: lots\n"
                   "bands:\n  - {name: A, energy: [1 GeV, 2 GeV], psf: {model: gaussian, fwhm: 0.1 deg},"
                   " exposure: 1e11 cm2 s}\n", "'pixel_scale' should be a quantity with units"),
}


@pytest.mark.parametrize("case", list(BAD_YAML))
def test_a_bad_instrument_yaml_is_one_line(tmp_path, capsys, case):
    text, words = BAD_YAML[case]
    (tmp_path / "mine.yaml").write_text(text)
    image = _image(tmp_path / "ok.fits", np.ones((16, 16), np.float32), _wcs_header())
    _one_error_line(capsys, main(["info", str(image), "--instrument", str(tmp_path / "mine.yaml")]), words)


def test_a_file_that_cannot_be_read_is_one_line(tmp_path, capsys):
    path = _image(tmp_path / "locked.fits", np.ones((16, 16), np.float32), _wcs_header())
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):  # root reads everything: nothing to test
            pytest.skip("running as a user who can read any file")
        code = main(["info", str(path)])
    finally:
        os.chmod(path, 0o644)
    _one_error_line(capsys, code, str(path))


@pytest.mark.parametrize("command", ["detect", "denoise"])
@pytest.mark.parametrize("device, words", [("gpu", "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
                                           ("cuda:7", "--device cuda:7")])
def test_a_device_that_is_not_there_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, command, device,
                                                                   words):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    image = _image(tmp_path / "ok.fits", np.ones((16, 16), np.float32), _wcs_header())
    out = tmp_path / "out.fits"
    _one_error_line(capsys, main([command, str(image), "--out", str(out), "--device", device]), words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.fits"]
