"""Sharded training sets: patches as webdataset-style tar shards, streamed by a PyTorch ``IterableDataset``.

Why POSIX tar shards (the webdataset layout) rather than Parquet or zarr:

* A shard is one file read front to back, so it streams at full speed from a local disk or an object store (a
  GET of the whole object), with no random access and no index to fetch first.
* One file per ~1000 patches: few files for any file system (a million patches are a thousand files), yet enough
  of them to spread over DDP ranks and DataLoader workers and to shuffle the order of.
* Append-friendly: a new run adds shards and entries in the manifest; nothing already written is rewritten.
* Readable with standard tools: ``tar tf`` lists a shard, ``tar xf`` unpacks ``.npy`` files that numpy reads and
  JSON that a person reads; webdataset reads them as they are. Parquet would hold multi-megabyte binary blobs per
  row and needs one schema for patches of 1 to 6 bands; zarr is a file (or object) per chunk, which file systems
  and object stores handle badly at millions of patches.

Shards are written with the standard library's ``tarfile`` and read by this module (no webdataset dependency:
the reader here also knows the manifest, resumes without reading what it skips, and never unpickles). It reads
local or mounted files.

Layout of a shard set (one folder)::

    manifest.json                      shards with sample counts, instruments, bands, shapes, bytes, sha256,
                                       and the command / configuration of each run that wrote them
    skyfm-fermi-lat-000000.tar         shards hold one instrument each (so that instruments can be mixed
    skyfm-meerlicht-000000.tar         with any weights at read time), at most ``max_samples_per_shard`` patches

A sample is the consecutive tar members ``KEY.*`` (KEY has no dot; the webdataset convention):

    KEY.json          instrument, bands, shape, pixel scale (deg), log10 wavelength (m) of each band, energy edges
                      (keV) or wavelength edges (nm), seed, WCS header (a string of 80-character cards), the
                      scaling parameters (sky and noise per band, computed once at write time), patch meta, units
                      and descriptions of the truth columns
    KEY.data.npy      float32 (C, H, W): counts or ADU
    KEY.source.npy    float32 (C, H, W): expected source-only image (simulated patches)
    KEY.mask.npy      uint8 (C, H, W): contaminant bits, :data:`skyfm.data.patch.CONTAMINANT_BITS`
    KEY.invalid.npy   uint8 (H, W): 1 where a pixel is invalid (the patch's ``mask``), when it has one
    KEY.truth.npy     structured array: the truth catalog, one field per column (multi-dimensional columns kept)

Arrays are ``.npy`` files read with ``allow_pickle=False`` semantics: an array of Python objects is refused, as is
anything else that would need unpickling. Shards are written to a temporary name and renamed when complete, and
the manifest is rewritten (atomically) after each complete shard, so a crash leaves only complete shards, all
listed. Tar member times are fixed, so the same patches give the same bytes.

Reading (:class:`ShardDataset`): each instrument is one stream; its shards are shuffled per epoch, split across
DDP ranks and then DataLoader workers, read front to back and shuffled within a buffer; the streams are drawn by
weight. The order of every sample is a function of the manifest counts and the seeds alone, so a run can resume
from a count of consumed samples without reading what it skips. See the class docstring for resuming.

Batching (:func:`collate_patches`): patches of different instruments share a batch, their bands padded to the
largest band count with a ``band_valid`` mask. Grouping by instrument would need a batch sampler that builds
single-instrument batches and would give the shared backbone one instrument per optimiser step; padding keeps
every step cross-instrument and the batch size fixed, and a band x position token model simply drops the tokens
of bands whose ``band_valid`` is False. The keys and shapes of a batch are the contract between the data layer
and the models (see :func:`collate_patches`).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import posixpath
import re
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from astropy.table import Table

from skyfm.data.patch import Patch
from skyfm.errors import SkyfmError
from skyfm.utils import atomic_path

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "skyfm-shards"
FORMAT_VERSION = 1
_TAR_MTIME = 1_767_225_600  # 2026-01-01: fixed member times make shards reproducible byte for byte
_NPY_MAGIC = b"\x93NUMPY"


# ================================================================================================================
# Encoding a patch as tar members
# ================================================================================================================
def _jsonable(value: Any, where: str) -> Any:
    """``value`` as plain JSON types (numpy scalars and arrays become numbers and lists)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if type(value) is np.ndarray and value.dtype.kind in "biufU":  # not Quantity: its unit would be lost
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise SkyfmError(f"{where} is a {type(value).__name__}, which a shard cannot store (use numbers, strings, lists)")


def _npy_bytes(array: np.ndarray, where: str) -> bytes:
    """A C-ordered ``.npy`` file in memory; arrays of Python objects are refused (they would need pickle)."""
    array = np.ascontiguousarray(array)
    if array.dtype.hasobject:
        raise SkyfmError(f"{where} holds Python objects; shards store only numeric and string arrays (no pickle)")
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _truth_array(truth: Table, where: str) -> tuple[np.ndarray, dict]:
    """The truth table as a structured array, and what the array cannot carry (units, descriptions, meta)."""
    if truth.has_masked_values:
        truth = truth.filled()  # simulated truth has no masked values; a user's table keeps its fill values
    for name in truth.colnames:
        if truth[name].dtype.hasobject:
            raise SkyfmError(f"{where}: truth column '{name}' holds Python objects; use numbers or fixed-width strings")
    info = {
        "units": {n: truth[n].unit.to_string() for n in truth.colnames if truth[n].unit is not None},
        "descriptions": {n: truth[n].description for n in truth.colnames if truth[n].description},
        "meta": _jsonable(dict(truth.meta), f"{where}: truth.meta"),
    }
    return np.asarray(truth.as_array()), info


def _band_edges(inst, patch: Patch) -> dict:
    """Energy edges (keV) of counts bins or wavelength edges (nm) of filters, one [low, high] per band."""
    if inst.is_counts:
        edges = patch.energy_edges_kev
        if edges is None:
            edges = [[q.to_value("keV") for q in inst.band(b).energy] for b in patch.bands]
        return {"energy_edges_kev": np.asarray(edges, dtype=np.float64).tolist(), "wavelength_edges_nm": None}
    waves = [[q.to_value("nm") for q in inst.band(b).wavelength] for b in patch.bands]
    return {"energy_edges_kev": None, "wavelength_edges_nm": waves}


def _scaling_parameters(inst, data: np.ndarray, background=None) -> dict:
    """The instrument's scaling parameters for this image (sky and noise per band for ``asinh``); ``background``:
    the image's background model, for ``counts-asinh-model``."""
    from skyfm.instruments.scaling import scale_image

    _, params = scale_image(data, inst.scaling["method"], background=background, **_scaling_options(inst))
    return params


def _scaling_options(inst) -> dict:
    return {"softening": float(inst.scaling["softening"])} if "softening" in inst.scaling else {}


