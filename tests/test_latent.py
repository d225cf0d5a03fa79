"""Latent-space tools end to end through the command line: embed -> index -> search -> umap (PNG + HTML).

One tiny random skyfm-tiny model, five small simulated files, one UMAP fit for the whole session (numba compiles
UMAP once per process, 10-30 s).
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from skyfm.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def latent_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("latent")


@pytest.fixture(scope="session")
def tiny_model(latent_dir) -> Path:
    import torch

    import skyfm

    torch.manual_seed(0)
    model = skyfm.create_model("skyfm-tiny")
    return model.save_pretrained(latent_dir / "model")


@pytest.fixture(scope="session")
def sims(latent_dir) -> Path:
    from skyfm.data import write_patch
    from skyfm.data.simulate import simulate_patch

    out = latent_dir / "sims"
    out.mkdir()
    for name, size, seeds in (("fermi-lat", 64, (11, 12)), ("wise", 64, (13, 14)), ("meerlicht", 96, (15,))):
        for s in seeds:
            write_patch(simulate_patch(name, seed=s, size=size), out / f"{name}_{s}.fits")
    return out


@pytest.fixture(scope="session")
def embeddings(latent_dir, tiny_model, sims) -> Path:
    out = latent_dir / "emb.parquet"
    assert main(["embed", str(sims), "--model", str(tiny_model), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def index_dir(latent_dir, embeddings) -> Path:
    out = latent_dir / "emb.index"
    assert main(["index", str(embeddings), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def umap_outputs(latent_dir, embeddings) -> tuple[Path, Path]:
    """The one UMAP fit of the session: the CLI writes the PNG and the HTML explorer."""
    png, html = latent_dir / "map.png", latent_dir / "map.html"
    assert main(["umap", str(embeddings), "--color-by", "instrument", "--out", str(png), "--html", str(html),
                 "--knn", "5"]) == 0
    return png, html


def clustered(n, dim, seed=0, centres=50):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim)).astype(np.float32)
    return (c[rng.integers(0, centres, n)] + 0.35 * rng.normal(size=(n, dim))).astype(np.float32)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error line"
    assert "Traceback" not in "\n".join(err)
    return err[-1]


# ------------------------------------------------------------------------------------------------ embed
def test_embed_gives_patch_and_source_vectors_with_metadata(embeddings, sims):
    from astropy.table import Table

    from skyfm.latent.embed import read_embeddings
    from skyfm.latent.thumbs import decode_png

    meta, vectors, info = read_embeddings(embeddings)
    rows = meta.to_pylist()
    assert vectors.shape == (len(rows), 160) and info["dim"] == 160 and info["model_name"] == "skyfm-tiny"
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    patches = [r for r in rows if r["kind"] == "patch"]
    sources = [r for r in rows if r["kind"] == "source"]
    # 4 single-tile 64 px files + a 96 px MeerLICHT file in 2 x 2 tiles of 64 px
    assert len(patches) == 4 + 4
    assert [r["id"] for r in rows] == list(range(len(rows)))
    for name in ("fermi-lat_11.fits", "wise_13.fits", "meerlicht_15.fits"):
        truth = Table.read(sims / name, hdu="TRUTH")
        x, y, snr = (np.asarray(truth[c], float) for c in ("x", "y", "snr"))
        inside = (snr >= 5) & (x >= -0.5) & (x < truth.meta.get("NAXIS1", 1e9)) & (y >= -0.5)
        got = [r for r in sources if r["file"] == name]
        size = 96 if name.startswith("meerlicht") else 64
        inside &= (x < size - 0.5) & (y < size - 0.5)
        assert len(got) == int(inside.sum()), name  # each source once, even where tiles overlap
        assert all(r["origin"] == "truth" and r["class"] and r["snr"] >= 5 for r in got)
    assert {r["instrument"] for r in rows} == {"fermi-lat", "wise", "meerlicht"}
    for r in rows:
        assert r["ra"] is not None and r["glon"] is not None and r["bands"]
        pixels = decode_png(r["thumbnail"])
        assert pixels.shape[:2] == (48, 48)
    fermi = next(r for r in patches if r["instrument"] == "fermi-lat")
    assert fermi["bands"] == "E0,E1,E2,E3,E4,E5" and fermi["n_sources"] is not None


def test_source_vectors_are_the_features_at_the_source(embeddings, sims, tiny_model):
    """A row of the file is what embed_tiles gives for that tile and position: nothing shuffled on the way."""
    from skyfm.data import read_image
    from skyfm.foundation.model import FoundationModel
    from skyfm.latent.embed import embed_tiles, read_embeddings

    meta, vectors, _ = read_embeddings(embeddings)
    rows = meta.to_pylist()
    src = [i for i, r in enumerate(rows) if r["file"] == "wise_13.fits" and r["kind"] == "source"]
    patch_row = next(i for i, r in enumerate(rows) if r["file"] == "wise_13.fits" and r["kind"] == "patch")
    model = FoundationModel.from_pretrained(tiny_model)
    pos = np.array([[rows[i]["x"], rows[i]["y"]] for i in src])
    out = embed_tiles(model, [read_image(sims / "wise_13.fits")], [pos])
    np.testing.assert_allclose(out.patch[0], vectors[patch_row], atol=1e-5)
    np.testing.assert_allclose(out.sources[0], vectors[src], atol=1e-5)


def test_embed_with_a_catalog_of_sky_positions(latent_dir, tiny_model, sims):
    from astropy.table import Table

    from skyfm.latent.embed import read_embeddings

    truth = Table.read(sims / "fermi-lat_12.fits", hdu="TRUTH")
    cat = Table({"ra": truth["ra"][:3], "dec": truth["dec"][:3], "flux": np.arange(1.0, 4.0)})
    cat.write(latent_dir / "cat.ecsv", overwrite=True)
    out = latent_dir / "cat.parquet"
    assert main(["embed", str(sims / "fermi-lat_12.fits"), "--model", str(tiny_model), "--sources",
                 str(latent_dir / "cat.ecsv"), "--out", str(out)]) == 0
    meta, _, _ = read_embeddings(out)
    src = [r for r in meta.to_pylist() if r["kind"] == "source"]
    inside = (np.asarray(truth["x"][:3]) >= -0.5) & (np.asarray(truth["x"][:3]) < 63.5) & \
             (np.asarray(truth["y"][:3]) >= -0.5) & (np.asarray(truth["y"][:3]) < 63.5)
    assert len(src) == int(inside.sum()) and all(r["origin"] == "catalog" for r in src)
    np.testing.assert_allclose([r["x"] for r in src], np.asarray(truth["x"][:3])[inside], atol=1e-3)


# ------------------------------------------------------------------------------------------ index/search
def test_index_folder_and_search_by_id(index_dir, embeddings, capsys, latent_dir):
    params = json.loads((index_dir / "index.json").read_text())
    assert params["kind"] == "flat" and params["metric"] == "cosine" and params["dim"] == 160
    assert {p.name for p in index_dir.iterdir()} == {"index.faiss", "index.json", "metadata.parquet", "vectors.npy"}
    grid = latent_dir / "grid.png"
    capsys.readouterr()
    assert main(["search", "--index", str(index_dir), "--id", "0", "-k", "4", "--grid", str(grid)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(lines) == 4
    dists = [float(line.split()[2]) for line in lines]
    assert dists == sorted(dists) and all(0 <= d <= 2 for d in dists)
    assert " 0 " not in " ".join(line.split()[1] for line in lines)  # the query row itself is left out
    from PIL import Image

    with Image.open(grid) as im:
        assert im.size[0] > 300
    # the neighbours are the exact cosine neighbours
    from skyfm.latent.embed import read_embeddings

    _, v, _ = read_embeddings(embeddings)
    cos = v @ v[0]
    cos[0] = -np.inf
    assert [int(line.split()[1]) for line in lines] == list(np.argsort(-cos)[:4])


def test_search_filters_and_query_files(index_dir, embeddings, sims, capsys):
    capsys.readouterr()
    assert main(["search", "--index", str(index_dir), "--id", "1", "-k", "3", "--instrument", "wise",
                 "--kind", "source"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert rows and all(r[3] == "source" and r[4] == "wise" for r in rows)
    # a FITS image: embedded with the index's model; its own patch is its nearest neighbour
    assert main(["search", "--index", str(index_dir), "--query", str(sims / "wise_14.fits"), "-k", "1"]) == 0
    out = capsys.readouterr().out
    top = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()][0]
    assert top[-1] == "wise_14.fits" and float(top[2]) < 1e-4
    # an embeddings file: each row a query
    assert main(["search", "--index", str(index_dir), "--query", str(embeddings), "-k", "2", "--max-queries", "2"]) == 0
    assert capsys.readouterr().out.count("query ") == 2


def test_exact_and_approximate_indexes_agree():
    from skyfm.latent.index import build_index, choose_params, exact_knn, prepare_vectors, recall_at_k

    both = prepare_vectors(clustered(4200, 32, seed=1), "cosine")  # held-out queries from the same mixture
    x, q = np.ascontiguousarray(both[:4000]), np.ascontiguousarray(both[4000:])
    _, truth = exact_knn(q, x, 10)
    flat, _ = build_index(x, choose_params(len(x), 32, "flat"))
    assert recall_at_k(flat.search(q, 10)[1], truth) == 1.0
    for kind, floor in (("ivf", 0.93), ("hnsw", 0.93), ("ivfpq", 0.5)):
        index, params = build_index(x, choose_params(len(x), 32, kind), target_recall=0.95)
        recall = recall_at_k(index.search(q, 10)[1], truth)
        assert recall >= floor, (kind, recall, params)
        if kind != "ivfpq":
            assert params["recall_at_10"] >= 0.95


def test_index_parameters_follow_the_size():
    from skyfm.latent.index import choose_params

    assert choose_params(500, 160)["kind"] == "flat"
    p5 = choose_params(100_000, 160)
    assert p5["kind"] == "ivf" and p5["nlist"] == round(4 * 100_000 ** 0.5)
    p6 = choose_params(1_000_000, 160)
    assert p6["nlist"] == 4000 and p6["train_points"] == 32 * 4000 and p6["quantizer"] == "hnsw32"
    assert p5["quantizer"] == "flat" and p5["train_points"] == 64 * p5["nlist"]
    p7 = choose_params(10_000_000, 160)
    assert p7["kind"] == "ivfpq" and 160 % p7["pq_m"] == 0 and p7["pq_m"] == 40
    assert choose_params(1000, 160, "ivf")["nlist"] == 1000 // 39  # at least 39 training points per cell
    h = choose_params(1000, 160, "hnsw")
    assert h["hnsw_m"] == 32


def test_hnsw_index_through_the_cli_matches_flat(embeddings, index_dir, latent_dir, capsys):
    hnsw = latent_dir / "hnsw.index"
    assert main(["index", str(embeddings), "--out", str(hnsw), "--kind", "hnsw"]) == 0
    capsys.readouterr()
    ids = {}
    for name, folder in (("flat", index_dir), ("hnsw", hnsw)):
        assert main(["search", "--index", str(folder), "--id", "5", "-k", "5"]) == 0
        ids[name] = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert ids["flat"] == ids["hnsw"]


# ------------------------------------------------------------------------------------------------ umap
def test_umap_writes_a_png_and_a_self_contained_html(umap_outputs):
    from PIL import Image

    png, html = umap_outputs
    with Image.open(png) as im:
        assert im.size[0] > 500
    page = html.read_text()
    assert 'id="status"' in page
    assert "<script src" not in page and "http://" not in page and "https://" not in page  # nothing fetched
    data = page.split('<script id="skyfm-data" type="application/json">')[1].split("</script>")[0]
    payload = json.loads(data)
    assert payload["n"] == len(payload["x"]) == len(payload["thumbs"]) == len(payload["knn"])
    assert all(len(k) == 5 for k in payload["knn"]) and all(t for t in payload["thumbs"])
    assert {e[0] for e in payload["legend"]} == {"fermi-lat", "wise", "meerlicht"}


def chromium_binary():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_html_explorer_renders_in_headless_chromium(umap_outputs, tmp_path):
    browser = chromium_binary()
    if browser is None:
        pytest.skip("no chromium / chrome on this machine (apt-get install chromium)")
    _, html = umap_outputs
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
           html.resolve().as_uri() + "#selftest"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)})
    dom = result.stdout
    assert 'id="status"' in dom, result.stderr[-2000:]
    status = dom.split('id="status"')[1].split("</div>")[0]
    n = json.loads(html.read_text().split('type="application/json">')[1].split("</script>")[0])["n"]
    assert "selftest ok: hover=shown thumb=yes neighbours=5" in status and f"points={n}" in status, status


# ------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_are_one_line_errors_and_leave_nothing_behind(tmp_path, index_dir, tiny_model, sims, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from skyfm.latent.embed import make_table

    capsys.readouterr()
    out = tmp_path / "e.parquet"
    assert main(["embed", str(tmp_path / "missing.fits"), "--model", str(tiny_model), "--out", str(out)]) == 1
    assert "input not found" in error_line(capsys) and not out.exists()
    assert main(["embed", str(sims / "wise_13.fits"), "--model", str(tmp_path / "nomodel"), "--out", str(out)]) == 1
    assert "does not exist" in error_line(capsys) and not out.exists()
    assert main(["embed", str(sims / "wise_13.fits"), "--model", str(tiny_model), "--tile", "60", "--out", str(out)]) == 1
    assert "multiple of 8" in error_line(capsys)

    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"a": [1, 2], "b": [3.0, 4.0]}), wrong)
    assert main(["index", str(wrong), "--out", str(tmp_path / "i1")]) == 1
    assert "no 'embedding' column" in error_line(capsys) and not (tmp_path / "i1").exists()

    empty = tmp_path / "empty.parquet"
    pq.write_table(make_table({}, np.zeros((0, 8), np.float32), {}), empty)
    assert main(["index", str(empty), "--out", str(tmp_path / "i2")]) == 1
    assert "0 rows" in error_line(capsys) and not (tmp_path / "i2").exists()
    assert main(["umap", str(empty), "--out", str(tmp_path / "m.png")]) == 1
    assert "0 rows" in error_line(capsys) and not (tmp_path / "m.png").exists()

    query = tmp_path / "q.npy"
    np.save(query, np.ones(7, np.float32))
    assert main(["search", "--index", str(index_dir), "--query", str(query)]) == 1
    assert "7 dimensions but the index" in error_line(capsys)
    assert main(["search", "--index", str(index_dir), "--id", "99999"]) == 1
    assert "not a row of the index" in error_line(capsys)
    assert main(["search", "--index", str(index_dir)]) == 1
    assert "exactly one of --query FILE and --id N" in error_line(capsys)
    assert main(["search", "--index", str(index_dir), "--id", "0", "--instrument", "ctao"]) == 1
    assert "no vector of instrument 'ctao'" in error_line(capsys)
    assert main(["search", "--index", str(tmp_path / "nowhere"), "--id", "0"]) == 1
    assert "index folder not found" in error_line(capsys)
    broken = tmp_path / "broken"
    shutil.copytree(index_dir, broken)
    (broken / "index.faiss").write_bytes(b"not a faiss file")
    assert main(["search", "--index", str(broken), "--id", "0"]) == 1
    assert "not a readable FAISS index" in error_line(capsys)
    assert not list(tmp_path.glob(".*.tmp*"))  # no temporary files left behind


def test_every_latent_command_has_a_help_with_examples(capsys):
    for name in ("embed", "index", "search", "umap"):
        with pytest.raises(SystemExit) as exc:
            from skyfm.cli import cli

            cli.main(args=[name, "--help"], prog_name="skyfm")
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "Examples:" in out and f"skyfm {name}" in out, name


def test_embed_with_a_detector_folder_uses_its_backbone_and_its_sources(tmp_path, capsys):
    """--model DETECTOR_DIR: the detector's backbone embeds, the detector finds the sources of a file without truth."""
    pytest.importorskip("skyfm.detect")
    heads = pytest.importorskip("skyfm.heads")
    import torch
    from astropy.io import fits

    from skyfm.data.simulate import simulate_patch
    from skyfm.foundation import create_model
    from skyfm.latent.embed import read_embeddings

    torch.manual_seed(0)
    fm = create_model("skyfm-tiny", backbone={"depth": 1, "embed_dim": 32, "num_heads": 2})
    det = heads.SourceDetector.from_foundation(fm, ["meerlicht"], trunk_channels=16, trunk_depth=1, min_score=0.0101)
    det_dir = det.save_pretrained(tmp_path / "det")
    patch = simulate_patch("meerlicht", seed=3, size=64, bands=["q"])
    fits.PrimaryHDU(patch.data[0], header=patch.wcs.to_header()).writeto(tmp_path / "plain.fits")
    out = tmp_path / "d.parquet"
    assert main(["embed", str(tmp_path / "plain.fits"), "-i", "meerlicht", "--band", "q", "--model", str(det_dir),
                 "--out", str(out)]) == 0
    meta, vectors, info = read_embeddings(out)
    assert vectors.shape[1] == 32 + 32 and "detector backbone" in info["model"]
    rows = meta.to_pylist()
    assert sum(r["kind"] == "patch" for r in rows) == 1
    assert all(r["origin"] == "detector" and r["score"] is not None for r in rows if r["kind"] == "source")


def test_colours_by_category_and_by_flux(embeddings):
    from skyfm.errors import SkyfmError
    from skyfm.latent.embed import read_embeddings
    from skyfm.latent.explore import UNKNOWN_COLOR, _colours

    meta, _, _ = read_embeddings(embeddings)
    by_kind = _colours(meta, "kind")
    assert {e[0] for e in by_kind["legend"]} == {"patch", "source"} and len(by_kind["colors"]) == meta.num_rows
    by_flux = _colours(meta, "flux")
    flux = meta.column("flux").to_pylist()
    assert by_flux["numeric"]["label"] == "log10 flux"
    assert all((c == UNKNOWN_COLOR) == (f is None or f <= 0) for c, f in zip(by_flux["colors"], flux))
    with pytest.raises(SkyfmError, match="--color-by must be one of"):
        _colours(meta, "brightness")
