"""The ``skyfm`` command.

Every subcommand has a ``--help`` that explains what it does and shows an example. Problems with the user's input
are reported as one line on stderr (``skyfm: error: ...``) with exit status 1, never as a traceback.
"""

from __future__ import annotations

import sys

import click

from skyfm import __version__
from skyfm.errors import SkyfmError
from skyfm.utils import format_angle


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
        click.echo(f"  {b.name:<6} {b.edges_label():<22} PSF {b.psf_spec['model']:<8} FWHM {format_angle(psf.fwhm_deg)} "
                   f"({psf.fwhm_deg / inst.pixel_scale_deg:.2f} pix), r68 {format_angle(psf.containment_radius())}")


@cli.command("simulate")
@click.option("--instrument", "-i", required=True, help="Instrument name (see `skyfm instruments`) or a YAML file.")
@click.option("--n", "n", type=click.IntRange(min=1), default=1, show_default=True, help="Number of patches.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Run seed: the same seed gives the same files.")
@click.option("--size", type=click.IntRange(min=16), default=None, help="Patch side in pixels (default: the instrument's).")
@click.option("--population", default=None,
              help="Gamma-ray source population: real (4FGL sky), resampled, plane or toy (CTAO 10x10 deg).")
@click.option("--galactic-model", default=None, help="Gamma-ray interstellar-emission model (gas-disk, ic-halo).")
@click.option("--scene", default=None, help="Optical/IR scene: empty, field, crowded or cluster (default: drawn).")
@click.option("--band", "bands", multiple=True, help="Optical/IR band(s) to simulate (default: the instrument's choice).")
def simulate_cmd(instrument, n, out_dir, seed, size, population, galactic_model, scene, bands):
    """Simulate patches with truth: one FITS file per patch in the instrument's real format.

    Each file holds the image (a gtbin-style counts cube with EBOUNDS for gamma-ray instruments, one 2-D image
    HDU per band for CCDs), the expected source-only image (SOURCES), the contaminant mask (MASK, CCDs) and the
    true sources (TRUTH table). An index of the files, `index.ecsv`, is written beside them. Patch i uses a seed
    derived from (--seed, i), so a run is reproducible and can be extended.

    \b
    Examples:
      skyfm simulate --instrument fermi-lat --n 10 --out sims/fermi --seed 1
      skyfm simulate -i ctao --population toy --size 512 --n 2 --out sims/ctao-toy
      skyfm simulate -i meerlicht --scene crowded --band q --n 5 --out sims/ml
    """
    from pathlib import Path

    from astropy.table import Table
    from tqdm import tqdm

    from skyfm.data import write_patch
    from skyfm.data.simulate import patch_seed, simulate_patch
    from skyfm.instruments import load_instrument
    from skyfm.utils import atomic_path

    inst = load_instrument(instrument)
    options = {"size": size, "population": population, "galactic_model": galactic_model, "scene": scene,
               "bands": list(bands) or None}
    kind_options = {"counts": ("size", "population", "galactic_model"), "ccd": ("size", "scene", "bands")}[inst.kind]
    for key, value in options.items():
        if value is not None and key not in kind_options:
            raise SkyfmError(f"--{key.replace('_', '-')} does not apply to {inst.name} ({inst.kind} instrument)")
    options = {k: v for k, v in options.items() if v is not None}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in tqdm(range(n), desc=f"simulating {inst.name}", unit="patch", disable=n < 2):
        s = patch_seed(seed, i)
        patch = simulate_patch(inst, s, **options)
        path = write_patch(patch, out / f"{inst.name}_{seed}_{i:05d}.fits")
        rows.append({"file": path.name, "seed": s, "n_sources": 0 if patch.truth is None else len(patch.truth),
                     "bands": ",".join(patch.bands)})
    index = Table(rows=rows)
    index.meta["comments"] = [f"skyfm simulate --instrument {inst.name} --n {n} --seed {seed}"]
    with atomic_path(out / "index.ecsv") as tmp:
        index.write(tmp, format="ascii.ecsv", overwrite=True)
    total = sum(r["n_sources"] for r in rows)
    click.echo(f"wrote {n} {inst.name} patch{'es' if n > 1 else ''} with {total} true sources to {out}/")

DEMO_SCENES = [  # (instrument, simulator options): one patch of every instrument of the mission
    ("fermi-lat", {"population": "resampled"}),
    ("ctao", {"population": "plane"}),
    ("meerlicht", {"scene": "crowded"}),
    ("hubble", {"scene": "field"}),
    ("wise", {"scene": "crowded"}),
]