def encode_patch(patch: Patch, key: str, instrument=None, seed: int | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON header and the arrays of one sample (see the module docstring), before serialisation.

    ``instrument`` (a name, YAML path or :class:`~skyfm.instruments.Instrument`) defaults to ``patch.instrument``.
    """
    from skyfm.instruments import load_instrument

    _check_key(key)
    inst = load_instrument(instrument if instrument is not None else patch.instrument)
    where = f"patch {key}"
    data = np.asarray(patch.data, dtype=np.float32)
    header = {
        "key": key,
        "instrument": inst.name,
        "bands": list(patch.bands),
        "shape": list(data.shape),
        "pixel_scale_deg": inst.pixel_scale_deg,
        "band_log10_wavelength_m": [inst.band(b).log10_wavelength_m for b in patch.bands],
        **_band_edges(inst, patch),
        "seed": _jsonable(seed if seed is not None else patch.meta.get("seed"), f"{where}: seed"),
        "wcs_header": None if patch.wcs is None else patch.wcs.to_header(relax=True).tostring(sep="\n"),
        "scaling": _jsonable(_scaling_parameters(inst, data, patch.background_image), f"{where}: scaling"),
        "finite": bool(np.isfinite(data).all()),
        "meta": _jsonable(dict(patch.meta), f"{where}: meta"),
        "truth": None,
    }
    arrays = {"data.npy": data}
    if patch.source_image is not None:
        arrays["source.npy"] = np.asarray(patch.source_image, dtype=np.float32)
    if patch.contaminant_mask is not None:
        arrays["mask.npy"] = np.asarray(patch.contaminant_mask, dtype=np.uint8)
    if patch.mask is not None:
        arrays["invalid.npy"] = np.asarray(patch.mask, dtype=np.uint8)
    if patch.truth is not None:
        arrays["truth.npy"], header["truth"] = _truth_array(patch.truth, where)
    for name, array in arrays.items():
        expected = {"source.npy": data.shape, "mask.npy": data.shape, "invalid.npy": data.shape[1:]}.get(name)
        if expected is not None and array.shape != expected:
            raise SkyfmError(f"{where}: {name.split('.')[0]} has shape {array.shape}, expected {expected}")
    return header, arrays


def _check_key(key: str) -> None:
    if not key or "." in key or "/" in key or not key.isprintable():
        raise SkyfmError(f"sample key '{key}' must be a non-empty name without '.' or '/' (tar members are KEY.suffix)")


# ================================================================================================================
# Writing shards
# ================================================================================================================
class _HashingFile:
    """A write-only file wrapper that computes the sha256 of what passes through (tarfile needs write and tell)."""

    def __init__(self, file):
        self._file = file
        self.sha256 = hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self._file.tell()


class _OpenShard:
    """One shard being written: a tar file under a temporary name until :meth:`finish` renames it."""

    def __init__(self, path: Path, instrument: str, index: int):
        self.path, self.instrument, self.index = path, instrument, index
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(path))
        self._file = self._stack.enter_context(open(tmp, "wb"))
        self._hashing = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.USTAR_FORMAT)
        self.n_samples = 0
        self.bands: list[str] = []
        self.shapes: list[list[int]] = []

    def add(self, key: str, header: dict, arrays: dict[str, np.ndarray]) -> None:
        members = [("json", json.dumps(header, indent=1).encode())]
        members += [(name, _npy_bytes(array, f"patch {key}: {name}")) for name, array in arrays.items()]
        for suffix, payload in members:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(payload), _TAR_MTIME, 0o644
            self._tar.addfile(info, io.BytesIO(payload))
        self.n_samples += 1
        self.bands += [b for b in header["bands"] if b not in self.bands]
        if header["shape"] not in self.shapes:
            self.shapes.append(header["shape"])

    def finish(self) -> dict:
        """Close the tar, rename it into place and return its manifest entry."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        digest = self._hashing.sha256.hexdigest()
        self._stack.close()
        return {"file": self.path.name, "instrument": self.instrument, "index": self.index,
                "n_samples": self.n_samples, "bands": self.bands,
                "patch_shapes": self.shapes, "bytes": self.path.stat().st_size, "sha256": digest}

    def abort(self) -> None:
        """Drop the half-written shard (its temporary file is removed)."""
        with contextlib.suppress(Exception):
            self._tar.close()
        # Leaving atomic_path with an exception deletes the temporary file instead of renaming it.
        self._stack.__exit__(SkyfmError, SkyfmError("shard aborted"), None)


class ShardWriter:
    """Write patches into tar shards of one instrument each, and the set's ``manifest.json``.

    Use as a context manager::

        with ShardWriter("shards/", max_samples_per_shard=1000) as writer:
            for patch in patches:
                writer.write(patch)

    Shard ``i`` of instrument ``NAME`` is ``{prefix}-{NAME}-{i:06d}.tar``. Keys default to ``NAME-{n:08d}`` with
    ``n`` counting that instrument's samples in the set. With ``append=True`` an existing set is extended (its
    shards are kept, numbering continues); without it, a folder that already holds a manifest is refused.
    ``command`` and ``config`` record how this run was made, in the manifest's ``runs``.
    """

    def __init__(self, out_dir: str | Path, max_samples_per_shard: int = 1000, prefix: str = "skyfm", *,
                 append: bool = False, command: str | None = None, config: Mapping | None = None):
        if max_samples_per_shard < 1:
            raise SkyfmError(f"max_samples_per_shard must be at least 1, got {max_samples_per_shard}")
        if not prefix or "/" in prefix:
            raise SkyfmError(f"shard prefix '{prefix}' must be a non-empty file-name part without '/'")
        self.out_dir = Path(out_dir)
        self.max_samples_per_shard = int(max_samples_per_shard)
        self.prefix = prefix
        manifest_path = self.out_dir / MANIFEST_NAME
        if manifest_path.exists() and not append:
            raise SkyfmError(f"{manifest_path} exists: write to a new folder, or append to this shard set")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.manifest = load_manifest(manifest_path) if manifest_path.exists() else _empty_manifest()
        self._run = {"command": command, "config": _jsonable(dict(config or {}), "config"), "shards": []}
        self.manifest["runs"].append(self._run)
        self._open: dict[str, _OpenShard] = {}
        self._next_index = {}
        for entry in self.manifest["shards"]:
            name = entry["instrument"]
            self._next_index[name] = max(self._next_index.get(name, 0), int(entry.get("index", -1)) + 1)
        self._closed = False

    def samples_written(self, instrument: str) -> int:
        """Samples of ``instrument`` in the set so far (earlier runs included)."""
        done = self.manifest["instruments"].get(instrument, 0)
        return done + (self._open[instrument].n_samples if instrument in self._open else 0)

    def write(self, patch: Patch, key: str | None = None, *, instrument=None, seed: int | None = None) -> str:
        """Add one patch; returns its key. ``instrument`` overrides ``patch.instrument`` (e.g. a YAML path)."""
        if self._closed:
            raise SkyfmError("this ShardWriter is closed")
        from skyfm.instruments import load_instrument

        inst = load_instrument(instrument if instrument is not None else patch.instrument)
        name = inst.name
        key = key if key is not None else f"{name}-{self.samples_written(name):08d}"
        header, arrays = encode_patch(patch, key, instrument=inst, seed=seed)
        shard = self._open.get(name)
        if shard is None:
            index = self._next_index.get(name, 0)
            self._next_index[name] = index + 1
            path = self.out_dir / f"{self.prefix}-{name}-{index:06d}.tar"
            shard = self._open[name] = _OpenShard(path, name, index)
        shard.add(key, header, arrays)
        if shard.n_samples >= self.max_samples_per_shard:
            self._finish(name)
        return key

    def _finish(self, name: str) -> None:
        shard = self._open.pop(name)
        entry = shard.finish()
        self.manifest["shards"].append(entry)
        self.manifest["shards"].sort(key=lambda e: (e["instrument"], e["index"]))
        self._run["shards"].append(entry["file"])
        self.manifest["instruments"][name] = self.manifest["instruments"].get(name, 0) + entry["n_samples"]
        self.manifest["instruments"] = dict(sorted(self.manifest["instruments"].items()))
        self.manifest["n_samples"] = sum(self.manifest["instruments"].values())
        self._write_manifest()

    def _write_manifest(self) -> None:
        with atomic_path(self.out_dir / MANIFEST_NAME) as tmp:
            tmp.write_text(json.dumps(self.manifest, indent=1) + "\n")

    def close(self) -> Path:
        """Finish the open (partial) shards and write the manifest; returns the manifest's path."""
        if not self._closed:
            for name in sorted(self._open):
                self._finish(name)
            self._write_manifest()
            self._closed = True
        return self.out_dir / MANIFEST_NAME

    def abort(self) -> None:
        """Drop the open shards; the complete ones stay, listed in the manifest."""
        for shard in self._open.values():
            shard.abort()
        self._open.clear()
        self._write_manifest()
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _empty_manifest() -> dict:
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "n_samples": 0, "instruments": {}, "runs": [],
            "shards": []}


