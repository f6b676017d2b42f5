"""Walking photo folders: which image and video files are there, skipping what the user excluded."""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from clipdex.search.errors import ClipdexError
from clipdex.search.media.imaging import IMAGE_EXTENSIONS
from clipdex.search.media.raw import RAW_EXTENSIONS
from clipdex.search.media.video import VIDEO_EXTENSIONS

# what a scan finds: photos (RAW included) and videos
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
from clipdex.search.media.safe_read import DEFAULT_MAX_FILE_MB, MB, not_regular_reason, too_large_reason

NOT_UTF8_NAME = "file name is not valid UTF-8, which the catalog cannot record: rename the file to index it"


@dataclass(frozen=True)
class ScannedFile:
    path: str  # absolute, normalized (symlinks kept as the user sees them)
    size: int
    mtime_ns: int


@dataclass
class ScanResult:
    roots: list[str]  # directories whose indexed contents this scan speaks for
    files: list[ScannedFile] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    # directories that could not be read: their indexed items must not be taken as deleted
    unreadable_dirs: list[str] = field(default_factory=list)


def normalize(path: str | os.PathLike[str]) -> str:
    return os.path.normpath(os.path.abspath(os.path.expanduser(os.fspath(path))))


def scan(
    paths: Sequence[str | os.PathLike[str]],
    exclude: Sequence[str] = (),
    include_hidden: bool = False,
    skip_dirs: Sequence[str] = (),
    max_file_bytes: int = DEFAULT_MAX_FILE_MB * MB,
) -> ScanResult:
    """Find the image files under `paths` (directories, recursively, or single files).

    Only regular files are indexed: a FIFO, device or socket met in a folder, a file over
    `max_file_bytes`, or one whose name is not UTF-8 is reported in `errors`; a path given
    that is neither a folder nor a regular file raises ClipdexError.
    `skip_dirs` are never entered (the library's own folder, for one).
    """
    normalized = [normalize(path) for path in paths]
    for path in normalized:
        _check_given(path)
    result = ScanResult(roots=[path for path in normalized if os.path.isdir(path)])
    seen: set[str] = set()
    skipped = {normalize(path) for path in skip_dirs}
    for path in normalized:
        if os.path.isdir(path):
            _walk(path, exclude, include_hidden, result, seen, skipped, max_file_bytes)
        else:
            _add_file(path, result, seen, max_file_bytes, explicit=True)
    return result


def _check_given(path: str) -> None:
    """A path named by the user must be a folder or a regular file, with a name the catalog can record."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ClipdexError(f"{path} does not exist") from None
    except OSError as error:
        raise ClipdexError(f"{path}: {error.strerror or error}") from None
    reason = None if stat.S_ISDIR(info.st_mode) else not_regular_reason(info.st_mode)
    if reason is not None:
        raise ClipdexError(f"{path}: {reason}")
    if stat.S_ISDIR(info.st_mode) and not recordable_name(path):
        raise ClipdexError(f"{path!r}: folder name is not valid UTF-8, which the catalog cannot record: "
                           "rename it, or index its parent folder (its files are then reported)")


def recordable_name(path: str) -> bool:
    """Whether the name can be stored: os.fsdecode keeps bytes that are not UTF-8 as lone surrogates."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_excluded(path: str, root: str, patterns: Sequence[str]) -> bool:
    """A glob matches the name, the path relative to the root, or the absolute path."""
    if not patterns:
        return False
    name = os.path.basename(path)
    relative = os.path.relpath(path, root)
    return any(
        fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(relative, pattern) or fnmatch.fnmatch(path, pattern)
        for pattern in patterns
    )


