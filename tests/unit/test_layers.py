"""
The layers of DESIGN.md, kept: each part of callward imports only the layers below it.

kernel (``callward.core``'s own modules) → ``registry``, ``parse`` → the stages
``policies``, ``sandbox``, ``audit`` (never each other) → ``observe``, ``models`` →
``gateway`` → ``agent``, ``plans``, ``mcp`` → ``console`` → ``cli``. Parts of one layer
never import each other. Every import counts, deferred ones inside functions included. The face
``callward.core`` re-exports the kernel and its sub-packages ``registry`` and
``parse``, nothing above them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"core": "callward.core", "policies": "callward.policies",
           "sandbox": "callward.sandbox", "audit": "callward.audit"}
LAYERS: tuple[tuple[str, ...], ...] = (
    ("callward.core",),
    ("callward.core.registry", "callward.core.parse"),
    ("callward.policies", "callward.sandbox", "callward.audit"),
    ("callward.core.observe", "callward.core.models"),
    ("callward.core.gateway",),
    ("callward.core.agent", "callward.core.plans", "callward.core.mcp"),
    ("callward.core.console",),
    ("callward.core.cli",),
)
WIRING = ("callward.core.observe", "callward.core.models", "callward.core.gateway",
          "callward.core.agent", "callward.core.plans", "callward.core.mcp",
          "callward.core.console", "callward.core.cli")


def part_of(module: str) -> str:
    """The part (the longest name in LAYERS) a module belongs to."""
    parts = [name for layer in LAYERS for name in layer
             if module == name or module.startswith(name + ".")]
    return max(parts, key=len)


def rank_of(part: str) -> int:
    return next(rank for rank, layer in enumerate(LAYERS) if part in layer)


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    folder, *rest = relative.parts
    if rest and rest[-1] == "__init__":
        rest = rest[:-1]
    return ".".join([FOLDERS[folder], *rest])


def library_files() -> list[Path]:
    # The image's runner and model server run inside the container, on the standard library.
    return sorted(path for folder in FOLDERS for path in (ROOT / folder).rglob("*.py")
                  if "image" not in path.relative_to(ROOT).parts
                  and "examples" not in path.relative_to(ROOT).parts)


def callward_imports(path: Path) -> list[tuple[int, str]]:
    """Every ``callward`` module the file imports, with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            found += [(node.lineno, name) for name in names if name.startswith("callward.")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names
                      if alias.name.startswith("callward.")]
    return found


def violations() -> list[str]:
    found = []
    for path in library_files():
        here = part_of(module_name(path))
        if module_name(path) == "callward.core":
            here = "callward.core.registry"  # the face re-exports the kernel's sub-packages
        for line, imported in callward_imports(path):
            if imported.startswith("callward.core.") and imported.split(".")[2] not in {
                    name.split(".")[2] for layer in LAYERS[1:] for name in layer
                    if name.startswith("callward.core.")}:
                there = "callward.core"  # a kernel module, or a name of the face
            else:
                there = part_of(imported)
            if there == here or (module_name(path) == "callward.core" and rank_of(there) <= 1):
                continue
            if rank_of(there) >= rank_of(here):
                found.append(f"{path.relative_to(ROOT)}:{line} ({here}) imports {imported}")
    return found


class TestLayers:
    def test_every_import_points_down(self):
        """No library module imports its own layer's siblings or a layer above it."""
        expected: list[str] = []
        assert expected == violations()

    @pytest.mark.parametrize(
        "name", ["callward.core", "callward.core.types", "callward.policies",
                 "callward.sandbox", "callward.audit"]
    )
    def test_importing_the_kernel_or_a_stage_loads_no_wiring(self, name):
        """After importing the kernel or a stage in a fresh interpreter, no wiring is loaded."""
        code = (f"import sys, {name}; "
                f"print(sorted(m for m in sys.modules if m.startswith({WIRING!r})))")
        loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.strip()

        assert "[]" == loaded

    def test_the_checker_sees_an_import_that_points_up(self, tmp_path):
        """The check itself works: a stage importing the gateway is a violation."""
        expected = ("callward.policies", 7, 4)
        assert expected == (part_of("callward.policies._evaluator"),
                            rank_of(part_of("callward.core.cli._common")),
                            rank_of(part_of("callward.core.gateway._config")))
