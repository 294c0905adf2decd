"""
One YAML reader for every file an operator writes (callward.yaml, policies, plans).

PyYAML's safe loader keeps the last of two equal keys and expands aliases; both are
refused here: a repeated key usually hides a rule, and a few nested ``*a``
references expand to gigabytes ("billion laughs").
"""

from __future__ import annotations

import yaml


class StrictYamlLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses duplicate mapping keys and aliases."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, "aliases are not allowed",
                                              event.start_mark)
        return super().compose_node(parent, index)


def _unique_mapping(loader: StrictYamlLoader, node: yaml.MappingNode) -> dict[object, object]:
    mapping: dict[object, object] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            repeated = key in mapping
        except TypeError as exc:  # an unhashable key (a list or mapping used as a key)
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a scalar", key_node.start_mark) from exc
        if repeated:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


StrictYamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def strict_yaml_load(text: str) -> object:
    """
    Parse one YAML document with ``StrictYamlLoader``.

    Raises:
        yaml.YAMLError: Not YAML, a duplicate key, an alias, or a non-scalar key.
    """
    return yaml.load(text, Loader=StrictYamlLoader)  # noqa: S506 - a SafeLoader subclass
