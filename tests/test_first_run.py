"""A library's first run, as an application embedding clipdex meets it: searches from other
threads while the first index exports the model, a model hub that cannot be reached, and
what the run reports and logs on the way."""

from __future__ import annotations

import threading
from pathlib import Path

from clipdex.indexer import index_paths
from clipdex.search.library import Library


def test_searches_during_the_first_run_all_succeed(library: Library, tmp_path: Path, make_images) -> None:  # type: ignore[no-untyped-def]
    """Text searches from several threads while the first index_paths exports the model (with
    the export cache empty): none fails, and no export is recorded as refused."""
    make_images(tmp_path / "pics", 48)
    done = threading.Event()
    errors: list[BaseException] = []
    answered = [0]

    def index() -> None:
        try:
            index_paths(library, [tmp_path / "pics"], batch_size=8)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            done.set()

    def search(number: int) -> None:
        turn = 0
        while not done.is_set() or turn < 2:
            try:
                library.search(text=f"query {number} {turn}", k=3)
                answered[0] += 1
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)
            turn += 1

    threads = [threading.Thread(target=index)] + [threading.Thread(target=search, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert answered[0] >= 8
    assert sorted(path.name for path in library.path.glob("*.refused.json")) == []
    assert (library.path / "text_encoder").is_dir() and (library.path / "image_encoder").is_dir()


def test_concurrent_exports_in_one_process_are_not_refusals(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two threads export the same library's towers at once: one exports, the other finds its
    export installed; torch's exporter never runs twice at once, and nothing is refused."""
    from clipdex.search.encoders.image_export import ensure_image_export
    from clipdex.search.encoders.text_export import ensure_text_export
    from clipdex.search.encoders.torch_clip import TorchClipEncoder

    encoder = TorchClipEncoder(tiny_model.resolve(), "cpu").load()
    results: list[object] = []

    def export() -> None:
        results.append(ensure_text_export(tmp_path, encoder, 32))
        results.append(ensure_image_export(tmp_path, encoder, 32))

    threads = [threading.Thread(target=export) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(result is not None for result in results) == 2  # each tower exported once
    assert list(tmp_path.glob("*.refused.json")) == []

