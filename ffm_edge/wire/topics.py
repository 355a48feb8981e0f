"""MQTT topic names under ``ffm/v1/{federation}/…``, ids, and the strict field checks of the wire.

Every device has its own uplink and downlink topics so that broker ACLs can confine a device to its own
traffic. Identifiers are restricted to a small safe alphabet, which also keeps MQTT wildcards (``+``,
``#``), separators (``/``) and ``$``-prefixed system topics out of every topic this module builds.

The private ``check_*`` helpers and the strict JSON reader below are shared by the other wire modules
(envelope, chunking, messages, codec) so that every field from the network is validated the same way:
``bool`` is never an ``int``, floats are finite, JSON has no duplicate keys and no ``NaN``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from typing import Any

from ffm_edge.errors import MalformedError

__all__ = ["ID_PATTERN", "TOPIC_ROOT", "Topics", "validate_id"]

TOPIC_ROOT = "ffm/v1"

#: Federation, device, update and transfer ids: 1-64 chars, starting with a letter or digit.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

_UPLINK_KINDS = ("update", "ctl")


def validate_id(value: object, what: str) -> str:
    """Return ``value`` if it is a valid id, else raise :class:`MalformedError` naming ``what``."""
    if not isinstance(value, str) or ID_PATTERN.fullmatch(value) is None:
        raise MalformedError(f"invalid {what}: {value!r} (expected {ID_PATTERN.pattern})")
    return value


_HEX64 = re.compile(r"[0-9a-f]{64}")


def check_int(value: object, what: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An int (never a bool) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedError(f"{what} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise MalformedError(f"{what} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise MalformedError(f"{what} must be <= {maximum}, got {value}")
    return value


def check_optional_int(value: object, what: str, *, minimum: int | None = None) -> int | None:
    """``None`` or an int as :func:`check_int` accepts it."""
    return None if value is None else check_int(value, what, minimum=minimum)


def check_float(value: object, what: str, *, minimum: float | None = None) -> float:
    """A finite number (int or float, never a bool) as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedError(f"{what} must be a number, got {type(value).__name__}")
    try:
        result = float(value)
    except OverflowError as exc:
        raise MalformedError(f"{what} is out of range") from exc
    if not math.isfinite(result):
        raise MalformedError(f"{what} must be finite, got {result}")
    if minimum is not None and result < minimum:
        raise MalformedError(f"{what} must be >= {minimum}, got {result}")
    return result


def check_bool(value: object, what: str) -> bool:
    """A real JSON boolean (``0``/``1`` are not accepted)."""
    if not isinstance(value, bool):
        raise MalformedError(f"{what} must be a bool, got {type(value).__name__}")
    return value


def check_text(value: object, what: str, *, max_chars: int, allow_empty: bool = False) -> str:
    """A string of at most ``max_chars`` characters without control characters or lone surrogates
    (JSON can carry ``"\\ud800"``, which no UTF-8 store or log could write back)."""
    if not isinstance(value, str):
        raise MalformedError(f"{what} must be a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise MalformedError(f"{what} must not be empty")
    if len(value) > max_chars:
        raise MalformedError(f"{what} is longer than {max_chars} characters")
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 or 0xD800 <= ord(ch) < 0xE000 for ch in value):
        raise MalformedError(f"{what} contains control characters or lone surrogates")
    return value


def check_choice(value: object, what: str, choices: frozenset[str] | tuple[str, ...]) -> str:
    """One of a fixed set of strings."""
    if not isinstance(value, str) or value not in choices:
        raise MalformedError(f"{what} must be one of {sorted(choices)}, got {value!r}")
    return value


#: A reason code: snake_case, 1-40 characters, starting with a letter.
CODE_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,39}")


def check_code(value: object, what: str) -> str:
    """A well-formed reason code, known to this SDK or not: codes are an open set (like HTTP status codes),
    so a newer peer can add one without every older decoder refusing the whole message."""
    if not isinstance(value, str) or CODE_PATTERN.fullmatch(value) is None:
        raise MalformedError(f"{what} must be a snake_case code ({CODE_PATTERN.pattern}), got {value!r:.60}")
    return value


def check_sha256(value: object, what: str) -> str:
    """A sha256 digest as 64 lowercase hex digits."""
    if not isinstance(value, str) or _HEX64.fullmatch(value) is None:
        raise MalformedError(f"{what} must be 64 lowercase hex digits")
    return value


#: Most entries in a ``metrics`` mapping, and the longest metric name.
MAX_METRICS = 256
MAX_METRIC_NAME = 128


