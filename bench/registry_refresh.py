"""
What the live registry adds to each call, against a baseline measured in the same
process (run: .venv/bin/python -m bench.registry_refresh).

- baseline ``get`` on a registry with no live source (what every call did before).
- ``refresh + get`` with ``registry.db`` attached and nothing changed: the
  per-call price of picking up ``callward tools load`` (one small SQLite read).
- ``refresh + get`` after a change: the full re-read (every stored version's
  digest recomputed), paid once per change, with TOOLS x VERSIONS stored.
- ``LiveRegistry.load``: one audited load (registry transaction plus two signed,
  fsynced audit records), as ``callward tools load`` pays it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench._common import EXAMPLES, configure_logging, print_table, summarize
from callward.audit import FileSigner, SQLiteAuditStore
from callward.core import ToolRegistry
from callward.core.registry import LiveRegistry, RegistryStore


def _tool_file(directory: Path, name: str, version: str) -> Path:
    path = directory / f"{name}_{version.replace('.', '_')}.py"
    path.write_text(
        "from callward.core import tool\n\n"
        f"@tool(version={version!r}, parameters={{'type': 'object', 'properties': "
        "{'x': {'type': 'integer'}}, 'required': ['x']})\n"
        f"def {name}(x: int) -> int:\n"
        f"    return x * {len(version)}\n")
    return path


def _time_us(function, repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tools", type=int, default=20)
    parser.add_argument("--versions", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=20000)
    args = parser.parse_args()
    configure_logging()

    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        plain = ToolRegistry()
        plain.load(EXAMPLES / "tools.py")

        audit = SQLiteAuditStore(root / "audit.db", FileSigner.load_or_create(root / "keys"))
        audit.open()
        store = RegistryStore(root / "registry.db")
        store.open()
        live_registry = ToolRegistry()
        live_registry.load(EXAMPLES / "tools.py")
        live_registry.attach(store)
        live = LiveRegistry(live_registry, store, audit)
        load_us = []
        for n in range(args.tools):
            for v in range(args.versions):
                path = _tool_file(root, f"tool_{n}", f"{v + 1}.0.0")
                started = time.perf_counter()
                live.load(path)
                load_us.append((time.perf_counter() - started) * 1e6)

        gateway_store = RegistryStore(root / "registry.db")
        gateway_store.open()
        gateway_registry = ToolRegistry()
        gateway_registry.load(EXAMPLES / "tools.py")
        gateway_registry.attach(gateway_store)

        baseline = _time_us(lambda: plain.get("square"), args.repeat)

        def refresh_and_get() -> None:
            gateway_registry.refresh()
            gateway_registry.get("square")

        unchanged = _time_us(refresh_and_get, args.repeat)

        def after_change() -> None:
            with store.change():
                pass  # bumps the generation only, as any change does
            started = time.perf_counter()
            refresh_and_get()
            changed.append((time.perf_counter() - started) * 1e6)

        changed: list[float] = []
        for _ in range(200):
            after_change()
        gateway_store.close()
        store.close()
        audit.close()

    base_p50 = summarize(baseline)[0]
    rows = []
    for label, samples in (("baseline get (no live source)", baseline),
                           ("refresh + get, nothing changed", unchanged),
                           (f"refresh + get after a change ({args.tools * args.versions} "
                            "versions stored)", changed),
                           ("LiveRegistry.load (2 signed records)", load_us)):
        p50, p99, _mean = summarize(samples)
        rows.append((label, len(samples), p50, p99, f"{p50 / base_p50:.1f}x"))
    print_table("Live registry cost per call, microseconds (busy machine: compare ratios)",
                ("what", "n", "p50 us", "p99 us", "p50 / baseline"), rows)


if __name__ == "__main__":
    main()
