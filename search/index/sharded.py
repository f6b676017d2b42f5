"""Building an inverted file bigger than the memory it may take: shards spilled to disk, merged into one file.

A 10-million-vector `IVF8192,SQ8` index is 5.2 GB of codes, and an import or a
rebuild must not hold it while it grows. `IndexBuilder` adds the vectors to a trained,
empty copy of the index until its codes pass `SHARD_BYTES`, then writes that shard's
inverted lists to a scratch file (each list's codes, then its ids) and starts an empty one.
At the end the shards' lists are merged, list by list and in the order they were added,
into FAISS's own file format (`write_merged_ivf`), read back with `pread` (the page cache
holds them, not the process), and the index is that file memory-mapped, as a large saved
index is served. Every list holds its entries in the order one in-memory build would have
left them: the index is the same.

An index that stays under `SHARD_BYTES`, or of another type than IVF, is built in memory
as before. The Ray build (`clipdex.search.index.optimize_cluster`) merges its shards with the
same writer.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from clipdex.search.index.fastscan import Packer, block_lists_tail, is_fast_scan, unpacked_codes, write_block_lists
from clipdex.search.index.vectors import VectorIndex, faiss_module, read_index_file

SHARD_BYTES = 128 << 20  # codes and ids a shard holds in memory before it is written out
WRITE_BUFFER = 8 << 20


class ListSource(Protocol):
    """One shard's inverted lists."""

    def list_size(self, number: int) -> int: ...

    def codes(self, number: int) -> bytes: ...

    def ids(self, number: int) -> bytes: ...


class FaissLists:
    """The inverted lists of a FAISS IVF index (in memory or memory-mapped)."""

    def __init__(self, index: Any) -> None:
        self.ivf = faiss_module().extract_index_ivf(index)
        self.code_size = int(self.ivf.code_size)
        # Fast-scan lists hold their codes packed in blocks: they are handed on unpacked, as any list's
        self._packer = Packer(self.ivf) if is_fast_scan(self.ivf) else None

    def list_size(self, number: int) -> int:
        return int(self.ivf.invlists.list_size(number))

    def codes(self, number: int) -> bytes:
        if self._packer is not None:
            return unpacked_codes(self.ivf, self._packer, number)
        size = self.list_size(number)
        return faiss_module().rev_swig_ptr(self.ivf.invlists.get_codes(number), size * self.code_size).tobytes() if size else b""

    def ids(self, number: int) -> bytes:
        size = self.list_size(number)
        return faiss_module().rev_swig_ptr(self.ivf.invlists.get_ids(number), size).tobytes() if size else b""


