"""The tool registry: functions with schemas, versions and digests."""

from __future__ import annotations

import pytest

from callward.core import ConfigurationError, ResourceLimits, ToolRegistry, UnknownTool, tool

SCHEMA = {
    "type": "object",
    "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}


@tool(version="1.2.0", parameters=SCHEMA, limits=ResourceLimits(wall_seconds=1))
def subtract(b: int, a: int) -> int:
    """Subtract a from b.

    More text that is not part of the description.
    """
    return b - a


class TestRegistry:
    def test_register_builds_a_spec(self):
        """A marked function becomes a spec with its version, order and description."""
        spec = ToolRegistry().register(subtract)

        assert ("subtract@1.2.0", ("b", "a"), "Subtract a from b.") == (
            spec.ref, spec.parameter_order, spec.description)
        assert 1.0 == spec.limits.wall_seconds

    def test_source_has_no_decorator(self):
        """Only the function itself is sent to the sandbox."""
        spec = ToolRegistry().register(subtract)

        assert spec.source.startswith("def subtract(")
        assert "@tool" not in spec.source

    def test_digest_is_stable_and_content_bound(self):
        """The same tool gives the same digest; another version gives another."""
        first = ToolRegistry().register(subtract).digest
        again = ToolRegistry().register(subtract).digest

        @tool(version="1.3.0", parameters=SCHEMA)
        def subtract_v2(b: int, a: int) -> int:
            return b - a

        assert first == again
        assert first != ToolRegistry().register(subtract_v2).digest

    def test_unknown_name(self):
        """get() returns None and require() raises UnknownTool for an unknown name."""
        registry = ToolRegistry()

        assert registry.get("nope") is None
        with pytest.raises(UnknownTool) as caught:
            registry.require("nope")
        assert "unknown_tool" == caught.value.kind

    def test_invalid_schema_is_refused(self):
        """A schema that is not valid 2020-12 is a configuration error at registration."""

        @tool(version="1.0.0", parameters={"type": "object", "properties": {"x": {"type": 5}}})
        def broken(x: int) -> int:
            return x

        with pytest.raises(ConfigurationError, match="not valid JSON Schema"):
            ToolRegistry().register(broken)

    def test_non_object_schema_is_refused(self):
        """Arguments are always an object."""

        @tool(version="1.0.0", parameters={"type": "array"})
        def listy(*values: int) -> int:
            return 0

        with pytest.raises(ConfigurationError, match="type object"):
            ToolRegistry().register(listy)

    def test_two_tools_one_name_refused(self, tmp_path):
        """Two different tools cannot share a name."""
        for number in (1, 2):
            (tmp_path / f"tools{number}.py").write_text(
                "from callward.core import tool\n\n"
                "@tool(version='1.0.0', parameters={'type': 'object'})\n"
                f"def clash() -> int:\n    return {number}\n"
            )
        registry = ToolRegistry()
        registry.load(tmp_path / "tools1.py")

        with pytest.raises(ConfigurationError, match="two different tools"):
            registry.load(tmp_path / "tools2.py")

    def test_load_file(self, tmp_path):
        """Every @tool function of a file is registered; a file without tools is refused."""
        path = tmp_path / "tools.py"
        path.write_text(
            "from callward.core import tool\n\n"
            "@tool(version='1.0.0', parameters={'type': 'object'})\n"
            "def hello() -> str:\n    return 'hi'\n"
        )
        empty = tmp_path / "empty.py"
        empty.write_text("x = 1\n")

        assert ["hello"] == [spec.name for spec in ToolRegistry().load(path)]
        with pytest.raises(ConfigurationError, match="no @tool"):
            ToolRegistry().load(empty)
        with pytest.raises(ConfigurationError, match="does not exist"):
            ToolRegistry().load(tmp_path / "absent.py")

    def test_file_that_fails_to_import(self, tmp_path):
        """A tool file that raises on import is a configuration error."""
        path = tmp_path / "bad.py"
        path.write_text("raise RuntimeError('boom')\n")

        with pytest.raises(ConfigurationError, match="failed to import"):
            ToolRegistry().load(path)
