"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "core" / "examples"


@pytest.fixture(name="examples")
def _examples() -> Path:
    """The shipped example configuration, tools and policy."""
    return EXAMPLES


@pytest.fixture(name="home")
def _home(tmp_path: Path) -> Path:
    """A fresh CALLWARD_HOME under tmp_path."""
    path = tmp_path / "home"
    path.mkdir()
    return path