def check_metrics(value: object, what: str = "metrics") -> dict[str, float]:
    """A mapping of metric names to finite floats (copied, so callers cannot mutate a frozen object)."""
    if not isinstance(value, Mapping):
        raise MalformedError(f"{what} must be an object, got {type(value).__name__}")
    if len(value) > MAX_METRICS:
        raise MalformedError(f"{what} has more than {MAX_METRICS} entries")
    result: dict[str, float] = {}
    for key, item in value.items():
        name = check_text(key, f"{what} key", max_chars=MAX_METRIC_NAME)
        result[name] = check_float(item, f"{what}[{name!r}]")
    return result


def check_keys(data: object, what: str, required: Collection[str], optional: Collection[str] = ()) -> dict[str, Any]:
    """A JSON object with every required key, no unknown key; returned as a plain dict."""
    if not isinstance(data, Mapping):
        raise MalformedError(f"{what} must be an object, got {type(data).__name__}")
    keys = set(data)
    missing = set(required) - keys
    if missing:
        raise MalformedError(f"{what} lacks {sorted(missing)}")
    unknown = keys - set(required) - set(optional)
    if unknown:
        raise MalformedError(f"{what} has unknown fields {sorted(map(str, unknown))}")
    return dict(data)


def _reject_constant(name: str) -> Any:
    raise MalformedError(f"JSON constant {name} is not allowed")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise MalformedError(f"duplicate JSON key {key!r}")
        result[key] = value
    return result


def loads_json_object(raw: bytes, what: str) -> dict[str, Any]:
    """Strictly parse UTF-8 JSON that must be an object; every failure is a :class:`MalformedError`."""
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_unique_object, parse_constant=_reject_constant)
    except MalformedError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise MalformedError(f"{what} is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise MalformedError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def dumps_json(value: Mapping[str, Any]) -> bytes:
    """Canonical compact JSON (sorted keys, no NaN) as UTF-8 bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


class Topics:
    """Topic names of one federation; every method validates the ids it interpolates."""

    def __init__(self, federation: str) -> None:
        self.federation = validate_id(federation, "federation id")
        self.base = f"{TOPIC_ROOT}/{self.federation}"

    def __repr__(self) -> str:
        return f"Topics({self.federation!r})"

    def uplink_update(self, device: str) -> str:
        """Chunk frames of a device's update (device → hub)."""
        return f"{self.base}/up/{validate_id(device, 'device id')}/update"

    def uplink_control(self, device: str) -> str:
        """JSON control messages from a device (device → hub)."""
        return f"{self.base}/up/{validate_id(device, 'device id')}/ctl"

    def downlink_control(self, device: str) -> str:
        """Receipts, rejections, manifests and pull errors for one device (hub → device)."""
        return f"{self.base}/down/{validate_id(device, 'device id')}/ctl"

    def downlink_global(self, device: str) -> str:
        """Chunk frames of a global version a device asked for (hub → device)."""
        return f"{self.base}/down/{validate_id(device, 'device id')}/global"

    def downlink_artifacts(self, device: str) -> str:
        """Chunk frames of training artifacts a device asked for (hub → device); apart from global
        versions, so a device's global-version reassembly never buffers an artifact transfer."""
        return f"{self.base}/down/{validate_id(device, 'device id')}/artifacts"

    def presence(self, device: str) -> str:
        """A device's presence (its Last Will goes here)."""
        return f"{self.base}/presence/{validate_id(device, 'device id')}"

    def hub_presence(self) -> str:
        """The hub's own presence."""
        return f"{self.base}/hub/presence"

    def manifest(self) -> str:
        """The retained manifest of the latest global version."""
        return f"{self.base}/global/manifest"

    def uplink_filter(self) -> str:
        """Hub subscription covering every device's uplink (updates and control)."""
        return f"{self.base}/up/+/+"

    def presence_filter(self) -> str:
        """Hub subscription covering every device's presence."""
        return f"{self.base}/presence/+"

    def parse_uplink(self, topic: str) -> tuple[str, str]:
        """Split an uplink topic of this federation into ``(device, "update" | "ctl")``."""
        parts = topic.split("/") if isinstance(topic, str) else []
        prefix = self.base.split("/")
        if (
            len(parts) != len(prefix) + 3
            or parts[: len(prefix)] != prefix
            or parts[len(prefix)] != "up"
            or parts[-1] not in _UPLINK_KINDS
        ):
            raise MalformedError(f"not an uplink topic of federation {self.federation!r}: {topic!r}")
        return validate_id(parts[-2], "device id"), parts[-1]

    def parse_presence(self, topic: str) -> str:
        """Return the device id of a device presence topic of this federation."""
        parts = topic.split("/") if isinstance(topic, str) else []
        prefix = self.base.split("/")
        if len(parts) != len(prefix) + 2 or parts[: len(prefix)] != prefix or parts[len(prefix)] != "presence":
            raise MalformedError(f"not a presence topic of federation {self.federation!r}: {topic!r}")
        return validate_id(parts[-1], "device id")
