import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED_DATA


os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def untrained_detector(tmp_path_factory):
    """save(instruments) -> the folder of a tiny untrained detector with heads for ``instruments`` (seeded; its
    threshold just above the heads' prior, so that it detects): for tests of what happens around the network."""

    def save(instruments) -> Path:
        import torch

        from skyfm.foundation import create_model
        from skyfm.heads import SourceDetector

        torch.manual_seed(0)
        fm = create_model("skyfm-tiny", backbone={"depth": 1, "embed_dim": 32, "num_heads": 2})
        det = SourceDetector.from_foundation(fm, list(instruments), trunk_channels=16, trunk_depth=1,
                                            min_score=0.0101)
        return det.save_pretrained(tmp_path_factory.mktemp("det") / "model")

    return save

