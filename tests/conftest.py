"""Fixtures several test files share."""
import pytest

from data import build_synthetic_dataset


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """The small synthetic set the smoke config trains on (64 training records, 32-pixel images), built once per
    session; tests read it and never write into it (test_data.py builds its own, larger one)."""
    out = str(tmp_path_factory.mktemp("synthetic"))
    build_synthetic_dataset(out, seed=0, n_train=64, n_val=8, n_test=16, image_size=32)
    return out
