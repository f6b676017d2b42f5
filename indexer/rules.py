"""The rules of an index run, apart from how it is run (threads, lanes: `clipdex.indexer.local`).

- what to do: the scan diffed against the catalog (`diff_scan`): new and changed files
  are jobs, known files the scan no longer found have vanished (removed at the end,
  unless their bytes turn up at a new path: a move), a root with no images left keeps its
  items;
- when a stored vector can be reused instead of decoding and embedding a file
  (`_prepare`, and `_recheck_reuse` in commit order);
- what a batch commits (`_commit`): moves, touched files, new and changed items.

Everything here works on one file or one batch at a time, with plain data and the
library; another runner (a cluster, say) can call the same functions from its own workers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from clipdex.indexer.report import Failure, IndexReport
from clipdex.indexer.scan import ScannedFile, ScanResult, pair_raw_files
from clipdex.search.catalog.types import FileRecord, NewItem
from clipdex.search.encoders.base import ImageTextEncoder
from clipdex.search.encoders.base import ImagePreparer
from clipdex.search.errors import ClipdexError, UnreadableFile, UnreadableImage
from clipdex.search.media.fileid import content_hash as hash_bytes
from clipdex.search.media import gpu_decode
from clipdex.search.media.imaging import decode_image
from clipdex.search.media.fileid import content_hash_of_file
from clipdex.search.media.video import Sampling, is_video_path, sample_video
from clipdex.search.library import Library
from clipdex.search.media.safe_read import read_regular_file


@dataclass
class _Job:
    """A file that needs work: new (`record` None) or changed (`record` its old row)."""

    file: ScannedFile
    record: FileRecord | None
    pair: str | None = None  # the RAW file beside this JPEG or HEIC: one photo (`scan.pair_raw_files`)


@dataclass
class _Prepared:
    job: _Job
    content_hash: str | None = None
    pixels: np.ndarray | None = None  # the model's preprocessing of the image, when it had to be decoded
    metadata: dict[str, Any] = field(default_factory=dict)
    reuse_id: int | None = None  # an item with the same bytes: its vector is reused
    error: str | None = None
    identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file that was read
    encoded: Any = None  # a JPEG waiting for the GPU's decoder (`gpu_decode.EncodedImage`), instead of `pixels`
    # a video: its sampled moments' times (seconds), `pixels` then holds one row per moment; `extra` its duration...
    frame_times: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_video(self) -> bool:
        return is_video_path(self.job.file.path)


# -- what to do -------------------------------------------------------------------------


@dataclass
class ScanDiff:
    """The scan against the catalog: what a run must do."""

    jobs: list[_Job]
    # indexed files the scan did not find again, by path; a batch that finds one's bytes at a
    # new path takes it out (a move), the rest are removed once all jobs are committed
    vanished: dict[str, FileRecord]
    unchanged: int
    failures: list[Failure]  # what the scan could not read, roots kept although empty
    vanished_by_id: dict[int, str] = field(init=False)

    def __post_init__(self) -> None:
        self.vanished_by_id = {record.id: path for path, record in self.vanished.items()}

    def hash_lookup(self, library: Library) -> "_HashLookup":
        """Where a job's bytes are stored already: the vanished files first (moves), then any item (copies)."""
        return _HashLookup(library, {record.content_hash: record.id for record in self.vanished.values() if record.content_hash})


def diff_scan(library: Library, result: ScanResult, prune_empty_roots: bool = False) -> ScanDiff:
    """Diff `result` against the catalog (under the write lock, so that no run slips in between).

    A root with no images at all keeps its indexed items (an unmounted drive looks just
    like that) unless `prune_empty_roots`.
    """
    failures = [Failure(path, reason) for path, reason in result.errors]
    known = library.catalog.files_under(result.roots)
    direct = [f.path for f in result.files if f.path not in known and not _inside_any(f.path, result.roots)]
    known.update(library.catalog.files_at(direct))  # single files given directly

    jobs: list[_Job] = []
    unchanged = 0
    files, pairs = pair_raw_files(result.files)  # a RAW beside its JPEG is that JPEG's item, not one of its own
    for scanned in files:
        record = known.get(scanned.path)
        pair = pairs.get(scanned.path)
        if record is not None and record.size == scanned.size and record.mtime_ns == scanned.mtime_ns \
                and record.pair == pair:
            unchanged += 1
        else:  # a new pair, or one gone, only re-describes the item: its bytes are unchanged, the vector kept
            jobs.append(_Job(scanned, record, pair))
    seen = {scanned.path for scanned in files}
    kept = {path for path, _ in result.errors}
    unreadable = list(result.unreadable_dirs)
    if not prune_empty_roots:
        unreadable += _empty_roots(result.roots, seen, known, failures)
    vanished = {
        path: record
        for path, record in known.items()
        if path not in seen and path not in kept and not _inside_any(path, unreadable)
    }
    return ScanDiff(jobs, vanished, unchanged, failures)


