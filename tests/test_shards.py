"""Sharded training sets: exact round trips, streaming order, instrument mixing, resuming, bad shards, batches."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from astropy.table import Table
from astropy.wcs import WCS
from torch.utils.data import DataLoader

from skyfm.data import Patch
from skyfm.data.shards import (
    ShardDataset,
    ShardWriter,
    collate_patches,
    decode_npy,
    load_manifest,
    parse_instrument_counts,
    read_shard,
    verify_shards,
    write_simulated_shards,
)
from skyfm.errors import SkyfmError
from skyfm.instruments import list_instruments, load_instrument, scale_image

SIZE = 16
BANDS = {"fermi-lat": ["E0", "E1", "E2", "E3", "E4", "E5"], "meerlicht": ["q"], "wise": ["W1", "W2", "W3", "W4"]}


def _wcs(seed):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0 + seed * 1e-3, 2.0]
    w.wcs.crpix = [SIZE / 2 + 0.5, SIZE / 2 + 0.5]
    w.wcs.cdelt = [-1.5e-4, 1.5e-4]
    return w


def fake_patch(instrument: str, seed: int, size: int = SIZE) -> Patch:
    """A patch with every part filled with random values (the shard format must not care what they mean)."""
    rng = np.random.default_rng(seed)
    bands = BANDS[instrument]
    c = len(bands)
    counts = instrument == "fermi-lat"
    data = (rng.poisson(3.0, (c, size, size)) if counts else rng.normal(500, 20, (c, size, size))).astype(np.float32)
    n = int(rng.integers(0, 6))
    truth = Table({"x": rng.uniform(0, size, n), "y": rng.uniform(0, size, n), "flux": rng.lognormal(size=n),
                   "flux_band": rng.lognormal(size=(n, c)).astype(np.float32), "class": np.array(["star"] * n, "U8")})
    truth["flux"].unit = "ph cm-2 s-1" if counts else "adu"
    truth["x"].description = "column, 0-based"
    truth.meta["population"] = "toy"
    mask = rng.random((size, size)) < 0.05 if seed % 2 else None
    return Patch(data, instrument, bands, _wcs(seed), mask=mask, truth=truth,
                 source_image=rng.random((c, size, size), dtype=np.float32),
                 contaminant_mask=rng.integers(0, 64, (c, size, size), dtype=np.uint8) if not counts else None,
                 meta={"seed": seed, "scene": "toy", "fwhm_arcsec": [2.1] * c})


def fake_simulator(name, seed, size=SIZE, **options):
    return fake_patch(name, seed % 100_000, size)


def write_set(folder, counts, per_shard=4, seed=0):
    """Write counts[name] fake patches per instrument; returns their keys."""
    keys = []
    with ShardWriter(folder, max_samples_per_shard=per_shard) as writer:
        for name, n in counts.items():
            keys += [writer.write(fake_patch(name, seed + 1000 * i + len(name))) for i in range(n)]
    return keys


@pytest.fixture(scope="module")
def mixed_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    keys = write_set(folder, {"fermi-lat": 14, "meerlicht": 18, "wise": 10}, per_shard=3)
    return folder, keys


def _keys(dataset_or_loader):
    out = []
    for item in dataset_or_loader:
        out += item["key"] if isinstance(item["key"], list) else [item["key"]]
    return out


# ---------------------------------------------------------------------------------------------------------------
def test_round_trip_is_bit_exact(tmp_path):
    patches = [fake_patch(name, seed) for seed in range(3) for name in BANDS]
    with ShardWriter(tmp_path / "set", max_samples_per_shard=2, command="test", config={"k": 1}) as writer:
        keys = [writer.write(p) for p in patches]
    manifest = load_manifest(tmp_path / "set")
    assert manifest["n_samples"] == 9 and manifest["instruments"] == {"fermi-lat": 3, "meerlicht": 3, "wise": 3}
    assert [e["n_samples"] for e in manifest["shards"]] == [2, 1] * 3
    assert manifest["runs"][0]["command"] == "test" and manifest["runs"][0]["config"] == {"k": 1}
    assert all(len(e["sha256"]) == 64 and e["bytes"] > 0 for e in manifest["shards"])
    assert verify_shards(tmp_path / "set") == 9
    back = {}
    for entry in manifest["shards"]:
        with tarfile.open(tmp_path / "set" / entry["file"]) as tar:  # a standard tar: members KEY.suffix
            names = tar.getnames()
        assert all(n.split(".", 1)[1] in ("json", "data.npy", "source.npy", "mask.npy", "invalid.npy", "truth.npy")
                   for n in names)
        for p in read_shard(tmp_path / "set" / entry["file"]):
            back[p.meta["seed"] * 10 + list(BANDS).index(p.instrument)] = p
    assert len(back) == 9 and len(set(keys)) == 9
    for p in patches:
        q = back[p.meta["seed"] * 10 + list(BANDS).index(p.instrument)]
        assert q.instrument == p.instrument and q.bands == p.bands and q.meta == p.meta
        for a, b in [(p.data, q.data), (p.source_image, q.source_image), (p.contaminant_mask, q.contaminant_mask),
                     (p.mask, q.mask)]:
            assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b))
        assert q.truth.colnames == p.truth.colnames and q.truth.meta == p.truth.meta
        for name in p.truth.colnames:
            assert q.truth[name].unit == p.truth[name].unit and q.truth[name].dtype == p.truth[name].dtype
            assert np.array_equal(q.truth[name], p.truth[name])
        assert q.truth["x"].description == "column, 0-based"
        assert q.wcs.to_header().tostring() == p.wcs.to_header().tostring()
        if p.instrument == "fermi-lat":  # energy edges of counts bins come from the instrument
            np.testing.assert_allclose(q.energy_edges_kev[[0, -1], [0, 1]], [3e5, 1e9])


def test_same_patches_give_the_same_bytes_and_append_continues(tmp_path):
    for name in ("a", "b"):
        write_set(tmp_path / name, {"meerlicht": 5}, per_shard=2)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["manifest.json"] + [f"skyfm-meerlicht-00000{i}.tar" for i in range(3)]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    with pytest.raises(SkyfmError, match="exists"):
        ShardWriter(tmp_path / "a")
    with ShardWriter(tmp_path / "a", max_samples_per_shard=2, append=True) as writer:
        key = writer.write(fake_patch("meerlicht", 99))
    manifest = load_manifest(tmp_path / "a")
    assert key == "meerlicht-00000005" and manifest["n_samples"] == 6 and len(manifest["runs"]) == 2
    assert manifest["shards"][-1]["file"] == "skyfm-meerlicht-000003.tar"
    assert not list((tmp_path / "a").glob(".*tmp*"))


def test_a_failed_run_leaves_only_complete_shards_all_listed(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, max_samples_per_shard=2) as writer:
            for i in range(5):
                writer.write(fake_patch("wise", i))
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "skyfm-wise-000000.tar", "skyfm-wise-000001.tar"]
    assert verify_shards(tmp_path) == 4


def test_write_simulated_shards_is_the_same_with_workers(tmp_path):
    counts = {"meerlicht": 5, "fermi-lat": 3}
    one = write_simulated_shards(tmp_path / "one", counts, seed=3, patches_per_shard=2, progress=False,
                                 simulator=fake_simulator)
    two = write_simulated_shards(tmp_path / "two", counts, seed=3, patches_per_shard=2, workers=2, progress=False,
                                 simulator=fake_simulator)
    m1, m2 = load_manifest(one), load_manifest(two)
    assert m1["instruments"] == {"fermi-lat": 3, "meerlicht": 5}
    assert [e["sha256"] for e in m1["shards"]] == [e["sha256"] for e in m2["shards"]]
    seeds = [p.meta["seed"] for f in sorted((tmp_path / "one").glob("*meerlicht*.tar")) for p in read_shard(f)]
    assert len(set(seeds)) == 5  # every patch its own seed
    assert m1["runs"][0]["config"]["seed"] == 3


def test_every_sample_once_per_epoch_across_ranks_and_workers(mixed_set):
    folder, keys = mixed_set
    seen = []
    for rank in range(2):
        ds = ShardDataset(folder, rank=rank, world_size=2, seed=1, shuffle_buffer=4, with_truth=False)
        seen += _keys(DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_patches))
    assert sorted(seen) == sorted(keys)


def test_order_is_fixed_by_seed_and_epoch(mixed_set):
    folder, keys = mixed_set
    orders = {}
    for seed, epoch in [(1, 0), (1, 0), (2, 0), (1, 1)]:
        ds = ShardDataset(folder, seed=seed, epoch=epoch, shuffle_buffer=5, with_truth=False)
        order = _keys(ds)
        assert sorted(order) == sorted(keys)
        assert orders.setdefault((seed, epoch), order) == order
    assert orders[(1, 0)] != orders[(2, 0)] and orders[(1, 0)] != orders[(1, 1)]
    shuffled = [k.split("-")[0] for k in orders[(1, 0)][:12]]
    assert len(set(shuffled)) > 1  # instruments are interleaved, not read one after the other


def test_instrument_weights_are_honoured(mixed_set):
    folder, _ = mixed_set
    ds = ShardDataset(folder, instrument_weights={"meerlicht": 3, "wise": 1}, resample=True, seed=5,
                      shuffle_buffer=4, with_truth=False)
    names = []
    for sample in ds:
        names.append(sample["instrument"])
        if len(names) == 2000:
            break
    share = names.count("meerlicht") / len(names)
    assert set(names) == {"meerlicht", "wise"} and abs(share - 0.75) < 0.03, share
    with pytest.raises(SkyfmError, match="hubble"):
        ShardDataset(folder, instrument_weights={"hubble": 1})


@pytest.mark.parametrize("num_workers, resample", [(0, False), (2, False), (2, True)])
def test_resume_continues_with_the_same_samples(mixed_set, num_workers, resample):
    folder, _ = mixed_set
    kwargs = dict(seed=7, epoch=1, shuffle_buffer=4, resample=resample, with_truth=False)

    def loader(ds):
        return DataLoader(ds, batch_size=2, num_workers=num_workers, collate_fn=collate_patches)

    n_batches = 12
    full = []
    for i, batch in enumerate(loader(ShardDataset(folder, **kwargs))):
        full.append(batch["key"])
        if i + 1 == n_batches:
            break
    first = ShardDataset(folder, **kwargs)
    for i, batch in enumerate(loader(first)):
        first.mark_consumed(batch)
        if i + 1 == 5:  # the run is killed after 5 batches
            break
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON
    assert state["samples_consumed"] == 10
    resumed = ShardDataset(folder, **{**kwargs, "epoch": 0})
    resumed.load_state_dict(state)
    rest = []
    for i, batch in enumerate(loader(resumed)):
        rest.append(batch["key"])
        if len(rest) == n_batches - 5:
            break
    assert rest == full[5:]


def test_resume_refuses_another_setup(mixed_set):
    folder, _ = mixed_set
    state = ShardDataset(folder, seed=1).state_dict()
    with pytest.raises(SkyfmError, match="seed"):
        ShardDataset(folder, seed=2).load_state_dict(state)
    with pytest.raises(SkyfmError, match="other shards or other dataset settings"):
        ShardDataset(folder, seed=1, shuffle_buffer=3).load_state_dict(state)
    resumed = ShardDataset(folder, seed=1)
    resumed.load_state_dict({**state, "num_workers": 2, "consumed": [1, 1]})
    with pytest.raises(SkyfmError, match="same number"):
        next(iter(resumed))


# ---------------------------------------------------------------------------------------------------------------
def _one_shard(tmp_path, n=3):
    write_set(tmp_path / "set", {"wise": n}, per_shard=10)
    return tmp_path / "set", tmp_path / "set" / "skyfm-wise-000000.tar"


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary", "garbage"])
def test_a_truncated_or_corrupt_shard_is_a_clear_error(tmp_path, cut):
    folder, shard = _one_shard(tmp_path)
    raw = shard.read_bytes()
    if cut == "mid_member":
        shard.write_bytes(raw[: len(raw) // 2])
    elif cut == "member_boundary":
        with tarfile.open(shard) as tar:
            last = tar.getmembers()[-1]
        shard.write_bytes(raw[: last.offset])  # the last member and the end-of-archive blocks are gone
    else:
        shard.write_bytes(b"not a tar file at all" * 100)
    with pytest.raises(SkyfmError, match=r"skyfm-wise-000000\.tar"):
        _keys(ShardDataset(folder))
    with pytest.raises(SkyfmError, match=r"skyfm-wise-000000\.tar"):
        verify_shards(folder)


def test_a_shard_shorter_than_its_manifest_is_an_error(tmp_path):
    folder, shard = _one_shard(tmp_path)
    manifest = load_manifest(folder)
    manifest["shards"][0]["n_samples"] = 4
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SkyfmError, match="holds 3 samples; its manifest says 4"):
        _keys(ShardDataset(folder, shuffle_buffer=0))


def test_pickled_arrays_are_refused(tmp_path):
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(SkyfmError, match="Python objects"):
        decode_npy(buffer.getvalue(), "x.npy")
    # ... also inside a shard: replace a sample's data with a pickled object array
    folder, shard = _one_shard(tmp_path, n=1)
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, payload in members:
            if m.name.endswith(".data.npy"):
                payload = buffer.getvalue()
                m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))
    with pytest.raises(SkyfmError, match="never unpickles"):
        _keys(ShardDataset(tmp_path / "set"))
    bad = fake_patch("wise", 0)
    bad.truth["class"] = np.array([object()] * len(bad.truth), dtype=object)
    with pytest.raises(SkyfmError, match="Python objects"):
        with ShardWriter(tmp_path / "other") as writer:
            writer.write(bad)


def test_bad_paths_and_manifests(tmp_path):
    with pytest.raises(SkyfmError, match="not found"):
        ShardDataset(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(SkyfmError, match="not valid JSON"):
        ShardDataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "skyfm-shards", "shards": [
        {"file": "gone.tar", "instrument": "wise", "n_samples": 3}]}))
    with pytest.raises(SkyfmError, match="gone.tar, which is missing"):
        ShardDataset(tmp_path)
    with pytest.raises(SkyfmError, match="NAME=COUNT"):
        parse_instrument_counts(["fermi-lat"])
    with pytest.raises(SkyfmError, match="unknown instrument"):
        parse_instrument_counts(["jwst=3"])
    assert parse_instrument_counts(["fermi=2", "wise=1"]) == {"fermi-lat": 2, "wise": 1}


def test_bare_tar_shards_and_globs_are_read(mixed_set):
    folder, keys = mixed_set
    ds = ShardDataset(str(folder / "*wise*.tar"), shuffle_buffer=0, shuffle_shards=False, with_truth=False)
    assert sorted(_keys(ds)) == sorted(k for k in keys if k.startswith("wise"))


# ---------------------------------------------------------------------------------------------------------------
def test_collate_follows_the_batch_contract(tmp_path):
    patches = [fake_patch("meerlicht", 1), fake_patch("fermi-lat", 2), fake_patch("wise", 3)]
    patches[2].data[1, 2, 3] = np.nan  # an invalid pixel
    with ShardWriter(tmp_path / "t") as writer:
        for p in patches:
            writer.write(p)
    samples = {s["instrument"]: s for s in ShardDataset(tmp_path / "t", shuffle_buffer=0)}
    batch = collate_patches([samples["meerlicht"], samples["fermi-lat"], samples["wise"]])
    direct = collate_patches(patches)  # Patch objects batch the same way
    b, c = 3, 6
    for name, dtype, shape in [("image", torch.float32, (b, c, SIZE, SIZE)), ("scaled", torch.float32, (b, c, SIZE, SIZE)),
                               ("band_valid", torch.bool, (b, c)), ("band_coord", torch.float32, (b, c)),
                               ("instrument_id", torch.int64, (b,)), ("pixel_scale_deg", torch.float32, (b,)),
                               ("pixel_mask", torch.bool, (b, SIZE, SIZE)), ("source", torch.float32, (b, c, SIZE, SIZE)),
                               ("contaminant", torch.uint8, (b, c, SIZE, SIZE))]:
        assert batch[name].dtype == dtype and tuple(batch[name].shape) == shape, name
        assert torch.equal(batch[name], direct[name]), name
    assert batch["band_valid"].sum(1).tolist() == [1, 6, 4]
    assert not batch["image"][0, 1:].any() and not batch["scaled"][2, 4:].any() and not batch["band_coord"][0, 1:].any()
    names = list_instruments()
    assert batch["instrument_id"].tolist() == [names.index(n) for n in ("meerlicht", "fermi-lat", "wise")]
    assert batch["instrument"] == ["meerlicht", "fermi-lat", "wise"] and batch["bands"][2] == BANDS["wise"]
    assert batch["key"] == [samples[n]["key"] for n in ("meerlicht", "fermi-lat", "wise")]
    # log10 wavelength (m): gamma rays ~1e-15 m, optical ~1e-6.2 m, WISE W4 ~2.2e-5 m; all from Band
    lat, wise = load_instrument("fermi-lat"), load_instrument("wise")
    np.testing.assert_allclose(batch["band_coord"][1], [b.log10_wavelength_m for b in lat.bands], rtol=1e-6)
    assert batch["band_coord"][1].max() < -14 and -6.5 < batch["band_coord"][0, 0] < -6
    np.testing.assert_allclose(batch["pixel_scale_deg"][2], wise.pixel_scale_deg, rtol=1e-6)
    # scaled is the instrument's scaling of the raw data, to float32 rounding
    for i, p in enumerate(patches):
        expected, _ = scale_image(p.data, load_instrument(p.instrument).scaling["method"])
        expected = np.nan_to_num(expected, nan=0.0)
        np.testing.assert_allclose(batch["scaled"][i, : p.n_bands].numpy(), expected, rtol=3e-7, atol=1e-7)
    # the NaN pixel is zero in image and scaled, and marked invalid; the patch's own mask is kept
    assert batch["pixel_mask"][2, 2, 3] and batch["image"][2, 1, 2, 3] == 0 and torch.isfinite(batch["scaled"]).all()
    assert torch.equal(batch["pixel_mask"][0], torch.from_numpy(patches[0].mask))  # seed 1: has a mask
    assert isinstance(batch["truth"][0], Table) and batch["truth"][0]["flux"].unit == "adu"
    assert torch.equal(batch["contaminant"][0, :1], torch.from_numpy(patches[0].contaminant_mask))
    with pytest.raises(SkyfmError, match="one size"):
        collate_patches([fake_patch("wise", 1), fake_patch("wise", 2, size=SIZE * 2)])


def test_scaling_matches_the_instruments_scaling_over_the_full_range():
    from skyfm.data.shards import apply_scaling

    rng = np.random.default_rng(3)
    counts = np.concatenate([rng.poisson(2.0, 5000), 10 ** rng.uniform(0, 7, 5000)]).astype(np.float32).reshape(1, 100, 100)
    adu = (500 + np.concatenate([rng.normal(0, 20, 5000), 10 ** rng.uniform(-3, 9, 2500),
                                 -(10 ** rng.uniform(-3, 5, 2500))])).astype(np.float32).reshape(1, 100, 100)
    for method, image in [("log1p", counts), ("anscombe", counts), ("asinh", adu)]:
        expected, params = scale_image(image, method)
        np.testing.assert_allclose(apply_scaling(image, params).numpy(), expected, rtol=3e-7, atol=1e-7, err_msg=method)


def test_skyfm_shards_command_with_the_real_simulators(tmp_path):
    from skyfm.cli import main
    from skyfm.data.simulate import simulate_patch

    args = ["shards", "-i", "fermi-lat=2", "-i", "meerlicht=3", "--size", "32", "--per-shard", "2", "--seed", "4"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    a, b = load_manifest(tmp_path / "a"), load_manifest(tmp_path / "b")
    assert a["instruments"] == {"fermi-lat": 2, "meerlicht": 3} and len(a["shards"]) == 3
    assert [e["sha256"] for e in a["shards"]] == [e["sha256"] for e in b["shards"]]  # same seed, same bytes
    assert a["runs"][0]["command"].startswith("skyfm shards -i fermi-lat=2 -i meerlicht=3")
    patch = next(read_shard(tmp_path / "a" / "skyfm-meerlicht-000000.tar"))
    again = simulate_patch("meerlicht", patch.meta["seed"], size=32)  # each patch can be made again from its seed
    assert np.array_equal(patch.data, again.data) and len(patch.truth) == len(again.truth)
    assert main(args + ["--out", str(tmp_path / "a")]) == 1  # an existing set is not overwritten
    assert main(["shards", "-i", "meerlicht=1", "--size", "32", "--out", str(tmp_path / "a"), "--append"]) == 0
    assert load_manifest(tmp_path / "a")["instruments"]["meerlicht"] == 4


def test_rank_and_world_size_come_from_torch_distributed(mixed_set, monkeypatch):
    folder, _ = mixed_set
    explicit = _keys(ShardDataset(folder, rank=1, world_size=2, seed=3, with_truth=False))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    assert _keys(ShardDataset(folder, seed=3, with_truth=False)) == explicit
    assert 0 < len(explicit) < 42


def test_pretraining_reads_skip_targets_but_keep_the_same_samples(mixed_set):
    folder, _ = mixed_set
    full = ShardDataset(folder, seed=2, shuffle_buffer=4, with_truth=False)
    light = ShardDataset(folder, seed=2, shuffle_buffer=4, with_truth=False, with_targets=False)
    loader = lambda ds: DataLoader(ds, batch_size=5, collate_fn=collate_patches)  # noqa: E731
    a, b = next(iter(loader(full))), next(iter(loader(light)))
    assert a["key"] == b["key"]
    assert torch.equal(a["scaled"], b["scaled"]) and torch.equal(a["image"], b["image"])
    assert "source" in a and "contaminant" in a
    assert "source" not in b and "contaminant" not in b
