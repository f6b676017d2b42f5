"""This machine's cache of verified ONNX exports: a new library of a model exported before starts at once.

Exporting a model's towers (`clipdex.search.encoders.image_export`, `text_export`) means
importing torch and open_clip, loading the model, tracing and checking each tower: about
15 s and 2.6 GiB for ViT-B-32, once per library. What comes out depends only on the model
and the software that made it (`key_parts`), so each verified export is also kept once per
machine, and a library that lacks its model's exports gets them from here before anything
loads the model (`restore_exports`): hard links into the library where the cache is on the
same file system, else copies. Either way the library holds its own files and stays whole
when the cache is cleared (files are never changed in place: an export is replaced whole).

    CACHE/exports/            CACHE: $CLIPDEX_CACHE_DIR, else the user's cache folder (`paths.user_cache_dir`)
      KEY/                    one tower's verified export; KEY hashes what determines it (`key_parts`)
        entry.json            the key's parts, and each file's size and sha256 (of each 32 MiB block)
        image_encoder.onnx …  the export's files, as the library that made it holds them
      .new-*/                 an entry being written, renamed to KEY once complete
      .old-*/                 an entry being removed (renamed away first, then deleted)

- An entry is written whole in `.new-*` and renamed into place, so no reader ever sees half
  of one. Of two processes storing the same KEY, the first rename wins; the other keeps its
  library's own export and drops its copy.
- Each file is checked against its recorded sha256 as it is installed (what is hashed is
  the library's new link or copy itself). An entry that fails, or whose record cannot be
  read, is removed with a warning in the log, and the model is exported again as if the
  cache were empty.
- The entry folder's mtime is its last use. Storing an entry evicts the least recently
  used others while the cache holds more than $CLIPDEX_EXPORT_CACHE_MB MiB (default 2048;
  0 turns the cache off). Sizes are the files' own, also where a library shares them.
- A cache that cannot be written is said once in the log; clipdex then works without it.
- Refusals are not cached: an export refused because of a passing failure (a MemoryError,
  say) would then be refused for every new library of that model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from clipdex.search.atomic import fsync_directory, write_json_atomic
from clipdex.search.cores import available_cores
from clipdex.search.encoders.model import ResolvedModel, architecture_config
from clipdex.search.paths import user_cache_dir

logger = logging.getLogger(__name__)

SIZE_ENV = "CLIPDEX_EXPORT_CACHE_MB"
DEFAULT_MAX_MB = 2048.0
EXPORTS_FOLDER = "exports"
ENTRY_FILE = "entry.json"
CACHE_FORMAT = 1
# A `.new-*` or `.old-*` folder this old was left by a process that was killed midway.
STALE_SECONDS = 24 * 3600
# The distributions whose versions can change an export or its verification.
SOFTWARE = ("open_clip_torch", "torch", "torchvision", "onnx", "onnxruntime", "onnxruntime-gpu", "Pillow", "numpy",
            "transformers", "tokenizers")  # the last two: Hugging Face text towers (multilingual models)
# The modules that build, export or check a tower: their source is part of the key, so a
# changed exporter never reuses what an older one made.
EXPORTER_MODULES = tuple(f"clipdex.search.encoders.{name}" for name in (
    "image_export", "text_export", "text_towers", "onnx_files", "onnx_image", "onnx_text", "preprocess",
    "clip_tokenizer", "hf_tokenizer", "torch_clip", "model")) + ("clipdex.search.media.imaging",)
# Files are hashed in blocks of this size, on all cores at once: an entry records each block's
# sha256 (a first index restoring ViT-B-32's 600 MB of exports waits for that hashing).
BLOCK_BYTES = 32 << 20


class DamagedEntry(Exception):
    """A cache entry whose record or files are not what it says."""


@dataclass(frozen=True)
class Tower:
    """Where a tower's export lives in a library, and how to tell that it is there."""

    name: str  # image or text
    folder: str
    settings_file: str
    version: int
    installed: Callable[[Path, ResolvedModel, int], Any]  # its settings when the library holds a usable export
    refusal: Callable[[Path, ResolvedModel], str | None]  # why the library's export was refused


