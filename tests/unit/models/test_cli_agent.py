"""`callward agent` runs the model the configuration names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from callward.core import ConfigurationError
from callward.core.gateway._config import load_config


def write_config(directory: Path, examples: Path, model_section: str) -> Path:
    config = directory / "callward.yaml"
    config.write_text(
        f"tools: [{examples / 'tools.py'}]\n"
        f"policy: {examples / 'policy.yaml'}\n"
        f"{model_section}"
    )
    return config


class TestModelSettings:
    def test_model_section_is_read_relative_to_the_file(self, tmp_path, examples):
        """model.directory resolves against the configuration's folder."""
        config = write_config(tmp_path, examples,
                              "model: {directory: models/mine, tool_role: tool, "
                              "max_new_tokens: 32}\n")

        settings = load_config(config).model

        assert settings is not None
        assert (tmp_path / "models" / "mine", "tool", 32) == (
            settings.directory, settings.tool_role, settings.max_new_tokens)

    def test_dtype_is_auto_unless_set(self, tmp_path, examples):
        """model.dtype is auto by default; float32 or bfloat16 when set."""
        unset = write_config(tmp_path, examples, "model: {max_new_tokens: 32}\n")
        other = tmp_path / "other"
        other.mkdir()
        forced = write_config(other, examples, "model: {dtype: float32}\n")

        assert ("auto", "float32") == (load_config(unset).model.dtype,  # type: ignore[union-attr]
                                       load_config(forced).model.dtype)  # type: ignore[union-attr]

    @pytest.mark.parametrize("dtype", ["float16", "fp32", "true"])
    def test_an_unknown_dtype_is_refused(self, tmp_path, examples, dtype):
        """A dtype other than auto, float32 or bfloat16 is a configuration error."""
        config = write_config(tmp_path, examples, f"model: {{dtype: {dtype}}}\n")

        with pytest.raises(ConfigurationError, match="model"):
            load_config(config)

    def test_no_model_section_means_the_demo_model(self, tmp_path, examples):
        """Without a model section, the agent uses the demo model."""
        assert load_config(write_config(tmp_path, examples, "")).model is None

    def test_unknown_model_keys_are_refused(self, tmp_path, examples):
        """A misspelt model setting is a configuration error, not silently ignored."""
        config = write_config(tmp_path, examples, "model: {dirctory: x}\n")

        with pytest.raises(ConfigurationError, match="model"):
            load_config(config)


class TestAgentCommand:
    @pytest.mark.timeout(600)
    def test_agent_runs_the_configured_model(self, tmp_path, examples, tiny_model_dir):
        """`callward agent` loads model.directory and audits its turn as model.turn."""
        config = write_config(tmp_path, examples,
                              f"model: {{directory: {tiny_model_dir}, max_new_tokens: 4}}\n")
        home = tmp_path / "home"

        done = subprocess.run(
            [sys.executable, "-m", "callward.core.cli", "--home", str(home), "agent",
             "What is 2 + 3?", "--config", str(config), "--max-steps", "1"],
            capture_output=True, text=True, timeout=600, check=False,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )

        report = json.loads(done.stdout)
        assert tiny_model_dir.name == report["model"]["id"]
        assert 1 == len(report["steps"])
        assert report["steps"][0]["model_turn_seq"] >= 1
