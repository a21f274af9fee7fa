"""Config files are data: refuse one that asks its loader to run code, repeats a key, or expands past a bound.

Snakemake loads config files itself (snakemake.common.configfile): JSON first, else YAML through YTE with
yaml.FullLoader, and a file whose top level says `__use_yte__: true` is rendered as a YTE template, i.e. its
`?`-expressions are evaluated as Python at load time, before the Snakefile runs. This module reads a config
file as plain data without constructing anything and raises ConfigFileError (one line, naming the file and
the key) for:
- the `__use_yte__` key (any value, anywhere), and any tag beyond the JSON types (`!!python/...`, custom `!tags`,
  also `!!timestamp`/`!!binary`/`!!set`: a config holds strings, numbers, booleans, null, lists and mappings);
- a key given twice in one mapping (YAML and JSON loaders silently keep the last);
- more than MAX_NODES values or MAX_CHARS characters of scalars once aliases are expanded (an alias bomb is a few
  lines that expand to gigabytes; the count is memoised per node, so refusing one takes milliseconds), a
  recursive alias, or a file over MAX_FILE_BYTES.
No torch import: it runs before Snakemake (`make run`, `python -m moesweep.configfile FILE...`) and from the
Snakefile on every config file Snakemake was given.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

MAX_FILE_BYTES = 1 << 20
MAX_NODES = 100_000
MAX_CHARS = 10 << 20
YTE_KEY = "__use_yte__"
_CORE = "tag:yaml.org,2002:"
ALLOWED_TAGS = {_CORE + t for t in ("str", "int", "float", "bool", "null", "map", "seq", "merge")}


class ConfigFileError(ValueError):
    pass


def _json_pairs(where: str):
    def hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ConfigFileError(f"{where}: key {key!r} is given twice in one mapping; give each key once")
            if key == YTE_KEY:
                raise ConfigFileError(f"{where}: key {YTE_KEY!r} asks Snakemake to run the file as a YTE template "
                                      f"(Python code); config files must be plain data")
            seen.add(key)
        return dict(pairs)
    return hook


def _walk(root: yaml.Node, where: str) -> None:
    """Check tags, keys and the alias-expanded size of a composed YAML node graph (shared nodes counted once
    per reference, memoised, so the walk is linear in the file, not in its expansion)."""
    sizes: dict[int, tuple[int, int]] = {}
    active: set[int] = set()

    def size(node: yaml.Node, path: str) -> tuple[int, int]:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in active:
            raise ConfigFileError(f"{where}: {path or 'the document'} refers to itself through an alias; "
                                  f"recursive values are not allowed")
        if node.tag not in ALLOWED_TAGS:
            raise ConfigFileError(f"{where}: {path or 'the document'} has tag {node.tag!r}; allowed: plain strings, "
                                  f"numbers, booleans, null, lists and mappings (quote the value if it is text)")
        active.add(id(node))
        nodes, chars = 1, 0
        if isinstance(node, yaml.ScalarNode):
            chars = len(node.value)
        elif isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                n, c = size(child, f"{path}[{i}]")
                nodes, chars = nodes + n, chars + c
        else:
            seen = set()
            for key, value in node.value:
                if key.tag == _CORE + "merge":
                    name = "<<"
                elif not isinstance(key, yaml.ScalarNode):
                    raise ConfigFileError(f"{where}: {path or 'the document'} has a non-scalar key; keys are strings")
                else:
                    name = key.value
                    if name == YTE_KEY:
                        raise ConfigFileError(f"{where}: key {YTE_KEY!r} asks Snakemake to run the file as a YTE "
                                              f"template (Python code); config files must be plain data")
                    if (key.tag, name) in seen:
                        raise ConfigFileError(f"{where}: key {f'{path}.' if path else ''}{name} is given twice in "
                                              f"one mapping (line {key.start_mark.line + 1}); give each key once")
                    seen.add((key.tag, name))
                for child in (key, value):
                    n, c = size(child, f"{path}.{name}" if path else str(name))
                    nodes, chars = nodes + n, chars + c
        active.discard(id(node))
        if nodes > MAX_NODES or chars > MAX_CHARS:
            raise ConfigFileError(f"{where}: {path or 'the document'} expands to {nodes:,} values / {chars:,} "
                                  f"characters once its aliases are resolved; allowed: at most {MAX_NODES:,} values "
                                  f"and {MAX_CHARS:,} characters")
        sizes[id(node)] = (nodes, chars)
        return nodes, chars

    size(root, "")


def check_config_file(path: str | Path) -> None:
    """Raise ConfigFileError unless `path` is plain data (see the module docstring)."""
    path = Path(path)
    where = f"config file {path}"
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigFileError(f"{where}: cannot be read ({err.strerror})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigFileError(f"{where}: {len(raw):,} bytes; allowed: at most {MAX_FILE_BYTES:,}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigFileError(f"{where}: not UTF-8 text ({err})") from None
    try:  # Snakemake tries JSON first; a file that parses as JSON is loaded as JSON
        json.loads(text, object_pairs_hook=_json_pairs(where))
        return
    except ValueError as err:
        if isinstance(err, ConfigFileError):
            raise
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # nodes only: nothing is constructed or expanded
    except yaml.YAMLError as err:
        raise ConfigFileError(f"{where}: not valid YAML ({' '.join(str(err).split())})") from None
    if root is None:
        raise ConfigFileError(f"{where}: empty")
    if not isinstance(root, yaml.MappingNode):
        raise ConfigFileError(f"{where}: the top level must be a mapping of config keys")
    _walk(root, where)


def check_config_files(paths) -> None:
    for p in paths:
        check_config_file(p)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: configfile.py CONFIG_FILE...", file=sys.stderr)
        return 2
    try:
        check_config_files(argv)
    except ConfigFileError as err:
        print(f"invalid config: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
