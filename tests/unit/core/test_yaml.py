"""The one YAML reader for operator files: duplicate keys and aliases are refused."""

from __future__ import annotations

import pytest
import yaml

from callward.core import ConfigurationError
from callward.core._yaml import strict_yaml_load
from callward.core.gateway._config import load_config


def test_plain_yaml_reads_as_safe_load_does():
    """Without duplicates or aliases, the strict reader agrees with yaml.safe_load."""
    text = "a: 1\nb: [x, {c: true}]\nd: null\n"

    assert yaml.safe_load(text) == strict_yaml_load(text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("a: 1\na: 2\n", "duplicate key 'a'"),
        ("outer:\n  k: 1\n  k: 1\n", "duplicate key 'k'"),
        ("a: &x [1, 2, 3]\nb: *x\n", "aliases are not allowed"),
        ("lol: &l [x, x]\nl2: &m [*l, *l]\n", "aliases are not allowed"),
        ("? {a: 1}\n: v\n", "must be a scalar"),
    ],
)
def test_duplicate_keys_aliases_and_complex_keys_are_refused(text, fragment):
    """Each is refused with a YAMLError that says what, never silently resolved."""
    with pytest.raises(yaml.YAMLError, match=fragment):
        strict_yaml_load(text)


def test_a_configuration_with_a_repeated_key_is_refused(tmp_path):
    """callward.yaml with `policy:` twice is an error at start, not the last one winning."""
    path = tmp_path / "callward.yaml"
    path.write_text("tools: [tools.py]\npolicy: strict.yaml\npolicy: open.yaml\n")

    with pytest.raises(ConfigurationError, match=r"line 3.*duplicate key .policy."):
        load_config(path)
