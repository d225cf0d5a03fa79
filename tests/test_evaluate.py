"""`skyfm evaluate`: metrics of a catalog against a simulated truth or a reference catalog; one-line errors."""

import json

import numpy as np
import pytest
from astropy.table import Table

from skyfm.baselines import tsmap_detect
from skyfm.catalog import build_catalog, write_catalog
from skyfm.catalog.evaluate import evaluate
from skyfm.cli import main
from skyfm.data import write_patch
from skyfm.data.simulate import simulate_patch


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaluate")
    patch = simulate_patch("ctao", seed=8, population="toy", size=128)
    write_patch(patch, d / "sim.fits")
    cat = tsmap_detect(patch)
    write_catalog(cat, d / "cat.fits")
    t = patch.truth
    Table({"x": np.asarray(t["x"]), "y": np.asarray(t["y"]), "snr": np.asarray(t["snr"]),
           "flux": np.asarray(t["flux"])}).write(d / "truth.ecsv")
    return d, patch, cat


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("skyfm: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_evaluate_against_a_simulated_file_writes_table_plot_and_json(files, capsys):
    d, patch, cat = files
    rc = main(["evaluate", str(d / "cat.fits"), "--truth", str(d / "sim.fits"), "--min-score", "5",
               "--plot", str(d / "eval.png"), "--json", str(d / "eval.json")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "precision" in out and "recall" in out and "F1" in out and "snr 5-10" in out
    assert "CRB" in out and "68% interval coverage" in out
    res = json.loads((d / "eval.json").read_text())
    assert 0.6 < res["detection"]["f1"] <= 1.0
    assert res["detection"]["radius_pix"] == 3.0
    assert res["localization"]["median_sep_over_crb"] > 0.5
    assert (d / "eval.png").stat().st_size > 10_000


def test_evaluate_against_a_plain_table_and_a_reference(files, capsys):
    d, patch, cat = files
    rc = main(["evaluate", str(d / "cat.fits"), "--truth", str(d / "truth.ecsv"), "--radius", "2",
               "--reference", str(d / "cat.fits")])
    out = capsys.readouterr().out
    assert rc == 0 and "match radius 2 pix" in out and "association with" in out
    res = evaluate(cat, None, cat)
    assert res["association"]["fraction"] == 1.0


def test_bad_inputs_are_one_line_errors_and_write_nothing(files, tmp_path, capsys):
    d, _, _ = files
    (tmp_path / "noxy.csv").write_text("a,b\n1,2\n")
    (tmp_path / "junk.fits").write_text("not a fits file")
    out_json = tmp_path / "out.json"
    cases = [
        [str(tmp_path / "missing.fits"), "--truth", str(d / "sim.fits")],
        [str(d / "cat.fits")],
        [str(tmp_path / "noxy.csv"), "--truth", str(d / "sim.fits")],
        [str(d / "cat.fits"), "--truth", str(tmp_path / "noxy.csv")],
        [str(tmp_path / "junk.fits"), "--truth", str(d / "sim.fits")],
        [str(d / "cat.fits"), "--truth", str(d / "sim.fits"), "--radius", "0"],
        [str(d / "cat.fits"), "--truth", str(d / "sim.fits"), "--plot", str(tmp_path / "plot.jpg")],
        [str(tmp_path / "noxy.csv"), "--reference", str(d / "cat.fits")],
        [str(d / "cat.fits"), "--truth", str(tmp_path)],
    ]
    for args in cases:
        rc = main(["evaluate", *args, "--json", str(out_json)])
        assert rc == 1, args
        _one_line_error(capsys)
        assert not out_json.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.fits", "noxy.csv"]


def test_a_catalog_without_sky_coordinates_still_evaluates_in_pixels(tmp_path, capsys):
    truth = Table({"x": [10.0, 30.0], "y": [10.0, 30.0], "snr": [20.0, 20.0]})
    truth.write(tmp_path / "t.ecsv")
    write_catalog(build_catalog([10.2, 50.0], [9.9, 50.0], score=[9.0, 3.0]), tmp_path / "c.ecsv")
    assert main(["evaluate", str(tmp_path / "c.ecsv"), "--truth", str(tmp_path / "t.ecsv")]) == 0
    out = capsys.readouterr().out
    assert "precision 0.500" in out and "recall 0.500" in out


def test_truth_crb_of_an_empty_sky_is_empty():
    """An image without a true source (MeerLICHT's empty scenes can have none) gives no bounds, not an error."""
    from skyfm.catalog.evaluate import truth_crb

    p = simulate_patch("meerlicht", 3, size=64, bands=["q"])
    crb, isolated = truth_crb(p.truth[:0], p)
    assert crb.shape == (0,) and isolated.shape == (0,)
    crb, isolated = truth_crb(p.truth, p)
    assert crb.shape == isolated.shape == (len(p.truth),)


def test_class_metrics_count_what_the_catalog_called_each_true_class(capsys):
    from skyfm.catalog.evaluate import format_results
    from skyfm.catalog.metrics import rank_auc

    # six true sources 20 px apart: four stars, two galaxies; the catalog calls one star a galaxy and ranks the
    # galaxies' probabilities above every star's but that one
    x = np.arange(6) * 20.0 + 10
    truth = Table({"x": x, "y": np.full(6, 10.0), "snr": np.full(6, 20.0),
                   "class": ["star", "star", "star", "star", "galaxy", "galaxy"]})
    p_gal = np.array([0.1, 0.2, 0.3, 0.7, 0.6, 0.9])
    cat = build_catalog(x + 0.3, np.full(6, 10.0), class_names=["star", "galaxy"],
                        class_prob=np.stack([1 - p_gal, p_gal], axis=1))
    res = evaluate(cat, truth, radius_pix=2.0)
    c = res["classification"]
    assert c["n"] == 6 and c["truth_key"] == "class"
    assert c["confusion"] == [[3, 1], [0, 2]]
    assert c["accuracy"] == pytest.approx(5 / 6)
    assert c["per_class"]["star"]["completeness"] == pytest.approx(0.75)
    assert c["per_class"]["galaxy"]["purity"] == pytest.approx(2 / 3)
    assert c["per_class"]["galaxy"]["auc"] == pytest.approx(7 / 8)  # one of 8 star-galaxy pairs out of order
    onehot = np.array([[1, 0]] * 4 + [[0, 1]] * 2)
    assert c["brier"] == pytest.approx(np.mean(((np.stack([1 - p_gal, p_gal], 1) - onehot) ** 2).sum(1)))
    text = format_results(res)
    assert "accuracy 0.833" in text and "galaxy" in text
    assert rank_auc([True, False], [0.5, 0.5]) == 0.5 and np.isnan(rank_auc([True], [1.0]))
    # a truth without classes, or classes the catalog does not know: no class section
    assert "classification" not in evaluate(cat, truth[["x", "y", "snr"]], radius_pix=2.0)
    truth["class"] = ["qso"] * 6
    assert "classification" not in evaluate(cat, truth, radius_pix=2.0)
    # a catalog with no rows (nothing found): every true source missed, no class called
    truth["class"] = ["star"] * 6
    empty = evaluate(cat[:0], truth, radius_pix=2.0)
    assert empty["detection"]["fn"] == 6 and empty["detection"]["f1"] == 0
    assert "classification" not in empty
