"""The OCR pass: the words in a library's images, read after (never during) the embedding.

`read_texts` reads the image items whose current bytes OCR has not read yet (new, or
changed since: the catalog knows by content hash), in id order, and commits what it read
every `batch_size` images with their keyword rows (`Catalog.store_ocr`, one transaction).
It is incremental and resumable: stopped (`stop`, Ctrl-C) or killed, it loses at most the
batch in flight, and the next run goes on from there. A file that changed since it was
indexed is left for the next index run (its vector is stale too); an image OCR cannot read
(not an image, a decompression bomb, a 30000x1 strip) is recorded with the reason, so that
it is not tried again until it changes, and reported.

It takes no write lock: each commit is one catalog transaction that stores the text only
for the bytes it was read from, so an index run may go on beside it.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from clipdex.indexer.report import Failure
from clipdex.search.catalog.keyword_sql import OcrResult
from clipdex.search.errors import UnreadableFile, UnreadableImage
from clipdex.search.library import Library
from clipdex.search.media.fileid import content_hash as hash_bytes
from clipdex.search.media.ocr import OcrSettings, TextFound, TextReader
from clipdex.search.media.safe_read import DEFAULT_MAX_FILE_MB, MB, read_regular_file

OCR_SETTING = "ocr"  # the catalog setting `clipdex index --ocr` turns "on": later runs read text too


@dataclass
class OcrReport:
    read: int = 0  # images read (with or without text)
    with_text: int = 0  # of which some text was found
    lines: int = 0
    changed: int = 0  # files changed (or gone) since they were indexed: left for the next index run
    failed: list[Failure] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    ocr_seconds: float = 0.0  # in OCR itself (the rest: reading and decoding files, committing)

    def to_json(self) -> dict[str, Any]:
        return {"read": self.read, "with_text": self.with_text, "lines": self.lines, "changed": self.changed,
                "failed": [failure.to_json() for failure in self.failed], "interrupted": self.interrupted,
                "seconds": round(self.seconds, 3)}


def ocr_enabled(library: Library) -> bool:
    return library.catalog.setting(OCR_SETTING) == "on"


def enable_ocr(library: Library) -> None:
    """Record in the library that its index runs read text too (`clipdex index --ocr`)."""
    library.check_writable()
    library.catalog.set_setting(OCR_SETTING, "on")


def read_texts(
    library: Library,
    *,
    batch_size: int = 16,
    settings: OcrSettings | None = None,
    progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
    max_file_mb: float = DEFAULT_MAX_FILE_MB,
) -> OcrReport:
    """Read the text in the library's images that have not been read (see the module's description)."""
    library.check_writable()
    started = time.monotonic()
    report = OcrReport()
    reader = TextReader(settings)
    counts = library.catalog.ocr_counts()
    total, done = counts["images"] - counts["read"], 0
    pending: list[OcrResult] = []
    after = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipdex-ocr-read") as files:
        while not (stop is not None and stop.is_set()):
            todo = library.catalog.images_to_read(after, 64)
            if not todo:
                break
            after = todo[-1][0]
            # the next file is read and decoded while OCR reads this one
            loaded: list[Future[Any]] = [files.submit(_load, reader, path, content_hash, max_file_mb)
                                         for _, path, content_hash in todo[:1]]
            for position, (item_id, path, content_hash) in enumerate(todo):
                if position + 1 < len(todo):
                    loaded.append(files.submit(_load, reader, *todo[position + 1][1:], max_file_mb))
                if stop is not None and stop.is_set():
                    report.interrupted = True
                    break
                result = _read_one(reader, item_id, path, content_hash, loaded[position].result(), report)
                done += 1
                if result is not None:
                    pending.append(result)
                if len(pending) >= batch_size:
                    library.catalog.store_ocr(pending)
                    pending = []
                if progress is not None:
                    progress(done, total)
            for future in loaded:
                future.cancel()
    if pending:
        library.catalog.store_ocr(pending)
    report.interrupted = report.interrupted or (stop is not None and stop.is_set())
    report.seconds = time.monotonic() - started
    return report


def _load(reader: TextReader, path: str, content_hash: str | None, max_file_mb: float) -> Any:
    """The file's pixels ready for OCR, or why not: "changed" (its bytes are not the item's), or a Failure."""
    try:
        data, _ = read_regular_file(path, int(max_file_mb * MB))
    except (FileNotFoundError, NotADirectoryError):
        return "changed"
    except UnreadableFile as error:
        return Failure(path, error.reason)
    except OSError as error:
        return Failure(path, f"cannot read: {error.strerror or error}")
    if content_hash is not None and hash_bytes(data) != content_hash:
        return "changed"
    try:
        return reader.prepare(data, name=path)
    except UnreadableImage as error:
        return Failure(path, error.reason)
    except MemoryError:
        return Failure(path, "not enough memory to decode this image for OCR")


def _read_one(reader: TextReader, item_id: int, path: str, content_hash: str | None, loaded: Any,
              report: OcrReport) -> OcrResult | None:
    if loaded == "changed":
        report.changed += 1
        return None
    if isinstance(loaded, Failure):
        report.failed.append(loaded)
        return OcrResult(item_id, content_hash, "", [], error=loaded.error)
    try:
        found: TextFound = reader.read_prepared(loaded)
    except Exception as error:  # an OCR engine error is this file's failure, never the end of the pass
        reason = f"OCR failed: {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:200]
        report.failed.append(Failure(path, reason))
        return OcrResult(item_id, content_hash, "", [], error=reason)
    report.read += 1
    report.ocr_seconds += found.seconds
    report.lines += len(found.lines)
    report.with_text += bool(found.lines)
    return OcrResult(item_id, content_hash, found.text, found.lines)
