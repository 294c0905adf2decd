"""
Model tools through the gateway: cold and warm latency of embed_search, summarize and
sentiment, the memory each loaded model holds, and what unloading it gives back.

Run: .venv/bin/python -m bench.model_tools [--home DIR] [--warm N]   (needs the Docker Engine)

- cold: the worker is unloaded first, so the call starts a container and loads the
  model (torch import + weights) before answering;
- warm: the same call again on the loaded worker;
- baseline, in the same process: the same op answered by the model server's own
  classes loaded in this process (no container, no policy, no audit), so the ratio
  says what isolation and governance add to a warm call;
- memory: the worker's cgroup usage (as ``docker stats`` counts it) while loaded,
  what ``unload`` reports, and the host's MemAvailable before and after unloading.

The generator is the demo model (Qwen2.5-Coder-0.5B, bf16); its first conversion
takes minutes and is not measured here (pass --home with a converted models/ cache).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench._common import configure_logging, print_table, summarize
from callward.core import ToolCall
from callward.core.gateway import Gateway
from callward.core.gateway._config import example_config_path
from callward.core.models._tools import example_collection_path
from callward.sandbox._model_worker import server_script

POLICY = """
version: 1
default: deny
principals:
  bench: {roles: [reader]}
rules:
  - {id: bench-uses-models, effect: allow, roles: [reader],
     tools: [embed_search, summarize, sentiment]}
"""
MIB = 1 << 20


def _article() -> str:
    line = example_collection_path().read_text(encoding="utf-8").splitlines()[0]
    return str(json.loads(line)["text"])


CASES: dict[str, dict[str, Any]] = {
    "embed_search": {"query": "a vaccine that protects children from malaria", "k": 3},
    "summarize": {"text": _article(), "max_words": 30},
    "sentiment": {"text": "The service was terrible and the food made me sick."},
}
WORKER = {"embed_search": "minilm", "summarize": "generator", "sentiment": "generator"}


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _timed(action: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    value = action()
    return (time.perf_counter() - started) * 1000, value


def _in_process_servers(gateway: Gateway) -> dict[str, Any]:
    """The model server's classes, loaded here on the same weights (the baseline)."""
    spec = importlib.util.spec_from_file_location("_model_server", server_script())
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    torch.set_num_threads(1)  # the worker has one core too
    workers = gateway.runner.workers  # type: ignore[attr-defined]
    embed = workers.spec("minilm")
    generate = workers.spec("generator")
    return {
        "minilm": module.EmbedServer(torch, transformers, str(embed.weights_dir),
                                     str(embed.collection)),
        "generator": module.GenerateServer(torch, transformers, str(generate.weights_dir),
                                           generate.max_input_tokens),
    }


def run(home: Path, warm: int, cold: int) -> None:
    config = home / "bench-config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "policy.yaml").write_text(POLICY, encoding="utf-8")
    (config / "callward.yaml").write_text(yaml.safe_dump({
        "tools": [str(example_config_path().parent / "tools.py")], "policy": "policy.yaml",
        "models_as_tools": {"memory_budget_mebibytes": 4096},
    }), encoding="utf-8")
    counter = iter(range(1, 1 << 30))
    latency_rows = []
    memory_rows = []
    with Gateway.from_config(config / "callward.yaml", home=home) as gateway:
        workers = gateway.runner.workers  # type: ignore[attr-defined]

        def call(tool: str) -> float:
            request = ToolCall.create(id=f"b{next(counter)}", name=tool,
                                      arguments=CASES[tool], dialect="api")
            elapsed, result = _timed(lambda: gateway.handle(request, principal="bench"))
            if result.kind != "ok":  # type: ignore[attr-defined]
                raise SystemExit(f"{tool} ended {result.kind}: {result.content}")  # type: ignore[attr-defined]
            return elapsed

        results: dict[str, tuple[list[float], list[float]]] = {}
        for tool in CASES:
            cold_ms = []
            for _ in range(cold):
                workers.unload(WORKER[tool])
                cold_ms.append(call(tool))
            warm_ms = [call(tool) for _ in range(warm)]
            results[tool] = (cold_ms, warm_ms)
        servers = _in_process_servers(gateway)
        for tool, (cold_ms, warm_ms) in results.items():
            server = servers[WORKER[tool]]
            server.handle(tool, CASES[tool])  # the first call in a process pays one-off costs
            base_ms = [_timed(lambda s=server, t=tool: s.handle(t, CASES[t]))[0]
                       for _ in range(warm)]
            cold_p50, _cold_p99, _ = summarize(cold_ms)
            warm_p50, warm_p99, _ = summarize(warm_ms)
            base_p50, _base_p99, _ = summarize(base_ms)
            latency_rows.append((tool, len(cold_ms), cold_p50, max(cold_ms), len(warm_ms),
                                 warm_p50, warm_p99, base_p50,
                                 f"{warm_p50 / base_p50:.2f}x", f"{cold_p50 / warm_p50:.0f}x"))
        del servers
        for name in ("minilm", "generator"):
            workers.load(name)
        for info in workers.loaded():
            before = _mem_available()
            held = workers.unload(info.name)
            time.sleep(1.0)  # the kernel frees the cgroup's pages as the container goes
            after = _mem_available()
            memory_rows.append((info.name, info.digest[:12], info.memory_limit_bytes // MIB,
                                (info.memory_bytes or 0) / MIB,
                                (info.memory_with_cache_bytes or 0) / MIB, (held or 0) / MIB,
                                (after - before) / MIB))
    print_table(
        "Model tools through the gateway (ms; baseline = same op in this process, no "
        "container/policy/audit)",
        ["tool", "cold n", "cold p50", "cold max", "warm n", "warm p50", "warm p99",
         "in-process p50", "warm/in-process", "cold/warm"],
        latency_rows,
    )
    print_table(
        "Memory per loaded model (MiB; held = cgroup usage less inactive page cache, "
        "as docker stats counts it)",
        ["worker", "digest", "limit", "held while loaded", "with page cache", "unload reported",
         "host MemAvailable gained"],
        memory_rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", help="CALLWARD_HOME whose models/ cache to use")
    parser.add_argument("--warm", type=int, default=10, help="warm calls per tool")
    parser.add_argument("--cold", type=int, default=2, help="cold calls per tool")
    args = parser.parse_args()
    configure_logging()
    with tempfile.TemporaryDirectory() as scratch:
        run(Path(args.home) if args.home else Path(scratch), args.warm, args.cold)


if __name__ == "__main__":
    main()
