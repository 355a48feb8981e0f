"""Logging set-up shared by the command-line tools: human-readable lines, or one JSON object per line.

JSON lines are for log shippers (Loki, Elasticsearch, journald → jq): every line parses on its own, and
fields passed with ``log.info(..., extra={"device": "edge-0"})`` become top-level keys that can be
filtered without regular expressions.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import sys
from typing import Any

from ffm_edge.errors import ConfigError

__all__ = ["LOG_FORMATS", "JsonFormatter", "resolve_log_format", "setup_logging"]

# Third-party loggers whose INFO/WARNING lines are noise on a device or hub log.
_QUIET = ("bitsandbytes", "transformers", "peft", "urllib3", "filelock", "amqtt")

LOG_FORMATS = ("text", "json")
_ENV = "FFM_LOG_FORMAT"
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has (plus the ones Formatter adds): whatever else a record carries came
# from ``extra=`` and belongs in the JSON object. taskName is new in Python 3.12.
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, extras.

    ``exc`` carries a logged exception's traceback and ``stack`` a ``stack_info=True`` stack, as
    strings, so a traceback never spans several lines of the log. An ``extra=`` value that JSON
    cannot hold is written as its ``str()`` rather than dropped; an extra that reuses a core field's
    name is kept as ``extra_<name>`` so it can never mask the core field.
    """

    def format(self, record: logging.LogRecord) -> str:
        ts = _dt.datetime.fromtimestamp(record.created, tz=_dt.UTC).isoformat(timespec="milliseconds")
        payload: dict[str, Any] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key in _STANDARD_ATTRS or key.startswith("_"):
                continue
            payload[key if key not in payload else f"extra_{key}"] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            payload["exc"] = record.exc_text
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        return json.dumps(payload, default=str, ensure_ascii=False)


def resolve_log_format(fmt: str | None = None) -> str:
    """``fmt`` if given, else ``$FFM_LOG_FORMAT``, else ``text``; anything else is a :class:`ConfigError`.

    Checked here rather than only by argparse so that a typo in the environment variable fails loudly
    instead of silently falling back to text that the log shipper then cannot parse.
    """
    source = "--log-format"
    if fmt is None:
        fmt, source = os.environ.get(_ENV, "").strip() or "text", _ENV
    value = fmt.lower()
    if value not in LOG_FORMATS:
        raise ConfigError(f"{source} must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    return value


def setup_logging(verbose: bool = False, fmt: str | None = None) -> None:
    """Log to stderr as timestamped text or JSON lines; third-party chatter only at ERROR unless ``verbose``.

    ``fmt`` is ``"text"`` or ``"json"``; ``None`` means ``$FFM_LOG_FORMAT`` (default text), so a
    service manager can switch a fleet to JSON without changing command lines. Like
    :func:`logging.basicConfig`, it leaves an already configured root logger alone.
    """
    handler = logging.StreamHandler(sys.stderr)
    if resolve_log_format(fmt) == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(_TEXT_FORMAT))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    if not verbose:
        for name in _QUIET:
            logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
