"""Fast-scan product quantization: 4-bit codes FAISS scans 32 at a time with SIMD shuffles.

`IVF{nlist},PQ{m}x4fsr` keeps m codes of 4 bits a vector (m/2 bytes), each encoding the
vector's residual to its list's centroid, in blocks of 32 vectors laid out for the scan.
At the same bytes as `PQ{m/2}` (a byte for each 4 dimensions of 512) its candidates are as
good once reranked by the stored vectors, and the scan is 10-14 times faster: the lookup
tables of 16 entries sit in SIMD registers, where an 8-bit code's 256 entries are read from
memory a code at a time. What the faster scan buys is breadth: text-like queries, whose
nearest neighbours spread over many lists, reach recall 0.9 at ten million vectors within a
millisecond or two.

FAISS writes these inverted lists in blocks (`BlockInvertedLists`, "ilbl") and reads them
into memory (there is no memory map of them). Two things here are what FAISS leaves out:

- `add_assigned` adds vectors whose lists are already known (the two-level assignment of
  `clipdex.search.index.coarse`); FAISS's `add_core` would store the codes unpacked.
- `unpacked_codes` and `write_block_lists` let `clipdex.search.index.sharded` spill and
  merge these lists like any other: shards hold plain codes, and the merged file is written
  in FAISS's block format, a list at a time.
"""

from __future__ import annotations

import struct
from typing import Any, BinaryIO, Iterable

import numpy as np

from clipdex.search.index.vectors import faiss_module


def is_fast_scan(ivf: Any) -> bool:
    """Whether an IVF index (as `faiss.extract_index_ivf` gives it) holds fast-scan codes."""
    faiss = faiss_module()
    return isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFastScan)


