"""The demo model, converted once per session and shared by the model test files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from callward.core.models._gguf import load_demo_model


@pytest.fixture(scope="session", name="model_cache")
def _model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """
    A fresh cache (the first load converts the GGUF), or ``$CALLWARD_TEST_MODEL_CACHE``:
    a cache converted before, whose manifest every load checks, to skip the conversion.
    """
    given = os.environ.get("CALLWARD_TEST_MODEL_CACHE")
    return Path(given) if given else tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session", name="demo_model")
def _demo_model(model_cache: Path):
    """The demo model in the dtype this CPU computes fastest (``auto``)."""
    return load_demo_model(model_cache)
