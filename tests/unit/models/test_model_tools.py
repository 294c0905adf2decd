"""
Model tools without a container: their specs and digests, the configuration section,
the audit record naming the model, and the routing runner's refusals.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml

from callward.audit import SQLiteAuditStore
from callward.core import (
    ConfigurationError,
    ModelRef,
    Placement,
    ResourceLimits,
    SandboxUnavailable,
    Sha256Hex,
    ToolCall,
    ToolRegistry,
    ToolSpec,
)
from callward.core.gateway._config import load_config
from callward.core.models._tools import (
    MINILM_NAME,
    ModelToolsSettings,
    build_model_runner,
    example_collection_path,
    model_tool_set,
    model_tools_settings,
    require_readable_in_container,
    weights_sha256,
)
from callward.core.testing import StubRunner, ok_execution
from callward.core.types import MIB
from callward.policies import Policy
from callward.sandbox import ModelToolRunner, ModelWorkers, WorkerSpec

SERVER = Sha256Hex("5e" * 32)
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


@pytest.fixture(name="generator_dir")
def _generator_dir(tmp_path: Path) -> Path:
    """A stand-in model directory: only its bytes matter here (nothing loads it)."""
    directory = tmp_path / "tiny-model"
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "qwen2"}', encoding="utf-8")
    (directory / "model.safetensors").write_bytes(b"weights")
    return directory


@pytest.fixture(name="tool_set")
def _tool_set(generator_dir: Path, tmp_path: Path):
    return model_tool_set(ModelToolsSettings(generator_directory=generator_dir),
                          model_cache=tmp_path / "models", server_sha256=SERVER)


class TestModelRef:
    def test_a_bad_digest_is_refused(self):
        """A model's weights digest is 64 lower-case hex digits, like every digest."""
        with pytest.raises(ValueError, match="sha256"):
            ModelRef("m", "1.0", Sha256Hex("XYZ"))

    def test_to_json_names_name_version_and_digest(self):
        """The audit record's model object has exactly name, version and sha256."""
        ref = ModelRef("m", "1.0", Sha256Hex("a" * 64))

        assert {"name": "m", "version": "1.0", "sha256": "a" * 64} == ref.to_json()


class TestModelToolSet:
    def test_three_tools_each_naming_its_model(self, tool_set, generator_dir):
        """embed_search names MiniLM; summarize and sentiment name the generator's weights."""
        models = {spec.name: spec.model for spec in tool_set.specs}

        assert ("embed_search", "summarize", "sentiment") == tuple(models)
        assert MINILM_NAME == models["embed_search"].name
        assert "0.1.0" == models["embed_search"].version
        assert weights_sha256(generator_dir) == models["summarize"].sha256
        assert models["summarize"] == models["sentiment"]

    def test_summarize_and_sentiment_share_one_worker(self, tool_set):
        """The two generator tools are routed to the same warm worker."""
        routes = {name: worker for name, (worker, _digest) in tool_set.routes.items()}

        assert {"embed_search": "minilm", "summarize": "generator",
                "sentiment": "generator"} == routes

    def test_other_weights_give_another_digest(self, tool_set, generator_dir, tmp_path):
        """Changing one byte of the weights changes the tools' digests and model sha256."""
        (generator_dir / "model.safetensors").write_bytes(b"weightz")
        again = model_tool_set(ModelToolsSettings(generator_directory=generator_dir),
                               model_cache=tmp_path / "models", server_sha256=SERVER)

        before = {s.name: s.digest for s in tool_set.specs}
        after = {s.name: s.digest for s in again.specs}
        assert before["embed_search"] == after["embed_search"]
        assert before["summarize"] != after["summarize"]
        assert before["sentiment"] != after["sentiment"]

    def test_another_collection_gives_another_digest(self, tool_set, generator_dir, tmp_path):
        """The collection embed_search answers from is part of its digest."""
        collection = tmp_path / "docs.jsonl"
        collection.write_text(json.dumps({"id": "a", "title": "t", "text": "x"}) + "\n",
                              encoding="utf-8")
        again = model_tool_set(
            ModelToolsSettings(generator_directory=generator_dir, collection=collection),
            model_cache=tmp_path / "models", server_sha256=SERVER)

        assert tool_set.specs[0].digest != again.specs[0].digest

    def test_another_server_gives_another_digest(self, tool_set, generator_dir, tmp_path):
        """The in-container server's source is part of every model tool's digest."""
        again = model_tool_set(ModelToolsSettings(generator_directory=generator_dir),
                               model_cache=tmp_path / "models",
                               server_sha256=Sha256Hex("5f" * 32))

        assert not {s.digest for s in tool_set.specs} & {s.digest for s in again.specs}

    def test_only_the_tools_asked_for(self, tmp_path):
        """tools: [embed_search] registers one tool and loads no generator model at all."""
        only = model_tool_set(ModelToolsSettings(tools=("embed_search",)),
                              model_cache=tmp_path / "models", server_sha256=SERVER)

        assert ["embed_search"] == [spec.name for spec in only.specs]
        assert ["minilm"] == list(only.workers)

    def test_a_model_tool_sent_to_a_plain_container_fails(self, tool_set):
        """The spec's source raises: a misrouted model tool can never pass as a function."""
        spec = tool_set.specs[0]
        namespace: dict[str, object] = {}
        exec(compile(spec.source, "<spec>", "exec"), namespace)  # noqa: S102 - our own source

        with pytest.raises(RuntimeError, match="model tool"):
            namespace[spec.entrypoint](query="x")  # type: ignore[operator]

    def test_the_example_collection_is_news(self):
        """The shipped collection has 20 to 40 articles with id, title and text."""
        lines = example_collection_path().read_text(encoding="utf-8").splitlines()
        documents = [json.loads(line) for line in lines]

        assert 20 <= len(documents) <= 40
        assert all({"id", "title", "text"} == set(d) for d in documents)
        assert len({d["id"] for d in documents}) == len(documents)