@cli.command("demo")
@click.option("--out", "out_dir", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=2026, show_default=True)
def demo_cmd(out_dir, seed):
    """Run the main job on simulated data of every instrument and write what a person would look at.

    For now (detection lands with the task heads): simulate a patch of Fermi-LAT, CTAO, MeerLICHT, Hubble and WISE,
    write each as FITS in its real format and its truth catalog as ECSV, and a gallery PNG
    with the true sources overlaid: OUT/gallery.png.

    \b
    Example:
      skyfm demo --out runs/demo
    """
    from pathlib import Path

    from tqdm import tqdm

    from skyfm.data import write_patch
    from skyfm.data.simulate import patch_seed, simulate_patch
    from skyfm.plotting import save_gallery
    from skyfm.utils import atomic_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    patches = []
    for i, (name, options) in enumerate(tqdm(DEMO_SCENES, desc="simulating", unit="instrument")):
        patch = simulate_patch(name, patch_seed(seed, i), **options)
        write_patch(patch, out / f"{name}.fits")
        with atomic_path(out / f"{name}_truth.ecsv") as tmp:
            patch.truth.write(tmp, format="ascii.ecsv", overwrite=True)
        patches.append(patch)
    gallery = save_gallery(patches, out / "gallery.png", title="skyfm demo: simulated patches with true sources")
    for patch in patches:
        save_gallery([patch], out / f"{patch.instrument}.png", ncols=1)
    for patch in patches:
        click.echo(f"  {patch.instrument:<10} {patch.n_bands} band(s) {patch.height}x{patch.width}, "
                   f"{len(patch.truth)} true sources -> {out / (patch.instrument + '.fits')}")
    click.echo(f"gallery: {gallery}")


@cli.command("info")
@click.argument("file", type=click.Path())
@click.option("--instrument", "-i", default=None, help="Instrument name or YAML file (default: from the header).")
@click.option("--hdu", default=None, help="HDU to read, by index or EXTNAME (default: the first with image data).")
@click.option("--band", default=None, help="Band of a one-band image whose header has no FILTER / BAND keyword.")
def info_cmd(file, instrument, hdu, band):
    """Say what skyfm sees in a FITS file: an image, a counts cube, a HEALPix map or a simulated patch.

    Prints the format, the instrument (and whether the header or --instrument named it), the shape, the bands
    with their energy or wavelength ranges, the pixel scale, the WCS (projection, frame, centre in ra/dec and
    glon/glat, field size), the fraction of masked pixels and, for simulated patches, the number of true sources.

    \b
    Examples:
      skyfm info image.fits
      skyfm info ccube.fits --instrument fermi-lat
      skyfm info drizzled.fits --hdu SCI --band F606W
    """
    import warnings

    from skyfm.data.readers import inspect_file

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        lines = inspect_file(file, instrument=instrument, hdu=hdu, band=band)
    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)):
        click.echo(f"skyfm: warning: {message}", err=True)
    click.echo("\n".join(lines))


@cli.command("shards")
@click.option("--instrument", "-i", "instruments", multiple=True, required=True, metavar="NAME=COUNT",
              help="Instrument and number of patches; repeat for a mixed set (e.g. -i fermi-lat=2000 -i wise=500).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Run seed: the same seed gives the same shards.")
@click.option("--per-shard", type=click.IntRange(min=1), default=1000, show_default=True, help="Patches per shard.")
@click.option("--size", type=click.IntRange(min=16), default=None, help="Patch side in pixels (default: the instrument's).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Simulating processes.")
@click.option("--append", is_flag=True, help="Add to the shard set in --out instead of refusing an existing one.")
def shards_cmd(instruments, out_dir, seed, per_shard, size, workers, append):
    """Simulate patches with truth and write them as a sharded training set.

    Writes webdataset-style tar shards (one instrument per shard, --per-shard patches each; every patch its
    image, source-only image, masks, truth catalog and metadata) and OUT/manifest.json with the sample counts,
    bands, sizes and sha256 of every shard and this command. Stream them into training with
    skyfm.data.ShardDataset, which mixes the instruments with any weights. Use one --size for all instruments
    to batch them together.

    \b
    Examples:
      skyfm shards -i fermi-lat=2000 -i meerlicht=2000 --size 256 --out shards/ --seed 1
      skyfm shards -i wise=500 --out shards/ --seed 2 --append
    """
    import shlex

    from skyfm.data.shards import load_manifest, parse_instrument_counts, write_simulated_shards

    counts = parse_instrument_counts(instruments)
    args = [a for name, n in counts.items() for a in ("-i", f"{name}={n}")] + ["--out", out_dir, "--seed", str(seed),
            "--per-shard", str(per_shard)] + (["--size", str(size)] if size else []) + (["--append"] if append else [])
    command = "skyfm shards " + shlex.join(args)  # recorded in the manifest
    manifest_path = write_simulated_shards(out_dir, counts, seed=seed, patches_per_shard=per_shard, size=size,
                                           workers=workers, progress=True, append=append, command=command)
    manifest = load_manifest(manifest_path)
    mix = ", ".join(f"{n} {name}" for name, n in manifest["instruments"].items())
    click.echo(f"{manifest_path.parent}/: {len(manifest['shards'])} shards, {manifest['n_samples']} patches ({mix})")


