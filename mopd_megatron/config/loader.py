"""Recipe YAML -> MOPDConfig, with ``--set a.b=c`` overrides and file:line in every error."""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml

from .base import ConfigError, from_data, unknown_key_reason
from .recipe import MOPDConfig

__all__ = ["load_recipe", "config_from_dict", "parse_override", "RecipeLoader"]


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` as a float (YAML 1.1 insists on ``1.0e-5``, which
    would turn a learning rate into a string)."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _marks(node: yaml.Node, path: str, out: dict[str, int], fname: str) -> None:
    """Record the 1-based line of every key/item path; refuse duplicate keys (PyYAML keeps the
    last one silently, which hides typos in long recipes)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, val_node in node.value:
            key = str(key_node.value)
            sub = f"{path}.{key}" if path else key
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(sub, key, f"duplicate key (first at line {seen[key]})", f"{fname}:{line}")
            seen[key] = line
            out[sub] = line
            _marks(val_node, sub, out, fname)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = f"{path}[{i}]"
            out[sub] = item.start_mark.line + 1
            _marks(item, sub, out, fname)


def _split_path(path: str) -> list[str]:
    """'teachers[0].checkpoint' or 'teachers.0.checkpoint' -> ['teachers', '0', 'checkpoint']."""
    return [p for p in re.sub(r"\[(\d+)\]", r".\1", path).split(".") if p != ""]


def _join_path(parts: list[str]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=c' -> ('a.b', c typed as a YAML scalar/flow value: 3 -> int, [1, 2] -> list)."""
    if "=" not in text:
        raise ConfigError("", text, f"override {text!r} must look like section.field=value", "--set")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError("", text, f"override {text!r} has no field path", "--set")
    try:
        value = yaml.load(raw, Loader=RecipeLoader) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(key, raw, f"value is not valid YAML ({e.problem})", f"--set {text}") from None
    return key, value


def _apply_override(data: dict, key: str, value: Any, origin: str) -> str:
    """Set ``key`` in the raw recipe data, checking each path part against the schema."""
    parts = _split_path(key)
    tp: Any = MOPDConfig
    node: Any = data
    for depth, part in enumerate(parts):
        here = _join_path(parts[: depth + 1])
        last = depth == len(parts) - 1
        tp = _unwrap_optional(tp)
        origin_tp = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            names = [f.name for f in dataclasses.fields(tp)]
            if part not in names:
                raise ConfigError(here, value, unknown_key_reason(here, part, names, "unknown field"),
                                  origin)
            tp = typing.get_type_hints(tp)[part]
            slot: Any = part
        elif origin_tp is list:
            if not part.isdigit():
                raise ConfigError(here, value, "list index must be a number", origin)
            if not isinstance(node, list) or int(part) >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise ConfigError(here, value, f"index out of range (the recipe has {size} items)", origin)
            tp = typing.get_args(tp)[0]
            slot = int(part)
        elif origin_tp is dict or tp is Any:
            args = typing.get_args(tp)
            tp = args[1] if args else Any
            slot = part
        else:
            raise ConfigError(here, value, f"{_join_path(parts[:depth])} is a value, not a section", origin)
        if last:
            node[slot] = value
        else:
            if isinstance(node, dict) and (slot not in node or node[slot] is None):
                node[slot] = [] if typing.get_origin(_unwrap_optional(tp)) is list else {}
            node = node[slot]
    return _join_path(parts)


def _unwrap_optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


class _Locator:
    """path -> 'file:line' (or the ``--set`` that set it) of the nearest recorded ancestor."""

    def __init__(self, source: str | None, lines: dict[str, int], overridden: dict[str, str]):
        self.source, self.lines, self.overridden = source, lines, overridden

    def __call__(self, path: str) -> str | None:
        probe = path
        while probe:
            if probe in self.overridden:
                return self.overridden[probe]
            if probe in self.lines:
                return f"{self.source}:{self.lines[probe]}"
            probe = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", probe)
        return self.source


def config_from_dict(data: dict, overrides: Iterable[str] = (), source: str | None = None,
                     lines: dict[str, int] | None = None) -> MOPDConfig:
    """Build an MOPDConfig from plain data plus overrides. Section checks run; call
    ``validate()`` for the cross-section checks."""
    data = copy.deepcopy(dict(data or {}))  # overrides must not edit the caller's dict
    lines = lines or {}
    overridden: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text)
        path = _apply_override(data, key, value, f"--set {text}")
        overridden[path] = f"--set {text}"

    locate = _Locator(source, lines, overridden)
    cfg = from_data(MOPDConfig, data, "", locate)
    cfg._locate = locate  # not a field (picklable): lets validate() name file:line too
    return cfg


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(node: Any, path: str, lines: dict[str, int], fname: str) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in the recipe's strings (cluster paths such as
    ``${MOPD_DATA}/math.jsonl``); an unset variable without a default is an error naming the
    field and line. Only recipe files are expanded: ``--set`` values come from a shell already."""
    if isinstance(node, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else str(k), lines, fname)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, f"{path}[{i}]", lines, fname) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        where = f"{fname}:{lines[path]}" if path in lines else fname
        raise ConfigError(path, node, f"environment variable {name} is not set (export it, or "
                          f"write ${{{name}:-default}} in the recipe)", where)
    return _ENV_REF.sub(sub, node)


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> MOPDConfig:
    """Read a recipe YAML, apply ``--set`` overrides, build and section-check the config.

    Errors are ConfigError naming the field path, the value, and ``file:line`` (or ``--set``).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", str(path), f"recipe file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    fname = str(path)
    try:
        root = yaml.compose(text, Loader=RecipeLoader)
        data = yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{fname}:{mark.line + 1}" if mark is not None else fname
        raise ConfigError("", None, f"not valid YAML: {getattr(e, 'problem', e)}", where) from None
    lines: dict[str, int] = {}
    if root is not None:
        _marks(root, "", lines, fname)
    if data is not None and not isinstance(data, dict):
        raise ConfigError("", None, "a recipe is a mapping of sections (model, data, ...)", fname)
    data = _expand_env(data or {}, "", lines, fname)
    return config_from_dict(data, overrides, fname, lines)