def _empty_roots(roots: Sequence[str], seen: set[str], known: dict[str, FileRecord], failures: list[Failure]) -> list[str]:
    """Roots where no image was found but items are indexed: kept, and reported."""
    empty = []
    for root in roots:
        indexed = sum(1 for path in known if _inside_any(path, [root]))
        if indexed and not any(_inside_any(path, [root]) for path in seen):
            empty.append(root)
            failures.append(Failure(root, f"no images found here, but {indexed} are indexed: kept them "
                                          "(is a drive unmounted?); --prune-empty-roots removes them"))
    return empty


def _inside_any(path: str, directories: Iterable[str]) -> bool:
    return any(path.startswith(directory.rstrip(os.sep) + os.sep) for directory in directories)


def remove_vanished(writer: Any, diff: ScanDiff, report: IndexReport) -> None:
    """Remove the vanished files that did not move (after all jobs; not after an interrupted run)."""
    if not report.interrupted and diff.vanished:
        writer.commit(remove_ids=[record.id for record in diff.vanished.values()])
        report.removed = len(diff.vanished)


# -- one file: reuse a stored vector, or decode --------------------------------------------


class _HashLookup:
    """Which stored item has given bytes: vanished files first (moves), then any (copies)."""

    def __init__(self, library: Library, vanished_hashes: dict[str, int]) -> None:
        self.library = library
        self.vanished = vanished_hashes
        self.lock = threading.Lock()

    def find(self, content_hash: str) -> int | None:
        if content_hash in self.vanished:
            return self.vanished[content_hash]
        with self.lock:
            return self.library.catalog.id_with_hash(content_hash)


class _NoStoredBytes:
    """A hash lookup that finds nothing: the file is decoded whatever is stored."""

    def find(self, content_hash: str) -> int | None:
        return None


def _prepare(job: _Job, encoder: ImagePreparer, hashes: _HashLookup) -> _Prepared:
    path = job.file.path
    if is_video_path(path):
        return _prepare_video(job, encoder, hashes)
    try:
        data, identity = _read_file(path, job.file.size)
    except FileNotFoundError:
        return _Prepared(job, error="file vanished before it could be read")
    except UnreadableFile as error:
        return _Prepared(job, error=error.reason)
    except OSError as error:
        return _Prepared(job, error=f"cannot read: {error.strerror or error}")
    content_hash = hash_bytes(data)
    prepared = _Prepared(job, content_hash=content_hash, identity=identity)
    if job.record is not None and job.record.content_hash == content_hash:
        prepared.reuse_id = job.record.id  # touched, not changed
        return prepared
    reuse = hashes.find(content_hash)
    if reuse is not None:
        prepared.reuse_id = reuse
        return prepared
    _decode_into(prepared, data, encoder)
    return prepared