class SpilledShard:
    """A shard's lists written to a file: each non-empty list's codes, then its ids; read back by `pread`."""

    def __init__(self, path: Path, lists: FaissLists, nlist: int) -> None:
        self.path = path
        self.code_size = lists.code_size
        self.sizes = np.array([lists.list_size(j) for j in range(nlist)], dtype=np.int64)
        self.offsets = np.zeros(nlist, dtype=np.int64)
        with open(path, "wb", buffering=WRITE_BUFFER) as out:
            position = 0
            for j in np.flatnonzero(self.sizes):
                self.offsets[j] = position
                codes, ids = lists.codes(int(j)), lists.ids(int(j))
                out.write(codes)
                out.write(ids)
                position += len(codes) + len(ids)
        self._file = open(path, "rb", buffering=0)

    def list_size(self, number: int) -> int:
        return int(self.sizes[number])

    def codes(self, number: int) -> bytes:
        return os.pread(self._file.fileno(), int(self.sizes[number]) * self.code_size, int(self.offsets[number]))

    def ids(self, number: int) -> bytes:
        start = int(self.offsets[number]) + int(self.sizes[number]) * self.code_size
        return os.pread(self._file.fileno(), int(self.sizes[number]) * 8, start)

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class IndexBuilder:
    """Adds vectors to a trained `index`, spilling inverted-file shards under `scratch` (see the module docstring)."""

    def __init__(self, index: VectorIndex, scratch: Path | None, expected: int, shard_bytes: int | None = None) -> None:
        self.index = index
        self._trained: bytes | None = None
        self._folder: Path | None = None
        self._shards: list[SpilledShard] = []
        self._shard_vectors = 0
        self._scratch = scratch
        self._limit = SHARD_BYTES if shard_bytes is None else shard_bytes
        self._started = False
        self._per_vector = 0
        self._expected = expected  # vectors to come: a build that stays under one shard is never split

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if not self._started:  # the index is trained by now: keep its empty form to start each shard from
            self._started = True
            index = self.index
            if self._scratch is not None and index.spec.type == "ivf" and index.is_trained and index.ntotal == 0:
                self._per_vector = int(faiss_module().extract_index_ivf(index.index).code_size) + 8
                if self._expected * self._per_vector > self._limit:
                    self._trained = bytes(faiss_module().serialize_index(index.index))
        self.index.add(ids, vectors)
        if self._trained is None:
            return
        self._shard_vectors += len(ids)
        if self._shard_vectors * self._per_vector >= self._limit:
            self._spill()

    def _spill(self) -> None:
        faiss = faiss_module()
        if self._folder is None:
            assert self._scratch is not None
            try:
                self._folder = Path(tempfile.mkdtemp(prefix="clipdex-build-", dir=self._scratch))
            except OSError:  # a read-only library: its index is rebuilt in memory, as it always was
                self._trained = None
                return
        lists = FaissLists(self.index.index)
        self._shards.append(SpilledShard(self._folder / f"shard-{len(self._shards)}", lists, int(lists.ivf.nlist)))
        assert self._trained is not None
        self.index.index = faiss.deserialize_index(np.frombuffer(self._trained, dtype=np.uint8))  # empty again
        self._shard_vectors = 0

    def finish(self) -> VectorIndex:
        """The index with every vector: in memory when no shard was written out, else merged and mapped."""
        if not self._shards:
            return self.index
        if self._shard_vectors:
            self._spill()
        faiss = faiss_module()
        assert self._folder is not None and self._trained is not None
        trained = faiss.deserialize_index(np.frombuffer(self._trained, dtype=np.uint8))
        merged_path = self._folder / "merged.faiss"
        ntotal = int(sum(int(shard.sizes.sum()) for shard in self._shards))
        try:
            with open(merged_path, "wb", buffering=WRITE_BUFFER) as out:
                write_merged_ivf(trained, list(self._shards), out)
        finally:
            self.abandon_shards()
        backing = open(merged_path, "rb")  # what a save copies; the map and this keep the file once unlinked
        try:
            if self.index.fast_scan:  # read into memory whole (FAISS maps no block lists): when first used
                index = VectorIndex.unread(self.index.dim, self.index.spec, backing, ntotal)
            else:
                faiss_index, mapped = read_index_file(merged_path, self.index.spec, True)
                index = VectorIndex(self.index.dim, self.index.spec, faiss_index)
                index.mapped, index.backing = mapped, backing
        except BaseException:
            backing.close()
            self.abandon()
            raise
        merged_path.unlink()
        self._folder.rmdir()
        self._folder = None
        return index

    def abandon_shards(self) -> None:
        for shard in self._shards:
            shard.close()
        self._shards = []

    def abandon(self) -> None:
        """Remove what was written (a failed build)."""
        self.abandon_shards()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def write_merged_ivf(trained: Any, shards: list[Any], out: BinaryIO) -> None:
    """Write to `out` the file FAISS writes for `trained` with every shard's lists merged in, in order.

    The file is the trained, empty index's serialization with its inverted lists (which
    FAISS writes last for IVF Flat, SQ and PQ) replaced by the merged ones: sizes, then
    each list's codes and ids, read from the shards (`ListSource`s, or FAISS IVF indexes)
    one list at a time.
    """
    faiss = faiss_module()
    shards = [FaissLists(shard) if not hasattr(shard, "codes") else shard for shard in shards]
    ivf = faiss.extract_index_ivf(trained)
    nlist, code_size = int(ivf.nlist), int(ivf.code_size)
    empty = faiss.serialize_index(trained).tobytes()
    blocks = is_fast_scan(ivf)
    tail = block_lists_tail(ivf) if blocks else struct.pack("<4sQQ4sQ", b"ilar", nlist, code_size, b"sprs", 0)
    if not empty.endswith(tail) or ivf.ntotal:
        raise ValueError("not an empty IVF index whose inverted lists FAISS writes last")
    sizes = np.zeros(nlist, dtype=np.uint64)
    for shard in shards:
        sizes += np.array([shard.list_size(j) for j in range(nlist)], dtype=np.uint64)
    ntotal = int(sizes.sum())
    header = bytearray(empty[: -len(tail)])
    _patch_ntotal(header, trained, ntotal)
    out.write(bytes(header))
    if blocks:  # fast-scan codes: FAISS's block format, each list's ids then its packed codes
        merged = ((b"".join(shard.ids(int(j)) for shard in shards if shard.list_size(int(j))),
                   b"".join(shard.codes(int(j)) for shard in shards if shard.list_size(int(j))))
                  for j in np.flatnonzero(sizes))
        write_block_lists(ivf, sizes, merged, out)
        return
    non_empty = int(np.count_nonzero(sizes))
    if non_empty > nlist // 2:
        out.write(struct.pack("<4sQQ4sQ", b"ilar", nlist, code_size, b"full", nlist) + sizes.tobytes())
    else:
        pairs = np.stack([np.flatnonzero(sizes).astype(np.uint64), sizes[sizes > 0]], axis=1).ravel()
        out.write(struct.pack("<4sQQ4sQ", b"ilar", nlist, code_size, b"sprs", len(pairs)) + pairs.tobytes())
    for j in np.flatnonzero(sizes):
        for shard in shards:
            if shard.list_size(int(j)):
                out.write(shard.codes(int(j)))
        for shard in shards:
            if shard.list_size(int(j)):
                out.write(shard.ids(int(j)))


def _patch_ntotal(header: bytearray, trained: Any, ntotal: int) -> None:
    """Set the vector count in the serialized index header (FAISS's write_index_header: d (int32), then ntotal (int64))."""
    offset = 4 + 4  # the index's fourcc, then d
    if struct.unpack_from("<i", header, 4)[0] != trained.d or struct.unpack_from("<q", header, offset)[0] != 0:
        raise ValueError("unexpected FAISS index header")
    struct.pack_into("<q", header, offset, ntotal)