def towers() -> dict[str, Tower]:
    from clipdex.search.encoders import image_export, onnx_image, onnx_text, text_export

    return {
        "image": Tower("image", onnx_image.IMAGE_EXPORT_FOLDER, onnx_image.IMAGE_SETTINGS_FILE,
                       onnx_image.IMAGE_EXPORT_VERSION, onnx_image.installed_image_export, image_export.image_export_refused),
        "text": Tower("text", onnx_text.EXPORT_FOLDER, onnx_text.SETTINGS_FILE, onnx_text.EXPORT_VERSION,
                      onnx_text.installed_export, text_export.export_refused),
    }


# -- the key ---------------------------------------------------------------------------------

def key_parts(model: ResolvedModel, dim: int, tower: Tower) -> dict[str, Any] | None:
    """What determines `tower`'s export of `model`, or None when nothing pins its weights down
    (random weights: each load draws others). Its preprocessing, image size and context length
    follow from the architecture config and the pretrained tag, read by that open_clip version."""
    if not (model.checkpoint_sha256 or model.pretrained):
        return None
    return {
        "format": CACHE_FORMAT,
        "tower": tower.name,
        "export_version": tower.version,
        "model": {"name": model.name, "config": architecture_config(model), "pretrained": model.pretrained,
                  "checkpoint_sha256": model.checkpoint_sha256},
        "dim": dim,
        "software": software_versions(),
        "exporter": exporter_digest(),
        "machine": platform.machine(),
    }


def export_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


@functools.lru_cache(maxsize=1)
def software_versions() -> dict[str, str | None]:
    """The installed versions of SOFTWARE (read from their metadata, nothing imported)."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in SOFTWARE:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.lru_cache(maxsize=1)
def exporter_digest() -> str:
    """The sha256 of the EXPORTER_MODULES' source."""
    import importlib.util

    digest = hashlib.sha256()
    for name in EXPORTER_MODULES:
        digest.update(name.encode() + b"\0")
        try:
            spec = importlib.util.find_spec(name)
            digest.update(Path(spec.origin).read_bytes() if spec is not None and spec.origin else b"?")
        except (ImportError, OSError):
            digest.update(b"?")
    return digest.hexdigest()


# -- the cache -------------------------------------------------------------------------------

@dataclass
class CacheEntry:
    """One entry, as `ExportCache.entries` lists it."""

    key: str
    path: Path
    tower: str | None  # None: its record cannot be read
    model: str | None
    bytes: int
    files: int
    created: float | None
    last_used: float

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "path": str(self.path), "tower": self.tower, "model": self.model, "bytes": self.bytes,
                "files": self.files, "created": self.created, "last_used": self.last_used}


