"""The store section and the store URL: no password anywhere, clear errors, sane defaults."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from callward.core._postgres import StoreUrl, describe, is_store_url
from callward.core.errors import ConfigurationError
from callward.core.gateway._config import load_config
from callward.core.gateway._fleet import (
    DEFAULT_HEARTBEAT_SECONDS,
    DEFAULT_LEASE_SECONDS,
    fleet_settings,
    new_replica_id,
)


def _config(tmp_path: Path, store: str) -> Path:
    (tmp_path / "tools.py").write_text("")
    (tmp_path / "policy.yaml").write_text("version: 1\ndefault: deny\n")
    path = tmp_path / "callward.yaml"
    path.write_text(f"tools: [tools.py]\npolicy: policy.yaml\n{store}")
    return path


class TestStoreUrl:
    @pytest.mark.parametrize("url", [
        "postgresql://callward@db:5432/callward",
        "postgres://callward@127.0.0.1/callward?sslmode=require",
        "postgresql:///callward?host=/var/run/postgresql",
    ])
    def test_a_url_without_password_is_taken_as_given(self, url):
        parsed = StoreUrl.parse(url)
        assert parsed.url == url
        assert str(parsed) == url
        assert is_store_url(url)

    @pytest.mark.parametrize("url", [
        "postgresql://callward:s3cret@db/callward",
        "postgresql://callward@db/callward?password=s3cret",
        "postgresql://db/callward?sslpassword=s3cret",
    ])
    def test_a_password_in_the_url_is_refused_and_never_repeated(self, url):
        with pytest.raises(ConfigurationError) as caught:
            StoreUrl.parse(url)
        assert "s3cret" not in caught.value.message
        assert "s3cret" not in caught.value.remediation
        assert "password" in caught.value.message

    @pytest.mark.parametrize("text", ["sqlite:///x.db", "/var/lib/audit.db", "", None, 5])
    def test_not_a_postgresql_url_is_refused(self, text):
        with pytest.raises(ConfigurationError):
            StoreUrl.parse(text)
        assert not is_store_url(text)

    def test_the_connection_string_commits_synchronously_and_names_itself(self):
        info = StoreUrl.parse("postgresql://callward@db/callward",
                              password_file="/etc/callward/pgpass").conninfo(  # noqa: S106
            application_name="callward-test")
        params = psycopg.conninfo.conninfo_to_dict(info)
        assert params["options"] == "-c synchronous_commit=on"
        assert params["application_name"] == "callward-test"
        assert params["passfile"] == "/etc/callward/pgpass"
        assert "password" not in params


class TestDescribe:
    def test_out_of_space_is_named(self):
        class DiskFull(Exception):
            sqlstate = "53100"

        assert "out of space" in describe(DiskFull())

    def test_an_unreachable_server_is_named_without_its_message(self):
        error = psycopg.OperationalError("connection to 10.0.0.1 failed: secret detail")
        text = describe(error)
        assert "cannot be reached" in text
        assert "secret detail" not in text


class TestStoreSection:
    def test_without_a_store_the_state_stays_at_home(self, tmp_path):
        assert load_config(_config(tmp_path, "")).store is None

    def test_a_store_section_is_read_with_its_defaults(self, tmp_path):
        config = load_config(_config(
            tmp_path, "store: {url: 'postgresql://callward@db/callward'}\n"))
        assert config.store is not None
        assert config.store.url.url == "postgresql://callward@db/callward"
        assert config.store.lease_seconds == DEFAULT_LEASE_SECONDS
        assert config.store.heartbeat_seconds == DEFAULT_HEARTBEAT_SECONDS

    def test_a_password_file_is_resolved_against_the_configuration(self, tmp_path):
        config = load_config(_config(tmp_path, (
            "store: {url: 'postgresql://callward@db/callward', password_file: pgpass,\n"
            "        lease_seconds: 6}\n")))
        assert config.store is not None
        assert config.store.url.password_file == str((tmp_path / "pgpass").resolve())
        assert config.store.heartbeat_seconds == 2.0

    @pytest.mark.parametrize(("section", "words"), [
        ("store: {url: 'postgresql://u:pw@db/x'}\n", "password"),
        ("store: {url: 'mysql://db/x'}\n", "store"),
        ("store: {}\n", "url"),
        ("store: {url: 'postgresql://db/x', lease_seconds: 2, heartbeat_seconds: 2}\n",
         "shorter"),
        ("store: {url: 'postgresql://db/x', pool: 3}\n", "store"),
    ])
    def test_a_bad_store_section_is_a_clear_error(self, tmp_path, section, words):
        with pytest.raises(ConfigurationError) as caught:
            load_config(_config(tmp_path, section))
        assert words in caught.value.message
        assert "pw@" not in caught.value.message

    def test_a_short_lease_gets_a_shorter_heartbeat(self):
        settings = fleet_settings({"url": "postgresql://db/x", "lease_seconds": 1.5}, str)
        assert settings is not None
        assert settings.heartbeat_seconds == 0.5


def test_the_replica_id_comes_from_the_environment_or_is_unique(monkeypatch):
    monkeypatch.setenv("CALLWARD_REPLICA_ID", "replica-7")
    assert new_replica_id() == "replica-7"
    monkeypatch.delenv("CALLWARD_REPLICA_ID")
    assert new_replica_id() != new_replica_id()