class TestReadableInContainer:
    def test_a_private_weights_file_is_refused(self, generator_dir):
        """A 0600 file (safetensors writes them so) cannot be read by nobody: refused."""
        (generator_dir / "model.safetensors").chmod(0o600)

        with pytest.raises(ConfigurationError, match="o\\+rX"):
            require_readable_in_container(generator_dir)

    def test_fix_grants_read_to_others(self, generator_dir):
        """For callward's own cache, fix=True makes every file readable by others."""
        (generator_dir / "model.safetensors").chmod(0o600)

        require_readable_in_container(generator_dir, fix=True)

        mode = (generator_dir / "model.safetensors").stat().st_mode
        assert stat.S_IROTH == mode & stat.S_IROTH


class TestSettings:
    def test_defaults(self):
        """An empty section: all three tools, the example collection, the demo model."""
        settings = model_tools_settings({}, str)

        assert ModelToolsSettings() == settings

    def test_an_unknown_tool_is_refused(self):
        """Only the three model tools can be named."""
        with pytest.raises(ConfigurationError, match="models_as_tools"):
            model_tools_settings({"tools": ["shell"]}, str)

    def test_the_section_reaches_the_config(self, tmp_path):
        """callward.yaml's models_as_tools is parsed, paths relative to the file."""
        path = tmp_path / "callward.yaml"
        path.write_text(yaml.safe_dump({
            "tools": ["tools.py"], "policy": "policy.yaml",
            "models_as_tools": {"generator": {"directory": "tiny", "memory_mebibytes": 512},
                                "memory_budget_mebibytes": 2048},
        }), encoding="utf-8")

        settings = load_config(path).model_tools

        assert settings is not None
        assert (tmp_path / "tiny").resolve() == settings.generator_directory
        assert 512 * MIB == settings.generator_memory_bytes
        assert 2048 * MIB == settings.memory_budget_bytes
        assert "auto" == settings.generator_dtype

    def test_the_generators_dtype_reaches_its_worker(self, tmp_path, generator_dir):
        """generator.dtype is parsed, refused unless a known dtype, and sent to the worker."""
        settings = model_tools_settings(
            {"tools": ["summarize"], "generator": {"directory": str(generator_dir),
                                                   "dtype": "float32"}}, str)
        tool_set = model_tool_set(settings, model_cache=tmp_path / "models",
                                  server_sha256=SERVER)
        runner = build_model_runner(tool_set, StubRunner(ok_execution(1)))

        assert "float32" == settings.generator_dtype
        assert "float32" == runner.workers.spec("generator").dtype
        with pytest.raises(ConfigurationError, match="models_as_tools"):
            model_tools_settings({"generator": {"dtype": "float16"}}, str)


