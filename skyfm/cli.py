"""The ``skyfm`` command.

Every subcommand has a ``--help`` that explains what it does and shows an example. Problems with the user's input
are reported as one line on stderr (``skyfm: error: ...``) with exit status 1, never as a traceback.
"""

from __future__ import annotations

import sys

import click

from skyfm import __version__
from skyfm.errors import SkyfmError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="skyfm")
def cli():
    """skyfm: find astrophysical sources in sky images, across wavelengths, with one foundation model.

    \b
    Start here:
      skyfm instruments                      the telescopes skyfm knows, and their bands
      skyfm simulate --instrument fermi-lat --n 4 --out sims/   simulated patches with truth
      skyfm info image.fits                  what skyfm sees in a FITS file
    """


@cli.command("instruments")
@click.argument("name", required=False)
def instruments_cmd(name: str | None):
    """List the built-in instruments, or describe one (NAME, or a path to your own YAML).

    \b
    Examples:
      skyfm instruments
      skyfm instruments wise
      skyfm instruments my-telescope.yaml
    """
    from skyfm.instruments import list_instruments, load_instrument

    if name is None:
        for n in list_instruments():
            inst = load_instrument(n)
            click.echo(f"{n:<11} {inst.kind:<7} {len(inst.bands)} bands  {inst.description}")
        return
    inst = load_instrument(name)
    click.echo(f"{inst.name}: {inst.description}")
    click.echo(f"  kind {inst.kind}, pixel scale {inst.pixel_scale}, patch {inst.patch_size[0]}x{inst.patch_size[1]},"
               f" frame {inst.frame}, projection {inst.projection}, scaling {inst.scaling['method']}")
    for b in inst.bands:
        psf = b.psf
        click.echo(f"  {b.name:<6} {b.edges_label():<22} PSF {b.psf_spec['model']:<8} FWHM {_angle(psf.fwhm_deg)} "
                   f"({psf.fwhm_deg / inst.pixel_scale_deg:.2f} pix), r68 {_angle(psf.containment_radius())}")


def _angle(deg: float) -> str:
    """An angle in the unit a person would use for it."""
    if deg >= 0.05:
        return f"{deg:.3g} deg"
    if deg >= 1 / 60:
        return f"{deg * 60:.3g} arcmin"
    return f"{deg * 3600:.3g} arcsec"


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the command group, turning SkyfmError into one clear line and exit status 1."""
    try:
        cli.main(args=argv, prog_name="skyfm", standalone_mode=False)
    except SkyfmError as e:
        click.echo(f"skyfm: error: {e}", err=True)
        return 1
    except click.exceptions.Abort:
        click.echo("skyfm: aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("skyfm: interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
