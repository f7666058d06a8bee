"""Params as YAML text: the hardened reader every params source goes through (a params file, the `params_yaml`
pipeline parameter, a `--set` value) and the `--set key.path=value` overrides applied to the data it returns.

Separate from `config.py`, which holds the schema: this layer only turns untrusted text into plain JSON-like data
within size limits (no alias bombs, no duplicate keys, no YAML-only types) and knows nothing of the sections.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from subjectops.errors import ConfigError

# A params file is a few kB; these bound what a hostile or broken file costs before it is refused.
MAX_PARAMS_BYTES = 1_000_000
# YAML aliases repeat their anchor's content: nested ones expand exponentially (a "billion laughs" file). The
# expanded document may hold at most this many scalar characters plus nodes.
MAX_EXPANDED_SIZE = 4_000_000

class BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that measures the document as its aliases expand it, and stops past MAX_EXPANDED_SIZE."""

    def __init__(self, text: str, source: str):
        super().__init__(text)
        self.source = source
        self.sizes: dict[int, int] = {}  # id(node) -> expanded size

    def compose_node(self, parent, index):
        alias = self.check_event(yaml.AliasEvent)
        node = super().compose_node(parent, index)
        if id(node) in self.sizes:
            return node  # an alias: its anchor's size, counted again by the parent
        if alias:
            raise ConfigError(f"{self.source}: a YAML alias refers to the node that contains it (an endless document)",
                              fix="remove the recursive alias")
        if isinstance(node, yaml.MappingNode):
            self._refuse_duplicate_keys(node)
        if isinstance(node, yaml.ScalarNode):
            size = 1 + len(node.value)
        else:
            children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
            size = 1 + sum(self.sizes[id(c)] for c in children)
        if size > MAX_EXPANDED_SIZE:
            raise ConfigError(f"{self.source}: YAML aliases expand this document past {MAX_EXPANDED_SIZE:,} "
                              "characters "
                              "and nodes (an alias bomb?)", fix="write the values out instead of nesting aliases")
        self.sizes[id(node)] = size
        return node

    def _refuse_duplicate_keys(self, node: yaml.MappingNode) -> None:
        # PyYAML keeps the last of two equal keys: the first value, which the user may be looking at, is ignored
        first_line: dict[str, int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            line = key.start_mark.line + 1
            if key.value in first_line:
                raise ConfigError(f"{self.source}: key {key.value!r} appears twice in one section (lines "
                                  f"{first_line[key.value]} and {line}); only the last would count",
                                  fix="keep one of the two and delete the other")
            first_line[key.value] = line

def _plain(value: Any, where: str, source: str) -> Any:
    """Params are JSON data: YAML's dates, sets and binary values are refused with the key that holds them."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{source}: key {key!r} under {where or 'the top level'} is not a name",
                                  fix="keys are names such as finetune or lr; quote the key")
            _plain(item, f"{where}.{key}" if where else key, source)
    elif isinstance(value, list):
        for item in value:
            _plain(item, where, source)
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise ConfigError(f"{source}: {where or 'the document'} holds a YAML {type(value).__name__}, not a params "
                          "value",
                          fix=f"quote the value of {where} if it is meant as text")
    return value

def parse_yaml(text: str, source: str) -> Any:
    """YAML text (a params file, a pipeline parameter, a --set value) as plain data, within the size limits."""
    if len(text) > MAX_PARAMS_BYTES:
        raise ConfigError(f"{source} is {len(text):,} characters, above the limit of {MAX_PARAMS_BYTES:,}",
                          fix="a params file is a few kB: pass the real params.yaml")
    try:
        loader = BoundedLoader(text, source)  # the reader refuses control characters here
        try:
            return _plain(loader.get_single_data(), "", source)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        # the problem and where, never PyYAML's quote of the line: --params may point at a file nobody should see
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{source} is not valid YAML: {getattr(exc, 'problem', None) or type(exc).__name__}{where}",
                          fix="correct the YAML; quote a value that holds ': ', '{' or ' #'") from None

def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value, e.g. finetune.lora.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; write key.path=value")
    value = parse_yaml(raw, f"the value of override {text!r}") if raw.strip() else ""
    return key.split("."), value

def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data
