"""The ``skyfm`` command.

Every subcommand has a ``--help`` that explains what it does and shows an example. Problems with the user's input
are reported as one line on stderr (``skyfm: error: ...``) with exit status 1, never as a traceback.
"""

from __future__ import annotations

import contextlib
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
@click.option("--size", type=click.IntRange(min=32), default=128, show_default=True, help="Patch side (pixels).")
def demo_cmd(out_dir, seed, size):
    """Run the whole path on simulated data of every instrument: simulate, detect, evaluate, plot.

    For Fermi-LAT, CTAO, MeerLICHT, Hubble and WISE: simulate a patch, write it as FITS in its real format with its
    truth (NAME.fits, NAME_truth.ecsv), detect its sources with the default detector (NAME_catalog.fits + .reg,
    NAME_catalog.png with truth circles and detection crosses), score the catalog against the truth
    (metrics.json: precision, recall, F1 for SNR >= 5), and plot recall against SNR (recall_vs_snr.png) and a
    gallery of the skies (gallery.png).

    \b
    Example:
      skyfm demo --out runs/demo
    """
    from skyfm.detect import run_demo

    summaries = run_demo(out_dir, DEMO_SCENES, seed=seed, size=size)
    click.echo(f"{'instrument':<10} {'shape':>14} {'true':>5} {'found':>5} {'prec':>5} {'recall':>6} {'F1':>5} {'s':>5}")
    for r in summaries:
        shape = "x".join(str(v) for v in r["shape"])
        click.echo(f"{r['instrument']:<10} {shape:>14} {r['n_true_snr5']:>5} {r['n_detected']:>5} "
                   f"{r['precision']:>5.2f} {r['recall']:>6.2f} {r['f1']:>5.2f} {r['detect_seconds']:>5.1f}")
    click.echo(f"catalogs, overlays, metrics.json, recall_vs_snr.png and gallery.png in {out_dir}/ "
               "(precision / recall against true sources with SNR >= 5)")


def mask_options(command):
    """``--mask`` and ``--mask-bits``, for the commands that read an image (info, detect, denoise)."""
    def bits(ctx, param, value):
        from skyfm.data.readers import parse_mask_bits

        return parse_mask_bits(value)

    command = click.option(
        "--mask-bits", default=None, callback=bits,
        help="Only pixels of --mask with one of these bits set are bad: bit values (1,2,16) or their sum. Leave "
             "saturation flags out: skyfm finds saturated stars from the pixel values.")(command)
    return click.option(
        "--mask", "mask_path", default=None, type=click.Path(dir_okay=False),
        help="A bad-pixel mask file beside the image, as pipelines write them (MeerLICHT's _mask.fits.fz, ZTF's "
             "mskimg): non-zero pixels are left out (the network sees them filled in, the fits skip them). Same "
             "size as the image (a mask file of several HDUs: the one of the image's HDU index).")(command)


BUNIT_HELP = ("CCD images: the pixels' unit, in place of the header's BUNIT (a file with none, or a wrong one): ADU, "
              "DN, counts or electrons, or any of these per second ('electron/s': the exposure time from EXPTIME). "
              "Default: the header's BUNIT; without one, the unit the sky's noise gives.")


@cli.command("info")
@click.argument("file", type=click.Path())
@click.option("--instrument", "-i", default=None, help="Instrument name or YAML file (default: from the header).")
@click.option("--hdu", default=None, help="HDU to read, by index or EXTNAME (default: the first with image data).")
@click.option("--band", default=None, help="Band of a one-band image whose header has no FILTER / BAND keyword.")
@mask_options
@click.option("--bunit", default=None, help=BUNIT_HELP)
def info_cmd(file, instrument, hdu, band, mask_path, mask_bits, bunit):
    """Say what skyfm sees in a FITS file: an image, a counts cube, a HEALPix map, a simulated patch or a PSF file.

    Prints the format, the instrument (and whether the header or --instrument named it), the shape, the bands
    with their energy or wavelength ranges, the pixel scale, the WCS (projection, frame, centre in ra/dec and
    glon/glat, field size), the fraction of masked pixels and, for simulated patches, the number of true sources.
    For a PSF file (gtpsf's, an IACT IRF's psf_table, or gammapy's PSF map): the King function skyfm detect --psf
    would fit to each band of the instrument, beside the YAML's PSF.

    \b
    Examples:
      skyfm info image.fits
      skyfm info ccube.fits --instrument fermi-lat
      skyfm info drizzled.fits --hdu SCI --band F606W
      skyfm info red.fits.fz --mask mask.fits.fz --mask-bits 1,2,16     # how much the pipeline's mask leaves out
      skyfm info gtpsf_psf3.fits                                        # the PSF per band that --psf would use
    """
    from skyfm.data.readers import inspect_file

    with _warnings_as_lines():
        lines = inspect_file(file, instrument=instrument, hdu=hdu, band=band, mask=mask_path,
                             mask_bits=mask_bits, bunit=bunit)
    click.echo("\n".join(lines))


