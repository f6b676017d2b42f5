"""The indexer's rules run without its local mechanics: another runner gets the same result."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import clipdex.indexer.rules as rules
from clipdex.indexer import IndexReport, index_paths
from clipdex.indexer.scan import scan
from clipdex.search.library import Library


def run_on_one_thread(library: Library, folder: Path, batch_size: int = 2) -> IndexReport:
    """A runner of its own: no decode pool, no model lanes; one file, then one batch, at a time."""
    report = IndexReport()
    with library.writer() as writer:
        diff = rules.diff_scan(library, scan([folder]))
        report.failed += diff.failures
        report.unchanged = diff.unchanged
        hashes = diff.hash_lookup(library)
        prepared = [rules._prepare(job, library.encoder, hashes) for job in diff.jobs]
        for start in range(0, len(prepared), batch_size):
            batch = prepared[start : start + batch_size]
            rules._commit(library, writer, batch, rules._embed(library, batch), diff.vanished, diff.vanished_by_id, report)
        rules.remove_vanished(writer, diff, report)
    return report


def test_the_rules_alone_index_move_and_remove(library: Library, tmp_path: Path, make_images) -> None:
    folder = tmp_path / "pics"
    paths = make_images(folder, 5)
    index_paths(library, [folder], export_text=False)
    moved_id = library.catalog.files_at([str(paths[0])])[str(paths[0])].id
    paths[0].rename(folder / "moved.jpg")
    paths[1].unlink()
    new = make_images(folder, 2, start=10)
    (folder / "broken.jpg").write_bytes(b"not an image")

    report = run_on_one_thread(library, folder)
    assert (report.added, report.moved, report.removed, report.unchanged) == (2, 1, 1, 3)
    assert [Path(failure.path).name for failure in report.failed] == ["broken.jpg"]
    assert library.catalog.files_at([str(folder / "moved.jpg")])[str(folder / "moved.jpg")].id == moved_id
    expected = library.encoder.encode_files(new)
    stored = library.catalog.files_at([str(path) for path in new])
    for path, vector in zip(new, expected):
        item = library.catalog.get_item(stored[str(path)].id)
        assert float(np.dot(item.vector_array(), vector)) > 0.9999
    assert library.check()["ok"]
    again = index_paths(library, [folder], export_text=False)  # the local runner agrees: nothing left to do
    assert (again.unchanged, again.added, again.moved, again.removed) == (6, 0, 0, 0)
