"""Config plumbing shared by every section: the error type, documented fields, and the typed
conversion from plain YAML data (dicts, lists, scalars) into the section dataclasses.

Every section dataclass declares ``SECTION`` (its dotted path in a recipe, e.g. ``"loss"``) so a
check in ``__post_init__`` can name the full field path (``loss.eps_low``) even when the section
is built directly in Python. The loader adds the recipe file and line when it knows them.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

__all__ = ["ConfigError", "doc", "check", "from_data", "field_docs", "close_matches",
           "MOVED_FIELDS", "unknown_key_reason"]

# Fields that moved to another section: old dotted path -> new one. A recipe (or --set) still
# using the old path gets an error that says where the field lives now.
MOVED_FIELDS = {
    "reward.alpha": "loss.alpha",  # the ORM weight is a term of the loss's advantage
}


class ConfigError(ValueError):
    """A recipe or override is wrong. ``path`` is the dotted field path (``loss.eps_low``)."""

    def __init__(self, path: str, value: Any, reason: str, where: str | None = None):
        self.path, self.value, self.reason, self.where = path, value, reason, where
        super().__init__(self._message())

    def _message(self) -> str:
        head = f"{self.path}={self.value!r}: {self.reason}" if self.path else self.reason
        return f"{self.where}: {head}" if self.where else head

    def located(self, where: str | None) -> "ConfigError":
        """The same error with a source location (``recipe.yaml:12`` or ``--set``) attached."""
        if where is None or self.where is not None:
            return self
        return ConfigError(self.path, self.value, self.reason, where)



def doc(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None) -> Any:
    """A dataclass field with its documentation kept in ``metadata['help']``.

    The help text is what ``field_docs`` prints and what the README's field table is made of.
    """
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def check(ok: bool, section: Any, name: str, reason: str) -> None:
    """Raise a ConfigError naming ``<section.SECTION>.<name>`` and its value unless ``ok``."""
    if not ok:
        raise ConfigError(f"{section.SECTION}.{name}", getattr(section, name), reason)


def field_docs(cls: type, prefix: str | None = None) -> list[tuple[str, str, Any, str]]:
    """(dotted path, type, default, help) for every field of a section, nested sections expanded."""
    prefix = prefix if prefix is not None else getattr(cls, "SECTION", cls.__name__)
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        inner = _dataclass_in(tp)
        if inner is not None:
            suffix = {list: "[]", dict: ".<key>"}.get(typing.get_origin(tp), "")
            rows += field_docs(inner, path + suffix)
            continue
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        rows.append((path, _type_name(tp), default, f.metadata.get("help", "")))
    return rows


def unknown_key_reason(path: str, key: str, options: typing.Iterable[str],
                       what: str = "unknown key") -> str:
    """The reason for an unknown ``key`` at dotted ``path``: where a moved field lives now, or
    the close matches among ``options``."""
    if path in MOVED_FIELDS:
        return (f"{what}: {path} moved to {MOVED_FIELDS[path]}; set {MOVED_FIELDS[path]} "
                f"instead")
    return what + close_matches(key, options)


def close_matches(name: str, options: typing.Iterable[str]) -> str:
    """' (did you mean: a, b?)' or '' -- appended to unknown-key errors."""
    hits = difflib.get_close_matches(name, list(options), n=3, cutoff=0.6)
    return f" (did you mean: {', '.join(hits)}?)" if hits else ""


# --- typed conversion -------------------------------------------------------------------------

def _dataclass_in(tp: Any) -> type | None:
    """The section dataclass inside ``tp`` (itself, ``list[X]``, ``dict[str, X]``), if any."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " or null"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def from_data(tp: Any, data: Any, path: str, locate: typing.Callable[[str], str | None]) -> Any:
    """Convert YAML data at ``path`` into ``tp``; ``locate(path)`` gives 'file:line' for errors.

    Strict on purpose: ints are not bools, a string is not a list, unknown keys are errors. The
    only widening is int -> float (YAML writes ``1`` for ``1.0``).
    """
    def fail(reason: str) -> ConfigError:
        return ConfigError(path, data, reason, locate(path))

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return data
    if origin in (Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for a in options:
            try:
                return from_data(a, data, path, locate)
            except ConfigError as e:
                errors.append(e)
        if len(options) == 1:
            raise errors[0]
        raise fail(f"expected {_type_name(tp)}")
    if origin is Literal:
        if data not in args:
            raise fail(f"must be one of {', '.join(repr(a) for a in args)}")
        return data
    if dataclasses.is_dataclass(tp):
        return _section_from_data(tp, data, path, locate)
    if origin in (list, tuple):
        if not isinstance(data, list):
            raise fail(f"expected a list, got {type(data).__name__}")
        item_tp = args[0] if args else Any
        if origin is tuple and len(args) == 2 and args[1] is not Ellipsis:  # fixed-size pair
            if len(data) != 2:
                raise fail("expected a list of 2 values")
            return tuple(from_data(a, v, f"{path}[{i}]", locate) for i, (a, v) in enumerate(zip(args, data)))
        out = [from_data(item_tp, v, f"{path}[{i}]", locate) for i, v in enumerate(data)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(data, dict):
            raise fail(f"expected a mapping, got {type(data).__name__}")
        key_tp, val_tp = args if args else (str, Any)
        return {from_data(key_tp, k, f"{path}", locate): from_data(val_tp, v, f"{path}.{k}", locate)
                for k, v in data.items()}
    if tp is bool:
        if not isinstance(data, bool):
            raise fail("expected true or false")
        return data
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise fail("expected an integer")
        return data
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise fail("expected a number")
        return float(data)
    if tp is str:
        if not isinstance(data, str):
            raise fail(f"expected a string, got {type(data).__name__}")
        return data
    raise TypeError(f"config type {tp!r} at {path} is not supported by from_data")


def _section_from_data(cls: type, data: Any, path: str, locate) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, data, f"expected a mapping of {cls.__name__} fields", locate(path))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            kpath = f"{path}.{key}" if path else str(key)
            raise ConfigError(kpath, data[key], unknown_key_reason(kpath, str(key), fields),
                              locate(kpath))
    kwargs = {}
    for name, f in fields.items():
        fpath = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = from_data(hints[name], data[name], fpath, locate)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(fpath, None, "required field is missing", locate(path))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # A section check names its declared SECTION path; items of a list or dict
        # (teachers[1], reward.verifiers.math) re-root it at their actual path.
        section = getattr(cls, "SECTION", None)
        if section and path != section and (e.path == section or e.path.startswith(section + ".")):
            e = ConfigError(path + e.path[len(section):], e.value, e.reason, e.where)
        raise e.located(locate(e.path)) from None