# ================================================================================================================
# Simulated shard sets
# ================================================================================================================
def instrument_seed(seed: int, instrument: str) -> int:
    """The run seed of one instrument: two CCD instruments given the same ``seed`` must not share star fields."""
    from skyfm.data.simulate import patch_seed

    return patch_seed(seed, zlib.crc32(instrument.encode()))


def _simulate_task(task: tuple) -> tuple[str, int, Patch]:
    simulator, name, seed, options = task
    return name, seed, simulator(name, seed, **options)


def write_simulated_shards(out_dir: str | Path, instruments: Mapping[str, int], seed: int = 0,
                           patches_per_shard: int = 1000, size: int | None = None, workers: int = 1,
                           progress: bool = True, *, options: Mapping[str, dict] | None = None,
                           prefix: str = "skyfm", append: bool = False, command: str | None = None,
                           simulator: Callable[..., Patch] | None = None) -> Path:
    """Simulate ``instruments[name]`` patches of each instrument and write them as shards; returns the manifest.

    Patch ``i`` of instrument ``name`` is ``simulator(name, patch_seed(instrument_seed(seed, name), i), **opts)``
    with ``opts`` = ``options.get(name, {})`` plus ``size`` when given; its seed is stored with it, so any patch
    can be simulated again on its own. Appending to a set continues each instrument's ``i`` where it stopped, so
    the same seed never repeats a patch. ``workers`` processes simulate in parallel; the files are the same for
    any number of workers. ``simulator`` defaults to :func:`skyfm.data.simulate.simulate_patch`.
    """
    import multiprocessing

    from tqdm import tqdm

    from skyfm.data.simulate import patch_seed, simulate_patch
    from skyfm.instruments import load_instrument

    simulator = simulator or simulate_patch
    counts = {load_instrument(name).name: int(n) for name, n in instruments.items()}
    if not counts or any(n < 0 for n in counts.values()):
        raise SkyfmError(f"give each instrument a number of patches >= 0, got {dict(instruments)}")
    per_instrument = {name: dict((options or {}).get(name, {})) for name in counts}
    if size is not None:
        for opts in per_instrument.values():
            opts["size"] = int(size)
    config = {"instruments": counts, "seed": int(seed), "patches_per_shard": int(patches_per_shard),
              "size": size, "options": per_instrument, "simulator": getattr(simulator, "__qualname__", str(simulator))}
    with ShardWriter(out_dir, patches_per_shard, prefix, append=append, command=command, config=config) as writer:
        tasks = []
        for name, n in counts.items():
            start, run_seed = writer.samples_written(name), instrument_seed(seed, name)
            tasks += [(simulator, name, patch_seed(run_seed, start + i), per_instrument[name]) for i in range(n)]
        bar = tqdm(total=len(tasks), desc="simulating shards", unit="patch", disable=not progress)
        with contextlib.ExitStack() as stack:
            if workers > 1:
                methods = multiprocessing.get_all_start_methods()
                context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
                pool = stack.enter_context(context.Pool(workers))
                results = pool.imap(_simulate_task, tasks, chunksize=max(1, min(8, len(tasks) // (4 * workers))))
            else:
                results = map(_simulate_task, tasks)
            for name, patch_seed_, patch in results:
                writer.write(patch, instrument=name, seed=patch_seed_)
                bar.update()
        bar.close()
    return writer.out_dir / MANIFEST_NAME


def parse_instrument_counts(specs: Iterable[str]) -> dict[str, int]:
    """``["fermi-lat=2000", "meerlicht=500"]`` -> ``{"fermi-lat": 2000, "meerlicht": 500}``, with clear errors."""
    from skyfm.instruments import load_instrument

    counts: dict[str, int] = {}
    for spec in specs:
        name, eq, count = spec.partition("=")
        if not eq or not name.strip():
            raise SkyfmError(f"--instrument '{spec}' should be NAME=COUNT, like fermi-lat=2000")
        try:
            n = int(count)
        except ValueError:
            raise SkyfmError(f"--instrument '{spec}': COUNT should be a whole number, got '{count}'") from None
        if n < 1:
            raise SkyfmError(f"--instrument '{spec}': COUNT should be at least 1")
        name = load_instrument(name.strip()).name
        if name in counts:
            raise SkyfmError(f"--instrument {name} is given twice")
        counts[name] = n
    return counts


# ================================================================================================================
# Reading shards
# ================================================================================================================
def load_manifest(path: str | Path) -> dict:
    """Read and check a ``manifest.json`` (or the one in a shard-set folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise SkyfmError(f"shard manifest not found: {path}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SkyfmError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise SkyfmError(f"{path} is not a skyfm shard manifest (no \"format\": \"{FORMAT_NAME}\")")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise SkyfmError(f"{path} is shard format version {manifest['version']}; this skyfm reads up to {FORMAT_VERSION}")
    manifest.setdefault("shards", [])
    for i, entry in enumerate(manifest["shards"]):
        for key in ("file", "instrument", "n_samples"):
            if key not in entry:
                raise SkyfmError(f"{path}: shards[{i}] has no '{key}'")
    manifest.setdefault("runs", [])
    if "instruments" not in manifest:  # a hand-made manifest: the totals follow from the shards
        counts: dict[str, int] = {}
        for entry in manifest["shards"]:
            counts[entry["instrument"]] = counts.get(entry["instrument"], 0) + int(entry["n_samples"])
        manifest["instruments"] = dict(sorted(counts.items()))
    manifest["n_samples"] = sum(manifest["instruments"].values())
    return manifest


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a set: its path, instrument, number of samples and (from the manifest) sha256."""

    path: Path
    instrument: str
    n_samples: int
    sha256: str | None = None


def resolve_shards(paths_or_manifests) -> list[ShardInfo]:
    """The shards named by manifests, shard-set folders, ``.tar`` files or glob patterns (in that order).

    A bare ``.tar`` is scanned once for its sample count and instrument.
    """
    if isinstance(paths_or_manifests, (str, Path)):
        paths_or_manifests = [paths_or_manifests]
    shards: list[ShardInfo] = []
    for item in paths_or_manifests:
        text = str(item)
        if any(c in text for c in "*?["):
            matches = sorted(glob.glob(text))
            if not matches:
                raise SkyfmError(f"no shard files match {text}")
            shards += resolve_shards(matches)
            continue
        path = Path(item)
        if path.is_dir() or path.suffix == ".json":
            manifest = load_manifest(path)
            folder = path if path.is_dir() else path.parent
            for entry in manifest["shards"]:
                shard_path = folder / entry["file"]
                if not shard_path.is_file():
                    raise SkyfmError(f"{folder / MANIFEST_NAME} lists {entry['file']}, which is missing")
                shards.append(ShardInfo(shard_path, entry["instrument"], int(entry["n_samples"]), entry.get("sha256")))
        elif path.is_file():
            shards.append(_scan_bare_shard(path))
        else:
            raise SkyfmError(f"shard file or manifest not found: {path}")
    seen = set()
    for shard in shards:
        if shard.path.resolve() in seen:
            raise SkyfmError(f"shard {shard.path} is named twice; its samples would be read twice per epoch")
        seen.add(shard.path.resolve())
    return shards


def _scan_bare_shard(path: Path) -> ShardInfo:
    """A shard without a manifest: count its samples and check that they are of one instrument."""
    instruments, n = set(), 0
    for key, members, file in iter_shard_members(path):
        if "json" not in members:
            raise SkyfmError(f"shard {path}: sample '{key}' has no {key}.json")
        instruments.add(_decode_json(_load_member(file, members, "json"), path, key)["instrument"])
        n += 1
    if len(instruments) != 1:
        found = ", ".join(sorted(instruments)) or "no samples"
        raise SkyfmError(f"shard {path} should hold samples of one instrument; it holds {found}")
    return ShardInfo(path, instruments.pop(), n)


class _Member(NamedTuple):
    offset: int
    size: int


def iter_shard_members(path: str | Path) -> Iterator[tuple[str, dict[str, _Member], Any]]:
    """The samples of a shard in file order: ``(key, {suffix: (offset, size)}, open file)``; reads headers only.

    The open file is valid until the next item; read a member with :func:`_load_member`. A truncated or corrupt
    shard raises :class:`SkyfmError` naming the file.
    """
    path = Path(path)
    try:
        file = open(path, "rb", buffering=0)  # unbuffered: members are read whole, straight into their arrays
    except OSError as e:
        raise SkyfmError(f"cannot open shard {path} ({e.strerror})") from None
    with file:
        try:
            tar = tarfile.open(fileobj=file, mode="r:")
        except tarfile.TarError as e:
            raise SkyfmError(f"{path} is not a readable tar shard ({e})") from None
        key, members = None, {}
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, EOFError, OSError) as e:
                raise SkyfmError(f"shard {path} is corrupt or truncated ({e})") from None
            if info is None:
                break
            if not info.isfile():
                continue
            folder, base = posixpath.split(info.name)
            stem, dot, suffix = base.partition(".")
            if not dot:
                raise SkyfmError(f"shard {path}: member '{info.name}' has no KEY.suffix name")
            sample_key = posixpath.join(folder, stem)
            if sample_key != key:
                if key is not None:
                    yield key, members, file
                key, members = sample_key, {}
            if suffix in members:
                raise SkyfmError(f"shard {path}: sample '{key}' has two '{suffix}' members")
            members[suffix] = _Member(info.offset_data, info.size)
        # tarfile accepts a file cut at a member boundary; writers (tarfile, GNU tar) end with two zero blocks.
        if os.fstat(file.fileno()).st_size < tar.offset + 2 * tarfile.BLOCKSIZE:
            raise SkyfmError(f"shard {path} is truncated (it lacks the end-of-archive blocks)")
        if key is not None:
            yield key, members, file


def _load_member(file_or_path, members: dict[str, _Member], suffix: str) -> np.ndarray:
    """The bytes of one member (a uint8 array), read straight into a writable buffer that is never zero-filled."""
    member = members[suffix]
    buffer = np.empty(member.size, dtype=np.uint8)
    if isinstance(file_or_path, (str, Path)):
        with open(file_or_path, "rb") as f:
            f.seek(member.offset)
            n = f.readinto(buffer)
    else:
        file_or_path.seek(member.offset)
        n = file_or_path.readinto(buffer)
    if n != member.size:
        name = getattr(file_or_path, "name", file_or_path)
        raise SkyfmError(f"shard {name} is truncated (member .{suffix} ends after {n} of {member.size} bytes)")
    return buffer


def _decode_json(buffer: bytes, path, key: str) -> dict:
    try:
        header = json.loads(bytes(buffer))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SkyfmError(f"shard {path}: {key}.json is not valid JSON ({e})") from None
    for name in ("instrument", "bands", "shape", "pixel_scale_deg", "band_log10_wavelength_m", "scaling"):
        if name not in header:
            raise SkyfmError(f"shard {path}: {key}.json has no '{name}'")
    return header


def decode_npy(buffer: np.ndarray | bytearray | bytes, where: str = "array") -> np.ndarray:
    """An array from the bytes of a ``.npy`` file, without copying and without ever unpickling.

    Arrays of Python objects (which ``.npy`` stores as pickles) raise :class:`SkyfmError`. Given a ``bytearray``
    the array is writable; given a uint8 array, it is a view of it.
    """
    view = memoryview(buffer)
    if bytes(view[:6]) != _NPY_MAGIC or len(view) < 10:
        raise SkyfmError(f"{where} is not a .npy array")
    version = (view[6], view[7])
    if version == (1, 0):
        start = 10 + int.from_bytes(view[8:10], "little")
    elif version in ((2, 0), (3, 0)):
        start = 12 + int.from_bytes(view[8:12], "little")
    else:
        raise SkyfmError(f"{where}: unsupported .npy version {version}")
    shape, fortran, dtype = _npy_header(bytes(view[:start]), where)
    if dtype.hasobject:
        raise SkyfmError(f"{where} holds Python objects (pickled); skyfm never unpickles shard data")
    count = int(np.prod(shape, dtype=np.int64))
    if len(view) - start != count * dtype.itemsize:
        raise SkyfmError(f"{where} is truncated ({len(view) - start} bytes of data for shape {shape} {dtype})")
    array = np.frombuffer(buffer, dtype=dtype, count=count, offset=start)
    return array.reshape(shape, order="F" if fortran else "C")


_NPY_SHAPE = re.compile(r"'shape':\s*\(([^)]*)\)")
_NPY_DTYPES: dict[str, tuple[bool, np.dtype]] = {}  # header without its shape -> (fortran order, dtype)


def _npy_header(head: bytes, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of a .npy header. The dtype part is parsed once per distinct header (a
    truth catalog's structured dtype costs a Python literal_eval), the shape every time."""
    text = head[10:].decode("latin1")
    match = _NPY_SHAPE.search(text)
    try:
        if match is None:
            raise ValueError("no shape")
        shape = tuple(int(n) for n in match.group(1).replace(",", " ").split())
        key = _NPY_SHAPE.sub("", text)
        if key not in _NPY_DTYPES:
            fp = io.BytesIO(head)
            version = np.lib.format.read_magic(fp)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            _, fortran, dtype = read(fp, max_header_size=len(head) + 1)
            if len(_NPY_DTYPES) > 1024:
                _NPY_DTYPES.clear()
            _NPY_DTYPES[key] = (fortran, dtype)
    except (ValueError, SyntaxError) as e:
        raise SkyfmError(f"{where} has a corrupt .npy header ({e})") from None
    return (shape, *_NPY_DTYPES[key])


def _truth_table(array: np.ndarray, info: dict) -> Table:
    import astropy.units as u

    table = Table(array, meta=info.get("meta") or {}, copy=False)  # the array is this sample's own buffer
    for name, unit in (info.get("units") or {}).items():
        table[name].unit = u.Unit(unit, parse_strict="silent")
    for name, text in (info.get("descriptions") or {}).items():
        table[name].description = text
    return table


def _decode_arrays(path, key: str, suffixes: Iterable[str], load: Callable[[str], bytearray],
                   with_truth: bool, with_targets: bool = True) -> tuple[dict, dict]:
    """The JSON header and the checked arrays of one sample; ``load(suffix)`` returns a member's bytes."""
    suffixes = set(suffixes)
    for required in ("json", "data.npy"):
        if required not in suffixes:
            raise SkyfmError(f"shard {path}: sample '{key}' has no {key}.{required}")
    header = _decode_json(load("json"), path, key)
    arrays = {}
    targets = ("source.npy", "mask.npy") if with_targets else ()
    for suffix in ("data.npy", *targets, "invalid.npy") + (("truth.npy",) if with_truth else ()):
        if suffix in suffixes:
            arrays[suffix] = decode_npy(load(suffix), f"shard {path}: {key}.{suffix}")
    shape = tuple(header["shape"])
    checks = {"data.npy": (np.float32, shape), "source.npy": (np.float32, shape), "mask.npy": (np.uint8, shape),
              "invalid.npy": (np.uint8, shape[1:])}
    for suffix, (dtype, expected) in checks.items():
        if suffix in arrays and (arrays[suffix].dtype != dtype or arrays[suffix].shape != expected):
            raise SkyfmError(f"shard {path}: {key}.{suffix} is {arrays[suffix].dtype} {arrays[suffix].shape}, "
                             f"expected {np.dtype(dtype)} {expected}")
    return header, arrays


def _wcs_from_header(text: str | None):
    if text is None:
        return None
    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(fits.Header.fromstring(text, sep="\n"))


def read_shard(path: str | Path) -> Iterator[Patch]:
    """The patches of one shard, in file order, exactly as they were written."""
    for key, members, file in iter_shard_members(path):
        header, arrays = _decode_arrays(path, key, members, lambda m: _load_member(file, members, m), with_truth=True)
        truth = _truth_table(arrays["truth.npy"], header["truth"] or {}) if "truth.npy" in arrays else None
        edges = header.get("energy_edges_kev")
        yield Patch(
            data=arrays["data.npy"], instrument=header["instrument"], bands=list(header["bands"]),
            wcs=_wcs_from_header(header.get("wcs_header")),
            mask=arrays["invalid.npy"].astype(bool) if "invalid.npy" in arrays else None,
            truth=truth, source_image=arrays.get("source.npy"), contaminant_mask=arrays.get("mask.npy"),
            energy_edges_kev=None if edges is None else np.asarray(edges, dtype=np.float64),
            meta=dict(header.get("meta") or {}),
        )


def verify_shards(paths_or_manifests) -> int:
    """Check every shard's sha256 (where the manifest has one) and sample count; returns the number of samples."""
    total = 0
    for shard in resolve_shards(paths_or_manifests):
        if shard.sha256 is not None:
            digest = hashlib.sha256()
            with open(shard.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            if digest.hexdigest() != shard.sha256:
                raise SkyfmError(f"shard {shard.path} does not match the sha256 in its manifest (corrupt or changed)")
        n = sum(1 for _ in iter_shard_members(shard.path))
        if n != shard.n_samples:
            raise SkyfmError(f"shard {shard.path} holds {n} samples; its manifest says {shard.n_samples}")
        total += n
    return total


# ================================================================================================================
# Samples: what the dataset yields and collate_patches batches
# ================================================================================================================
class StreamPosition(NamedTuple):
    """Where a sample came from in the dataset's order: its epoch, DataLoader worker and index in that worker."""

    epoch: int
    worker: int
    num_workers: int
    index: int


@lru_cache(maxsize=1)
def _builtin_instruments() -> tuple[str, ...]:
    from skyfm.instruments import list_instruments

    return tuple(list_instruments())


def instrument_id(name: str) -> int:
    """Index of ``name`` in :func:`skyfm.instruments.list_instruments`, or its length for a user's instrument."""
    names = _builtin_instruments()
    return names.index(name) if name in names else len(names)


def apply_scaling(image: np.ndarray | torch.Tensor, params: Mapping) -> torch.Tensor:
    """:func:`skyfm.instruments.scale_image` with parameters computed earlier, in torch (float32 tensor).

    The same functions to float32 rounding (about 1e-7 relative), three to ten times faster than numpy's, which
    matters when every patch is scaled every epoch.
    """
    x = torch.as_tensor(image)
    method = params["method"]
    if method == "log1p":
        return torch.log1p(x.clamp(min=0))
    if method == "anscombe":
        return 2.0 * torch.sqrt(x.clamp(min=0) + 0.375)
    if method == "asinh":
        from skyfm.instruments.scaling import sky_sigma_maps

        sky, sigma = (torch.from_numpy(a) for a in sky_sigma_maps(params, tuple(x.shape)))
        return _asinh((x - sky) / (sigma * params.get("softening", 1.0)))
    raise SkyfmError(f"unknown scaling method '{method}' in a shard sample")


def _asinh(z: torch.Tensor) -> torch.Tensor:
    """asinh(z) = sign(z) log1p(|z| + z^2 / (1 + sqrt(1 + z^2))), exact to float32 rounding and, unlike
    torch.asinh, vectorised; in place where possible (this runs on every patch of every epoch)."""
    a = z.abs()
    out = a * a
    out.div_(out.add(1).sqrt_().add_(1)).add_(a).log1p_()
    big = a > 1e4  # a^2 overflows float32 above ~1e19; asinh(a) = log(2a) to float32 precision above 1e4
    if big.any():
        out[big] = torch.log(a[big]) + float(np.log(2.0))
    return out.copysign_(z)


def _sample(header: dict, arrays: dict, key: str, truth: Table | None) -> dict:
    """The sample dict (torch tensors + metadata) from a decoded header and arrays."""
    image = torch.from_numpy(arrays["data.npy"])
    scaled = apply_scaling(image, header["scaling"])
    if "invalid.npy" in arrays:
        pixel_mask = torch.from_numpy(arrays["invalid.npy"]).bool()
    else:
        pixel_mask = torch.zeros(image.shape[1:], dtype=torch.bool)
    if not header.get("finite", True):  # NaN / inf pixels: zero them for the networks and mark them invalid
        bad = ~torch.isfinite(image)
        pixel_mask = pixel_mask | bad.any(dim=0)
        image = image.masked_fill(bad, 0.0)
        scaled = torch.nan_to_num(scaled, nan=0.0, posinf=0.0, neginf=0.0)
    source, contaminant = arrays.get("source.npy"), arrays.get("mask.npy")
    return {
        "key": key,
        "instrument": header["instrument"],
        "instrument_id": instrument_id(header["instrument"]),
        "bands": list(header["bands"]),
        "image": image,
        "scaled": scaled,
        "source": None if source is None else torch.from_numpy(source),
        "contaminant": None if contaminant is None else torch.from_numpy(contaminant),
        "pixel_mask": pixel_mask,
        "band_coord": torch.tensor(header["band_log10_wavelength_m"], dtype=torch.float32),
        "pixel_scale_deg": float(header["pixel_scale_deg"]),
        "truth": truth,
        "meta": header,
    }


def sample_from_patch(patch: Patch, key: str | None = None, instrument=None) -> dict:
    """The sample dict :class:`ShardDataset` would yield for ``patch`` (to batch patches made on the fly)."""
    key = key or f"{patch.instrument}-0"
    header, arrays = encode_patch(patch, key, instrument=instrument)
    return _sample(header, arrays, key, patch.truth)


def _decode_sample(path, key: str, loaded: dict[str, bytearray], with_truth: bool, with_targets: bool) -> dict:
    """A dataset sample from the bytes of its members."""
    header, arrays = _decode_arrays(path, key, loaded, loaded.__getitem__, with_truth, with_targets)
    truth = None
    if "truth.npy" in arrays:
        truth = _truth_table(arrays["truth.npy"], header.get("truth") or {})
    return _sample(header, arrays, key, truth)


# ================================================================================================================
# The streaming dataset
# ================================================================================================================
def _canonical_name(name: str, available) -> str:
    """An instrument's name as shards store it (``fermi`` -> ``fermi-lat``); unknown names are returned as given."""
    if name in available:
        return name
    from skyfm.instruments import load_instrument

    try:
        return load_instrument(name).name
    except SkyfmError:
        return name


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) & 0xFFFFFFFF for w in words]))


_SHARD_ORDER, _BUFFER, _MIX = 1, 2, 3  # independent random streams per purpose


class _ShuffledStream:
    """The order in which one instrument's samples leave its shuffle buffer, as identities (shard position, index).

    Pure bookkeeping on the manifest's sample counts: nothing is read, so skipping ahead to resume is cheap. The
    buffer works as webdataset's: it fills to ``size``; then each new sample replaces a random one, which is
    emitted; at the end the rest leave in random order. ``shards`` records the shard at each position.
    """

    def __init__(self, shard_sequence: Iterator[ShardInfo], size: int, rng: np.random.Generator):
        self._source = shard_sequence
        self.size = size
        self.rng = rng
        self.shards: list[ShardInfo] = []
        self.buffer: list[tuple[int, int]] = []
        self.cursor = (0, 0)  # the next identity to enter the buffer

    def _next_input(self) -> tuple[int, int] | None:
        position, index = self.cursor
        while position >= len(self.shards) or index >= self.shards[position].n_samples:
            if position < len(self.shards):  # this shard is used up: on to the next
                position, index = position + 1, 0
                self.cursor = (position, index)
                continue
            shard = next(self._source, None)
            if shard is None:
                return None
            self.shards.append(shard)
        self.cursor = (position, index + 1)
        return position, index

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, int]:
        if self.size <= 1:
            item = self._next_input()
            if item is None:
                raise StopIteration
            return item
        while (item := self._next_input()) is not None:
            if len(self.buffer) < self.size:
                self.buffer.append(item)
                continue
            k = int(self.rng.integers(self.size))
            out, self.buffer[k] = self.buffer[k], item
            return out
        if not self.buffer:
            raise StopIteration
        k = int(self.rng.integers(len(self.buffer)))
        self.buffer[k], self.buffer[-1] = self.buffer[-1], self.buffer[k]
        return self.buffer.pop()


