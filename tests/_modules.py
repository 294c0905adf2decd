"""Source files the tests load as modules without importing them by name."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def module_from_file(name: str, path: Path) -> ModuleType:
    """
    A fresh module ``name`` run from ``path``: a script of the sandbox image (which
    cannot be imported as part of callward), an example tool file, or another test
    directory's conftest (which pytest would otherwise register a second time).
    """
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
