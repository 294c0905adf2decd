"""The ``anomalies`` section of callward.yaml, and stats helpers that need no engine."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from callward.core import ConfigurationError
from callward.core.cli._stats import since_moment, stats_from_records
from callward.core.gateway._config import load_config
from callward.core.observe._anomaly import DetectorSettings


def config_with(tmp_path: Path, examples: Path, section: str) -> Path:
    path = tmp_path / "callward.yaml"
    path.write_text(f"tools: [{examples / 'tools.py'}]\npolicy: {examples / 'policy.yaml'}\n"
                    + section, encoding="utf-8")
    return path


class TestAnomaliesSection:
    def test_monitoring_is_on_by_default(self, tmp_path, examples):
        """No section: the detector runs with its documented defaults."""
        assert DetectorSettings() == load_config(config_with(tmp_path, examples, "")).anomalies

    def test_settings_and_switching_off(self, tmp_path, examples):
        """Fields override the defaults; enabled: false turns monitoring off."""
        tuned = load_config(config_with(tmp_path, examples,
                                        "anomalies: {quiet_seconds: 60, rate_min_calls: 30}\n"))
        off = load_config(config_with(tmp_path, examples, "anomalies: {enabled: false}\n"))

        assert (60, 30) == (tuned.anomalies.quiet_seconds, tuned.anomalies.rate_min_calls)  # type: ignore[union-attr]
        assert off.anomalies is None

    @pytest.mark.parametrize("section", ["anomalies: {rate_min_calls: 2.5}\n",
                                         "anomalies: {no_such_setting: 1}\n",
                                         "anomalies: {quiet_seconds: 0}\n",
                                         "anomalies: {rate_min_history_buckets: 100}\n"])
    def test_invalid_settings_are_refused(self, tmp_path, examples, section):
        """A count that is not whole, an unknown name or an impossible value: refused at load."""
        with pytest.raises(ConfigurationError):
            load_config(config_with(tmp_path, examples, section))


class TestStatsHelpers:
    def test_since_takes_an_age_or_a_time(self):
        """--since 15m is fifteen minutes ago; an RFC 3339 time without zone is UTC."""
        now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

        assert datetime(2026, 1, 1, 11, 45, tzinfo=UTC) == since_moment("15m", now=now)
        assert datetime(2026, 1, 1, 8, 0, tzinfo=UTC) == since_moment("2026-01-01T08:00:00")
        with pytest.raises(ConfigurationError):
            since_moment("last tuesday")

    def test_model_turns_are_the_model_stage(self):
        """model.turn records give the model stage; other kinds are skipped."""
        records = [("2026-01-01T00:00:00.000000Z", "model.turn", {"duration_ms": 900.0}),
                   ("2026-01-01T00:00:01.000000Z", "policy.reloaded", {"ok": True})]

        summary = stats_from_records(records)

        assert (0, 1) == (summary["calls"], summary["stages"]["model"]["n"])  # type: ignore[index]
