"""Structured logging: one logfmt line per event on stderr, so journald and grep both read it.

Context such as the study or job id is passed as keyword fields and always rendered as
``key=value`` pairs, never interpolated into the message, so a line can be found by id.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    """Render ``ts level logger msg`` followed by every extra field the caller attached."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [
            f"ts={ts}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_quote(record.getMessage())}",
        ]
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class FieldLogger(logging.LoggerAdapter):
    """A logger that takes context as keyword arguments: ``log.info("stored", study=uid)``."""

    def __init__(self, logger: logging.Logger, fields: dict[str, Any] | None = None) -> None:
        super().__init__(logger, fields or {})

    def bind(self, **fields: Any) -> FieldLogger:
        return FieldLogger(self.logger, {**self.extra, **fields})

    def _log_fields(self, level: int, msg: str, args: tuple, kwargs: dict[str, Any]) -> None:
        exc_info = kwargs.pop("exc_info", None)
        extra = {**self.extra, **kwargs}
        self.logger.log(level, msg, *args, extra=extra, exc_info=exc_info, stacklevel=3)

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._log_fields(logging.DEBUG, msg, args, kwargs)

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._log_fields(logging.INFO, msg, args, kwargs)

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._log_fields(logging.WARNING, msg, args, kwargs)

    def error(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._log_fields(logging.ERROR, msg, args, kwargs)

    def exception(self, msg: str, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("exc_info", True)
        self._log_fields(logging.ERROR, msg, args, kwargs)


def get_logger(name: str, **fields: Any) -> FieldLogger:
    return FieldLogger(logging.getLogger(name), fields)


def setup_logging(level: str = "info") -> None:
    """Install the logfmt handler on the root logger once (idempotent)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler.formatter, LogfmtFormatter):
            root.setLevel(level.upper())
            return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    # pynetdicom is chatty at INFO; its association-level events are logged by our handlers.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