def _prepare_video(job: _Job, encoder: ImagePreparer, hashes: "_HashLookup | _NoStoredBytes", sampling: Sampling = Sampling()) -> _Prepared:
    """A video: hashed as it is read (never whole in memory), its stored frames reused as an image's
    vector is (touched, moved, copied), else its moments sampled (`clipdex.search.media.video`) and prepared."""
    path = job.file.path
    try:
        content_hash, info = content_hash_of_file(path)
    except FileNotFoundError:
        return _Prepared(job, error="file vanished before it could be read")
    except UnreadableFile as error:
        return _Prepared(job, error=error.reason)
    except OSError as error:
        return _Prepared(job, error=f"cannot read: {error.strerror or error}")
    if info.st_size == 0:
        return _Prepared(job, error="empty file (0 bytes)")
    prepared = _Prepared(job, content_hash=content_hash, identity=(info.st_dev, info.st_ino))
    if job.record is not None and job.record.content_hash == content_hash:
        prepared.reuse_id = job.record.id
        return prepared
    reuse = hashes.find(content_hash)
    if reuse is not None:
        prepared.reuse_id = reuse
        return prepared
    size = encoder.image_size  # loads the model first: its errors are not this file's
    try:
        video = sample_video(path, dataclasses.replace(sampling, picture_side=2 * size))  # as an image's draft size
        prepared.pixels = np.stack([encoder.prepare(picture) for _, picture in video.frames])
    except UnreadableImage as error:
        prepared.error = error.reason
        return prepared
    except ClipdexError:
        raise
    except Exception as error:  # a decoder bug must not end the run: report the file
        prepared.error = unexpected_failure(error)
        return prepared
    prepared.frame_times = [seconds for seconds, _ in video.frames]
    prepared.metadata = video.metadata()
    prepared.extra = {"duration": round(video.duration, 3), "frames": len(video.frames), "codec": video.codec}
    if video.skipped:
        prepared.extra["frames_skipped"] = video.skipped  # failed to decode: that frame lost, not the video
    return prepared


def _prepare_again(prepared: _Prepared, encoder: ImagePreparer) -> None:
    """Decode and preprocess the file again (its pixels were made in a way that turned out
    wrong), from its bytes read anew: a file whose bytes changed since is reported as failed."""
    prepared.pixels = None
    try:
        data, identity = _read_file(prepared.job.file.path, prepared.job.file.size)
    except (OSError, UnreadableFile):
        data, identity = b"", None
    if identity != prepared.identity or hash_bytes(data) != prepared.content_hash:
        prepared.error = "file changed during the run; run index again"
        return
    _decode_into(prepared, data, encoder)


def _read_file(path: str, scanned_size: int) -> tuple[bytes, tuple[int, int]]:
    """The file's bytes and its (device, inode), both of the one file that was opened: a
    regular file, read up to one byte past the size the scan saw (which was within the limit)."""
    data, info = read_regular_file(path, scanned_size, larger="file changed during the run; run index again")
    return data, (info.st_dev, info.st_ino)


def _decode_into(prepared: _Prepared, data: bytes, encoder: ImagePreparer, on_gpu: bool = True) -> None:
    """Decode and preprocess the file's bytes into `prepared` (pixels and metadata, or error).

    When the model runs on CUDA with open_clip's usual transform, a JPEG is only read
    here (header, pinned bytes: `prepared.encoded`); the model lane decodes it on the GPU
    (`clipdex.search.media.gpu_decode`) and sends back to this path what the GPU refuses.
    """
    if not data:
        prepared.error = "empty file (0 bytes)"
        return
    try:
        draft_size = 2 * encoder.image_size  # loads the model first: its errors are not this file's
        if on_gpu and _decodes_on_gpu(encoder):
            image = gpu_decode.encoded_image(data)
            if not isinstance(image.header, str):  # else: not for the GPU's decoder (PNG, CMYK...): decode here
                prepared.encoded, prepared.metadata = image, image.header.metadata()
                return
        decoded = decode_image(data, draft_size=draft_size, name=prepared.job.file.path)
        prepared.pixels = encoder.prepare(decoded.image)
    except UnreadableImage as error:
        prepared.error = error.reason
        return
    except ClipdexError:  # the model cannot load: that ends the run, it is no file's fault
        raise
    except Exception as error:  # a decoder bug must not end the run: report the file
        prepared.error = unexpected_failure(error)
        return
    prepared.metadata = {
        "width": decoded.width,
        "height": decoded.height,
        "taken_at": decoded.taken_at,
        "camera_make": decoded.camera_make,
        "camera_model": decoded.camera_model,
        **({"extra": decoded.extra()} if decoded.description else {}),
    }


