"""Build the compact Fermi-LAT resources that ship inside skyfm (``skyfm/resources/``).

Run from the repository root (the inputs are the public LAT files in ``../shared/data/fermi``):

    .venv/bin/python scripts/make_fermi_resources.py [--fermi-dir ../shared/data/fermi] [--out skyfm/resources]

Writes:

* ``fermi_4fgl_dr2.fits.gz``: the 5788 sources of 4FGL-DR2 (``gll_psc_v27.fit``), one row each, with only what the
  simulator needs: name, positions, Flux1000, Energy_Flux100, significance, the spectrum of the catalog's
  ``SpectrumType`` (form, pivot, normalisation, index, curvature or cutoff), CLASS1 (lower case; unassociated
  sources get ``unas``), and for the 75 extended sources their morphology (disk, gaussian or template), size and
  68% containment radius.
* ``fermi_extended_templates.fits.gz``: every spatial template of ``Extended_12years/Templates``, reprojected
  (DeForest adaptive resampling, anti-aliased) onto a small galactic CAR grid centred on the source's catalog
  position (or on the template's flux centroid when the DR2 catalog does not use it), at most
  :data:`MAX_TEMPLATE_PIXELS` pixels a side, clipped at zero and normalised to unit sum. One image HDU per
  template, named after the template file.

The script checks that the shipped spectra reproduce the catalog's Flux1000 and prints the largest deviation.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

REPO = Path(__file__).resolve().parents[1]
MAX_TEMPLATE_PIXELS = 120  # pixels a side of a shipped template
MIN_TEMPLATE_PIXEL_DEG = 0.01  # finer than any instrument pixel skyfm simulates from these templates
SIGNIFICANT = 1e-4  # template pixels below this fraction of the peak do not set the template's extent
CATALOG_FILE = "fermi_4fgl_dr2.fits.gz"
TEMPLATES_FILE = "fermi_extended_templates.fits.gz"

FORM_TO_MORPHOLOGY = {"Disk": "disk", "2D Gaussian": "gaussian", "Map": "template", "Ring": "template"}
# 68% containment radius of a uniform disk of radius R is sqrt(0.68) R; 4FGL gives Gaussians by their r68.
DISK_R68_PER_RADIUS = float(np.sqrt(0.68))
GAUSS_R68_PER_SIGMA = float(np.sqrt(-2.0 * np.log(1.0 - 0.68)))


def _strip(values) -> np.ndarray:
    return np.char.strip(np.asarray(values).astype(str))


def catalog_table(psc_path: Path) -> Table:
    """The compact 4FGL-DR2 table (see the module docstring)."""
    main = Table.read(psc_path, hdu="LAT_Point_Source_Catalog")
    ext = Table.read(psc_path, hdu="ExtendedSources")
    kind = _strip(main["SpectrumType"])
    prefix = np.select([kind == "PowerLaw", kind == "LogParabola"], ["PL", "LP"], "PLEC")
    pick = lambda name: np.array([main[f"{p}_{name}"][i] for i, p in enumerate(prefix)], dtype=np.float64)  # noqa: E731
    plec = kind == "PLSuperExpCutoff"
    lp = kind == "LogParabola"
    cls = np.char.lower(_strip(main["CLASS1"]))
    cls[cls == ""] = "unas"

    out = Table()
    out["name"] = _strip(main["Source_Name"])
    out["glon"] = np.asarray(main["GLON"], dtype=np.float64)
    out["glat"] = np.asarray(main["GLAT"], dtype=np.float64)
    out["ra"] = np.asarray(main["RAJ2000"], dtype=np.float64)
    out["dec"] = np.asarray(main["DEJ2000"], dtype=np.float64)
    out["flux1000"] = np.asarray(main["Flux1000"], dtype=np.float64)
    out["energy_flux100"] = np.asarray(main["Energy_Flux100"], dtype=np.float64)
    out["signif_avg"] = np.nan_to_num(np.asarray(main["Signif_Avg"], dtype=np.float32))
    out["spectrum_type"] = kind
    out["pivot_energy"] = np.asarray(main["Pivot_Energy"], dtype=np.float64)
    out["norm"] = pick("Flux_Density")
    out["index"] = pick("Index")
    out["beta"] = np.where(lp, np.asarray(main["LP_beta"], dtype=np.float64), 0.0)
    out["expfactor"] = np.where(plec, np.nan_to_num(np.asarray(main["PLEC_Expfactor"], dtype=np.float64)), 0.0)
    out["exp_index"] = np.where(plec, np.nan_to_num(np.asarray(main["PLEC_Exp_Index"], dtype=np.float64), nan=1.0), 1.0)
    out["class"] = cls

    morphology = np.full(len(main), "point", dtype="U8")
    ext_radius = np.zeros(len(main))
    extension = np.zeros(len(main))
    template = np.full(len(main), "", dtype="U24")
    by_name = {str(n).strip(): row for n, row in zip(ext["Source_Name"], ext)}
    for i, ext_name in enumerate(_strip(main["Extended_Source_Name"])):
        if not ext_name:
            continue
        row = by_name[ext_name]
        filename = str(row["Spatial_Filename"]).strip()
        form = FORM_TO_MORPHOLOGY[str(row["Model_Form"]).strip()]
        if filename and filename not in ("--", "None"):
            form = "template"
            template[i] = Path(filename).stem
        size = float(row["Model_SemiMajor"])
        morphology[i] = form
        if form == "disk":
            ext_radius[i], extension[i] = size, DISK_R68_PER_RADIUS * size
        elif form == "gaussian":  # 4FGL's Model_SemiMajor of a 2D Gaussian is its 68% containment radius
            ext_radius[i], extension[i] = size / GAUSS_R68_PER_SIGMA, size
        else:
            ext_radius[i], extension[i] = size, np.nan  # filled from the template below
    out["morphology"] = morphology
    out["ext_radius"] = ext_radius
    out["extension"] = extension
    out["template"] = template
    for col, unit in (("glon", "deg"), ("glat", "deg"), ("ra", "deg"), ("dec", "deg"), ("flux1000", "cm-2 s-1"),
                      ("energy_flux100", "erg cm-2 s-1"), ("pivot_energy", "MeV"), ("norm", "cm-2 s-1 MeV-1"),
                      ("ext_radius", "deg"), ("extension", "deg")):
        out[col].unit = unit
    for col in out.colnames:  # positions keep float64; float32 is ample for the rest
        if out[col].dtype == np.float64 and col not in ("glon", "glat", "ra", "dec"):
            out[col] = out[col].astype(np.float32)
    out.meta["ORIGIN"] = "4FGL-DR2 gll_psc_v27.fit, compacted by scripts/make_fermi_resources.py"
    return out


def _template_centre(data: np.ndarray, wcs: WCS) -> tuple[float, float]:
    """Flux centroid (glon, glat) of a template, via unit vectors so that it is safe across l = 0."""
    yy, xx = np.nonzero(data > 0)
    world = wcs.pixel_to_world(xx, yy).galactic
    x, y, z = (world.cartesian.xyz.value * data[yy, xx]).sum(axis=1)
    return float(np.degrees(np.arctan2(y, x)) % 360.0), float(np.degrees(np.arctan2(z, np.hypot(x, y))))


def template_hdu(path: Path, centre: tuple[float, float] | None, source_name: str) -> fits.ImageHDU:
    """One template reprojected onto a compact galactic CAR grid centred on ``centre`` (see the module docstring)."""
    from astropy.coordinates import SkyCoord
    from reproject import reproject_adaptive

    with fits.open(path) as hdul, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FITSFixedWarning, BLANK on float data: harmless in these files
        header = hdul[0].header
        data = np.nan_to_num(np.asarray(hdul[0].data, dtype=np.float64).squeeze())
        wcs = WCS(header).celestial
    data = np.clip(data, 0.0, None)
    native_scale = float(np.abs(wcs.proj_plane_pixel_scales()[0].to_value("deg")))
    if centre is None:
        centre = _template_centre(data, wcs)
    yy, xx = np.nonzero(data > SIGNIFICANT * data.max())
    world = wcs.pixel_to_world(xx, yy)
    radius = float(world.separation(SkyCoord(*centre, unit="deg", frame="galactic")).deg.max()) + 2 * native_scale
    scale = max(native_scale, MIN_TEMPLATE_PIXEL_DEG, 2 * radius / MAX_TEMPLATE_PIXELS)
    n = int(np.ceil(2 * radius / scale)) | 1  # odd: the centre falls on a pixel centre
    out_wcs = WCS(naxis=2)
    out_wcs.wcs.ctype = ["GLON-CAR", "GLAT-CAR"]
    out_wcs.wcs.crval = list(centre)
    out_wcs.wcs.crpix = [(n + 1) / 2, (n + 1) / 2]
    out_wcs.wcs.cdelt = [-scale, scale]
    out_wcs.wcs.cunit = ["deg", "deg"]
    image, _ = reproject_adaptive((data, wcs), out_wcs, shape_out=(n, n), conserve_flux=False, boundary_mode="constant",
                                  boundary_fill_value=0.0)
    image = np.clip(np.nan_to_num(image), 0.0, None)
    image /= image.sum()
    hdu = fits.ImageHDU(image.astype(np.float32), header=out_wcs.to_header(), name=path.stem.upper())
    hdu.header["TEMPLATE"] = (path.stem, "file in Extended_12years/Templates")
    hdu.header["SRCNAME"] = (source_name, "4FGL-DR2 extended source using it ('' if none)")
    hdu.header["NATSCALE"] = (native_scale, "deg, pixel of the original template")
    hdu.header["BUNIT"] = ("", "fraction of the source's flux per pixel")
    return hdu


def template_r68(image: np.ndarray, scale_deg: float) -> float:
    """68% containment radius (deg) of a unit-sum template about its grid centre."""
    n = image.shape[0]
    yy, xx = np.mgrid[0:n, 0:n] - (n - 1) / 2
    r = np.hypot(xx, yy).ravel() * scale_deg
    order = np.argsort(r)
    cum = np.cumsum(image.ravel()[order])
    return float(r[order][np.searchsorted(cum, 0.68)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fermi-dir", type=Path, default=REPO.parent / "shared" / "data" / "fermi")
    parser.add_argument("--out", type=Path, default=REPO / "skyfm" / "resources")
    args = parser.parse_args()
    psc = args.fermi_dir / "gll_psc_v27.fit"
    template_dir = args.fermi_dir / "Extended_12years" / "Templates"
    args.out.mkdir(parents=True, exist_ok=True)

    table = catalog_table(psc)
    hdus = [fits.PrimaryHDU()]
    hdus[0].header["COMMENT"] = "LAT extended-source templates (Extended_12years), compacted by skyfm"
    users = {t: (float(r["glon"]), float(r["glat"]), str(r["name"])) for r, t in zip(table, table["template"]) if t}
    for path in sorted(template_dir.glob("*.fits")):
        glon, glat, name = users.get(path.stem, (None, None, ""))
        hdu = template_hdu(path, None if glon is None else (glon, glat), name)
        r68 = template_r68(hdu.data.astype(np.float64), abs(hdu.header["CDELT1"]))
        hdu.header["R68"] = (r68, "deg, 68% containment radius about the centre")
        hdus.append(hdu)
        table["extension"][table["template"] == path.stem] = r68
        print(f"{path.stem:<22} {hdu.data.shape[0]:>4} px at {abs(hdu.header['CDELT1']):.4f} deg, r68 {r68:.3f} deg"
              f"{'  (' + name + ')' if name else ''}")
    missing = sorted(set(t for t in table["template"] if t) - {h.header["TEMPLATE"] for h in hdus[1:]})
    if missing:
        raise SystemExit(f"templates used by the catalog but not found: {missing}")
    fits.HDUList(hdus).writeto(args.out / TEMPLATES_FILE, overwrite=True)

    import sys

    sys.path.insert(0, str(REPO))
    from skyfm.data.simulate.spectra import SPECTRUM_TYPES, SpectrumSet

    spectra = SpectrumSet(
        kind=[SPECTRUM_TYPES.index(k) for k in table["spectrum_type"]], norm=table["norm"],
        pivot_mev=table["pivot_energy"], index=table["index"], beta=table["beta"], expfactor=table["expfactor"],
        exp_index=table["exp_index"],
    )
    ratio = spectra.photon_flux(1e3, 1e5) / np.asarray(table["flux1000"])
    print(f"Flux1000 recomputed from the spectra / catalog: median {np.median(ratio):.4f}, "
          f"1-99% [{np.percentile(ratio, 1):.4f}, {np.percentile(ratio, 99):.4f}]")
    table.write(args.out / CATALOG_FILE, overwrite=True)
    print(f"wrote {len(table)} sources and {len(hdus) - 1} templates to {args.out}/")


if __name__ == "__main__":
    main()