def _walk(root: str, exclude: Sequence[str], include_hidden: bool, result: ScanResult, seen: set[str], skipped: set[str],
          max_file_bytes: int) -> None:
    visited: set[tuple[int, int]] = set()  # (device, inode) of directories: symlink loops end here
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            info = os.stat(directory)
        except OSError as error:
            _unreadable(directory, error, result)
            continue
        if (info.st_dev, info.st_ino) in visited:
            continue
        visited.add((info.st_dev, info.st_ino))
        try:
            with os.scandir(directory) as entries:
                children = sorted(entries, key=lambda entry: entry.name)
        except OSError as error:
            _unreadable(directory, error, result)
            continue
        subdirectories = []
        for entry in children:
            if not include_hidden and entry.name.startswith("."):
                continue
            if is_excluded(entry.path, root, exclude) or entry.path in skipped:
                continue
            try:
                is_directory = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_directory = False
            if not is_directory and entry.is_symlink() and not os.path.exists(entry.path):
                # a link whose target is gone (an unmounted drive, say): keep what was indexed there
                result.errors.append((entry.path, "symbolic link to a missing target; its indexed items are kept"))
                result.unreadable_dirs.append(entry.path)
                continue
            if is_directory:
                subdirectories.append(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in MEDIA_EXTENSIONS:
                _add_file(entry.path, result, seen, max_file_bytes)
        stack.extend(reversed(subdirectories))


def _add_file(path: str, result: ScanResult, seen: set[str], max_file_bytes: int, explicit: bool = False) -> None:
    if path in seen:
        return
    if explicit and Path(path).suffix.lower() not in MEDIA_EXTENSIONS:
        result.errors.append((path, f"not a supported image type ({Path(path).suffix or 'no extension'})"))
        return
    try:
        info = os.stat(path)
    except FileNotFoundError:
        result.errors.append((path, "broken symbolic link or file vanished during the scan"))
        return
    except OSError as error:
        result.errors.append((path, error.strerror or str(error)))
        return
    problem = not_regular_reason(info.st_mode)
    # a video is hashed and decoded as a stream, never read whole: the size limit is for images
    if problem is None and info.st_size > max_file_bytes and Path(path).suffix.lower() not in VIDEO_EXTENSIONS:
        problem = too_large_reason(info.st_size, max_file_bytes, setting="--max-file-mb")
    if problem is None and not recordable_name(path):
        problem = NOT_UTF8_NAME
    if problem is None and not os.access(path, os.R_OK):
        problem = "permission denied"
    if problem is not None:
        result.errors.append((path, problem))
        return
    seen.add(path)
    result.files.append(ScannedFile(path, info.st_size, info.st_mtime_ns))


# the rendered picture a camera writes beside its RAW file, preferred in this order
PAIR_EXTENSIONS = (".jpg", ".jpeg", ".heic", ".heif")


def pair_raw_files(files: Sequence[ScannedFile]) -> tuple[list[ScannedFile], dict[str, str]]:
    """RAW files beside a JPEG or HEIC of the same stem in the same folder are one photo with it:
    `files` without those RAW files, and the pairs as {JPEG or HEIC path: RAW path}. The photo is
    embedded from the JPEG or HEIC (the picture the camera rendered); a RAW alone stays a file of its own."""
    by_stem: dict[tuple[str, str], dict[str, str]] = {}
    for file in files:
        stem, suffix = os.path.splitext(file.path)
        by_stem.setdefault((os.path.dirname(file.path), os.path.basename(stem)), {})[suffix.lower()] = file.path
    pairs: dict[str, str] = {}
    for found in by_stem.values():
        raws = sorted(path for suffix, path in found.items() if suffix in RAW_EXTENSIONS)
        rendered = next((found[suffix] for suffix in PAIR_EXTENSIONS if suffix in found), None)
        if raws and rendered is not None:
            pairs[rendered] = raws[0]
    paired = set(pairs.values())
    return [file for file in files if file.path not in paired], pairs


def _unreadable(directory: str, error: OSError, result: ScanResult) -> None:
    result.errors.append((directory, f"folder not readable: {error.strerror or error}"))
    result.unreadable_dirs.append(directory)