@cli.command("pretrain")
@click.option("--config", "config_path", required=True,
              help="Pretraining recipe: a YAML file, or the name of a built-in one (tiny, base).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder: checkpoints, metrics.csv, TensorBoard logs and the final model/.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop after this many optimizer steps (the schedule still follows the recipe).")
@click.option("--no-resume", is_flag=True, help="Start from scratch even if OUT holds checkpoints.")
def pretrain_cmd(config_path, out_dir, max_steps, no_resume):
    """Pretrain the foundation model, self-supervised, on mixed gamma-ray, optical and infrared patches.

    Stage 1 trains the VQ-VAE tokenizer on every band of every instrument; stage 2 freezes it and trains the
    backbone to predict the codes of masked tokens. The recipe names the model, the data (a shard set, or
    instruments to simulate into OUT/shards first) and the optimisation. The full training state is saved every
    checkpoint.every steps; run the same command again to resume exactly where a stopped or killed run left off.
    At the end OUT/model/ holds config.json + model.safetensors, for `--init` / create_model(pretrained_dir=...).

    \b
    Examples:
      skyfm pretrain --config tiny --out runs/pretrain-tiny
      skyfm pretrain --config configs/pretrain/tiny.yaml --out runs/pretrain-tiny --max-steps 100
    \b
    On two CPU processes, or GPUs and machines (accelerate launch):
      accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no -m skyfm.pretrain --config tiny --out runs/pretrain-tiny
    """
    import os

    from skyfm.pretrain import load_pretrain_config
    from skyfm.pretrain.train import pretrain

    config = load_pretrain_config(config_path)
    model_dir = pretrain(config, out_dir, max_steps=max_steps, resume=not no_resume)
    click.echo(f"model: {model_dir}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo may abort while tearing down at interpreter exit: everything is saved, leave now.
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@cli.command("denoise")
@click.argument("input_path", metavar="INPUT", type=click.Path())
@click.option("--instrument", "-i", default=None, help="Instrument name or YAML file (default: from the header).")
@click.option("--model", "model_dir", default=None, type=click.Path(),
              help="Denoiser directory (config.json + model.safetensors; default: the one shipped with skyfm).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Output FITS file.")
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help="Diffusion samples averaged per pixel; their spread is the uncertainty (default: the model's, 4).")
@click.option("--steps", type=click.IntRange(min=1, max=1000), default=None,
              help="DDIM steps per sample (default: the model's, 4).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed: the same seed gives the same file.")
@click.option("--hdu", default=None, help="HDU to read, by index or EXTNAME (default: the first with image data).")
@click.option("--band", default=None, help="Band of a one-band image whose header has no FILTER / BAND keyword.")
def denoise_cmd(input_path, instrument, model_dir, out_path, samples, steps, seed, hdu, band):
    """Remove backgrounds, noise, cosmic rays and trails: write the source-only image of INPUT.

    INPUT is a FITS image or a gtbin counts cube. OUT gets the clean image (same shape as the input, same units)
    as its primary HDU, the per-pixel uncertainty (std of the diffusion samples) as HDU UNCERT, the input header
    and WCS, and the input's EBOUNDS table for counts cubes. Large images are denoised tile by tile.

    \b
    Examples:
      skyfm denoise ccube.fits --out clean.fits
      skyfm denoise ml_q.fits --instrument meerlicht --band q --out clean.fits --samples 8 --steps 8
    """
    from skyfm.heads.denoise.apply import denoise_file

    out = denoise_file(input_path, out_path, instrument=instrument, model_dir=model_dir, samples=samples,
                       steps=steps, seed=seed, hdu=hdu, band=band, progress=True)
    click.echo(f"clean image: {out}")


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
