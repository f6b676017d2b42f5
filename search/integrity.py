"""The catalog's own integrity: what `clipdex check` verifies beyond catalog-versus-index, and
what `check --repair` can do about it.

- A library whose manifest is there but whose catalog is missing, or has no tables, is
  an error (`require_catalog`): only creating a new library makes a catalog, so a lost
  catalog never silently becomes an empty library.
- The `state` table (generation, changes_floor) emptied: repaired by re-creating the rows
  past every generation the library has seen, so every saved index is rebuilt.
- The keyword index (names, texts, OCR text) out of step with the items: rebuilt.
- Stored vectors of another length than the manifest's `dim`: when every vector agrees
  with each other and with the model's own dimension, the manifest is what is wrong and
  the repair rewrites its `dim`; otherwise the few rows of another length are damaged,
  and the repair removes them, naming their files or texts so they can be indexed again
  (a damaged vector cannot be read back, and the rest of the row is re-made by indexing).
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from clipdex.search.catalog.vector_rows import valid_sizes
from clipdex.search.errors import ClipdexError, CorruptLibrary
from clipdex.search.manifest import MANIFEST_FILE
from clipdex.search.index.parts import LibraryParts
from clipdex.search.index.vectors import STAMP_FILE

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from clipdex.search.manifest import Manifest


class CheckedLibrary(LibraryParts, Protocol):
    """What the check reads and repairs of a library (`clipdex.search.library.Library` is one;
    a protocol, so that this module and the facade do not import each other)."""

    @property
    def manifest(self) -> Manifest: ...

    def writer(self) -> AbstractContextManager[object]: ...


def require_catalog(path: Path) -> None:
    """Raise CorruptLibrary unless `path` is an SQLite file holding clipdex's tables."""
    if not path.exists():
        raise CorruptLibrary(
            f"{path} is missing: this library's catalog (its items and vectors) is gone; restore it from a "
            "backup, or index into a new library folder (clipdex makes a catalog only for a new library)"
        )
    try:
        tables = catalog_tables(path)
    except sqlite3.DatabaseError as error:
        raise CorruptLibrary(f"cannot read catalog {path}: {error}") from error
    if "items" not in tables:
        raise CorruptLibrary(
            f"{path} holds no catalog (it is empty or has no items table): the library's items are gone; "
            "restore it from a backup, or index into a new library folder"
        )


def catalog_tables(path: Path) -> set[str]:
    """The table names in an SQLite file, read without writing to it (see `clipdex.search.readonly`)."""
    from clipdex.search.readonly import sqlite_uri

    last_error: sqlite3.Error | None = None
    for immutable in (False, True):  # a WAL file in a read-only folder needs immutable=1 to be read
        try:
            connection = sqlite3.connect(sqlite_uri(path, immutable=immutable), uri=True)
            try:
                return {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            finally:
                connection.close()
        except sqlite3.OperationalError as error:
            last_error = error
    assert last_error is not None
    raise last_error


@dataclass
class CatalogCheck:
    problems: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)  # what --repair did
    unrepairable: list[str] = field(default_factory=list)  # what --repair cannot do, and what to do instead
    blocking: bool = False  # the catalog cannot be compared with the index until these are repaired

    def report(self) -> dict[str, Any]:
        """`Library.check`'s report when the check cannot go on."""
        return {"ok": False, "problems": self.problems, "repaired": False, "items": None, **self.details()}

    def details(self) -> dict[str, Any]:
        """`repairs` and `unrepairable`, when there are any."""
        return {key: value for key, value in (("repairs", self.repairs), ("unrepairable", self.unrepairable)) if value}


def check_catalog(library: "CheckedLibrary", repair: bool) -> CatalogCheck:
    """The catalog's state rows and stored vector lengths; with `repair`, fix what can be fixed."""
    check = CatalogCheck()
    _check_state(library, repair, check)
    if not check.blocking:
        _check_vector_lengths(library, repair, check)
    if not check.blocking and not library.catalog.read_only:
        _check_keywords(library, repair, check)
    return check


