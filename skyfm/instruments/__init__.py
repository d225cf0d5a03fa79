"""Instruments as data: bands, pixel scale, PSF per band, noise, background and scaling, read from YAML."""

from skyfm.instruments.instrument import (
    Band,
    Instrument,
    builtin_config_dir,
    instrument_from_header,
    list_instruments,
    load_instrument,
    parse_instrument,
    psf_from_spec,
    read_instrument_file,
)
from skyfm.instruments.psf import PSF
from skyfm.instruments.scaling import scale_image, unscale_image

__all__ = [
    "Band",
    "Instrument",
    "PSF",
    "builtin_config_dir",
    "instrument_from_header",
    "list_instruments",
    "load_instrument",
    "parse_instrument",
    "psf_from_spec",
    "read_instrument_file",
    "scale_image",
    "unscale_image",
]
