"""The public surface of each subpackage, and what importing it loads."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest

PACKAGES = ["callward.core", "callward.policies", "callward.sandbox", "callward.audit"]


def _isort_style(name: str) -> tuple[int, str]:
    """ruff's RUF022 order: CONSTANTS, then Classes, then functions, each alphabetical."""
    if name.isupper():
        return (0, name)
    return (1 if name[0].isupper() else 2, name)


def _public_names(module: ModuleType) -> set[str]:
    """
    The names a face binds, and those its ``__getattr__`` serves lazily (which its
    ``__dir__`` lists), that are not private, a module, or ``annotations``. A name
    served with a warning (a deprecated one) is not public: it raises here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return {
            attribute
            for attribute in dir(module)
            if not attribute.startswith("_")
            and not isinstance(getattr(module, attribute), type(sys))
        } - {"annotations"}


class TestExportedMembers:
    @pytest.mark.parametrize("name", PACKAGES)
    def test_all_is_sorted_and_complete(self, name):
        """
        __all__ is sorted (constants, classes, functions) and lists every public name,
        bound by the face or served lazily by its __getattr__.
        """
        module = importlib.import_module(name)
        public = _public_names(module)

        assert sorted(module.__all__, key=_isort_style) == list(module.__all__)
        assert set(module.__all__) == public


class TestLazyImports:
    @pytest.mark.parametrize(
        ("name", "forbidden"),
        [
            ("callward.policies", ["docker", "torch", "callward.sandbox", "callward.audit"]),
            ("callward.audit", ["docker", "torch", "callward.sandbox", "callward.policies"]),
            ("callward.sandbox", ["torch", "callward.audit", "callward.policies"]),
            ("callward.core", ["docker", "torch", "callward.sandbox", "callward.audit",
                               "callward.policies"]),
        ],
    )
    def test_subpackages_do_not_load_each_other(self, name, forbidden):
        """Each subpackage depends on core only; policies never loads docker or torch."""
        code = (
            f"import sys, {name}; "
            f"print(','.join(m for m in {forbidden!r} if m in sys.modules))"
        )
        loaded = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()

        assert "" == loaded


def test_test_modules_have_unique_names():
    """
    tests/ has no __init__.py, so pytest imports every test module by its file name:
    two files of one name (e.g. unit and integration test_secrets.py) stop collection.
    """
    root = Path(__file__).resolve().parents[1]
    names = [path.name for path in root.rglob("*.py") if path.name != "conftest.py"]

    assert [] == sorted({name for name in names if names.count(name) > 1})
