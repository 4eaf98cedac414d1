"""Generate the values table of a Helm chart's README from the ``# --`` comments in values.yaml.

A small stand-in for helm-docs (not installable here) that follows its comment convention::

    # -- Description of the key below; it may go on over
    # more comment lines until the key.
    key: value

A description may start with a type in parentheses, ``# -- (string) ...``; otherwise the type
is taken from the default value. A documented mapping documents its children too; every
other key must carry its own description, and :func:`undocumented_keys` lists the ones that
do not. The table replaces whatever lies between the ``<!-- values:start -->`` and
``<!-- values:end -->`` markers of README.md; the rest of the README is hand-written.

    python tools/helm_values_docs.py            # rewrite helm/fashionserve/README.md
    python tools/helm_values_docs.py --check    # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CHART = Path(__file__).resolve().parent.parent / "helm" / "fashionserve"
START_MARKER = "<!-- values:start -->"
END_MARKER = "<!-- values:end -->"

_KEY_RE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z0-9_][A-Za-z0-9_.\-/]*|\"[^\"]+\"):(\s|$)")
_ITEM_RE = re.compile(r"^(?P<indent>\s*)-(\s|$)")
_DOC_RE = re.compile(r"^\s*# -- ?(?P<text>.*)$")
_CONT_RE = re.compile(r"^\s*#( (?P<text>.*))?$")
_TYPE_RE = re.compile(r"^\((?P<type>[A-Za-z0-9_\[\]]+)\)\s*(?P<rest>.*)$")


@dataclass(frozen=True)
class ValueDoc:
    """One documented key: its dotted path, type, default (as JSON) and description."""

    key: tuple[str, ...]
    type: str
    default: str
    description: str

    @property
    def dotted(self) -> str:
        """The key as helm's --set spells it."""
        return ".".join(self.key)


class DocsError(Exception):
    """values.yaml or README.md is not in a shape this tool understands."""


def _lookup(values: Any, path: tuple[str, ...]) -> Any:
    node = values
    for part in path:
        if not isinstance(node, dict) or part not in node:
            raise DocsError(f"documented key {'.'.join(path)} not found in the parsed values")
        node = node[part]
    return node


def _infer_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return "null" if value is None else type(value).__name__


def _scan(text: str) -> tuple[dict[tuple[str, ...], str], list[tuple[str, ...]]]:
    """Return {key path: description} for documented keys, and every mapping key in order.

    Keys inside sequence items are not paths of their own (helm-docs does the same); their
    sequence is documented as a whole.
    """
    docs: dict[tuple[str, ...], str] = {}
    keys: list[tuple[str, ...]] = []
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    sequence_indent: int | None = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        if sequence_indent is not None:
            # Lines of a sequence's items: deeper than the dash, or further dashes.
            if indent > sequence_indent or (
                indent == sequence_indent and _ITEM_RE.match(line) is not None
            ):
                pending = None
                continue
            sequence_indent = None
        doc = _DOC_RE.match(line)
        if doc is not None:
            pending = [doc.group("text").strip()]
            continue
        if line.lstrip().startswith("#"):
            cont = _CONT_RE.match(line)
            if pending is not None and cont is not None:
                pending.append((cont.group("text") or "").strip())
            continue
        item = _ITEM_RE.match(line)
        if item is not None:
            sequence_indent = indent
            pending = None
            continue
        key = _KEY_RE.match(line)
        if key is None:
            raise DocsError(f"values.yaml:{lineno}: cannot parse {line.strip()!r}")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        name = key.group("key").strip('"')
        stack.append((indent, name))
        path = tuple(part for _, part in stack)
        keys.append(path)
        if pending is not None:
            docs[path] = " ".join(part for part in pending if part)
            pending = None
    return docs, keys


def parse_values(values_path: Path) -> tuple[list[ValueDoc], list[str]]:
    """Parse a values.yaml: its documented keys, and the dotted keys nobody documented."""
    text = values_path.read_text()
    values = yaml.safe_load(text) or {}
    docs, keys = _scan(text)
    result = []
    for path, description in docs.items():
        default = _lookup(values, path)
        type_name = _infer_type(default)
        declared = _TYPE_RE.match(description)
        if declared is not None:
            type_name, description = declared.group("type"), declared.group("rest")
        # A mapping whose keys have rows of their own: their defaults are shown there.
        has_rows = any(other[: len(path)] == path and len(other) > len(path) for other in docs)
        shown = "{...}" if has_rows else json.dumps(default, ensure_ascii=False)
        result.append(ValueDoc(key=path, type=type_name, default=shown, description=description))
    undocumented = [
        ".".join(path)
        for path in keys
        if not any(path[:n] in docs for n in range(1, len(path) + 1))
        # A mapping whose children are all documented needs no description of its own.
        and not any(other[: len(path)] == path and len(other) > len(path) for other in docs)
    ]
    return result, undocumented


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(docs: list[ValueDoc]) -> str:
    """The markdown table helm-docs would write: Key | Type | Default | Description."""
    lines = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for doc in docs:
        lines.append(
            f"| `{doc.dotted}` | {doc.type} | `{_cell(doc.default)}` | {_cell(doc.description)} |"
        )
    return "\n".join(lines) + "\n"


def render_readme(readme: str, table: str) -> str:
    """Put the table between the README's markers, keeping everything else."""
    start, end = readme.find(START_MARKER), readme.find(END_MARKER)
    if start < 0 or end < start:
        raise DocsError(f"README.md needs the markers {START_MARKER} and {END_MARKER}")
    return readme[: start + len(START_MARKER)] + "\n" + table + readme[end:]


def expected_readme(chart: Path = DEFAULT_CHART) -> tuple[str, list[str]]:
    """The README as it should read, and the undocumented keys of values.yaml."""
    docs, undocumented = parse_values(chart / "values.yaml")
    readme = (chart / "README.md").read_text()
    return render_readme(readme, render_table(docs)), undocumented


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chart", type=Path, default=DEFAULT_CHART, help="chart directory")
    parser.add_argument("--check", action="store_true", help="only check, exit 1 if stale")
    args = parser.parse_args(argv)
    try:
        readme, undocumented = expected_readme(args.chart)
    except DocsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if undocumented:
        print("error: undocumented values (add a '# --' comment):", file=sys.stderr)
        for key in undocumented:
            print(f"  {key}", file=sys.stderr)
        return 1
    target = args.chart / "README.md"
    if args.check:
        if target.read_text() != readme:
            print(
                f"error: {target} is stale: run python tools/helm_values_docs.py", file=sys.stderr
            )
            return 1
        return 0
    target.write_text(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
