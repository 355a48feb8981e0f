"""Strategy configs from text: ``KEY=VALUE`` options (``ffm-edge run --strategy-option``) and their listing.

A device user sets e.g. full_q8's ``top_k`` or LoRA's ``r`` without writing Python; apps that read
settings from a file or an environment use the same parser. Each value is parsed by the type of its
config dataclass field, and the config's own ``__post_init__`` then validates it, so text and Python
give the same errors. The types the built-in configs use, and so the ones parsed here:

* ``bool``: ``true``/``false``, ``1``/``0``, ``yes``/``no`` (any case);
* ``int``, ``float`` (finite), ``str`` (taken as is);
* ``tuple[str, ...]``: comma-separated names, e.g. ``query,value`` (spaces around names are dropped);
* ``X | None``: ``none`` (any case) is ``None``, anything else is parsed as ``X``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from ffm_edge.errors import ConfigError
from ffm_edge.strategies.base import STRATEGIES, Strategy, StrategyConfig

__all__ = [
    "OptionField",
    "format_strategy_options",
    "parse_strategy_options",
    "strategy_from_options",
    "strategy_option_fields",
]

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


@dataclasses.dataclass(frozen=True)
class OptionField:
    """One settable field of a strategy config: what the listing prints and the parser needs."""

    name: str
    type: Any
    default: Any
    help: str

    @property
    def type_name(self) -> str:
        """The type as a user reads it: ``float``, ``int | None``, ``tuple[str, ...] | None``."""
        return _type_name(self.type)

    @property
    def default_text(self) -> str:
        """The default in the option syntax (``none``, ``true``, ``query,value``), so it can be copied."""
        return _to_text(self.default)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    args = typing.get_args(tp)
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) is tuple:
        return f"tuple[{_type_name(args[0])}, ...]"
    return str(getattr(tp, "__name__", tp))


def _to_text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _config_class(name: str) -> type[StrategyConfig]:
    if name == "auto":
        raise ConfigError(
            "strategy options need a named strategy, not 'auto' (the planner picks auto's strategy and config); "
            f"choose one of {sorted(STRATEGIES)}"
        )
    try:
        return STRATEGIES[name].config_class
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}") from None


def strategy_option_fields(name: str) -> list[OptionField]:
    """The fields of strategy ``name``'s config that options can set, in declaration order."""
    cls = _config_class(name)
    hints = typing.get_type_hints(cls)  # the configs use postponed annotations: resolve the strings
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        out.append(OptionField(f.name, hints[f.name], default, str(f.metadata.get("help", ""))))
    return out


def _parse(text: str, tp: Any) -> Any:
    """``text`` as a value of ``tp``; ValueError when it is not one (the caller names key and type)."""
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != len(typing.get_args(tp)) and text.strip().lower() == "none":
            return None
        if len(args) != 1:
            raise TypeError(f"unions of several types are not parsed: {_type_name(tp)}")
        return _parse(text, args[0])
    if tp is bool:
        word = text.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise ValueError(text)
    if tp is int:
        return int(text.strip())
    if tp is float:
        value = float(text.strip())
        if not math.isfinite(value):
            raise ValueError(text)
        return value
    if tp is str:
        return text
    if typing.get_origin(tp) is tuple and typing.get_args(tp)[1:] == (Ellipsis,):
        if not text.strip():
            return ()
        items = tuple(_parse(item.strip(), typing.get_args(tp)[0]) for item in text.split(","))
        if any(item == "" for item in items):
            raise ValueError(text)
        return items
    raise TypeError(f"fields of type {_type_name(tp)} cannot be set from text")


def _expected(tp: Any) -> str:
    """What a value of ``tp`` looks like, for the error on one that does not parse."""
    if _is_union(tp):
        inner = [_expected(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join([*inner, "none"])
    if typing.get_origin(tp) is tuple:
        return "comma-separated names, e.g. query,value"
    return {bool: "a bool (true/false, 1/0, yes/no)", int: "an int", float: "a finite float"}.get(tp, _type_name(tp))


def _describe(fields: list[OptionField]) -> str:
    return "; ".join(f"{f.name} ({f.type_name}, default {f.default_text}): {f.help}" for f in fields)


def parse_strategy_options(items: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` texts (``--strategy-option``, repeatable) as field name → text, for
    :func:`strategy_from_options`. ``ConfigError`` for an item without ``=`` or a key, or a key given twice."""
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--strategy-option takes KEY=VALUE, like top_k=0.01; got {item!r}")
        if key in options:
            raise ConfigError(f"--strategy-option {key} is given twice ({options[key]!r} and {value!r})")
        options[key] = value
    return options


def strategy_from_options(name: str, options: Mapping[str, str]) -> Strategy:
    """Strategy ``name`` with the config fields in ``options`` (field name → text) set; the rest default.

    Raises :class:`ConfigError` for ``auto`` or an unknown strategy, an unknown field (the message lists the
    valid ones with their help), a value that does not parse as the field's type (naming key, value and
    type), and a value the config's validation refuses (naming the key that caused it).
    """
    fields = {f.name: f for f in strategy_option_fields(name)}
    values: dict[str, Any] = {}
    for key, text in options.items():
        field = fields.get(key)
        if field is None:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"strategy {name!r} has no option {key!r}{hint}; its options are: {_describe(list(fields.values()))}"
            )
        try:
            values[key] = _parse(text, field.type)
        except ValueError:
            raise ConfigError(f"strategy {name!r} option {key}={text!r}: expected {_expected(field.type)}") from None
        except TypeError as exc:
            raise ConfigError(f"strategy {name!r} option {key}: {exc}") from None
    config_class = STRATEGIES[name].config_class
    try:
        config = config_class(**values)
    except ConfigError as exc:
        # Name the option at fault: the one that fails on its own, else the combination of all given.
        culprits = []
        for key, value in values.items():
            try:
                config_class(**{key: value})
            except ConfigError:
                culprits.append(key)
        keys = culprits or list(values)
        given = ", ".join(f"{k}={options[k]}" for k in keys)
        raise ConfigError(f"strategy {name!r} option {given}: {exc}") from exc
    return STRATEGIES[name](config)


def format_strategy_options() -> str:
    """Every registered strategy with its config fields, types, defaults and help (most capable first)."""
    lines = []
    for name in sorted(STRATEGIES, key=lambda n: -STRATEGIES[n].capability_rank):
        cls = STRATEGIES[name]
        summary = (cls.__doc__ or "").strip().split("\n")[0].replace("``", "")
        lines.append(f"{name} (capability {cls.capability_rank}): {summary}")
        fields = strategy_option_fields(name)
        rows = [(f.name, f.type_name, f.default_text) for f in fields]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        for f in fields:
            lines.append(
                f"  {f.name:<{widths[0]}}  {f.type_name:<{widths[1]}}  default {f.default_text:<{widths[2]}}  {f.help}"
            )
        lines.append("")
    lines.append("set a field with: ffm-edge run --strategy NAME --strategy-option FIELD=VALUE (repeatable)")
    return "\n".join(lines)
