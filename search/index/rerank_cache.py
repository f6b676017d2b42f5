"""The vectors a reranking index reads its candidates from: float16 copies of the catalog's,
in one file, each item's row at a place given by its id.

An index of quantized codes (`IndexSpec.rerank`) orders its candidates by their stored
vectors: a hundred or more rows per query. Read by id from a catalog of ten million items,
a row cost about 9 µs with the catalog's B-tree (half of a query's time at nprobe 8, the
codes the other half); read from this file by position (`os.preadv`: the pages stay the
kernel's cache, never the process's memory) about 1.7 µs. The catalog stays the source of truth; this file is a cache of it:

- Row `id` (`dim` float16 values) lies at `HEADER_BYTES + id * 2 * dim`; a row never
  written reads as zeros (a hole in a sparse file).
- A row is used only when its length is 1 (every stored vector is of unit length, within
  float16's rounding): a hole, a torn row or a vector not kept here (off unit length) is
  read from the catalog instead.
- The header names the library (its manifest's `created_at`), the dimension and the
  catalog generation the rows mirror, and the file is trusted only while that is the
  catalog's generation. The library's writer writes the rows of each commit it makes (new
  items, and items whose vectors changed under the same id), then moves the header on; a
  commit it did not mirror (a crash in between, an import that replaced vectors) leaves the
  file untrusted until the writer writes it again from the catalog (`fill`: at the next
  commit, rebuild or optimize). Rows an import wrote for ids of a transaction that rolled
  back are written again by the commit that takes those ids next.
- Readers never write it, and read the catalog while it is not trusted.

Writes are best effort: a full disk or a read-only folder costs speed, never an answer.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from clipdex.search.catalog.vector_rows import half_to_single

if TYPE_CHECKING:  # pragma: no cover
    from clipdex.search.index.vectors import VectorSource

log = logging.getLogger(__name__)

CACHE_FILE = "rerank.f16"
HEADER_BYTES = 4096
MAGIC = "clipdex rerank vectors, float16"
UNIT_TOLERANCE = 0.01  # |squared length - 1| of a usable row: float16 rounds a unit vector's within 0.002


class RerankCache:
    """The float16 rows of a library's vectors by id (see the module docstring)."""

    def __init__(self, directory: Path, dim: int, library: float, generation: Callable[[], int]) -> None:
        self.path = directory / CACHE_FILE
        self.dim = dim
        self.row_bytes = 2 * dim
        self._library = library
        self._generation = generation  # the catalog's, now
        self._fd: int | None = None
        self._writable = False
        self._seen: tuple[int, int] | None = None  # (catalog generation, file mtime) the header was last read at
        self._trusted = False
        # Searches on several threads share the file: one opens, replaces or closes it at a time,
        # and never under a read in progress (a descriptor closed and given to another file).
        self._lock = threading.RLock()

    # -- the file ----------------------------------------------------------------------------

    def _file(self, write: bool = False) -> int | None:
        """The file, open (read-write where it can be; made when `write`), or None."""
        if self._fd is not None and not self._same_file():
            self.close()  # replaced or removed by the writer
        if self._fd is None:
            flags = [os.O_RDWR | os.O_CREAT] if write else [os.O_RDWR, os.O_RDONLY]
            for flag in flags:
                try:
                    self._fd = os.open(self.path, flag, 0o644)
                    self._writable = flag != os.O_RDONLY
                    break
                except OSError as error:
                    if write:
                        log.info("%s cannot be written: %s", self.path, error)
        return self._fd

    def _same_file(self) -> bool:
        assert self._fd is not None
        try:
            return os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except OSError:
            return False

    def _header_generation(self) -> int | None:
        """The generation the rows mirror, from a header of this library and dimension; else None."""
        assert self._fd is not None
        try:
            header = json.loads(os.pread(self._fd, HEADER_BYTES, 0).rstrip(b"\0 ") or b"null")
        except (OSError, ValueError):
            return None
        if not isinstance(header, dict) or header.get("magic") != MAGIC or header.get("dim") != self.dim:
            return None
        generation = header.get("generation")
        return generation if header.get("library") == self._library and isinstance(generation, int) else None

    def _write_header(self, generation: int) -> None:
        assert self._fd is not None
        header = json.dumps({"magic": MAGIC, "dim": self.dim, "library": self._library, "generation": generation})
        os.pwrite(self._fd, header.encode().ljust(HEADER_BYTES, b" "), 0)

    def _give_up(self, error: OSError) -> None:
        """A write failed (a full disk, say): drop the file; reranking reads the catalog."""
        log.info("%s: %s; reranking reads the catalog instead", self.path, error)
        self.remove()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
            self._fd, self._writable, self._seen, self._trusted = None, False, None, False

    def remove(self) -> None:
        """Delete the file (the index no longer reranks, or it cannot be written)."""
        self.close()
        try:
            self.path.unlink(missing_ok=True)
        except OSError as error:
            log.info("%s not removed: %s", self.path, error)

    # -- reading (any process) ------------------------------------------------------------

    def _trusted_file(self) -> int | None:
        """The file while it mirrors the catalog's generation now; the header is read again
        only when the generation or the file changed."""
        generation = self._generation()
        fd = self._file()
        if fd is None:
            return None
        seen = (generation, os.fstat(fd).st_mtime_ns)
        if seen != self._seen:
            self._seen, self._trusted = seen, self._header_generation() == generation
        return fd if self._trusted else None

    def read(self, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids found, their vectors as float32, ids to read from the catalog instead) for `ids`."""
        wanted = np.unique(np.asarray(ids, dtype=np.int64))
        bits = np.zeros((len(wanted), self.dim), dtype=np.uint16)
        rows, size = bits.data.cast("B"), self.row_bytes
        with self._lock:
            fd = self._trusted_file() if len(wanted) else None
            if fd is None:
                return wanted[:0], np.zeros((0, self.dim), np.float32), wanted
            for place, item_id in enumerate(wanted.tolist()):
                if item_id >= 0:
                    os.preadv(fd, [rows[place * size:(place + 1) * size]], HEADER_BYTES + item_id * size)
        vectors = half_to_single(bits)
        usable = np.abs(np.einsum("ij,ij->i", vectors, vectors) - 1.0) <= UNIT_TOLERANCE
        return wanted[usable], vectors[usable], wanted[~usable]

    # -- writing (the library's writer, under its write lock) ----------------------------------

    def open_for_writing(self) -> bool:
        """Open the file to write, made when missing; False when it cannot be written here."""
        with self._lock:
            return self._file(write=True) is not None and self._writable

    def mirrors(self, generation: int) -> bool:
        """Whether the rows mirror the catalog as of `generation`."""
        with self._lock:
            return self._file() is not None and self._header_generation() == generation

    def write(self, ids: np.ndarray, vectors: np.ndarray, halves: np.ndarray | None = None) -> None:
        """Keep these rows (rows off unit length are not kept): a commit's, before `mirrored`.
        `halves`: the rows in float16 when the caller has them (`vectors` exactly as float32), not made again."""
        if self._fd is None or not self._writable or len(ids) == 0:
            return
        ids = np.asarray(ids, dtype=np.int64)
        if halves is None:
            halves = np.ascontiguousarray(vectors, dtype=np.float16).reshape(len(ids), self.dim)
            singles = half_to_single(halves)
        else:
            halves, singles = np.ascontiguousarray(halves, dtype=np.float16).reshape(len(ids), self.dim), vectors
        keep = (np.abs(np.einsum("ij,ij->i", singles, singles) - 1.0) <= UNIT_TOLERANCE) & (ids >= 0)
        if np.any(np.diff(ids) < 0):
            order = np.argsort(ids, kind="stable")
            ids, halves, keep = ids[order], halves[order], keep[order]
        # runs of consecutive ids, all kept: one write each (an import's chunk is one run)
        starts = np.flatnonzero(keep & np.concatenate([[True], (np.diff(ids) != 1) | ~keep[:-1]]))
        ends = np.append(starts[1:], len(ids))
        with self._lock:
            try:
                for start, end in zip(starts.tolist(), ends.tolist()):
                    if self._fd is None:
                        return
                    end = start + int(np.argmin(np.append(keep[start:end], False)))  # up to the first row not kept
                    os.pwrite(self._fd, halves[start:end].tobytes(), HEADER_BYTES + int(ids[start]) * self.row_bytes)
            except OSError as error:
                self._give_up(error)

    def mirrored(self, before: int, after: int) -> bool:
        """After writing the rows of a commit that took the catalog from generation `before` to
        `after`: record `after`, when the file mirrored `before`. True when it did."""
        with self._lock:
            if self._fd is None or not self._writable or self._header_generation() != before:
                return False
            try:
                self._write_header(after)
            except OSError as error:
                self._give_up(error)
                return False
            return True

    def fill(self, catalog: "VectorSource", generation: int) -> None:
        """Write the file again from every vector of the catalog (as of `generation`, a chunk at a time)."""
        if not self.open_for_writing():
            return
        with self._lock:
            try:
                assert self._fd is not None
                os.ftruncate(self._fd, 0)
                self._write_header(-1)  # mirrors nothing until full
            except OSError as error:
                self._give_up(error)
                return
        for ids, vectors in catalog.iter_vectors():
            self.write(ids, vectors)
        self.mirrored(-1, generation)


class CachedVectors:
    """A `VectorSource` for reranking: rows from the cache, the others from the catalog."""

    def __init__(self, cache: RerankCache, catalog: "VectorSource") -> None:
        self.cache = cache
        self.catalog = catalog

    def iter_vectors(self, ids: Sequence[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if ids is None:
            yield from self.catalog.iter_vectors()
            return
        found_ids, found, missing = self.cache.read(ids)
        if len(found_ids):
            yield found_ids, found
        if len(missing):
            yield from self.catalog.iter_vectors(missing.tolist())