class ExportCache:
    """The verified exports kept in `folder` (CACHE/exports), at most `max_bytes` of them."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes

    @classmethod
    def default(cls) -> "ExportCache":
        """This user's cache: `paths.user_cache_dir()/exports`, capped by $CLIPDEX_EXPORT_CACHE_MB."""
        text = os.environ.get(SIZE_ENV, "").strip()
        try:
            megabytes = float(text) if text else DEFAULT_MAX_MB
        except ValueError:
            _say_once(f"size:{text}", f"${SIZE_ENV}={text!r} is not a number of MiB; the export cache keeps "
                                      f"at most {DEFAULT_MAX_MB:.0f} MiB")
            megabytes = DEFAULT_MAX_MB
        return cls(user_cache_dir() / EXPORTS_FOLDER, max(0, int(megabytes * (1 << 20))))

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    # -- into a library ------------------------------------------------------------------

    def restore(self, library_path: Path, model: ResolvedModel, dim: int, tower: Tower) -> bool:
        """Install the cached export of `tower` of `model` in the library; False when there is none
        (or it was damaged: then it is removed). OSError: the library could not take it."""
        parts = key_parts(model, dim, tower)
        if parts is None:
            return False
        entry = self.folder / export_key(parts)
        try:
            record = self._record(entry, parts, tower)
            if record is None:
                return False
            self._install(entry, record, library_path, model, tower)
        except DamagedEntry as damage:
            self._discard(entry, str(damage))
            return False
        except FileNotFoundError:
            if entry.is_dir():  # one of its files is gone
                self._discard(entry, "a file is missing")
            return False  # else removed meanwhile by another process: a miss
        self._touch(entry)
        logger.info("installed the cached %s export of %s in %s", tower.name, model.describe(), library_path)
        return True

    def _install(self, entry: Path, record: dict[str, Any], library_path: Path, model: ResolvedModel, tower: Tower) -> None:
        from clipdex.search.encoders.onnx_files import install_export, scratch_folder

        files: dict[str, dict[str, Any]] = record["files"]
        names = [name for name in files if name != tower.settings_file]
        scratch = scratch_folder(library_path, f".{tower.folder}-")
        try:
            for name in names:
                if (entry / name).stat().st_size != files[name]["bytes"]:
                    raise DamagedEntry(f"{name} is not {files[name]['bytes']} bytes long")
                _link_or_copy(entry / name, scratch / name)
            digests = block_digests([scratch / name for name in names])  # what the library now holds
            for name in names:
                if digests[scratch / name] != files[name]["sha256_blocks"]:
                    raise DamagedEntry(f"{name} does not have its recorded sha256")
            data = (entry / tower.settings_file).read_bytes()
            if [hashlib.sha256(data).hexdigest()] != files[tower.settings_file]["sha256_blocks"]:
                raise DamagedEntry(f"{tower.settings_file} does not have its recorded sha256")
            settings = json.loads(data)
            settings["model"] = model.to_json()  # this library's own record of its model
            write_json_atomic(scratch / tower.settings_file, settings)
            install_export(scratch, library_path / tower.folder, tower.settings_file)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _record(self, entry: Path, parts: dict[str, Any], tower: Tower) -> dict[str, Any] | None:
        """The entry's record when it is there (None: no entry, or it cannot be read here)."""
        try:
            record = json.loads((entry / ENTRY_FILE).read_text())
        except FileNotFoundError:
            if entry.is_dir():
                raise DamagedEntry(f"{ENTRY_FILE} is missing") from None
            return None
        except ValueError:
            raise DamagedEntry(f"{ENTRY_FILE} is not valid JSON") from None
        except OSError:  # not readable by this user, say: not for this process to remove
            return None
        files = record.get("files") if isinstance(record, dict) else None
        if not isinstance(files, dict) or record.get("key") != parts:
            raise DamagedEntry(f"{ENTRY_FILE} does not describe this export")
        for name, recorded in files.items():
            if name != Path(name).name or name.startswith(".") or not isinstance(recorded, dict) \
                    or not isinstance(recorded.get("bytes"), int) or not isinstance(recorded.get("sha256_blocks"), list):
                raise DamagedEntry(f"{ENTRY_FILE} lists {name!r} wrongly")
        if tower.settings_file not in files:
            raise DamagedEntry(f"{ENTRY_FILE} lists no {tower.settings_file}")
        return record

    # -- from a library ------------------------------------------------------------------

    def store(self, library_path: Path, model: ResolvedModel, dim: int, tower: Tower) -> bool:
        """Keep the library's verified export of `tower` (True when this call added it), then
        evict the least recently used entries above the cap. OSError: the cache cannot be written."""
        parts = key_parts(model, dim, tower)
        if parts is None or not self.enabled:
            return False
        entry = self.folder / export_key(parts)
        if (entry / ENTRY_FILE).is_file():
            self._touch(entry)
            return False
        if tower.installed(library_path, model, dim) is None:
            return False
        sources = sorted(path for path in (library_path / tower.folder).iterdir() if path.is_file() and not path.is_symlink())
        size = sum(path.stat().st_size for path in sources)
        if size > self.max_bytes:
            logger.info("the %s export of %s (%d MiB) is larger than the export cache (%d MiB): not cached",
                        tower.name, model.describe(), size >> 20, self.max_bytes >> 20)
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        new = Path(tempfile.mkdtemp(prefix=".new-", dir=self.folder))
        try:
            for source in sources:
                _link_or_copy(source, new / source.name)
            digests = block_digests([new / source.name for source in sources])
            files = {source.name: {"bytes": (new / source.name).stat().st_size, "sha256_blocks": digests[new / source.name]}
                     for source in sources}
            record = {"format": CACHE_FORMAT, "key": parts, "tower": tower.name, "model": model.describe(),
                      "created": time.time(), "block_bytes": BLOCK_BYTES, "files": files}
            write_json_atomic(new / ENTRY_FILE, record)
            if entry.is_dir() and not (entry / ENTRY_FILE).exists():
                self._remove(entry)  # a damaged leftover
            try:
                os.rename(new, entry)
            except OSError:
                if (entry / ENTRY_FILE).is_file():
                    return False  # another process stored it first: its entry is kept, this copy dropped
                raise
            fsync_directory(self.folder)
        finally:
            shutil.rmtree(new, ignore_errors=True)
        self._touch(entry)
        self.evict(keep=entry.name)
        return True

    # -- listing, eviction, clearing -------------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """The complete entries, least recently used first (damaged ones too: `tower` None)."""
        try:
            children = [child for child in self.folder.iterdir() if not child.name.startswith(".") and child.is_dir()]
        except OSError:
            return []
        found = []
        for child in children:
            try:
                files = [path.stat() for path in child.iterdir() if path.is_file()]
                last_used = child.stat().st_mtime
            except OSError:  # removed meanwhile
                continue
            tower: str | None = None
            model: str | None = None
            created: float | None = None
            try:
                record = json.loads((child / ENTRY_FILE).read_text())
                tower, model, created = str(record["tower"]), str(record["model"]), float(record["created"])
            except (OSError, ValueError, KeyError, TypeError):  # damaged: listed, and its size counted
                pass
            found.append(CacheEntry(child.name, child, tower, model, sum(info.st_size for info in files),
                                    len(files), created, last_used))
        return sorted(found, key=lambda entry: entry.last_used)

    def size(self) -> int:
        return sum(entry.bytes for entry in self.entries())

    def evict(self, keep: str | None = None) -> list[CacheEntry]:
        """Remove the least recently used entries (never `keep`) until the cache holds at most
        `max_bytes`, and what killed processes left; the entries removed."""
        self._remove_leftovers(STALE_SECONDS)
        entries = self.entries()
        total = sum(entry.bytes for entry in entries)
        removed = []
        for entry in entries:
            if total <= self.max_bytes:
                break
            if entry.key != keep and self._remove(entry.path):
                total -= entry.bytes
                removed.append(entry)
        if removed:
            logger.info("the export cache %s was over %d MiB: removed %d least recently used entries",
                        self.folder, self.max_bytes >> 20, len(removed))
        return removed

    def clear(self) -> list[CacheEntry]:
        """Remove every entry (and every unfinished one); the entries removed. Libraries keep their exports."""
        entries = [entry for entry in self.entries() if self._remove(entry.path)]
        self._remove_leftovers(0)
        return entries

    # -- mechanics ------------------------------------------------------------------------

    def _discard(self, entry: Path, reason: str) -> None:
        logger.warning("the cached export %s is damaged (%s): removed, the model is exported again", entry, reason)
        self._remove(entry)

    def _remove(self, entry: Path) -> bool:
        """Rename `entry` away (atomically: whoever reads it next finds nothing), then delete it."""
        gone = self.folder / f".old-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.rename(entry, gone)
        except FileNotFoundError:
            return False  # removed by another process
        shutil.rmtree(gone, ignore_errors=True)
        return True

    def _remove_leftovers(self, older_than: float) -> None:
        now = time.time()
        for leftover in list(self.folder.glob(".new-*")) + list(self.folder.glob(".old-*")):
            try:
                if now - leftover.stat().st_mtime >= older_than:
                    shutil.rmtree(leftover, ignore_errors=True)
            except OSError:
                pass

    @staticmethod
    def _touch(entry: Path) -> None:
        try:
            os.utime(entry)
        except OSError:  # a read-only cache: it is still used, its order of use is not kept
            pass