def unexpected_failure(error: Exception) -> str:
    """A file's failure reason for an error no reader anticipated: one line, never empty."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if not detail:
        detail = ("not enough memory to decode and prepare this file" if isinstance(error, MemoryError)
                  else "no detail given")
    return f"{type(error).__name__}: {detail}"[:200]


def _decodes_on_gpu(encoder: ImagePreparer) -> bool:
    return encoder.device == "cuda" and gpu_decode.uses_gpu_decoding(encoder)


def _embed(library: Library, batch: list[_Prepared]) -> dict[int, np.ndarray]:
    """The vectors of the batch's decoded files, by `id` of their _Prepared."""
    return embed_with(library.encoder, batch)


def embed_with(encoder: ImageTextEncoder, batch: list[_Prepared]) -> dict[int, np.ndarray]:
    """The vectors of the batch's decoded files, by `id` of their _Prepared: JPEGs waiting for
    the GPU first (what it refuses is decoded on the CPU, or becomes the file's error), then
    the files decoded on the CPU."""
    vectors = _embed_on_gpu(encoder, [prepared for prepared in batch if prepared.encoded is not None])
    to_embed = [(prepared, prepared.pixels) for prepared in batch if prepared.pixels is not None]
    images = [(prepared, pixels) for prepared, pixels in to_embed if prepared.frame_times is None]
    if images:
        encoded = encoder.encode_prepared(np.stack([pixels for _, pixels in images]))
        vectors.update({id(prepared): vector for (prepared, _), vector in zip(images, encoded)})
    for prepared, pixels in to_embed:
        if prepared.frame_times is not None:  # a video: one vector per moment, a batch at a time
            vectors[id(prepared)] = np.concatenate([encoder.encode_prepared(pixels[start:start + VIDEO_BATCH])
                                                    for start in range(0, len(pixels), VIDEO_BATCH)])
        prepared.pixels = None  # embedded: let the memory go
    return vectors


VIDEO_BATCH = 32  # a video's moments embedded so many at a time


def _embed_on_gpu(encoder: ImageTextEncoder, batch: list[_Prepared]) -> dict[int, np.ndarray]:
    if not batch:
        return {}
    feeder = gpu_decode.thread_feeder(encoder)  # this lane's decoder and streams
    if feeder is None:
        raise ClipdexError("files were read for the GPU's decoder, but the model does not run on CUDA")
    embedded = feeder.embed([prepared.encoded for prepared in batch])
    for index in embedded.fallbacks:  # refused by the GPU's decoder: the CPU path decodes it (or reports it)
        _decode_into(batch[index], batch[index].encoded.as_bytes(), encoder, on_gpu=False)
    for prepared in batch:
        prepared.encoded = None
    return {id(batch[index]): vector for index, vector in embedded.vectors.items()}


def _mean_direction(vectors: np.ndarray) -> np.ndarray:
    """The normalized mean of a video's moments: the video's own vector (`like`, duplicates, tags)."""
    rows = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    mean = rows.mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


# -- one batch: what it commits ----------------------------------------------------------


def _stored_extra(source: Any) -> dict[str, Any]:
    """The parts of a stored item's `extra` that belong to its bytes (all but the RAW pair, which
    belongs to the folder and is decided again each run)."""
    try:
        extra = json.loads(source.extra) if source is not None and source.extra else {}
    except ValueError:
        return {}
    return {key: value for key, value in extra.items() if key != "pair"} if isinstance(extra, dict) else {}


def _extra_json(extra: dict[str, Any]) -> str | None:
    return json.dumps(extra) if extra else None


