"""The public API of callward.sandbox is exactly its sorted __all__."""

from __future__ import annotations

import types

import callward.sandbox


class TestExports:
    def test_all_is_sorted(self) -> None:
        """__all__ is kept sorted, so a reviewer sees additions at a glance."""
        expected = sorted(callward.sandbox.__all__)

        assert expected == callward.sandbox.__all__

    def test_all_lists_every_public_name(self) -> None:
        """Every public, non-module name of the package is in __all__, and nothing else."""
        public = {
            name
            for name, value in vars(callward.sandbox).items()
            if not name.startswith("_") and not isinstance(value, types.ModuleType)
        }

        expected = set(callward.sandbox.__all__)
        assert expected == public