class _StreamReader:
    """Reads one stream's shards front to back and hands out the samples its :class:`_ShuffledStream` asks for.

    Samples read before they are asked for wait in memory (at most a shuffle buffer's worth). When resuming, only
    the samples still pending in the buffer and those not yet read are kept; the shards before them are never
    opened.
    """

    def __init__(self, stream: _ShuffledStream, with_truth: bool, with_targets: bool):
        self.stream = stream
        self.with_truth = with_truth
        self.skipped = set() if with_targets else {"source.npy", "mask.npy"}
        if not with_truth:
            self.skipped.add("truth.npy")
        self.pending = set(stream.buffer)
        self.resume_cursor = stream.cursor
        self.position = min([stream.cursor[0]] + [p for p, _ in self.pending])
        self.waiting: dict[tuple[int, int], tuple] = {}
        self._members = None
        self._index = 0

    def _keep(self, ident: tuple[int, int]) -> bool:
        return ident >= self.resume_cursor or ident in self.pending

    def get(self, ident: tuple[int, int]) -> dict:
        while ident not in self.waiting:
            self._read_next()
        path, key, loaded = self.waiting.pop(ident)
        return _decode_sample(path, key, loaded, self.with_truth, not self.skipped & {"source.npy"})

    def _read_next(self) -> None:
        shard = self.stream.shards[self.position]
        if self._members is None:
            self._members, self._index = iter_shard_members(shard.path), 0
        item = next(self._members, None)
        if item is None:
            if self._index != shard.n_samples:
                raise SkyfmError(f"shard {shard.path} holds {self._index} samples; its manifest says "
                                 f"{shard.n_samples} (truncated or replaced)")
            self._members, self.position = None, self.position + 1
            return
        ident = (self.position, self._index)
        self._index += 1
        if ident[1] >= shard.n_samples:
            raise SkyfmError(f"shard {shard.path} holds more samples than its manifest's {shard.n_samples}")
        if self._keep(ident):
            key, members, file = item
            # Read the bytes now, while the file is here; decode when the sample is handed out.
            wanted = [m for m in members if m not in self.skipped]
            self.waiting[ident] = (shard.path, key, {m: _load_member(file, members, m) for m in wanted})