class Packer:
    """Codes in and out of FAISS's blocks of `nvec` (32) vectors."""

    def __init__(self, ivf: Any) -> None:
        self._packer = ivf.get_CodePacker()  # a new packer, freed with this object
        self.code_size = int(self._packer.code_size)
        self.per_block = int(self._packer.nvec)
        self.block_size = int(self._packer.block_size)

    def blocks(self, count: int) -> int:
        return -(-count // self.per_block)

    def pack(self, codes: np.ndarray) -> np.ndarray:
        """`codes` ((n, code_size) uint8) as the bytes of ceil(n / 32) blocks."""
        faiss = faiss_module()
        count = len(codes)
        padded = np.zeros((self.blocks(count) * self.per_block, self.code_size), dtype=np.uint8)
        padded[:count] = codes
        out = np.zeros(self.blocks(count) * self.block_size, dtype=np.uint8)
        for block in range(self.blocks(count)):
            rows = padded[block * self.per_block : (block + 1) * self.per_block]
            self._packer.pack_all(faiss.swig_ptr(rows), faiss.swig_ptr(out[block * self.block_size :]))
        return out

    def unpack(self, blocks: np.ndarray, count: int) -> np.ndarray:
        """The first `count` codes of packed `blocks`, as (count, code_size) uint8."""
        faiss = faiss_module()
        out = np.empty((self.blocks(count) * self.per_block, self.code_size), dtype=np.uint8)
        blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
        for block in range(self.blocks(count)):
            self._packer.unpack_all(faiss.swig_ptr(blocks[block * self.block_size :]), faiss.swig_ptr(out[block * self.per_block :]))
        return out[:count]


def entries(ivf: Any, packer: Packer, list_no: int) -> tuple[np.ndarray, np.ndarray]:
    """List `list_no`'s ids and unpacked codes ((n, code_size) uint8), copies."""
    size = int(ivf.invlists.list_size(list_no))
    ids = faiss_module().rev_swig_ptr(ivf.invlists.get_ids(list_no), size).copy() if size else np.zeros(0, np.int64)
    return ids, np.frombuffer(unpacked_codes(ivf, packer, list_no), dtype=np.uint8).reshape(size, packer.code_size)


def unpacked_codes(ivf: Any, packer: Packer, list_no: int) -> bytes:
    """List `list_no`'s codes, one after another (code_size bytes each), as a plain inverted list holds them."""
    faiss = faiss_module()
    size = int(ivf.invlists.list_size(list_no))
    if not size:
        return b""
    blocks = faiss.rev_swig_ptr(ivf.invlists.get_codes(list_no), packer.blocks(size) * packer.block_size)
    return packer.unpack(blocks, size).tobytes()


def add_assigned(ivf: Any, ids: np.ndarray, vectors: np.ndarray, lists: np.ndarray) -> None:
    """Add `vectors` (float32, unit) under `ids` to the lists `lists` of a fast-scan IVF index."""
    faiss = faiss_module()
    fast = faiss.downcast_index(ivf)
    count = len(ids)
    codes = np.empty((count, int(fast.code_size)), dtype=np.uint8)
    fast.encode_vectors(count, faiss.swig_ptr(vectors), faiss.swig_ptr(lists), faiss.swig_ptr(codes), False)
    packer = Packer(fast)
    order = np.argsort(lists, kind="stable")  # each list's entries in the order they came
    bounds = np.flatnonzero(np.diff(lists[order])) + 1
    for rows in np.split(order, bounds):
        if len(rows):
            append(fast, packer, int(lists[rows[0]]), ids[rows], codes[rows])
    fast.ntotal = int(fast.ntotal) + count


def append(fast: Any, packer: Packer, list_no: int, ids: np.ndarray, codes: np.ndarray) -> None:
    """Append entries (ids, unpacked codes) to list `list_no` of a fast-scan index (not its `ntotal`).

    FAISS's `BlockInvertedLists.add_entries` (1.15) copies whole blocks when the list already
    holds a multiple of `block_size` entries (bytes and entries confused: 4,096 at d=512),
    starting past the packed input's end and writing past the list's: such a list is emptied
    and given its old entries and the new at once (at 0 entries the copy is right)."""
    faiss = faiss_module()
    held = int(fast.invlists.list_size(list_no))
    if held and held % packer.block_size == 0:
        old_ids, old_codes = entries(fast, packer, list_no)
        ids, codes = np.concatenate([old_ids, ids]), np.concatenate([old_codes, codes])
        fast.invlists.resize(list_no, 0)
    packed = packer.pack(codes)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    fast.invlists.add_entries(list_no, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(packed))


def merge_into(into: Any, part: Any) -> None:
    """Append every list of fast-scan IVF `part` to the same list of `into` (FAISS's `merge_from`
    goes through the `add_entries` that `append` works around)."""
    faiss = faiss_module()
    into, part = faiss.downcast_index(into), faiss.downcast_index(part)
    packer = Packer(into)
    for list_no in range(int(part.nlist)):
        if part.invlists.list_size(list_no):
            append(into, packer, list_no, *entries(part, packer, list_no))
    into.ntotal = int(into.ntotal) + int(part.ntotal)


def _block_lists_header(ivf: Any, packer: Packer) -> bytes:
    """What FAISS writes before the lists of `BlockInvertedLists` (`code_size` is its "no fixed size" marker)."""
    return struct.pack("<4sQQQQ", b"ilbl", int(ivf.nlist), int(ivf.invlists.code_size), packer.per_block, packer.block_size)


def block_lists_tail(ivf: Any) -> bytes:
    """The bytes FAISS writes last for the empty block inverted lists of a trained, empty fast-scan index."""
    return _block_lists_header(ivf, Packer(ivf)) + bytes(16 * int(ivf.nlist))


def write_block_lists(ivf: Any, sizes: np.ndarray, lists: Iterable[tuple[bytes, bytes]], out: BinaryIO) -> None:
    """Write the block inverted lists whose `sizes` are given, from each list's (ids, unpacked codes), in list order."""
    packer = Packer(ivf)
    out.write(_block_lists_header(ivf, packer))
    chunks = iter(lists)
    for size in sizes.tolist():
        if not size:
            out.write(bytes(16))
            continue
        ids, codes = next(chunks)
        packed = packer.pack(np.frombuffer(codes, dtype=np.uint8).reshape(size, packer.code_size))
        out.write(struct.pack("<Q", size) + ids + struct.pack("<Q", len(packed)) + packed.tobytes())