def _link_or_copy(source: Path, target: Path) -> None:
    """Put `source`'s bytes at `target`: a hard link where the file system allows it, else a copy."""
    try:
        os.link(source, target)
    except FileNotFoundError:
        raise
    except OSError:  # another file system, links not allowed here
        shutil.copyfile(source, target)
        with open(target, "rb") as copied:
            os.fsync(copied.fileno())


def block_digests(paths: list[Path]) -> dict[Path, list[str]]:
    """The sha256 of each BLOCK_BYTES block of each file (one block for an empty file), hashed on
    all cores at once: hashlib lets go of the interpreter's lock while it hashes."""
    from concurrent.futures import ThreadPoolExecutor

    def block(job: tuple[Path, int]) -> str:
        path, offset = job
        with open(path, "rb") as handle:
            handle.seek(offset)
            return hashlib.sha256(handle.read(BLOCK_BYTES)).hexdigest()

    jobs = [(path, offset) for path in paths for offset in range(0, max(1, path.stat().st_size), BLOCK_BYTES)]
    with ThreadPoolExecutor(max(1, min(available_cores(), len(jobs)))) as pool:
        hashed = list(pool.map(block, jobs))
    digests: dict[Path, list[str]] = {path: [] for path in paths}
    for (path, _), digest in zip(jobs, hashed):
        digests[path].append(digest)
    return digests


