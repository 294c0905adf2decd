"""
Model tools in the live registry while a gateway runs: the real CLI in another process
lists the worker (``callward models list``), withdraws and reinstates ``embed_search``
(the real MiniLM from the pinned wheel); the running gateway object stops and restarts
its worker on the real Docker Engine. Real SQLite registry and audit log, real keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import docker
import pytest
import yaml

from callward.core import ToolCall
from callward.core.gateway import Gateway
from callward.sandbox._limits import OWNER_LABEL, OWNER_PID_LABEL

POLICY = """
version: 1
default: deny
principals:
  alice: {roles: [reader]}
rules:
  - {id: readers-search, effect: allow, roles: [reader], tools: [embed_search]}
"""


@pytest.fixture(name="own_leftover_containers")
def _own_leftover_containers(engine: docker.DockerClient) -> Callable[[], list[str]]:
    """Ids of containers labelled callward that this very process owns."""

    def leftovers() -> list[str]:
        mine = {"label": [OWNER_LABEL, f"{OWNER_PID_LABEL}={os.getpid()}"]}
        return [str(c["Id"]) for c in engine.api.containers(all=True, filters=mine)]

    return leftovers


@pytest.fixture(name="config")
def _config(tmp_path: Path, examples: Path) -> Path:
    """Only embed_search: MiniLM loads in seconds and needs no converted model."""
    (tmp_path / "policy.yaml").write_text(POLICY, encoding="utf-8")
    path = tmp_path / "callward.yaml"
    path.write_text(yaml.safe_dump({
        "tools": [str(examples / "tools.py")],
        "policy": "policy.yaml",
        "sandbox": {"runtime": "runc"},
        "models_as_tools": {"tools": ["embed_search"], "memory_budget_mebibytes": 2048},
    }), encoding="utf-8")
    return path


@pytest.fixture(name="tools")
def _tools(cli, config: Path):
    """`callward tools ...` in another process, on the gateway's home and configuration."""

    def run(*args: str):
        done = cli("tools", *args, "--config", str(config))
        assert 0 == done.returncode, done.stderr
        return json.loads(done.stdout) if done.stdout.startswith(("[", "{")) else done.stdout

    return run


def search(query: str) -> ToolCall:
    return ToolCall.create(id=f"c-{abs(hash(query)) % 10**8}", name="embed_search",
                           arguments={"query": query, "k": 2}, dialect="api")


def _models_list(cli) -> list[dict[str, object]]:
    """`callward models list --json` in another process: the engine's worker containers."""
    done = cli("models", "list", "--json")
    assert 0 == done.returncode, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def _exists(engine: docker.DockerClient, container_id: str) -> bool:
    try:
        engine.api.inspect_container(container_id)
    except docker.errors.NotFound:
        return False
    return True


def test_unload_from_the_cli_stops_the_worker_and_activate_brings_it_back(
    engine, config, home, cli, tools, own_leftover_containers
):
    """Warm worker; `tools unload` → unknown_tool and no container; `tools activate` → a new one."""
    before = set(own_leftover_containers())
    with Gateway.from_config(config, home=home) as gateway:
        spec = gateway.registry.require("embed_search")
        warm = gateway.handle(search("a vaccine against malaria"), principal="alice")
        (worker,) = gateway.runner.workers.loaded()
        listed = {e["ref"]: e for e in tools("list", "--json")}
        running = _models_list(cli)

        (unloaded,) = tools("unload", "embed_search@1.0.0")
        gone = gateway.handle(search("interest rates"), principal="alice")
        stopped = (_exists(engine, worker.container_id), gateway.runner.workers.loaded())
        table = tools("list")
        after_unload = _models_list(cli)

        (activated,) = tools("activate", "embed_search@1.0.0")
        back = gateway.handle(search("airline pilots on strike"), principal="alice")
        (again,) = gateway.runner.workers.loaded()
        records = list(gateway.audit.records())  # type: ignore[attr-defined]

    assert "ok" == warm.kind
    entry = listed["embed_search@1.0.0"]
    assert (spec.digest, "config", "models_as_tools", True) == (
        entry["digest"], entry["origin"], entry["source_path"], entry["active"])
    assert spec.model.to_json() == entry["model"]
    assert "all-MiniLM-L6-v2" == entry["model"]["name"]
    assert ("tool.unloaded", spec.digest) == (unloaded["kind"], unloaded["digest"])
    assert "unknown_tool" == gone.kind
    assert (False, ()) == stopped
    (shown,) = [w for w in running if w["container_id"] == worker.container_id]
    assert ("minilm", str(os.getpid()), "running") == (shown["worker"], shown["owner_pid"],
                                                      shown["state"])
    assert 0 < shown["memory_bytes"] < shown["memory_limit_bytes"] == worker.memory_limit_bytes
    assert worker.container_id not in [w["container_id"] for w in after_unload]
    assert "unloaded" in next(line for line in table.splitlines()
                              if line.startswith("embed_search"))
    assert ("tool.activated", spec.digest) == (activated["kind"], activated["digest"])
    assert "ok" == back.kind
    assert worker.container_id != again.container_id
    changes = [r for r in records if r.kind in ("tool.unloaded", "call.denied", "tool.activated")]
    assert ["tool.unloaded", "call.denied", "tool.activated"] == [r.kind for r in changes]
    assert "unknown_tool" in json.dumps(changes[1].body)
    verified = cli("audit", "verify")
    assert 0 == verified.returncode, verified.stderr
    assert set() == set(own_leftover_containers()) - before
