"""Secret sources, redaction, and the runner's handling of secrets (no Docker needed)."""

from __future__ import annotations

import base64
import os
import threading
import urllib.parse
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

import callward.sandbox
from callward.core import Execution, ToolCall, ToolSpec, Usage, canonical_bytes, sha256_hex
from callward.sandbox import (
    DirectorySecretSource,
    EnvironmentSecretSource,
    SecretUnavailable,
    secret_source,
)
from callward.sandbox._interpret import redact_secrets
from callward.sandbox._secrets import SecretRedactor, read_secrets
from callward.sandbox.base import request_bytes
from tests._modules import module_from_file

TOKEN = "cwsecret-0123456789abcdef"  # noqa: S105 - a test value


def _runner() -> ModuleType:
    path = Path(callward.sandbox.__file__).parent / "image" / "runner.py"
    return module_from_file("callward_runner_under_test", path)


runner = _runner()


class TestEnvironmentSecretSource:
    def test_reads_the_prefixed_variable(self) -> None:
        """By default secret NAME is CALLWARD_SECRET_NAME."""
        source = EnvironmentSecretSource({"CALLWARD_SECRET_API_TOKEN": TOKEN})

        assert TOKEN == source.read("API_TOKEN")

    def test_a_mapping_names_another_variable(self) -> None:
        """The configured mapping points a secret at any variable."""
        source = EnvironmentSecretSource({"GH_TOKEN": TOKEN}, {"GITHUB_TOKEN": "GH_TOKEN"})

        assert TOKEN == source.read("GITHUB_TOKEN")

    def test_a_missing_secret_is_sandbox_unavailable_naming_only_the_name(self) -> None:
        """Missing fails closed with kind sandbox_unavailable; the message names the variable."""
        with pytest.raises(SecretUnavailable) as caught:
            EnvironmentSecretSource({}).read("API_TOKEN")

        expected = ("sandbox_unavailable", True)
        assert expected == (caught.value.kind, "CALLWARD_SECRET_API_TOKEN" in caught.value.message)

    def test_an_empty_value_is_refused(self) -> None:
        """An empty secret is as good as none."""
        with pytest.raises(SecretUnavailable):
            EnvironmentSecretSource({"CALLWARD_SECRET_A": ""}).read("A")

    def test_the_configured_source_defaults_to_the_environment(self) -> None:
        """Without a sandbox.secrets section the environment is the source."""
        assert isinstance(secret_source(None), EnvironmentSecretSource)


class TestDirectorySecretSource:
    def test_a_0600_file_is_read_without_its_trailing_newline(self, tmp_path: Path) -> None:
        """One file per secret, like /run/secrets; one trailing newline is dropped."""
        path = tmp_path / "API_TOKEN"
        path.write_text(TOKEN + "\n")
        path.chmod(0o600)

        assert TOKEN == DirectorySecretSource(tmp_path).read("API_TOKEN")

    @pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
    def test_a_file_others_may_read_is_refused(self, tmp_path: Path, mode: int) -> None:
        """Any permission for group or others refuses the secret."""
        path = tmp_path / "API_TOKEN"
        path.write_text(TOKEN)
        path.chmod(mode)

        with pytest.raises(SecretUnavailable, match="0600"):
            DirectorySecretSource(tmp_path).read("API_TOKEN")

    def test_a_symlink_is_refused(self, tmp_path: Path) -> None:
        """A symlink could point anywhere on the host: refused."""
        target = tmp_path / "real"
        target.write_text(TOKEN)
        target.chmod(0o600)
        (tmp_path / "API_TOKEN").symlink_to(target)

        with pytest.raises(SecretUnavailable):
            DirectorySecretSource(tmp_path).read("API_TOKEN")

    def test_a_missing_file_or_a_bad_name_is_refused(self, tmp_path: Path) -> None:
        """No file, or a name that could walk out of the directory: refused."""
        source = DirectorySecretSource(tmp_path)

        for name in ("API_TOKEN", "../etc/passwd"):
            with pytest.raises(SecretUnavailable):
                source.read(name)

    def test_no_source_at_all_fails_closed(self) -> None:
        """A tool that needs a secret where none is configured does not run."""
        with pytest.raises(SecretUnavailable, match="no secret source"):
            read_secrets(None, ["API_TOKEN"])


