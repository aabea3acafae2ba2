#!/usr/bin/env python3
"""The values table of charts/mailrelay/README.md, generated from values.yaml: every leaf value
(and every empty map or list) with its default and the comment block written right above it (or
above the nearest parent that has one). Usage:

    tests/tools/chart-values-table.py          # rewrite the table between the markers
    tests/tools/chart-values-table.py --check  # exit 1 when the README is stale (tests/chart.sh)
"""
import json
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
VALUES = ROOT / "charts/mailrelay/values.yaml"
README = ROOT / "charts/mailrelay/README.md"
START, END = "<!-- values-table:start -->", "<!-- values-table:end -->"


def comments(lines):
    """Key path -> the comment block directly above that key."""
    out, stack, pending = {}, [], []
    for line in lines:
        stripped = line.strip()
        if not stripped:
            pending = []
            continue
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        m = re.match(r"^(\s*)([^\s:#][^:#]*?):(\s|$)", line)
        if not m or stripped.startswith("- "):
            pending = []
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2).strip().strip('"')))
        path = ".".join(k for _, k in stack)
        if pending:
            out[path] = " ".join(pending)
        pending = []
    return out


def leaves(value, path=""):
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from leaves(v, f"{path}.{k}" if path else str(k))
    else:
        yield path, value


def table():
    text = VALUES.read_text()
    docs = comments(text.splitlines())
    rows = ["| Key | Default | Description |", "| --- | --- | --- |"]
    for path, value in leaves(yaml.safe_load(text)):
        desc, p = "", path
        while p and not desc:
            desc = docs.get(p, "")
            p = p.rpartition(".")[0]
        default = json.dumps(value, separators=(", ", ": "))
        desc = desc.replace("|", "\\|")
        rows.append(f"| `{path}` | `{default}` | {desc} |")
    return "\n".join(rows)


def main():
    readme = README.read_text()
    head, _, rest = readme.partition(START)
    _, _, tail = rest.partition(END)
    want = f"{head}{START}\n{table()}\n{END}{tail}"
    if "--check" in sys.argv:
        if want != readme:
            print(f"{README.relative_to(ROOT)} is stale: run tests/tools/chart-values-table.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(want)
    return 0


if __name__ == "__main__":
    sys.exit(main())