def _recheck_reuse(library: Library, batch: list[_Prepared]) -> dict[int, Any]:
    """The stored items whose vectors the batch reuses, still holding the same bytes.

    The decision to reuse was made before earlier batches of this run committed; if one of
    them changed or removed that item (two files swapped contents, say), decode instead.
    """
    reused = [prepared.reuse_id for prepared in batch if prepared.reuse_id is not None]
    stored = library.catalog.get_items(reused) if reused else {}
    for prepared in batch:
        if prepared.reuse_id is None:
            continue
        source = stored.get(prepared.reuse_id)
        if source is None or source.content_hash != prepared.content_hash:
            prepared.reuse_id = None
            if prepared.is_video:  # sampled after all, from the file as it is now
                again = _prepare_video(prepared.job, library.encoder, _NoStoredBytes())
                if again.content_hash != prepared.content_hash and again.error is None:
                    again.error = "file changed during the run; run index again"
                prepared.__dict__.update(again.__dict__)
                continue
            try:
                data, prepared.identity = _read_file(prepared.job.file.path, prepared.job.file.size)
            except UnreadableFile as error:
                prepared.error = error.reason
                continue
            except OSError as error:
                prepared.error = f"cannot read: {error.strerror or error}"
                continue
            if hash_bytes(data) != prepared.content_hash:
                prepared.error = "file changed during the run; run index again"
                continue
            _decode_into(prepared, data, library.encoder)
    return stored


def _commit(
    library: Library,
    writer: Any,
    batch: list[_Prepared],
    vectors: dict[int, np.ndarray],
    vanished: dict[str, FileRecord],
    vanished_by_id: dict[int, str],
    report: IndexReport,
) -> None:
    """Commit a batch whose decoded files are embedded (`vectors`); reuse is rechecked here, in commit order."""
    stored = _recheck_reuse(library, batch)
    decoded_now = [p for p in batch if p.error is None and (p.pixels is not None or p.encoded is not None)]
    if decoded_now:  # files the recheck had to decode after all (embedding may yet fail one: reported below)
        vectors = {**vectors, **_embed(library, decoded_now)}
    for prepared in [p for p in batch if p.error is not None]:
        report.failed.append(Failure(prepared.job.file.path, prepared.error or ""))
    batch = [prepared for prepared in batch if prepared.error is None]
    items: list[NewItem] = []
    moves: list[tuple[int, dict[str, Any]]] = []
    counts = {"added": 0, "updated": 0, "moved": 0}
    for prepared in batch:
        job = prepared.job
        device, inode = prepared.identity or (None, None)
        file_columns: dict[str, Any] = {"path": job.file.path, "size": job.file.size, "mtime_ns": job.file.mtime_ns,
                                        "content_hash": prepared.content_hash, "device": device, "inode": inode}
        pair_extra = {"pair": job.pair} if job.pair else {}
        source_id = prepared.reuse_id
        source = stored.get(source_id) if source_id is not None else None
        kept = _stored_extra(source)  # what the stored item's extra says of its bytes (an EXIF description, a video's duration)
        if source_id is not None and source_id in vanished_by_id and job.record is None:
            moves.append((source_id, {**file_columns, "extra": _extra_json({**kept, **pair_extra})}))
            vanished.pop(vanished_by_id.pop(source_id), None)  # same bytes at a new path: keep id and vector
            counts["moved"] += 1
            continue
        if source_id is not None and job.record is not None and source_id == job.record.id:
            # touched: only size/mtime (or the RAW beside it) changed
            moves.append((source_id, {**file_columns, "extra": _extra_json({**kept, **pair_extra})}))
            counts["updated"] += 1
            continue
        kind, frames, extra = "image", None, {**kept, **pair_extra}
        if source is not None:
            metadata = {key: getattr(source, key) for key in ("width", "height", "taken_at", "camera_make", "camera_model")}
            vector = source.vector_array().copy()
            if source.kind == "video":  # a copy of a stored video: its moments too
                kind, frames = "video", library.catalog.frames_of([source.id]).get(source.id, [])
        else:
            metadata = dict(prepared.metadata)
            extra.update(metadata.pop("extra", None) or {})  # the EXIF description, when the file has one
            vector = vectors[id(prepared)]
            if prepared.frame_times is not None:  # a video: its item holds the mean of its moments
                kind, frames, extra = "video", list(zip(prepared.frame_times, vector)), {**prepared.extra, **pair_extra}
                vector = _mean_direction(vector)
        items.append(NewItem(kind=kind, vector=vector, id=job.record.id if job.record else None, extra=extra,
                             frames=frames, **file_columns, **metadata))
        counts["updated" if job.record else "added"] += 1
    writer.commit(items=items, moves=moves)
    report.added += counts["added"]
    report.updated += counts["updated"]
    report.moved += counts["moved"]