def _check_keywords(library: "CheckedLibrary", repair: bool, check: CatalogCheck) -> None:
    """The keyword index against the items: a row for each item that has words, none for another;
    the repair re-makes the whole index (in one transaction) from the items and their OCR text."""
    catalog = library.catalog
    indexed = catalog.keyword_ids()
    items = {int(i) for i in catalog.ids()}
    unknown = indexed - items
    unindexed = sorted(items - indexed)
    missing = [item_id for item_id, parts in catalog.keyword_documents(unindexed).items() if parts]
    if not unknown and not missing:
        return
    check.problems.append(f"{catalog.describe()}: the keyword index lacks {len(missing)} items and holds "
                          f"{len(unknown)} unknown ids")
    if repair:
        with library.writer():
            catalog.rebuild_keywords()
        check.repairs.append("rebuilt the keyword index from the items and their OCR text")


def _check_state(library: "CheckedLibrary", repair: bool, check: CatalogCheck) -> None:
    missing = library.catalog.missing_state()
    if not missing:
        return
    check.problems.append(f"{library.catalog.describe()}: its state table lacks the rows {', '.join(missing)}")
    if not repair:
        check.blocking = True
        return
    generation = restore_state(library)
    check.repairs.append(f"re-created the state rows at generation {generation}")


def restore_state(library: "CheckedLibrary") -> int:
    """Re-create the state rows past every generation the catalog's log, its state and the saved
    index know of, with the change log's floor there too: every reader rebuilds its index."""
    try:
        saved = int(json.loads((library.path / STAMP_FILE).read_text())["generation"])
    except (OSError, ValueError, KeyError, TypeError):
        saved = 0
    with library.writer():
        generation = library.catalog.restore_state(saved)
    return generation


def _check_vector_lengths(library: "CheckedLibrary", repair: bool, check: CatalogCheck) -> None:
    lengths: Counter[int] = Counter(library.catalog.vector_lengths())
    if not lengths:
        return
    expected = valid_sizes(library.dim)  # float32, or float16 as an import may store them
    common, count = lengths.most_common(1)[0]
    if common not in expected and common % 4 == 0:
        if not _check_manifest_dim(library, common // 4, count, repair, check):
            return
        expected = valid_sizes(common // 4)
    damaged = sum(number for size, number in lengths.items() if size not in expected)
    if damaged:
        _check_damaged_rows(library, expected, damaged, repair, check)


def _check_manifest_dim(library: "CheckedLibrary", stored: int, count: int, repair: bool, check: CatalogCheck) -> bool:
    """The manifest's dim against the catalog's vectors (most of them of `stored` dimensions);
    True when they agree now (repaired)."""
    check.problems.append(
        f"{library.path / 'manifest.json'} gives dimension {library.dim}, but {count} of the catalog's vectors have {stored}"
    )
    model_dim = _model_dim(library)
    if model_dim != stored:
        check.unrepairable.append(
            f"the model {library.model.describe()} gives {model_dim or 'an unknown number of'} dimensions, so it cannot "
            "tell whether manifest.json or catalog.sqlite is wrong: restore the wrong one from a backup"
        )
        check.blocking = True
        return False
    if not repair:
        check.blocking = True
        return False
    with library.writer():
        library.manifest.dim = stored
        library.manifest.write(library.path / MANIFEST_FILE)
        library.catalog.vector_dim = stored
    check.repairs.append(f"set dimension {stored} in manifest.json, the model's and the catalog's")
    return True


def _check_damaged_rows(library: "CheckedLibrary", expected: tuple[int, int], damaged: int, repair: bool, check: CatalogCheck) -> None:
    catalog = library.catalog
    rows = catalog.items_with_vector_length_other_than(expected)
    shown = ", ".join(str(row.id) for row in rows[:10]) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")
    check.problems.append(
        f"{catalog.describe()}: {damaged} items have damaged vectors (not {expected[0] // 4} float32 values): ids {shown}"
    )
    if not repair:
        check.blocking = True
        return
    with library.writer():
        catalog.commit_batch(remove_ids=[row.id for row in rows])
    names = [row.path if row.kind == "image" else f"text {(row.text or '')[:40]!r} of {row.source}" for row in rows[:5]]
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    check.repairs.append(
        f"removed the {len(rows)} items whose vectors were damaged ({'; '.join(map(str, names))}{more}): "
        "index their files or texts again (or import them again) to restore them"
    )


def _model_dim(library: "CheckedLibrary") -> int | None:
    """The library's model's own embedding dimension, or None when it cannot be told here."""
    from clipdex.search.manifest import embedding_dim  # the one place that knows how

    try:
        return embedding_dim(library.model)
    except (ClipdexError, ImportError, KeyError, TypeError, ValueError):
        return None
