"""YAML reading and writing for configs: YAML 1.2 scalars, duplicate keys refused, one-line errors.

No torch here (see moedist/config.py).
"""
from __future__ import annotations

import functools
import re

import yaml


class ConfigError(ValueError):
    """A bad configuration; ``str(err)`` is one line naming the dotted key."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


_TAG = "tag:yaml.org,2002:"
# YAML 1.2 core-schema scalars: PyYAML's default 1.1 rules would read `yes` as a bool,
# `1e-3` as a string, `010` as octal 8 and `2024-01-01` as a date.
_RESOLVERS = [
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("int", r"^[-+]?[0-9]+$", list("-+0123456789")),
    ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
              r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", list("-+0123456789.")),
    ("merge", r"^(?:<<)$", ["<"]),
]


def _install_resolvers(cls, keep_yaml_1_1: bool = False):
    cls.yaml_implicit_resolvers = {k: list(v) for k, v in cls.yaml_implicit_resolvers.items()
                                   if keep_yaml_1_1}
    for tag, regex, first in _RESOLVERS:
        cls.add_implicit_resolver(_TAG + tag, re.compile(regex), first)
    return cls


@_install_resolvers
class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader with YAML 1.2 scalars (decimal ints only)."""


_Loader.add_constructor(_TAG + "int", lambda loader, node: int(loader.construct_scalar(node)))
_Loader.add_constructor(_TAG + "float", lambda loader, node: float(
    loader.construct_scalar(node).lower().replace(".inf", "inf").replace(".nan", "nan")))


@functools.partial(_install_resolvers, keep_yaml_1_1=True)
class YamlDumper(yaml.SafeDumper):
    """Quotes every string that :class:`_Loader` or a YAML 1.1 reader would take for another type."""

    def represent_list(self, data):        # short scalar lists inline: targets: [gate, up, down]
        flat = all(not isinstance(x, (list, tuple, dict)) for x in data)
        return self.represent_sequence(_TAG + "seq", data, flow_style=flat)


YamlDumper.add_representer(list, YamlDumper.represent_list)


def parse_yaml(text: str, where: str, prefix: tuple[str, ...] = ()):
    """One YAML document; errors are one line. ``prefix``: the override key the text is the value of."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        _check_duplicates(node, where, prefix, set(), show_line=not prefix)
        return None if node is None else loader.construct_document(node)
    except yaml.YAMLError as err:
        mark, context = getattr(err, "problem_mark", None), getattr(err, "context", None)
        pos = f":{mark.line + 1}:{mark.column + 1}" if mark is not None and not prefix else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}{pos}: invalid YAML: {problem}" + (f" ({context})" if context else "")) \
            from None
    finally:
        loader.dispose()


def _check_duplicates(node, where: str, path: tuple[str, ...], seen: set, show_line: bool) -> None:
    """PyYAML keeps the last of two equal keys silently; a config must not."""
    if node is None or id(node) in seen:       # aliases may revisit (or loop back to) a node
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        names = set()
        for key_node, value in node.value:
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            if name in names:
                line = f" line {key_node.start_mark.line + 1}" if show_line else ""
                raise ConfigError(f"{'.'.join(path + (name,))}: duplicate key ({where}{line})")
            names.add(name)
            _check_duplicates(value, where, path + (name,), seen, show_line)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            _check_duplicates(value, where, path + (str(i),), seen, show_line)


def dump_yaml(data) -> str:
    """YAML text that :func:`load_config` (and any YAML reader) reads back to the same values."""
    return yaml.dump(data, Dumper=YamlDumper, sort_keys=False, default_flow_style=False, width=100)


def fmt_value(v) -> str:
    """A value as error messages show it: YAML-like, strings quoted, one short line."""
    if v is None or isinstance(v, bool):
        return {None: "null", True: "true", False: "false"}[v]
    if isinstance(v, (list, tuple)):
        s = "[" + ", ".join(fmt_value(x) for x in v) + "]"
    elif isinstance(v, dict):
        s = "{" + ", ".join(f"{fmt_value(k)}: {fmt_value(x)}" for k, x in v.items()) + "}"
    else:
        s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."
