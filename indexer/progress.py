"""What an index run tells its caller as it goes: its phase, and how far it is in it.

`index_paths(progress=...)` takes a callable of one argument, an `IndexProgress`:

- `scan`: the folders are being walked (`done` 0, `total` None), then walked (`done` ==
  `total` == the files found);
- `export`: a new library's first run exports the model to ONNX (towers: `done` of `total` 2),
  or a run that loaded the model exports it at its end (`total` None until it is done);
- `embed`: files read, decoded and handed to the model (`done` of `total`, the files the run
  must do: new or changed ones);
- `ocr`: with OCR on (`ocr=True`, or a library indexed with it), after the rest: images read
  for text (`done` of `total`, the images not read yet);
- `commit`: files stored in the catalog (`done` of `total`: files that failed are never
  committed, so `done` may end below `total`).

Phases may overlap: a first run decodes while it exports, and commits while it embeds. The
callable is called from the run's threads (one call at a time): keep it quick.

A callable of two arguments `(done, total)` (what clipdex took before) still works: it is
called for the `embed` phase only.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Callable, Literal, Union, cast

Phase = Literal["scan", "export", "embed", "commit", "ocr"]
PHASES: tuple[Phase, ...] = ("scan", "export", "embed", "commit", "ocr")


@dataclass(frozen=True)
class IndexProgress:
    """One step of an index run (see the module's docstring)."""

    phase: Phase
    done: int
    total: int | None  # None: not known yet


IndexProgressCallback = Callable[[IndexProgress], None]
FileCountCallback = Callable[[int, int], None]  # (done, total) of the embed phase: the older form
ProgressCallback = Union[IndexProgressCallback, FileCountCallback]


def takes_index_progress(callback: Callable[..., None]) -> bool:
    """Whether `callback` takes one argument (an IndexProgress) rather than two (done, total)."""
    try:
        signature = inspect.signature(callback)
    except (TypeError, ValueError):  # a builtin without a signature: the older form
        return False

    def accepts(*arguments: object) -> bool:
        try:
            signature.bind(*arguments)
        except TypeError:
            return False
        return True

    return accepts(None) and not accepts(0, 0)


class ProgressReporter:
    """Tells `callback` (either form, or None) each step, one call at a time."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self._callback = callback
        self._typed = callback is not None and takes_index_progress(callback)
        self._lock = threading.Lock()

    def __call__(self, phase: Phase, done: int, total: int | None) -> None:
        if self._callback is None:
            return
        with self._lock:
            if self._typed:
                cast(IndexProgressCallback, self._callback)(IndexProgress(phase, done, total))
            elif phase == "embed" and total is not None:
                cast(FileCountCallback, self._callback)(done, total)

    def files(self, phase: Phase) -> FileCountCallback:
        """`(done, total)` calls of `phase` (for a runner that counts files)."""
        return lambda done, total: self(phase, done, total)