@contextlib.contextmanager
def _warnings_as_lines():
    """Each distinct UserWarning of the block (no WCS, a denoised input, ...) becomes one line on stderr, said
    once the block has succeeded: a failure stays the one line of its error."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        yield
    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)):
        click.echo(f"skyfm: warning: {message}", err=True)


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
    backbone to predict the codes of masked tokens (with `model_overrides: {denoise_loss_weight: W}`, also to
    regress every token's pixels of an independent noisy copy of the image: recipe tiny-denoise). The recipe
    names the model, the data (a shard set, or instruments to simulate into OUT/shards first) and the
    optimisation. The full training state is saved every checkpoint.every steps; run the same command again to
    resume exactly where a stopped or killed run left off.
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
              help="Diffusion samples averaged per pixel; their spread, calibrated, is the uncertainty (default: the "
                   "model's, 4; with 1 there is no spread and UNCERT is NaN).")
@click.option("--steps", type=click.IntRange(min=1, max=1000), default=None,
              help="DDIM steps per sample (default: the model's, 10).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed: the same seed gives the same file.")
@click.option("--hdu", default=None, help="HDU to read, by index or EXTNAME (default: the first with image data).")
@click.option("--band", default=None, help="Band of a one-band image whose header has no FILTER / BAND keyword.")
@click.option("--flux-correction", type=click.Choice(["none", "forced"]), default="forced", show_default=True,
              help="forced: rescale each source of the clean image so that its aperture flux (1 PSF FWHM) is the "
                   "observed one minus the removed background (forced photometry; the denoiser alone keeps "
                   "0.36-0.87 of an isolated source's flux); none: the plain mean of the samples.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Network arithmetic: auto = bfloat16 where the CPU or GPU has it natively, else float32.")
@click.option("--device", default="auto", show_default=True,
              help="Where the network runs: auto (a CUDA GPU where torch sees one, else the CPU), cpu, cuda or "
                   "cuda:N.")
@mask_options
def denoise_cmd(input_path, instrument, model_dir, out_path, samples, steps, seed, hdu, band, flux_correction,
                precision, device, mask_path, mask_bits):
    """Remove backgrounds, noise, cosmic rays and trails: write the source-only image of INPUT.

    INPUT is a FITS image or a gtbin counts cube. OUT gets the clean image (same shape as the input, same units)
    as its primary HDU, the per-pixel 1-sigma uncertainty as HDU UNCERT (the spread of the diffusion samples,
    calibrated per instrument on validation simulations; header keyword DNUNCERT says whether it is), the
    background it removed as HDU BACKGROUND (input minus the mean clean image before the flux correction,
    smoothed: diffuse emission, sky, unresolved sources, removed artefacts), the input header and WCS, and the
    input's EBOUNDS table for counts cubes (a cube binned otherwise than the instrument is summed into its bands
    first, and the output has those bands). Large images are denoised tile by tile. By
    default each source of the clean image is rescaled to its observed aperture flux (its uncertainty with it).

    \b
    Examples:
      skyfm denoise ccube.fits --out clean.fits
      skyfm denoise ml_q.fits --instrument meerlicht --band q --out clean.fits --samples 8 --steps 8
    """
    from skyfm.heads.denoise.apply import denoise_file

    if samples == 1:
        click.echo("skyfm: warning: 1 sample has no spread: the UNCERT HDU will be NaN (use --samples 2 or more)",
                   err=True)
    with _warnings_as_lines():
        out = denoise_file(input_path, out_path, instrument=instrument, model_dir=model_dir, samples=samples,
                           steps=steps, seed=seed, hdu=hdu, band=band, progress=True,
                           flux_correction=flux_correction, precision=precision, device=device, mask=mask_path,
                           mask_bits=mask_bits)
    click.echo(f"clean image: {out}")


@cli.command("embed")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Output Parquet file.")
@click.option("--model", "model_dir", default=None, type=click.Path(),
              help="Foundation model folder (e.g. runs/pretrain-tiny/model) or detector folder "
                   "(default: the backbone of the detector shipped with skyfm).")
@click.option("--instrument", "-i", default=None, help="Instrument name or YAML file (default: from each header).")
@click.option("--band", default=None, help="Band of one-band images whose header has no FILTER / BAND keyword.")
@click.option("--sources", "sources", default=None, type=click.Path(dir_okay=False),
              help="Catalog of sources to embed (FITS / ECSV / VOTable with ra/dec, glon/glat or x/y; a 'file' "
                   "column assigns rows to inputs). Default: each file's TRUTH table, else the detector.")
@click.option("--min-snr", type=float, default=5.0, show_default=True,
              help="TRUTH tables only: embed true sources at least this significant.")
@click.option("--min-score", type=float, default=None, help="Detector sources: minimum score (default: the detector's).")
@click.option("--patches-only", is_flag=True, help="One vector per patch (tile) only, no source vectors.")
@click.option("--tile", type=click.IntRange(min=8), default=64, show_default=True,
              help="Tile side in pixels (a multiple of the model's 8-pixel token); smaller images are one tile.")
@click.option("--overlap", type=click.IntRange(min=0), default=16, show_default=True, help="Tile overlap in pixels.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Tiles per forward pass.")
def embed_cmd(inputs, out_path, model_dir, instrument, band, sources, min_snr, min_score, patches_only, tile,
              overlap, batch_size):
    """Embed images: one vector per patch (tile) and per source, with metadata and thumbnails, into Parquet.

    INPUTS are FITS images, gtbin counts cubes, simulated patch files or folders of them. Images larger than
    --tile are cut into overlapping tiles; each source is embedded once, by the tile that owns it. A vector is
    the model's token features and dense features (each unit length) joined: 160 numbers for skyfm-tiny. Each
    row records file, instrument, bands, pixel x/y, ra/dec and glon/glat, class / flux / snr when known and a
    PNG thumbnail. Then: `skyfm index`, `skyfm search`, `skyfm umap`.

    \b
    Examples:
      skyfm embed sims/fermi sims/wise --model runs/pretrain-tiny/model --out emb.parquet
      skyfm embed mosaic.fits --sources my_catalog.ecsv --model runs/pretrain-tiny/model --out emb.parquet
      skyfm embed ccube.fits -i fermi-lat --patches-only --tile 128 --out patches.parquet
    """
    import shlex

    from skyfm.latent.embed import embed_command

    command = "skyfm embed " + shlex.join([*map(str, inputs), "--out", str(out_path)]
                                          + (["--model", str(model_dir)] if model_dir else [])
                                          + (["--sources", str(sources)] if sources else []))
    out, summary = embed_command(inputs, out_path, model_dir=model_dir, instrument=instrument, band=band,
                                 sources=sources, tile=tile, overlap=overlap, batch_size=batch_size, min_snr=min_snr,
                                 patches_only=patches_only, min_score=min_score, command=command)
    for note in summary["notes"]:
        click.echo(f"skyfm: note: {note}", err=True)
    click.echo(f"{out}: {summary['patches']} patch and {summary['sources']} source vectors ({summary['dim']} dims) "
               f"from {summary['files']} file{'s' if summary['files'] != 1 else ''}")


@cli.command("index")
@click.argument("embeddings", type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Index folder to write.")
@click.option("--kind", type=click.Choice(["auto", "flat", "ivf", "ivfpq", "hnsw"]), default="auto", show_default=True,
              help="auto: exact flat up to 20k vectors, IVF-Flat up to 5M, IVF-PQ beyond; hnsw on request.")
@click.option("--metric", type=click.Choice(["cosine", "l2"]), default="cosine", show_default=True,
              help="cosine: unit vectors, distance 1 - cos; l2: raw vectors, Euclidean distance.")
@click.option("--target-recall", type=float, default=0.95, show_default=True,
              help="Approximate indexes: tune nprobe / efSearch until recall@10 against exact search reaches this.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of k-means and of the tuning sample.")
def index_cmd(embeddings, out_dir, kind, metric, target_recall, seed):
    """Build a FAISS index of an embeddings Parquet file (from `skyfm embed`) in a folder.

    The folder holds index.faiss (FAISS's own format, not a pickle), index.json (kind, parameters chosen by size,
    the tuned nprobe / efSearch and its measured recall@10), metadata.parquet (row i = id i, with thumbnails)
    and vectors.npy. Search it with `skyfm search`.

    \b
    Examples:
      skyfm index emb.parquet --out emb.index
      skyfm index big.parquet --out big.index --kind hnsw --target-recall 0.98
    """
    from skyfm.latent.index import build_index_dir, search_param_name

    out, params = build_index_dir(embeddings, out_dir, kind=kind, metric=metric, target_recall=target_recall,
                                  seed=seed, progress=True)
    name = search_param_name(params["kind"])
    tuned = f", {name} {params[name]} (recall@10 {params['recall_at_10']:.3f})" if name else " (exact)"
    extra = f", nlist {params['nlist']}" if "nlist" in params else ""
    click.echo(f"{out}/: {params['kind']} index of {params['n']} vectors, {params['dim']} dims, {params['metric']}"
               f"{extra}{tuned}, built in {params['build_seconds']:.2f} s")


@cli.command("search")
@click.option("--index", "index_dir", required=True, type=click.Path(), help="Index folder from `skyfm index`.")
@click.option("--query", "query", default=None, type=click.Path(),
              help="Query file: embeddings .parquet (each row), vectors .npy ((D,) or (n, D)), or a FITS image "
                   "(embedded with the index's model, one query per tile).")
@click.option("--id", "row_id", type=int, default=None, help="Query with row N of the index (itself left out).")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Neighbours per query.")
@click.option("--instrument", "-i", default=None, help="Only neighbours from this instrument.")
@click.option("--kind", type=click.Choice(["patch", "source"]), default=None, help="Only patch or only source vectors.")
@click.option("--grid", "grid", default=None, type=click.Path(dir_okay=False),
              help="Write a PNG grid: each query's thumbnail and its neighbours'.")
@click.option("--model", "model_dir", default=None, type=click.Path(),
              help="Model to embed a FITS query with (default: the one the index was built from).")
@click.option("--max-queries", type=click.IntRange(min=1), default=5, show_default=True,
              help="Queries taken from a multi-row query file.")
def search_cmd(index_dir, query, row_id, k, instrument, kind, grid, model_dir, max_queries):
    """Find the nearest neighbours of a query in an index: print them with distances, draw a thumbnail grid.

    Distances are cosine distances (1 - cos, 0 = same direction) for cosine indexes, Euclidean for l2 ones.

    \b
    Examples:
      skyfm search --index emb.index --id 42 -k 10 --grid neighbours.png
      skyfm search --index emb.index --query new_patch.fits --instrument wise -k 5
      skyfm search --index emb.index --query some.parquet --kind source --grid grid.png
    """
    from skyfm.latent.search import search_command

    lines, _ = search_command(index_dir, query=query, row_id=row_id, k=k, instrument=instrument, kind=kind, grid=grid,
                              model_dir=model_dir, max_queries=max_queries)
    click.echo("\n".join(lines))


@cli.command("umap")
@click.argument("embeddings", type=click.Path())
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Static map, PNG.")
@click.option("--html", "html_path", default=None, type=click.Path(dir_okay=False),
              help="Also write a self-contained interactive explorer (opens from disk, no server).")
@click.option("--color-by", type=click.Choice(["instrument", "class", "kind", "origin", "file", "bands", "flux", "snr",
                                               "score"]), default="instrument", show_default=True)
@click.option("--kind", type=click.Choice(["patch", "source"]), default=None, help="Map only patch or source vectors.")
@click.option("--instrument", "-i", default=None, help="Map only this instrument's vectors.")
@click.option("--max-points", type=click.IntRange(min=5), default=5000, show_default=True,
              help="Random subsample above this many points (seeded).")
@click.option("--n-neighbors", type=click.IntRange(min=2), default=15, show_default=True, help="UMAP n_neighbors.")
@click.option("--min-dist", type=click.FloatRange(min=0.0), default=0.1, show_default=True, help="UMAP min_dist.")
@click.option("--knn", type=click.IntRange(min=1, max=100), default=10, show_default=True,
              help="Nearest neighbours listed per point in the HTML explorer.")
@click.option("--seed", type=int, default=0, show_default=True, help="UMAP and subsample seed.")
def umap_cmd(embeddings, out_path, html_path, color_by, kind, instrument, max_points, n_neighbors, min_dist, knn,
             seed):
    """Draw a 2-D UMAP map of embeddings (PNG) and, with --html, an interactive explorer.

    The explorer is one HTML file with the points, metadata, thumbnails and nearest neighbours inside: hover a
    point to see its thumbnail and metadata, click it to list its nearest neighbours in the embedding space.
    UMAP takes a few seconds for 5000 points, plus 10-30 s of numba compilation on first use.

    \b
    Examples:
      skyfm umap emb.parquet --color-by instrument --out map.png --html map.html
      skyfm umap emb.parquet --kind source --color-by class --out classes.png
      skyfm umap emb.parquet --color-by flux --instrument fermi-lat --out flux.png
    """
    from skyfm.latent.explore import umap_command

    summary = umap_command(embeddings, out_path, html=html_path, color_by=color_by, kind=kind, instrument=instrument,
                           max_points=max_points, n_neighbors=n_neighbors, min_dist=min_dist, seed=seed, knn=knn)
    click.echo(f"map of {summary['points']} embeddings (UMAP {summary['fit_seconds']:.1f} s): {summary['png']}")
    if "html" in summary:
        click.echo(f"explorer: {summary['html']} ({summary['html_bytes'] / 1e6:.1f} MB; open it in a browser)")


@cli.command("finetune")
@click.option("--instrument", "-i", "instruments", multiple=True,
              help="Instrument name or YAML file of a telescope (repeat for several); default: the recipe's.")
@click.option("--init", "init", default=None,
              help="Start from this model folder: a pretrained backbone, a detector, or 'scratch' (random).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder: checkpoints, metrics.csv and the trained detector in OUT/model/.")
@click.option("--config", "config_path", default=None,
              help="Fine-tuning recipe (YAML or a built-in name: default); options below override it.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps.")
@click.option("--backbone", type=click.Choice(["frozen", "partial", "full", "lora"]), default=None,
              help="Train only the heads (frozen), also the backbone's last blocks and decoder (partial), all of "
                   "it (full), or low-rank adapters on its transformer blocks (lora; see --lora-rank).")
@click.option("--lora-rank", type=int, default=None,
              help="Rank of the LoRA adapters with --backbone lora (default 8; recipe key lora.rank).")
@click.option("--pairs", default=None, type=click.Path(),
              help="Train on your FITS images + reference catalogs in this folder instead of simulations.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Patches per step.")
@click.option("--size", type=click.IntRange(min=16), default=None, help="Training patch side (pixels).")
@click.option("--seed", type=int, default=None, help="Run seed.")
@click.option("--train-pool", type=click.IntRange(min=1), default=None,
              help="Train on only this many distinct simulated patches (label-fraction experiments).")
@click.option("--no-resume", is_flag=True, help="Start again even if OUT holds checkpoints.")
def finetune_cmd(instruments, init, out_dir, config_path, steps, backbone, lora_rank, pairs, batch_size, size, seed,
                 train_pool, no_resume):
    """Fine-tune detection heads (and some of the backbone) for one or more instruments.

    Trains on patches simulated on the fly from the instrument's YAML (a new telescope is a YAML file), or on
    your own FITS images with reference catalogs (--pairs). Resumable: run it again to continue.

    \b
    Examples:
      skyfm finetune --instrument wise --init runs/pretrain-tiny/model --out runs/ft-wise --steps 500
      skyfm finetune --instrument my-telescope.yaml --init runs/pretrain-tiny/model --out runs/ft-mine
      skyfm finetune --instrument hubble --init runs/pretrain-tiny/model --backbone lora --out runs/ft-hst-lora
      skyfm finetune --config configs/finetune/default.yaml --out runs/detector-default
      skyfm finetune --instrument meerlicht --pairs my_images/ --init runs/ft-ml/model --out runs/ft-ml2
    """
    from skyfm.finetune import finetune, load_finetune_config

    overrides = {"init": init, "backbone": backbone, "seed": seed, "train.steps": steps,
                 "data.batch_size": batch_size, "data.size": size, "data.pairs": pairs, "lora.rank": lora_rank}
    if config_path is None and init is None:
        raise SkyfmError("say where the backbone comes from: --init DIR (or --init scratch), or a --config recipe")
    if train_pool is not None:
        overrides["data.train_pool"] = train_pool
    config = load_finetune_config(config_path, instruments=list(instruments) or None, **overrides)
    model_dir = finetune(config, out_dir, resume=not no_resume)
    click.echo(f"detector: {model_dir}")


@cli.command("detect")
@click.argument("input_path", metavar="INPUT", type=click.Path())
@click.option("--instrument", "-i", default=None, help="Instrument name or YAML file (default: from the header).")
@click.option("--band", default=None, help="Band of a one-band image whose header has no FILTER / BAND keyword.")
@click.option("--model", "model_dir", default=None, type=click.Path(),
              help="Detector folder (default: the one shipped with skyfm).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Catalog to write: .fits, .ecsv or .vot (a DS9 .reg file is written beside it).")
@click.option("--plot", is_flag=True, help="Also write OUT.png: the image with the detections overlaid.")
@click.option("--associate", default=None, type=click.Path(),
              help="Reference catalog: add the associated source's name to each detection.")
@click.option("--min-score", type=click.FloatRange(0, 1), default=None,
              help="Detection threshold on the heatmap probability (default: the detector's own per-instrument "
                   "threshold, chosen on validation patches; 0.2-0.4 for the shipped one, listed in its README, "
                   "where a head may ask more of the peaks its PSF fit does not confirm; any other threshold given "
                   "here applies to every detection).")
@click.option("--hdu", default=None,
              help="HDU to read, by index or EXTNAME (default: the first with image data); all: every science "
                   "image of a file of several (a mosaic camera's CCDs, one per extension), into one catalog "
                   "with a column hdu.")
@mask_options
@click.option("--tile", "tile_size", type=click.IntRange(min=16), default=None,
              help="Tile side (pixels; default 512 for CCD images, 128 for counts cubes).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Network arithmetic: auto = bfloat16 where the CPU or GPU has it natively, else float32.")
@click.option("--attention-window", type=click.IntRange(min=0), default=None,
              help="Attend within N x N token windows (0 = the whole tile; default: the training patch size for "
                   "images, the whole tile for counts cubes).")
@click.option("--no-refine", is_flag=True,
              help="Keep the network's positions and fluxes: no PSF fit (CCD images) or Poisson likelihood fit "
                   "(counts cubes, which then get no TS). Faster, less accurate.")
@click.option("--drop-trails/--no-drop-trails", default=None,
              help="CCD images: find satellite trails in each tile (straight ridges of light across it, and "
                   "fainter ones that the detections line up along) and drop the detections on them, except stars "
                   "standing above the trail or seen in a band the trail does not cross; saturated stars' bleed "
                   "columns are not trails. Costs 0.05-0.3 s per 512^2 tile and band. Default: the instrument head's "
                   "setting (on for MeerLICHT and Hubble, off for WISE).")
@click.option("--background", "background_path", default=None, type=click.Path(),
              help="Counts cubes: FITS file with the expected background counts (same bins and pixels as INPUT, e.g. "
                   "the interstellar-emission + isotropic model cube from gtmodel, or a gammapy MapDataset file's "
                   "BACKGROUND), or, with --exposure, the "
                   "interstellar-emission model itself (gll_iem_v07.fits, a photon intensity on any grid: skyfm "
                   "makes the counts, PSF and all); the likelihood refinement fits against it, and sources are kept "
                   "by their TS (see --selection). Default: estimated from the counts (TS and flux errors are then "
                   "less reliable).")
@click.option("--background-as-is", is_flag=True,
              help="Counts cubes with a background model: fit against the model as given. Default: the model is "
                   "first rescaled, one factor per energy bin, to the counts away from the sources (catalog meta "
                   "background_scale), as LAT analyses free the diffuse normalisations: a model 13% low otherwise "
                   "reads its residual as sources; and a model whose structure the counts contradict (too many "
                   "places 3 sigma below it; a warning, meta background_deficit) is corrected over the image on "
                   "scales of 1 PSF FWHM (meta background_correction).")
@click.option("--isotropic", "isotropic_path", default=None, type=click.Path(),
              help="Counts cubes, with --exposure: the isotropic emission's spectrum (the FSSC's text file, e.g. "
                   "iso_P8R3_SOURCE_V3_v1.txt: energy in MeV, intensity, error), added to the --background "
                   "intensity cube's counts.")
@click.option("--bunit", default=None, help=BUNIT_HELP)
@click.option("--exposure", "exposure_path", default=None, type=click.Path(),
              help="Counts cubes: FITS exposure cube (gtexpcube2's, with its ENERGIES table, on any celestial "
                   "grid that covers the image, a gammapy MapDataset file's EXPOSURE, or a HEALPix map with one "
                   "column per plane; in its BUNIT, cm2 s if none) that flux_phys takes "
                   "each source's exposure from, per energy bin, at its position. Default: the instrument YAML's "
                   "one exposure per bin, right only for cubes of that exposure (a typical one).")
@click.option("--psf", "psf_path", default=None, type=click.Path(),
              help="Counts cubes: the observation's PSF file, as gtpsf writes it for the data's event selection "
                   "(PSF and THETA tables), an IACT IRF's psf_table (at 1 deg off axis) or gammapy's PSF map (a "
                   "MapDataset file's PSF, averaged over the sky by its exposure): each band's PSF, the "
                   "file's averaged over the band for a power law of index 2 and fitted with a King function, is "
                   "the one the likelihood fits, the TS map and a background model made with --exposure use "
                   "(catalog meta psf_file, psf_r68; skyfm info FILE lists them per band). Default: the instrument "
                   "YAML's PSF, a typical one (all event types together).")
@click.option("--selection", type=click.Choice(["auto", "network", "likelihood"]), default="auto", show_default=True,
              help="Counts cubes: which detections the catalog keeps. network = heatmap probability >= --min-score; "
                   "likelihood = the network's peaks and the Poisson TS map's, fitted together, kept at TS >= "
                   "--min-ts (score is then sqrt(TS), net_score the network's probability); auto = likelihood with "
                   "--background (and without one where the instrument's head chose it on validation: CTAO), else "
                   "network.")
@click.option("--min-ts", type=click.FloatRange(min=0), default=25.0, show_default=True,
              help="Likelihood selection: the least fitted TS a source needs (25: the 4FGL convention).")
@click.option("--test-extension/--no-test-extension", default=None,
              help="Counts cubes with --background: test every source for extension (a radial Gaussian seen "
                   "through the PSF, fitted on sizes from 1.5 to 13 times the sharpest bin's r68, kept at TS_ext "
                   ">= 16 over the point model, the point fits' pieces of it absorbed); extended sources get "
                   "extension (r68, deg) and ts_ext. Default: the instrument head's choice (on for CTAO, and since "
                   "Run 45 for Fermi-LAT, where it joins the pieces of extended sources that --model-error's "
                   "candidates find; docs/benchmarks.md); 3-10 s more per 256^2 cube. CTAO's head runs it after "
                   "the first of its two passes, so that the second looks for more sources beside the extended ones "
                   "as they are (Run 48).")
@click.option("--split-blends/--no-split-blends", default=None,
              help="Counts cubes with --background: fit each source of TS >= 50 again as two point sources and keep "
                   "the pair where it fits better by TS >= 25, both of TS >= 25 and at least a PSF FWHM apart, and "
                   "better than one extended source (blends in crowded fields, which a TS map does not resolve); "
                   "the rows it makes or moves carry ts_split. Default: the instrument head's choice "
                   "(docs/benchmarks.md, Run 43).")
@click.option("--model-error", type=click.FloatRange(min=0, max=1, max_open=True), default=None, metavar="FRACTION",
              help="Counts cubes with --background: how well the model is known (a fraction of it; 0.03 for "
                   "Fermi-LAT's interstellar emission model, as the 4FGL catalog weighs its likelihood). The TS map "
                   "of a likelihood weighted for that error also gives candidates, kept at weighted TS >= --min-ts: "
                   "soft sources in the Galactic plane whose low-energy light the model gets a few percent wrong. "
                   "0 turns it off. Default: the instrument head's choice (docs/benchmarks.md, Run 45).")
@click.option("--mask-cosmic-rays/--keep-cosmic-rays", default=None,
              help="CCD images: leave the pixels L.A.Cosmic (astroscrappy) takes for cosmic-ray hits out of the PSF "
                   "fit, so a hit beside a star does not pull its position and flux. Default: the instrument head's "
                   "choice (on for the single exposures of Hubble and MeerLICHT, off for the WISE coadds); ~0.5-1 s "
                   "per Mpix per band.")
@click.option("--residual-search/--no-residual-search", default=None,
              help="CCD images: after the PSF fit, search its residual image for the faint or diffuse sources the "
                   "network passed over (matched filters of 2 and 4 PSF FWHM; catalog fit = 4, with a score that "
                   "says how often such finds were real), and, before it, a first fit's residual for the second "
                   "star of blends the network took as one (catalog fit = 5). Default, and with --residual-search: "
                   "the instrument head's settings (both on for MeerLICHT, Hubble and WISE in the shipped detector; "
                   "~20-40% more time on sparse fields); --no-residual-search turns both off: only the network's "
                   "detections.")
@click.option("--device", default="auto", show_default=True,
              help="Where the network runs: auto (a CUDA GPU where torch sees one, else the CPU), cpu, cuda or "
                   "cuda:N.")
def detect_cmd(input_path, instrument, band, model_dir, out_path, plot, associate, min_score, hdu, tile_size,
               precision, attention_window, no_refine, drop_trails, background_path, selection, min_ts,
               test_extension, split_blends, model_error, mask_cosmic_rays, residual_search, device, mask_path,
               mask_bits, bunit, exposure_path, isotropic_path, background_as_is, psf_path):
    """Find the sources in a sky image and write a catalog (positions, fluxes, classes, errors).

    INPUT is a FITS image (any size and pixel scale, with a celestial WCS), a gtbin counts cube, a skyfm
    simulated patch, or a HEALPix map. Counts cubes and counts maps (per sky tile) get a Poisson likelihood
    refinement: TS and physical flux.
    CCD images get a PSF-fit refinement of the bright detections (seeing fitted on the image): positions and
    point-source fluxes with their errors, Kron fluxes for galaxies, and a search of the fit's residual image for
    the faint or diffuse sources the network missed (catalog fit = 4).

    Units: CCD images in electrons or electrons per second (BUNIT; e.g. a Hubble _drc file, with EXPTIME) are read as
    the instrument's ADU, which its noise model describes, and the catalog's fluxes are given in the image's own
    unit. A file that does not say its unit (no BUNIT, or one such as MJy/sr or nanomaggies) and whose sky's noise
    is far finer than the ADU's (a rate, a calibrated flux) is read in the unit that noise gives; a warning says so;
    --bunit names the unit where the header does not, or says a wrong one. Counts cubes binned otherwise than the
    instrument (EBOUNDS, or gammapy's BANDSHDU table) are summed into its energy bands; a warning says how. Bad
    pixels: NaN, a MASK image HDU (non-zero = bad), the DQ extension of an HST or JWST file (e.g. an _flc file's hot
    pixels and flagged cosmic rays; --hdu all reads each chip with its own DQ), or a mask file of their own
    (--mask).

    \b
    Examples:
      skyfm detect image.fits --out catalog.fits --plot
      skyfm detect hst_drc.fits --hdu SCI --instrument hubble --band F606W --out hst.ecsv
      skyfm detect hst_flc.fits --hdu all --out flc.ecsv
      skyfm detect ML_red.fits.fz --mask ML_mask.fits.fz --mask-bits 1,2,16 --out ml.fits
      skyfm detect mosaic.fits.fz --hdu all --instrument my_camera.yaml --band r --out ccds.fits
      skyfm detect W1.fits --instrument wise --band W1 --out w1.ecsv
      skyfm detect rate.fits --instrument hubble --band F606W --bunit electron/s --out rate.ecsv
      skyfm detect ccube.fits --instrument fermi-lat --out fermi.vot --associate 4fgl.fits
      skyfm detect ccube.fits --instrument fermi-lat --background model_cube.fits --out fermi.fits
      skyfm detect ccube.fits --background model_cube.fits --exposure expcube.fits --out fermi.fits
      skyfm detect ccube.fits --background gll_iem_v07.fits --isotropic iso_P8R3_SOURCE_V3_v1.txt \\
          --exposure expcube.fits --out fermi.fits
      skyfm detect ccube.fits --background model_cube.fits --psf gtpsf_psf3.fits --out fermi.fits
      skyfm detect dataset.fits --instrument ctao --background dataset.fits --exposure dataset.fits \\
          --psf dataset.fits --out ctao.fits     # a gammapy MapDataset file: COUNTS and the rest
    """
    from skyfm.detect import detect_file

    if hdu is not None and hdu.isdigit():
        hdu = int(hdu)
    with _warnings_as_lines():
        table = detect_file(input_path, out_path, instrument=instrument, band=band, model_dir=model_dir,
                            min_score=min_score, plot=plot, associate=associate, hdu=hdu, tile_size=tile_size,
                            precision=precision, attention_window=attention_window, refine=not no_refine,
                            drop_trails=drop_trails, background=background_path, selection=selection,
                            min_ts=min_ts, test_extension=test_extension, split_blends=split_blends,
                            model_error=model_error, mask_cosmic_rays=mask_cosmic_rays,
                            residual_search=residual_search, device=device, mask=mask_path,
                            mask_bits=mask_bits, exposure=exposure_path, bunit=bunit, isotropic=isotropic_path,
                            fit_background=not background_as_is, psf=psf_path)
    click.echo(f"{len(table)} sources -> {out_path}")


@cli.command("evaluate")
@click.argument("catalog", type=click.Path())
@click.option("--truth", default=None, type=click.Path(),
              help="Truth: a simulated skyfm FITS file (its TRUTH table) or any table file with x, y (and snr, flux).")
@click.option("--reference", default=None, type=click.Path(),
              help="Reference catalog to associate with (e.g. 4FGL-DR2 gll_psc_v27.fit: within its 95% ellipses).")
@click.option("--radius", type=float, default=None,
              help="Match radius in pixels (default: 3 for counts cubes, else 0.75 PSF FWHM, at least 2).")
@click.option("--snr-min", type=float, default=5.0, show_default=True,
              help="True sources at least this significant must be found; fainter matches count neither way.")
@click.option("--min-score", type=float, default=None, help="Keep only detections with score >= this.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="PNG: recall vs SNR/flux, separations in CRB units, flux recovery.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Write the metrics as JSON.")
def evaluate_cmd(catalog, truth, reference, radius, snr_min, min_score, plot_path, json_path):
    """Measure a catalog against the truth or a reference catalog: precision, recall, F1 (overall and per SNR and
    flux bin), localization against the Cramer-Rao bound, flux bias, scatter and 68% coverage, association.

    \b
    Examples:
      skyfm evaluate cat.fits --truth sims/fermi/patch_0000.fits --plot eval.png
      skyfm evaluate cat.ecsv --truth truth.ecsv --radius 2 --json eval.json
      skyfm evaluate cat.fits --reference ../shared/data/fermi/gll_psc_v27.fit
    """
    from skyfm.catalog.evaluate import evaluate, format_results, write_json

    if truth is None and reference is None:
        raise SkyfmError("give --truth TABLE or --reference CATALOG to evaluate against")
    if radius is not None and not radius > 0:
        raise SkyfmError(f"--radius should be a positive number of pixels, got {radius}")
    from skyfm.catalog.evaluate import check_output_path

    check_output_path(plot_path, (".png",), "--plot")
    check_output_path(json_path, (".json",), "--json")
    results = evaluate(catalog, truth, reference, radius_pix=radius, snr_min=snr_min, min_score=min_score)
    click.echo(format_results(results))
    if plot_path:
        from skyfm.catalog.plots import evaluation_figure

        click.echo(f"plot: {evaluation_figure(results, plot_path, title=str(catalog))}")
    if json_path:
        click.echo(f"json: {write_json(results, json_path)}")

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
