"""
Model tools end to end: real Docker Engine, real MiniLM from the pinned wheel, a tiny
random-weight Qwen2 built here for summarize/sentiment, real SQLite log and keys.

Workers load in seconds, so the gateway (and its warm workers) is shared by the
module; the tests of limits and lifecycle drive ``ModelWorkers`` directly.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest
import yaml

from callward.audit import verify
from callward.core import ToolCall
from callward.core.gateway import Gateway
from callward.core.gateway._config import example_config_path
from callward.core.models._tools import ModelToolsSettings, model_tool_set
from callward.core.types import MIB
from callward.sandbox import ModelWorkers, WorkerSpec, server_sha256
from callward.sandbox._limits import OWNER_LABEL, OWNER_PID_LABEL
from tests._modules import module_from_file

POLICY = """
version: 1
default: deny
principals:
  alice: {roles: [reader]}
  mallory: {roles: [guest]}
rules:
  - {id: readers-use-models, effect: allow, roles: [reader],
     tools: [embed_search, summarize, sentiment]}
"""
LABELS = {"positive", "negative", "neutral"}


def _tiny_qwen2_builder() -> Callable[[Path], Path]:
    """The unit tests' tiny Qwen2 builder (one definition of the tiny model)."""
    path = Path(__file__).resolve().parents[2] / "unit" / "models" / "conftest.py"
    module = module_from_file("_tiny_qwen2", path)
    return module.build_tiny_qwen2  # type: ignore[no-any-return]


@pytest.fixture(scope="module", name="tiny_dir")
def _tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = _tiny_qwen2_builder()(tmp_path_factory.mktemp("tiny-qwen2"))
    # safetensors writes 0600 files; the worker reads them as nobody.
    for path in (directory, *directory.iterdir()):
        path.chmod(path.stat().st_mode | 0o005)
    return directory


@pytest.fixture(name="own_leftover_containers")
def _own_leftover_containers(engine: docker.DockerClient) -> Callable[[], list[str]]:
    """Ids of containers labelled callward that this very process owns."""

    def leftovers() -> list[str]:
        mine = {"label": [OWNER_LABEL, f"{OWNER_PID_LABEL}={os.getpid()}"]}
        return [str(c["Id"]) for c in engine.api.containers(all=True, filters=mine)]

    return leftovers


