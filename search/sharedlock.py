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
        entered = False
        try:
            with self._condition:
                while self._writing or self._writers_waiting:
                    self._condition.wait()
                self._readers += 1
                entered = True
            yield
        finally:
            if entered:  # also when an exception (a Ctrl-C, say) lands right after entering
                with self._condition:
                    self._readers -= 1
                    if self._readers == 0:
                        self._condition.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        entered = False
        try:
            with self._condition:
                self._writers_waiting += 1
                try:
                    while self._writing or self._readers:
                        self._condition.wait()
                    entered = True
                    self._writing = True
                finally:
                    self._writers_waiting -= 1
                    if not entered:  # gave up waiting (an exception): let in the readers it held off
                        self._condition.notify_all()
            yield
        finally:
            if entered:
                with self._condition:
                    self._writing = False
                    self._condition.notify_all()
