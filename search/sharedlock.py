"""A lock that many readers hold at once, or one writer alone."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class SharedLock:
    """Many holders of `shared()` at once, or one holder of `exclusive()` and nobody else.

    A waiting writer holds off new readers, so a stream of searches cannot starve a
    commit. Not reentrant: a thread holding either side must not ask for the other.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._condition:
            while self._writing or self._writers_waiting:
                self._condition.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                if self._readers == 0:
                    self._condition.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._condition:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._condition.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._condition.notify_all()
