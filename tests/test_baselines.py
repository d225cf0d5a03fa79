"""The baselines skyfm is measured against: sep, photutils (DAO, segmentation) and the Poisson TS map."""

import numpy as np
import pytest
from astropy.table import QTable

from skyfm.baselines import photutils_detect, sep_detect, tsmap_detect
from skyfm.catalog import match_catalogs
from skyfm.data.simulate import simulate_patch
from skyfm.errors import SkyfmError


@pytest.fixture(scope="module")
def optical():
    # a bright star in the middle of a quiet field, on an ideal detector
    return simulate_patch("meerlicht", seed=4, size=64, scene="field", contaminants=False,
                          inject={"x": [31.3], "y": [30.6], "mag": [15.5]})


@pytest.fixture(scope="module")
def wise():
    return simulate_patch("wise", seed=4, size=64, scene="field", contaminants=False,
                          inject={"x": [20.2], "y": [40.7], "mag": [13.0]})


@pytest.fixture(scope="module")
def gamma():
    return simulate_patch("ctao", seed=8, size=128, population="toy")


def _found(cat, x, y, r=1.5):
    return len(match_catalogs(cat, (np.array([x]), np.array([y])), r)[0]) == 1


@pytest.mark.parametrize("fn", [sep_detect, lambda p, **k: photutils_detect(p, "dao", **k),
                                lambda p, **k: photutils_detect(p, "segmentation", **k)],
                         ids=["sep", "dao", "segmentation"])
def test_optical_baselines_find_the_bright_star_with_flux_and_snr(optical, wise, fn):
    for patch, (x, y) in ((optical, (31.3, 30.6)), (wise, (20.2, 40.7))):
        cat = fn(patch)
        assert isinstance(cat, QTable)
        for col in ("x", "y", "flux", "flux_err", "score", "ra", "dec"):
            assert col in cat.colnames
        assert cat.meta["score_kind"] == "snr"
        assert _found(cat, x, y)
        i = int(np.argmax(np.asarray(cat["score"])))
        assert np.hypot(cat["x"][i].value - x, cat["y"][i].value - y) < 1.5
        true_flux = float(patch.truth["flux"][np.argmin(np.hypot(patch.truth["x"] - x, patch.truth["y"] - y))])
        assert 0.7 < cat["flux"][i].value / true_flux < 1.3


def test_one_band_of_a_multiband_image(wise):
    cat = sep_detect(wise, band="W1")
    assert _found(cat, 20.2, 40.7)
    with pytest.raises(SkyfmError):
        sep_detect(wise, band="q")


def test_tsmap_detect_with_true_and_estimated_background(gamma):
    truth = gamma.truth
    bright = truth[(np.asarray(truth["snr"]) >= 15) & (np.asarray(truth["extension"]) == 0)]
    assert len(bright) >= 1
    for bg in ("true", "estimated"):
        cat = tsmap_detect(gamma, background=bg)
        for col in ("x", "y", "glon", "glat", "flux", "flux_err", "pos_err", "score", "ts", "flux_band"):
            assert col in cat.colnames
        assert cat.meta["score_kind"] == "sqrt_ts"
        assert np.allclose(np.asarray(cat["score"]) ** 2, np.asarray(cat["ts"]))
        strong = cat[np.asarray(cat["score"]) >= 5]
        d, t, _ = match_catalogs(strong, bright, 2.0)
        assert len(t) >= 0.8 * len(bright), (bg, len(t), len(bright))


def test_tsmap_detect_refuses_what_it_cannot_do(optical, gamma):
    with pytest.raises(SkyfmError):
        tsmap_detect(optical)
    real_like = simulate_patch("ctao", seed=8, size=32, population="toy")
    real_like.background_image = None
    with pytest.raises(SkyfmError, match="estimated"):
        tsmap_detect(real_like, background="true")
    with pytest.raises(SkyfmError):
        photutils_detect(optical, method="iraf")


def test_sep_without_its_filter_splits_a_close_pair():
    # two equal stars 5 px apart (~1.3 FWHM in this seed's seeing): SExtractor's default filter merges them before
    # deblending; the crowded-field configuration, unfiltered, finds both
    from skyfm.baselines import BASELINES

    x0, y0, d = 30.0, 31.0, 5.0
    pair = simulate_patch("meerlicht", seed=4, size=64, scene="field", contaminants=False,
                          inject={"x": [x0, x0 + d], "y": [y0, y0], "mag": [16.0, 16.0]})

    def near_pair(cat):
        strong = cat[np.asarray(cat["score"]) >= 5]
        return int(np.sum(np.hypot(strong["x"].value - x0 - d / 2, strong["y"].value - y0) < d / 2 + 1.5))

    assert near_pair(sep_detect(pair)) == 1
    for cat in (BASELINES["sep-nofilter"](pair), sep_detect(pair, filter=False, minarea=3)):
        assert near_pair(cat) == 2
        assert _found(cat, x0, y0) and _found(cat, x0 + d, y0)
