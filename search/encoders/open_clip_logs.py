"""open_clip's log records, moved off the root logger and under clipdex's own.

open_clip logs through the logging module's functions (`logging.info(...)`), that is on the
root logger: about 20 INFO lines each time a model is loaded, which an application that
shows its own INFO records prints among them. `route_open_clip_logs` (called before a load)
installs, once, a filter on the root logger that takes the records made in open_clip's own
files off it and logs them again on LOGGER_NAME: INFO and below at DEBUG, warnings and errors
at their own level. Records of anything else pass untouched.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading

LOGGER_NAME = "clipdex.search.encoders.open_clip"

_installed: "OpenClipRecords | None" = None
_lock = threading.Lock()


class OpenClipRecords(logging.Filter):
    """The root logger's filter for the records made in the files under `folder` (open_clip's)."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = os.path.normcase(os.path.join(os.path.realpath(folder), ""))
        self._seen: dict[str, bool] = {}  # a record's pathname: whether it is under `folder`

    def _ours(self, pathname: str) -> bool:
        known = self._seen.get(pathname)
        if known is None:
            known = self._seen[pathname] = os.path.normcase(os.path.realpath(pathname)).startswith(self.folder)
        return known

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._ours(record.pathname):
            return True
        target = logging.getLogger(LOGGER_NAME)
        level = logging.DEBUG if record.levelno <= logging.INFO else record.levelno
        if target.isEnabledFor(level):
            moved = logging.makeLogRecord(record.__dict__)
            moved.name, moved.levelno, moved.levelname = LOGGER_NAME, level, logging.getLevelName(level)
            target.handle(moved)
        return False


def route_open_clip_logs() -> None:
    """Install the filter on the root logger, once (nothing when open_clip is not installed)."""
    global _installed
    if _installed is not None:
        return
    with _lock:
        if _installed is not None:
            return
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            return
        _installed = OpenClipRecords(list(spec.submodule_search_locations)[0])
        logging.getLogger().addFilter(_installed)