class TestSecretRedactor:
    def test_plain_and_encoded_forms_are_redacted(self) -> None:
        """The value, its base64 (both alphabets), hex (both cases) and URL encodings."""
        redactor = SecretRedactor.for_secrets({"API_TOKEN": "p@ss word/+?"})
        raw = b"p@ss word/+?"
        forms = [
            "p@ss word/+?", base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode(),
            raw.hex(), raw.hex().upper(), urllib.parse.quote("p@ss word/+?", safe=""),
            urllib.parse.quote_plus("p@ss word/+?"),
        ]

        for form in forms:
            cleaned, count = redactor.redact_text(f"<{form}>")
            assert ("<[REDACTED:API_TOKEN]>", 1) == (cleaned, count), form

    @given(prefix=st.binary(max_size=7), suffix=st.binary(max_size=7),
           secret=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=8,
                          max_size=40))
    def test_base64_of_a_secret_inside_other_bytes_is_caught(
        self, prefix: bytes, suffix: bytes, secret: str
    ) -> None:
        """Wherever the secret sits in a base64-encoded blob, a piece of it is cut."""
        redactor = SecretRedactor.for_secrets({"S": secret})
        blob = base64.b64encode(prefix + secret.encode() + suffix).decode()

        _cleaned, count = redactor.redact_text(blob)

        assert count >= 1

    def test_keys_and_nested_values_are_redacted(self) -> None:
        """Every string of a JSON value, object keys included."""
        redactor = SecretRedactor.for_secrets({"T": TOKEN})

        value, count = redactor.redact_json({TOKEN: [1, {"x": f"a{TOKEN}b"}], "n": None})

        expected = ({"[REDACTED:T]": [1, {"x": "a[REDACTED:T]b"}], "n": None}, 2)
        assert expected == (value, count)

    def test_a_message_cut_short_inside_the_secret_loses_the_piece(self) -> None:
        """A truncated message ending in the start of a secret has that start cut."""
        redactor = SecretRedactor.for_secrets({"T": TOKEN})

        cleaned, count = redactor.redact_truncated("bad login for " + TOKEN[:10] + "...")

        expected = ("bad login for [REDACTED:T]...", 1)
        assert expected == (cleaned, count)

    def test_nothing_to_redact_leaves_the_text(self) -> None:
        """Without secrets the text is returned as is."""
        assert ("hello", 0) == SecretRedactor.for_secrets({}).redact_text("hello")


def _spec() -> ToolSpec:
    return ToolSpec(name="t", version="1", description="", source="def t():\n    pass\n",
                    entrypoint="t", parameters_json=canonical_bytes({"type": "object"}),
                    digest=sha256_hex(b"t"))


class TestExecutionRedaction:
    def test_value_and_message_are_cut_and_counted_in_usage(self) -> None:
        """redact_secrets cuts the value, names the secrets and counts in the usage."""
        execution = Execution(kind="ok", value_json=canonical_bytes([TOKEN, TOKEN.encode().hex()]),
                              message="", usage=Usage(wall_ms=1, exit_code=0, output_bytes=9))

        redacted = redact_secrets(execution, {"T": TOKEN})

        expected = (["[REDACTED:T]", "[REDACTED:T]"], ("T",), 2,
                    {"secrets_provided": ["T"], "secret_redactions": 2})
        usage = redacted.usage.to_json()
        assert expected == (redacted.value, redacted.usage.secrets_provided,
                            redacted.usage.secret_redactions,
                            {k: usage[k] for k in ("secrets_provided", "secret_redactions")})

    def test_a_request_carries_secrets_only_when_given(self) -> None:
        """The request of a tool without secrets is byte for byte what it was before."""
        call = ToolCall.create(id="c1", name="t", arguments={}, dialect="api")

        plain = request_bytes(_spec(), call)
        with_secret = request_bytes(_spec(), call, secrets={"T": TOKEN})

        expected = (False, True)
        assert expected == (b"secrets" in plain, TOKEN.encode() in with_secret)


class TestRunnerSecrets:
    def test_secrets_and_proxy_become_the_tools_environment(self) -> None:
        """The request's secrets and egress proxy are environment variables for the tool."""
        environment = runner.request_environment(
            {"secrets": {"T": TOKEN}, "egress_proxy": "http://10.0.0.1:3128"})

        expected = {"T": TOKEN, "HTTP_PROXY": "http://10.0.0.1:3128",
                    "HTTPS_PROXY": "http://10.0.0.1:3128", "http_proxy": "http://10.0.0.1:3128",
                    "https_proxy": "http://10.0.0.1:3128"}
        assert expected == environment

    def test_a_request_without_secrets_gives_no_variables(self) -> None:
        """Older hosts send no secrets: the runner adds nothing."""
        assert {} == runner.request_environment({"source": "", "entrypoint": "t"})

    def test_malformed_secrets_are_a_bad_request(self) -> None:
        """Secrets that are not an object of strings are refused."""
        with pytest.raises(TypeError):
            runner.request_environment({"secrets": {"T": 1}})

    def test_the_session_parent_reads_wall_seconds_without_decoding(self) -> None:
        """wall_seconds comes from the line's end; a line without one gets 5 s."""
        line = bytearray(canonical_bytes({"arguments": {"wall_seconds": 99},
                                          "secrets": {"T": TOKEN}, "wall_seconds": 0.25}))

        expected = (0.25, 5.0)
        assert expected == (runner.session_wall_seconds(line),
                            runner.session_wall_seconds(bytearray(b'{"a":1}')))

    def test_the_line_reader_leaves_no_copy_once_the_line_is_zeroed(self) -> None:
        """After zero(line), neither the line nor the reader's buffer holds the secret."""
        read_fd, write_fd = os.pipe()
        payload = canonical_bytes({"secrets": {"T": TOKEN}}) + b"\n" + b"x" * 70000 + b"\n"
        writer = threading.Thread(target=lambda: (os.write(write_fd, payload), os.close(write_fd)))
        writer.start()
        reader = runner.LineReader(read_fd)
        line = reader.next_line()
        runner.zero(line)
        rest = reader.next_line()
        writer.join()
        os.close(read_fd)

        expected = (False, False, 70000)
        assert expected == (TOKEN.encode() in line, TOKEN.encode() in reader._buffer, len(rest))