class TestAuditNamesTheModel:
    def test_call_records_carry_the_model(self, tool_set, make_gateway,
                                          store: SQLiteAuditStore):
        """call.authorized's tool object names the model, its version and weights digest."""
        registry = ToolRegistry()
        for spec in tool_set.specs:
            registry.add(spec)
        runner = StubRunner(ok_execution({"hits": []}))
        gateway = make_gateway(runner, registry=registry, policy=Policy.from_text(POLICY))
        call = ToolCall.create(id="c1", name="embed_search", arguments={"query": "rates"},
                               dialect="api")

        result = gateway.handle(call, principal="alice")

        authorized = next(r for r in store.records() if r.kind == "call.authorized")
        spec = tool_set.specs[0]
        assert ("ok", [spec]) == (result.kind, runner.specs)
        assert {"ref": spec.ref, "digest": spec.digest,
                "model": spec.model.to_json()} == authorized.body["tool"]


class TestModelToolRunner:
    @pytest.fixture(name="runner")
    def _runner(self, tool_set, generator_dir):
        workers = ModelWorkers(
            {name: WorkerSpec(name=r.name, task=r.task, weights_dir=r.weights_dir,
                              digest=r.digest, limits=r.limits, collection=r.collection)
             for name, r in tool_set.workers.items()},
            memory_budget_bytes=8192 * MIB,
        )
        return ModelToolRunner(workers, tool_set.routes, StubRunner(ok_execution({"hits": []})))

    def test_other_tools_go_to_the_fallback(self, runner):
        """A tool that is not a model tool runs in the usual sandbox."""
        spec = ToolSpec(name="square", version="1", description="", source="def square(x): ...",
                        entrypoint="square", parameters_json=b"{}", digest=Sha256Hex("0" * 64))
        call = ToolCall.create(id="c", name="square", arguments={}, dialect="api")

        execution = runner.run(spec, call, ResourceLimits())

        assert "ok" == execution.kind

    def test_a_spec_with_another_digest_is_refused(self, runner, tool_set):
        """A model tool's name with another digest never reaches the worker."""
        spec = tool_set.specs[1]
        forged = ToolSpec(name=spec.name, version=spec.version, description=spec.description,
                          source=spec.source, entrypoint=spec.entrypoint,
                          parameters_json=spec.parameters_json, digest=Sha256Hex("1" * 64),
                          limits=spec.limits, model=spec.model)
        call = ToolCall.create(id="c", name=spec.name, arguments={"text": "x"}, dialect="api")

        with pytest.raises(SandboxUnavailable, match="digest"):
            runner.run(forged, call, spec.limits)

        assert () == runner.workers.loaded()

    def test_another_runtime_is_refused(self, runner, tool_set):
        """A policy that asks for gVisor for a model tool is refused, not ignored."""
        spec = tool_set.specs[2]
        call = ToolCall.create(id="c", name=spec.name, arguments={"text": "x"}, dialect="api")

        with pytest.raises(SandboxUnavailable, match="runsc"):
            runner.run_placed(spec, call, spec.limits,
                              Placement(runtime="runsc", principal="alice"))

    def test_a_worker_larger_than_the_budget_is_refused(self, tool_set):
        """Configuring a worker whose memory limit exceeds the whole budget is an error."""
        recipe = tool_set.workers["generator"]
        spec = WorkerSpec(name="generator", task="generate", weights_dir=recipe.weights_dir,
                          digest=recipe.digest, limits=recipe.limits)

        with pytest.raises(ValueError, match="budget"):
            ModelWorkers({"generator": spec}, memory_budget_bytes=64 * MIB)