@pytest.fixture(scope="module", name="gateway_home")
def _gateway_home(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("model-tools")
    (root / "policy.yaml").write_text(POLICY, encoding="utf-8")
    tools = example_config_path().parent / "tools.py"
    (root / "callward.yaml").write_text(yaml.safe_dump({
        "tools": [str(tools)],
        "policy": "policy.yaml",
        "models_as_tools": {"generator": {"directory": str(tiny_dir), "memory_mebibytes": 1024},
                            "memory_budget_mebibytes": 3072},
    }), encoding="utf-8")
    return root


@pytest.fixture(scope="module", name="gateway")
def _gateway(engine: docker.DockerClient, gateway_home: Path) -> Iterator[Gateway]:
    with Gateway.from_config(gateway_home / "callward.yaml", home=gateway_home / "home") as gw:
        yield gw
    verify(gateway_home / "home" / "audit.db", gateway_home / "home" / "keys" /
           "audit-ed25519.pub")


def call(name: str, **arguments: object) -> ToolCall:
    return ToolCall.create(id=f"c-{name}-{abs(hash(repr(arguments))) % 10**8}", name=name,
                           arguments=arguments, dialect="api")  # type: ignore[arg-type]


def completed(gateway: Gateway, call_id: str) -> dict[str, object]:
    return next(r.body for r in gateway.audit.records()  # type: ignore[attr-defined]
                if r.kind == "call.completed" and r.body["call_id"] == call_id)


def authorized(gateway: Gateway, call_id: str) -> dict[str, object]:
    return next(r.body for r in gateway.audit.records()  # type: ignore[attr-defined]
                if r.kind == "call.authorized" and r.body["call"]["id"] == call_id)


class TestEmbedSearch:
    def test_an_obvious_query_finds_its_article(self, gateway):
        """The real MiniLM ranks the malaria vaccine article first for a question about it."""
        request = call("embed_search", query="a vaccine that protects children from malaria",
                       k=3)

        result = gateway.handle(request, principal="alice")

        assert "ok" == result.kind
        hits = result.content["hits"]
        assert "n05" == hits[0]["id"]
        assert 3 == len(hits)
        assert hits[0]["score"] > hits[1]["score"]
        assert "malaria" in hits[0]["text"]

    def test_the_records_name_the_model(self, gateway):
        """call.authorized names all-MiniLM-L6-v2, its version and weights digest."""
        request = call("embed_search", query="interest rates")
        gateway.handle(request, principal="alice")

        tool = authorized(gateway, request.id)["tool"]

        spec = gateway.registry.require("embed_search")
        assert {"name": "all-MiniLM-L6-v2", "version": "0.1.0",
                "sha256": spec.model.sha256} == tool["model"]
        assert spec.digest == tool["digest"]

    def test_the_worker_stays_warm(self, gateway):
        """Two calls are answered by one container: the model is not loaded again."""
        first = call("embed_search", query="wildfire near the coast")
        second = call("embed_search", query="airline pilots on strike")

        gateway.handle(first, principal="alice")
        gateway.handle(second, principal="alice")

        one = completed(gateway, first.id)["usage"]["container_id"]
        two = completed(gateway, second.id)["usage"]["container_id"]
        assert one == two
        assert [] != [w for w in gateway.runner.workers.loaded()
                      if w.container_id.startswith(one) and w.requests >= 2]


class TestGenerator:
    def test_summarize_returns_a_summary(self, gateway):
        """summarize runs the generator greedily and returns its text and token counts."""
        result = gateway.handle(call("summarize", text="The council approved new homes.",
                                     max_words=10), principal="alice")

        assert "ok" == result.kind
        assert isinstance(result.content["summary"], str)
        assert 20 == result.content["output_tokens"]

    def test_sentiment_is_always_one_of_three_labels(self, gateway):
        """sentiment answers by comparing label scores: never free text."""
        results = [gateway.handle(call("sentiment", text=text), principal="alice")
                   for text in ("I love it", "This is awful", "It is Tuesday")]

        assert ["ok"] * 3 == [r.kind for r in results]
        assert {r.content["label"] for r in results} <= LABELS
        assert all(abs(sum(r.content["scores"].values()) - 1) < 1e-3 for r in results)

    def test_summarize_and_sentiment_share_the_worker(self, gateway):
        """One generator worker answers both tools."""
        first = call("summarize", text="Markets fell.", max_words=5)
        second = call("sentiment", text="Markets fell.")

        gateway.handle(first, principal="alice")
        gateway.handle(second, principal="alice")

        assert (completed(gateway, first.id)["usage"]["container_id"]
                == completed(gateway, second.id)["usage"]["container_id"])

    def test_a_denied_call_never_reaches_the_worker(self, gateway):
        """mallory may not call sentiment: denied, audited, and the worker saw no request."""
        before = {w.name: w.requests for w in gateway.runner.workers.loaded()}

        result = gateway.handle(call("sentiment", text="hello"), principal="mallory")

        after = {w.name: w.requests for w in gateway.runner.workers.loaded()}
        assert "permission" == result.kind
        assert "call.denied" == gateway.audit.last().kind  # type: ignore[attr-defined]
        assert before == after

    def test_arguments_outside_the_schema_are_denied(self, gateway):
        """A text longer than the schema allows is denied before any worker sees it."""
        result = gateway.handle(call("sentiment", text="x" * 9000), principal="alice")

        assert "schema" == result.kind


@pytest.fixture(name="workers")
def _workers(engine: docker.DockerClient, tiny_dir: Path, tmp_path: Path,
             own_leftover_containers) -> Iterator[ModelWorkers]:
    tool_set = model_tool_set(ModelToolsSettings(generator_directory=tiny_dir,
                                                 generator_memory_bytes=1024 * MIB),
                              model_cache=tmp_path / "models", server_sha256=server_sha256())
    specs = {name: WorkerSpec(name=r.name, task=r.task,  # type: ignore[arg-type]
                              weights_dir=r.weights_dir, digest=r.digest, limits=r.limits,
                              collection=r.collection, load_seconds=r.load_seconds)
             for name, r in tool_set.workers.items()}
    # The module's gateway keeps its own workers meanwhile: only new containers count.
    before = set(own_leftover_containers())
    # Room for one 1 GiB worker at a time, so loading the other evicts the first.
    with ModelWorkers(specs, memory_budget_bytes=1536 * MIB) as workers:
        yield workers
    assert set() == set(own_leftover_containers()) - before


def _exists(engine: docker.DockerClient, container_id: str) -> bool:
    try:
        engine.api.inspect_container(container_id)
    except docker.errors.NotFound:
        return False
    return True


class TestWorkerLifecycle:
    def test_unload_stops_the_container_and_reports_its_memory(self, workers, engine):
        """unload removes the worker's container and returns the memory it held."""
        loaded = workers.load("generator")
        assert _exists(engine, loaded.container_id)

        held = workers.unload("generator")

        assert held is not None
        assert held > 0
        assert not _exists(engine, loaded.container_id)
        assert () == workers.loaded()

    def test_loaded_reports_memory_per_worker(self, workers):
        """loaded() names each worker with its cgroup memory, under its limit."""
        workers.load("generator")

        (info,) = workers.loaded()

        assert "generator" == info.name
        assert info.memory_bytes is not None
        assert 0 < info.memory_bytes < info.memory_limit_bytes

    def test_the_engine_stats_agree_where_cgroups_cannot_be_read(self, workers):
        """The docker stats fallback (remote engines) reports usage under the limit too."""
        info = workers.load("generator")

        usage = workers._stats_usage(info.container_id)

        assert usage is not None
        assert 0 < usage[0] - usage[1] < info.memory_limit_bytes

    def test_least_recently_used_is_evicted_under_the_budget(self, workers, engine):
        """With room for one worker, loading the second stops the first (LRU)."""
        first = workers.load("generator")

        second = workers.load("minilm")

        assert ["minilm"] == [w.name for w in workers.loaded()]
        assert not _exists(engine, first.container_id)
        assert _exists(engine, second.container_id)

    def test_an_evicted_worker_reloads_on_demand(self, workers):
        """A request to an evicted worker starts it again and is answered."""
        workers.load("generator")
        workers.load("minilm")
        limits = workers.spec("generator").limits

        execution = workers.request("generator", "sentiment", {"text": "fine"}, limits)

        assert "ok" == execution.kind
        assert ["generator"] == [w.name for w in workers.loaded()]


class TestWorkerLimits:
    def test_a_request_past_its_deadline_is_a_timeout_and_the_worker_is_replaced(
        self, workers, engine
    ):
        """A 400-token summary under a 1 ms deadline: timeout; the next call gets a new worker."""
        limits = workers.spec("generator").limits
        old = workers.load("generator", limits=dataclasses.replace(limits, wall_seconds=0.001))
        tight = dataclasses.replace(limits, wall_seconds=0.001)

        execution = workers.request("generator", "summarize",
                                    {"text": "Rates were held.", "max_words": 200}, tight)

        assert "timeout" == execution.kind
        assert not _exists(engine, old.container_id)
        again = workers.request("generator", "sentiment", {"text": "fine"}, limits)
        assert "ok" == again.kind
        assert old.container_id != again.usage.container_id

    def test_memory_past_the_limit_is_memory_limit_and_the_next_worker_is_fresh(self, workers):
        """A worker under 64 MiB is OOM-killed while loading: memory_limit; then a fresh one."""
        limits = workers.spec("generator").limits
        small = dataclasses.replace(limits, memory_bytes=64 * MIB)

        execution = workers.request("generator", "sentiment", {"text": "x"}, small)

        assert "memory_limit" == execution.kind
        assert () == workers.loaded()
        again = workers.request("generator", "sentiment", {"text": "x"}, limits)
        assert "ok" == again.kind

    def test_a_worker_killed_between_calls_is_memory_limit_then_replaced(self, workers, engine):
        """A worker SIGKILLed (as the OOM killer does) ends the next call as memory_limit."""
        limits = workers.spec("minilm").limits
        first = workers.load("minilm")
        engine.api.kill(first.container_id, signal="SIGKILL")

        execution = workers.request("minilm", "embed_search", {"query": "rain"}, limits)
        again = workers.request("minilm", "embed_search", {"query": "rain"}, limits)

        assert "memory_limit" == execution.kind
        assert "ok" == again.kind
        assert first.container_id != again.usage.container_id

    def test_a_bad_request_is_a_tool_error_and_the_worker_stays(self, workers):
        """An op the worker does not serve is a tool_error; the worker keeps serving."""
        limits = workers.spec("minilm").limits
        first = workers.load("minilm")

        execution = workers.request("minilm", "summarize", {"text": "x"}, limits)

        assert "tool_error" == execution.kind
        assert [first.container_id] == [w.container_id for w in workers.loaded()]

    def test_the_container_is_hardened(self, workers, engine):
        """No network, read-only root and mounts, no capabilities, nobody, memory capped."""
        loaded = workers.load("minilm")

        config = engine.api.inspect_container(loaded.container_id)

        host = config["HostConfig"]
        assert "none" == host["NetworkMode"]
        assert host["ReadonlyRootfs"] is True
        assert ["ALL"] == host["CapDrop"]
        assert ["no-new-privileges"] == host["SecurityOpt"]
        assert "65534:65534" == config["Config"]["User"]
        assert loaded.memory_limit_bytes == host["Memory"] == host["MemorySwap"]
        assert all(mount["RW"] is False for mount in config["Mounts"])


class TestNoLeftovers:
    def test_closing_the_gateway_removes_its_workers(self, engine, gateway_home,
                                                     own_leftover_containers):
        """A gateway that loaded a worker leaves no container of this process when closed."""
        with Gateway.from_config(gateway_home / "callward.yaml",
                                 home=gateway_home / "home2") as gateway:
            result = gateway.handle(call("sentiment", text="ok"), principal="alice")
            ids = [w.container_id for w in gateway.runner.workers.loaded()]

        assert "ok" == result.kind
        assert 1 == len(ids)
        assert [] == [i for i in ids if _exists(engine, i)]
        assert [] == [i for i in own_leftover_containers() if i in ids]

