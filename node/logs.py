"""Structured logging: one line per event, `key=value` pairs, on stderr.

Usage: `log = EventLogger(logging.getLogger("warren.server"), node="n1")`, then
`log.info("connection.opened", conn=3, peer="127.0.0.1:5050")`. Values with spaces or
quotes are quoted. Never print(); never log a traceback for a client's mistake.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any


def _fmt_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def wall_time(at: float) -> str:
    """A `time.time()` as the logs stamp their lines: UTC, milliseconds."""
    whole = int(at)
    millis = int((at - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"ts={wall_time(record.created)}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"event={_fmt_value(record.getMessage())}",
        ]
        fields: dict[str, Any] = getattr(record, "fields", {})
        parts.extend(f"{k}={_fmt_value(v)}" for k, v in fields.items())
        if record.exc_info:
            # Only for our own bugs: keep it on one line.
            exc = self.formatException(record.exc_info).replace("\n", " | ")
            parts.append(f"exc={_fmt_value(exc)}")
        return " ".join(parts)


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class EventLogger:
    """A logger bound to some fields (node name, connection id, ...)."""

    __slots__ = ("_fields", "_logger")

    def __init__(self, logger: logging.Logger, **fields: Any) -> None:
        self._logger = logger
        self._fields = fields

    def bind(self, **fields: Any) -> EventLogger:
        return EventLogger(self._logger, **{**self._fields, **fields})

    def _log(self, level: int, event: str, fields: dict[str, Any], exc: bool = False) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(
                level, event, extra={"fields": {**self._fields, **fields}}, exc_info=exc
            )

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields, exc=True)