# -- what the library and the exporters call ---------------------------------------------------

_said: set[str] = set()


def _say_once(what: str, message: str) -> None:
    if what not in _said:
        _said.add(what)
        logger.warning(message)


def restore_exports(library_path: Path, model: ResolvedModel, dim: int, image: bool = True) -> list[str]:
    """Install in the library the exports of `model` it lacks (nor refused) that this machine's
    cache holds: the text tower's, and (with `image`) the image tower's where the library then
    has both (with the image export alone, a first run would load torch here to embed). The
    towers installed; never fails (a library that cannot take them is left as it was)."""
    import importlib.util

    cache = ExportCache.default()
    if not cache.enabled or importlib.util.find_spec("onnxruntime") is None:
        return []
    restored = []
    known = towers()
    for tower in (known["text"], known["image"]) if image else (known["text"],):
        if tower.installed(library_path, model, dim) is not None or tower.refusal(library_path, model):
            continue
        if tower.name == "image" and known["text"].installed(library_path, model, dim) is None:
            continue
        try:
            if cache.restore(library_path, model, dim, tower):
                restored.append(tower.name)
        except OSError as error:  # a read-only library, a full disk: it exports as before, if it can
            logger.info("the cached %s export was not installed in %s (%s)", tower.name, library_path, error)
    return restored


def store_exports(library_path: Path, model: ResolvedModel, dim: int, names: tuple[str, ...] = ("image", "text")) -> None:
    """Keep the library's verified exports (`names`: image, text) in this machine's cache; never
    fails (a cache that cannot be written is said once in the log)."""
    cache = ExportCache.default()
    if not cache.enabled:
        return
    known = towers()
    for name in names:
        try:
            cache.store(library_path, model, dim, known[name])
        except OSError as error:
            _say_once(f"unwritable:{cache.folder}", f"the export cache {cache.folder} cannot be written ({error}); "
                                                     "clipdex works without it")
            return
