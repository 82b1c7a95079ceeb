"""The manifest's YAML: safe, strict and bounded, so that a hostile file costs at most its size to read.

On top of PyYAML's SafeLoader rules: no anchors or aliases (a few lines of them expand to billions of nodes),
at most MAX_DEPTH levels of nesting and MAX_NODES values, no duplicate or unhashable keys, and every number
written in at most MAX_NUMBER_CHARS characters, integers within 64 bits. Events come from libyaml when PyYAML
has it (about three times faster than its Python parser), from the Python parser otherwise; the limits are
checked on those events, before any node is built.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, cast

import yaml
import yaml.cyaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import AliasEvent, Event, MappingStartEvent, SequenceStartEvent
from yaml.nodes import MappingNode, Node, ScalarNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import BaseResolver, Resolver
from yaml.scanner import Scanner

# None when PyYAML was built without libyaml.
_CPARSER: Any = getattr(yaml.cyaml, "CParser", None) if yaml.__with_libyaml__ else None

MAX_DEPTH = 64
MAX_NODES = 50_000
MAX_NUMBER_CHARS = 100
INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # what Ollama (Go) and JSON readers can hold


class YamlLimitError(yaml.MarkedYAMLError):
    """Well-formed YAML that a manifest may not contain (an alias, too deep, too many values, a huge number)."""

    def __init__(self, problem: str, mark: Any):
        super().__init__(problem=problem, problem_mark=mark)


class _BoundedComposer(Composer):
    """Builds the node tree without recursion surprises: aliases refused, depth and node count capped."""

    peek_event: Callable[[], Event]  # from the parser this is mixed with

    def __init__(self) -> None:
        super().__init__()
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()
        # An anchor alone is harmless, but it is only ever written to be aliased: refuse it where it is defined,
        # which is the line a reader looks at.
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            kind = "aliases" if isinstance(event, AliasEvent) else "anchors"
            sign = "*" if isinstance(event, AliasEvent) else "&"
            raise YamlLimitError(f"YAML {kind} ({sign}{anchor}) are not allowed in a manifest: write the value "
                                 "out where it is used", event.start_mark)
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise YamlLimitError(f"more than {MAX_NODES} values: over the limit of a manifest", event.start_mark)
        nested = isinstance(event, MappingStartEvent | SequenceStartEvent)
        if nested:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise YamlLimitError(f"exceeds the maximum nesting depth of a manifest ({MAX_DEPTH} levels)",
                                     event.start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            if nested:
                self._depth -= 1


class _ManifestConstructor(SafeConstructor):
    pass


def _construct_mapping(loader: Any, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
    """A mapping whose keys are hashable and unique (SafeLoader keeps the last of duplicate keys silently)."""
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        mark = key_node.start_mark
        if not isinstance(key, Hashable):
            raise ConstructorError(None, None, f"a {type(key).__name__} cannot be a key (line {mark.line + 1})",
                                   mark)
        if key in mapping:
            raise ConstructorError(None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark)
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


def _short_number(node: ScalarNode, what: str) -> str:
    if len(node.value) > MAX_NUMBER_CHARS:  # before int(): a long one is slow, or a ValueError past 4300 digits
        raise YamlLimitError(f"{what} written with more than {MAX_NUMBER_CHARS} characters", node.start_mark)
    return cast(str, node.value)


def _construct_int(loader: Any, node: ScalarNode) -> int:
    _short_number(node, "an integer")
    value: int = loader.construct_yaml_int(node)
    if not INT_MIN <= value <= INT_MAX:
        raise YamlLimitError("an integer out of range: a manifest's integers fit in 64 bits", node.start_mark)
    return value


def _construct_float(loader: Any, node: ScalarNode) -> float:
    _short_number(node, "a number")
    value: float = loader.construct_yaml_float(node)  # inf and nan are refused by the schema, which names the field
    return value


_ManifestConstructor.add_constructor(BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_ManifestConstructor.add_constructor("tag:yaml.org,2002:int", _construct_int)
_ManifestConstructor.add_constructor("tag:yaml.org,2002:float", _construct_float)


class _PythonLoader(Reader, Scanner, Parser, _BoundedComposer, _ManifestConstructor, Resolver):
    def __init__(self, stream: str):
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        _BoundedComposer.__init__(self)
        _ManifestConstructor.__init__(self)
        Resolver.__init__(self)


LOADERS: list[type] = [_PythonLoader]
if _CPARSER is not None:
    # _CPARSER is yaml.cyaml.CParser when libyaml is present; typed Any since it may be absent.
    class _LibyamlLoader(_BoundedComposer, _CPARSER, _ManifestConstructor, Resolver):  # type: ignore[misc]
        """libyaml's events, this module's composer (listed first, so it replaces libyaml's own)."""

        def __init__(self, stream: str):
            _CPARSER.__init__(self, stream)
            _BoundedComposer.__init__(self)
            _ManifestConstructor.__init__(self)
            Resolver.__init__(self)

    LOADERS.insert(0, _LibyamlLoader)


def load_yaml(text: str, loader: type | None = None) -> Any:
    """One YAML document as plain data; raises yaml.YAMLError (YamlLimitError for a limit)."""
    instance = (loader or LOADERS[0])(text)
    try:
        return instance.get_single_data()
    finally:
        instance.dispose()
