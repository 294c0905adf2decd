"""The demo model, converted once and loaded once per dtype, shared by the model test files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from callward.core.models._chat import TransformersChatModel
from callward.core.models._cpu import choose_dtype, cpu_flags
from callward.core.models._gguf import load_demo_model


@pytest.fixture(scope="session", name="model_cache")
def _model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """
    ``$CALLWARD_TEST_MODEL_CACHE`` (``make test`` sets it to the copy ``make model``
    converted), whose manifest every load checks; else a fresh cache, which the first
    load converts (about a minute on 2 cores).
    """
    given = os.environ.get("CALLWARD_TEST_MODEL_CACHE")
    return Path(given) if given else tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session", name="demo_model_in")
def _demo_model_in(model_cache: Path) -> Callable[[str], TransformersChatModel]:
    """
    The demo model in a dtype (``float32`` or ``bfloat16``), loaded once per session.
    Tests that care about its prefix cache set their own (``model.prefix_cache``).
    """
    loaded: dict[str, TransformersChatModel] = {}

    def load(dtype: str) -> TransformersChatModel:
        if dtype not in loaded:
            loaded[dtype] = load_demo_model(model_cache, dtype=dtype)
        return loaded[dtype]

    return load


@pytest.fixture(scope="session", name="demo_model")
def _demo_model(demo_model_in: Callable[[str], TransformersChatModel]) -> TransformersChatModel:
    """The demo model in the dtype this CPU computes fastest (``auto``)."""
    return demo_model_in(choose_dtype(cpu_flags()).dtype)