class ShardDataset(torch.utils.data.IterableDataset):
    """Stream samples from shard sets: shuffled, split across DDP ranks and DataLoader workers, instruments mixed.

    Args:
        paths_or_manifests: shard-set folders, ``manifest.json`` files, ``.tar`` shards or glob patterns.
        instrument_weights: ``{instrument: weight}``; each sample comes from instrument ``i`` with probability
            ``w_i / sum(w)``. Instruments left out (or with weight 0) are not read. Default: proportional to the
            number of samples, so that every stream ends at about the same time.
        shuffle_buffer: samples per instrument held for shuffling (memory: this many patches per instrument and
            worker); 0 or 1 reads in shard order.
        seed, epoch: the order is a function of (seed, epoch, rank, world_size, number of DataLoader workers).
        rank, world_size: this process's DDP rank and the number of ranks; default: from ``torch.distributed``
            when it is initialised, else 0 and 1. (With ``accelerate``, keep ``dispatch_batches=False`` so that
            every rank reads its own shards.)
        transform: called on each sample dict before it is yielded (in the worker).
        resample: False: one pass per epoch, each shard read by exactly one (rank, worker), each sample once;
            ranks may get different numbers of samples, and once an instrument's stream ends the others fill in.
            True: an endless stream for step-based training; every (rank, worker) reads all of an instrument's
            shards, in its own random order, pass after pass, so the weights hold exactly for any length of run.
        shuffle_shards: shuffle the shard order per epoch (default); False keeps the manifest's order.
        with_truth: decode truth catalogs into astropy Tables (pretraining does not need them).
        with_targets: decode the source-only image and the contaminant mask (pretraining does not need them;
            without them a batch has no ``source`` and ``contaminant`` keys).

    Each sample is a dict: ``image``, ``scaled`` (C, H, W) float32 tensors, ``source`` (or None),
    ``contaminant`` (uint8 or None), ``pixel_mask`` (H, W) bool, ``band_coord`` (C,) float32, ``key``,
    ``instrument``, ``instrument_id``, ``bands``, ``pixel_scale_deg``, ``truth``, ``meta`` (the sample's JSON) and
    ``stream_position`` (:class:`StreamPosition`). Batch with :func:`collate_patches`.

    Resuming: ``state_dict()`` holds the number of samples consumed from each DataLoader worker this epoch; a
    dataset given it by ``load_state_dict`` continues with exactly the samples that would have come next,
    without reading the ones it skips. Iterating the dataset in this process (or with ``num_workers=0``) keeps
    the count itself; with DataLoader workers, which run on copies, call ``mark_consumed(batch)`` for each batch
    trained on. Resume with the same number of workers. In ``resample`` mode every rank consumes as much from
    each worker, so rank 0's state resumes every rank. Call ``set_epoch`` before each epoch, and do not use
    ``persistent_workers`` (workers keep the epoch they started with).

    Speed (``benchmarks/shards.py``): a 256x256 patch costs about 1.5-2 ms of CPU to read, scale and batch; a
    truth table about 0.5 ms more to build and 1.5 ms more to unpickle in the main process when it comes from a
    DataLoader worker. So pass ``with_truth=False`` when the truth is not needed (pretraining), and turn truth
    into training targets inside ``transform`` (then set ``sample["truth"] = None``) when it is. Batches from
    workers travel through new shared memory each time, whose page faults cost about as much again as making
    the batch: use workers when there are cores to spare for them.
    """

    def __init__(self, paths_or_manifests, *, instrument_weights: Mapping[str, float] | None = None,
                 shuffle_buffer: int = 256, seed: int = 0, epoch: int = 0, rank: int | None = None,
                 world_size: int | None = None, transform: Callable[[dict], dict] | None = None,
                 resample: bool = False, shuffle_shards: bool = True, with_truth: bool = True,
                 with_targets: bool = True):
        super().__init__()
        shards = resolve_shards(paths_or_manifests)
        if not shards:
            raise SkyfmError(f"no shards in {paths_or_manifests}")
        self.shards_by_instrument: dict[str, list[ShardInfo]] = {}
        for shard in shards:
            self.shards_by_instrument.setdefault(shard.instrument, []).append(shard)
        self.weights = self._check_weights(instrument_weights)
        if (rank is None) != (world_size is None):
            raise SkyfmError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise SkyfmError(f"rank {rank} is outside 0..{world_size - 1}")
        self.shuffle_buffer = max(0, int(shuffle_buffer))
        self.seed, self.epoch = int(seed), int(epoch)
        self.rank, self.world_size = rank, world_size
        self.transform = transform
        self.resample = bool(resample)
        self.shuffle_shards = bool(shuffle_shards)
        self.with_truth = bool(with_truth)
        self.with_targets = bool(with_targets)
        self._consumed: dict[int, int] = {}
        self._consumed_workers: int | None = None
        self._next_worker = 0  # the worker whose batch is due next (DataLoader workers take turns)
        self._resume: dict | None = None

    def _check_weights(self, weights: Mapping[str, float] | None) -> dict[str, float]:
        available = self.shards_by_instrument
        if weights is None:
            return {name: float(sum(s.n_samples for s in shards)) for name, shards in sorted(available.items())}
        out = {}
        for name, weight in weights.items():
            name = _canonical_name(name, available)
            if name not in available:
                raise SkyfmError(f"instrument_weights names '{name}', which these shards do not hold; they hold "
                                 f"{', '.join(sorted(available))}")
            if not (np.isfinite(weight) and weight >= 0):
                raise SkyfmError(f"instrument weight of '{name}' must be >= 0, got {weight}")
            if weight > 0:
                out[name] = float(weight)
        if not out:
            raise SkyfmError("instrument_weights gives no instrument a positive weight")
        return dict(sorted(out.items()))

    def _warn_if_shards_are_too_few(self, n_splits: int) -> None:
        """Without resampling a shard goes to one (rank, worker): with fewer shards than those, some get none."""
        few = [f"{name} ({len(self.shards_by_instrument[name])})" for name in self.weights
               if len(self.shards_by_instrument[name]) < n_splits]
        if few and not self.resample:
            warnings.warn(f"fewer shards than the {n_splits} DataLoader workers x ranks for {', '.join(few)}: some "
                          "workers get none of them and mix the instruments differently; write smaller shards or "
                          "use resample=True", stacklevel=3)

    @property
    def instruments(self) -> list[str]:
        """The instruments this dataset draws from (positive weight)."""
        return list(self.weights)

    @property
    def num_samples(self) -> int:
        """Samples in one pass over the shards of the drawn instruments (all ranks and workers together)."""
        return sum(s.n_samples for name in self.weights for s in self.shards_by_instrument[name])

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (a new shard order and shuffle) at its beginning."""
        if int(epoch) != self.epoch:
            self._consumed, self._consumed_workers, self._next_worker = {}, None, 0
        self.epoch = int(epoch)

    def _rank_world(self) -> tuple[int, int]:
        if self.world_size is not None:
            return self.rank, self.world_size
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    # -- the order ------------------------------------------------------------------------------------------
    def _shard_sequence(self, name: str, split: int, n_splits: int, worker_seed: tuple) -> Iterator[ShardInfo]:
        """The shards one (rank, worker) reads for instrument ``name``, in order."""
        shards = self.shards_by_instrument[name]
        code = zlib.crc32(name.encode())
        if self.resample:
            rng = _rng(self.seed, self.epoch, *worker_seed, code, _SHARD_ORDER)
            while True:
                yield from (shards[i] for i in rng.permutation(len(shards)))
        order = _rng(self.seed, self.epoch, code, _SHARD_ORDER).permutation(len(shards)) if self.shuffle_shards \
            else np.arange(len(shards))
        yield from (shards[i] for i in order[split::n_splits])

    def _streams(self, rank: int, world: int, worker: int, num_workers: int) -> dict[str, _ShuffledStream]:
        split, n_splits = rank * num_workers + worker, world * num_workers
        streams = {}
        for name in self.weights:
            seeds = (rank, world, worker, num_workers)
            buffer_rng = _rng(self.seed, self.epoch, *seeds, zlib.crc32(name.encode()), _BUFFER)
            size = self.shuffle_buffer if (self.shuffle_buffer > 1) else 0
            streams[name] = _ShuffledStream(self._shard_sequence(name, split, n_splits, seeds), size, buffer_rng)
        return streams

    def _draws(self, streams: dict[str, _ShuffledStream], rng: np.random.Generator) -> Iterator[tuple[str, tuple]]:
        """(instrument, identity) of each sample this worker yields: instruments drawn by weight."""
        names = list(streams)
        weights = np.array([self.weights[n] for n in names])
        while names:
            cumulative = np.cumsum(weights)
            k = min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(names) - 1)
            try:
                ident = next(streams[names[k]])
            except StopIteration:  # this instrument is used up on this worker: the others go on
                del names[k]
                weights = np.delete(weights, k)
                continue
            yield names[k], ident

    def __iter__(self) -> Iterator[dict]:
        rank, world = self._rank_world()
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        # The DataLoader asks its workers for batches in turn, starting with worker 0; a resumed run must start
        # with the worker whose batch was due next, so worker ids are rotated to the saved order.
        worker = (worker + self._resume_offset(num_workers)) % num_workers
        if rank == 0 and worker == 0:
            self._warn_if_shards_are_too_few(world * num_workers)
        streams = self._streams(rank, world, worker, num_workers)
        draws = self._draws(streams, _rng(self.seed, self.epoch, rank, world, worker, num_workers, _MIX))
        position = 0
        for _ in range(self._skip_for(worker, num_workers)):  # resume: replay the draws, read nothing
            if next(draws, None) is None:
                break
            position += 1
        # Readers start after the skip: they read only what is still in the buffers and what comes after.
        readers = {name: _StreamReader(stream, self.with_truth, self.with_targets) for name, stream in streams.items()}
        for name, ident in draws:
            sample = readers[name].get(ident)
            if self.transform is not None:
                sample = self.transform(sample)
            sample["stream_position"] = StreamPosition(self.epoch, worker, num_workers, position)
            position += 1
            if info is None:  # iterated in this process: count what the consumer has taken
                self._record(sample["stream_position"])
            yield sample

    def _resume_offset(self, num_workers: int) -> int:
        if self._resume is None or self._resume["epoch"] != self.epoch:
            return 0
        if self._resume["num_workers"] != num_workers:
            raise SkyfmError(f"the data state was saved with {self._resume['num_workers']} DataLoader worker(s); "
                             f"resume with the same number, not {num_workers}")
        return self._resume["next_worker"]

    def _skip_for(self, worker: int, num_workers: int) -> int:
        if self._resume is None or self._resume["epoch"] != self.epoch:
            return 0
        return int(self._resume["consumed"][worker])

    # -- resuming ------------------------------------------------------------------------------------------
    def _record(self, position: StreamPosition) -> None:
        if position.epoch != self.epoch:
            return  # a batch of an earlier epoch, still in flight
        if self._consumed_workers not in (None, position.num_workers):
            raise SkyfmError("batches from DataLoaders with different numbers of workers were marked consumed")
        self._consumed_workers = position.num_workers
        self._consumed[position.worker] = max(self._consumed.get(position.worker, 0), position.index + 1)
        self._next_worker = (position.worker + 1) % position.num_workers

    def mark_consumed(self, batch_or_sample: Mapping) -> None:
        """Count a batch (from :func:`collate_patches`) or a sample as consumed, for :meth:`state_dict`."""
        positions = batch_or_sample.get("stream_position")
        if positions is None:
            raise SkyfmError("this batch has no stream_position: was it made by ShardDataset and collate_patches?")
        for position in [positions] if isinstance(positions, StreamPosition) else positions:
            self._record(StreamPosition(*position))

    def _fingerprint(self) -> str:
        """What fixes the order besides the seed and epoch: the shard set and the settings."""
        shards = [s for name in self.weights for s in self.shards_by_instrument[name]]
        desc = {"shards": [(s.path.name, s.instrument, s.n_samples) for s in shards],
                "weights": self.weights, "buffer": self.shuffle_buffer, "resample": self.resample,
                "shuffle_shards": self.shuffle_shards}
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        """Plain numbers and strings (JSON-serialisable): how far this epoch's stream has been consumed."""
        num_workers = self._consumed_workers or 1
        consumed = [self._consumed.get(w, 0) for w in range(num_workers)]
        return {"version": 1, "seed": self.seed, "epoch": self.epoch, "world_size": self._rank_world()[1],
                "num_workers": num_workers, "consumed": consumed, "samples_consumed": int(sum(consumed)),
                "next_worker": self._next_worker, "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from ``state`` (see :meth:`state_dict`): same shards, settings, seed and number of ranks."""
        try:
            seed, epoch, world = int(state["seed"]), int(state["epoch"]), int(state["world_size"])
            consumed, num_workers = [int(c) for c in state["consumed"]], int(state["num_workers"])
            next_worker = int(state.get("next_worker", 0))
            fingerprint = state["fingerprint"]
        except (KeyError, TypeError, ValueError) as e:
            raise SkyfmError(f"not a ShardDataset state ({e})") from None
        if fingerprint != self._fingerprint():
            raise SkyfmError("the data state was saved for other shards or other dataset settings; it cannot resume here")
        if seed != self.seed:
            raise SkyfmError(f"the data state was saved with seed {seed}; this dataset has seed {self.seed}")
        if world != self._rank_world()[1]:
            raise SkyfmError(f"the data state was saved with {world} rank(s); this run has {self._rank_world()[1]}")
        if len(consumed) != num_workers or not 0 <= next_worker < num_workers:
            raise SkyfmError("the data state's consumed counts do not match its number of workers")
        self.epoch = epoch
        self._resume = {"epoch": epoch, "num_workers": num_workers, "consumed": consumed, "next_worker": next_worker}
        self._consumed, self._consumed_workers = dict(enumerate(consumed)), num_workers
        self._next_worker = next_worker


# ================================================================================================================
# Batching
# ================================================================================================================
def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker, in shared memory, so that it reaches the main process
    without another copy (as torch's default_collate does)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = int(np.prod(shape))
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


def collate_patches(samples: Sequence[dict | Patch]) -> dict:
    """Batch samples of one patch size from any instruments, bands padded to the largest band count.

    ``samples`` are :class:`ShardDataset` samples or :class:`~skyfm.data.Patch` objects. Returns (B = batch,
    C = largest band count): ``image``, ``scaled``, ``source`` (B, C, H, W) float32 and ``contaminant`` uint8,
    padding zero (``source`` and ``contaminant`` only when some sample has them: not when read with
    ``with_targets=False``); ``band_valid`` (B, C) bool; ``band_coord`` (B, C) float32 log10 wavelength (m), 0 for padding;
    ``instrument_id`` (B,) int64; ``pixel_scale_deg`` (B,) float32; ``pixel_mask`` (B, H, W) bool, True where
    invalid; and the lists ``instrument``, ``bands``, ``truth``, ``key``, ``scaling`` (each sample's scaling
    parameters, :func:`apply_scaling`) (and ``stream_position`` for dataset
    samples, for :meth:`ShardDataset.mark_consumed`).
    """
    samples = [s if isinstance(s, Mapping) else sample_from_patch(s, key=f"{s.instrument}-{i}")
               for i, s in enumerate(samples)]
    if not samples:
        raise SkyfmError("collate_patches got an empty batch")
    height, width = samples[0]["image"].shape[-2:]
    for s in samples:
        if tuple(s["image"].shape[-2:]) != (height, width):
            raise SkyfmError(f"collate_patches needs patches of one size: {samples[0]['key']} is {height}x{width}, "
                             f"{s['key']} is {s['image'].shape[-2]}x{s['image'].shape[-1]} (simulate with --size)")
    n, c_max = len(samples), max(s["image"].shape[0] for s in samples)
    cube = (n, c_max, height, width)
    # Datasets read with with_targets=False carry no source image or contaminant mask: no zeros to build then.
    arrays = ["image", "scaled"] + [k for k in ("source", "contaminant") if any(s.get(k) is not None for s in samples)]
    batch = {
        "image": _batch_tensor(cube, torch.float32),
        "scaled": _batch_tensor(cube, torch.float32),
        "band_valid": torch.zeros(n, c_max, dtype=torch.bool),
        "band_coord": torch.zeros(n, c_max, dtype=torch.float32),
        "instrument_id": torch.tensor([s["instrument_id"] for s in samples], dtype=torch.int64),
        "pixel_scale_deg": torch.tensor([s["pixel_scale_deg"] for s in samples], dtype=torch.float32),
        "pixel_mask": torch.stack([s["pixel_mask"] for s in samples], out=_batch_tensor((n, height, width), torch.bool)),
        "instrument": [s["instrument"] for s in samples],
        "bands": [list(s["bands"]) for s in samples],
        "truth": [s.get("truth") for s in samples],
        "key": [s["key"] for s in samples],
        "scaling": [s["meta"]["scaling"] for s in samples],
    }
    for name, dtype in (("source", torch.float32), ("contaminant", torch.uint8)):
        if name in arrays:
            batch[name] = _batch_tensor(cube, dtype)
    for i, s in enumerate(samples):
        c = s["image"].shape[0]
        batch["band_valid"][i, :c] = True
        batch["band_coord"][i, :c] = s["band_coord"]
        for name in arrays:
            if s.get(name) is not None:
                batch[name][i, :c] = s[name]
                batch[name][i, c:] = 0
            else:
                batch[name][i] = 0
    if all("stream_position" in s for s in samples):
        batch["stream_position"] = [tuple(s["stream_position"]) for s in samples]
    return batch


__all__ = [
    "MANIFEST_NAME",
    "ShardDataset",
    "ShardInfo",
    "ShardWriter",
    "StreamPosition",
    "apply_scaling",
    "collate_patches",
    "decode_npy",
    "encode_patch",
    "instrument_id",
    "instrument_seed",
    "iter_shard_members",
    "load_manifest",
    "parse_instrument_counts",
    "read_shard",
    "resolve_shards",
    "sample_from_patch",
    "verify_shards",
    "write_simulated_shards",
]
