"""Reading a YAML config file strictly: bytes in, one document out, or one
problem naming where.

PyYAML on its own takes the last of two equal keys silently (a duplicated
``activeModel`` switched the GPU), recurses once per nesting level (3,000
levels end in a RecursionError) and leaves decoding to the caller (a latin-1
byte in a comment ended in a traceback). Here every one of those is a
``YamlFileError`` with the line, so the user reads what to fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node

# Deeper than any config needs, far from Python's recursion limit.
MAX_DEPTH = 64
# Aliases may not fan out into a "billion laughs" document.
MAX_ALIASES = 200

_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_UTF8_BOM = b"\xef\xbb\xbf"


class YamlFileError(ValueError):
    """``where``: "line L, column C" or "(file)"; the message says what to fix."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where, self.message = where, message


def _at(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(file)"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, deep nesting and alias fan-out."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise YamlFileError(_at(event.start_mark), f"more than {MAX_ALIASES} aliases (*name): write the values out")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YamlFileError(_at(event.start_mark), f"nested more than {MAX_DEPTH} levels deep: a config is never this deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` may be overridden by the keys beside it, as YAML means
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader says so below
                continue
            if first is not None:
                raise YamlFileError(
                    _at(key_node.start_mark),
                    f"duplicate key {key!r} at line {first.start_mark.line + 1} and line {key_node.start_mark.line + 1}: keep one of them",
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def decode(raw: bytes) -> str:
    """UTF-8 text of a file (a UTF-8 BOM is dropped); YamlFileError names the first bad byte."""
    if raw.startswith(_UTF16_BOMS) or (len(raw) >= 2 and (raw[0] == 0 or raw[1] == 0)):
        raise YamlFileError("(file)", "the file is UTF-16 (or has NUL bytes): save it as UTF-8")
    raw = raw.removeprefix(_UTF8_BOM)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise YamlFileError(f"line {line}, column {column}", f"byte 0x{raw[err.start]:02x} is not UTF-8: save the file as UTF-8") from None


def parse(text: str) -> Any:
    """One YAML document (None when empty); YamlFileError on anything PyYAML or the rules above refuse."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    except YamlFileError:
        raise
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        raise YamlFileError(_at(mark), f"not valid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise YamlFileError("(file)", f"not valid YAML: {err}") from None
    except RecursionError:
        raise YamlFileError("(file)", f"nested too deeply: a config is never more than {MAX_DEPTH} levels deep") from None
    finally:
        loader.dispose()


def load(path: str | Path) -> Any:
    """Read, decode and parse ``path``. OSError propagates (the caller names the file)."""
    return parse(decode(Path(path).read_bytes()))
