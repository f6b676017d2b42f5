"""OCR: the words in images, read by a pass of its own, found by keyword and hybrid search.

The images are rendered here (tests/text_images.py: screenshots, signs on photos, tilted
receipts, posters, turned text; several DejaVu fonts). There is no CJK font here: Chinese
words are drawn stroke by stroke (tests/text_images.GLYPHS) on signs, and read by PP-OCR's
Chinese recognizer like any other text.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from clipdex.cli.main import app
from clipdex.indexer import index_paths
from clipdex.indexer.ocr_pass import ocr_enabled, read_texts
from clipdex.search.encoders.model import ModelSpec
from clipdex.search.library import Library
from clipdex.search.media.ocr import TextReader
from tests.conftest import huge_png
from tests.text_images import CHINESE_WORDS, chinese_sign, photo_background, render_set

pytest.importorskip("rapidocr", reason="OCR needs rapidocr: pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def read_library(tmp_path_factory: pytest.TempPathFactory, tiny_model: ModelSpec):
    """A library of one image of each kind (two words each) and a photo without text, indexed with --ocr."""
    folder = tmp_path_factory.mktemp("ocr")
    made = render_set(folder / "photos", per_kind=1, seed=3)
    photo_background((640, 480), 99).save(folder / "photos" / "plain.jpg")
    library = Library.open(folder / "library", model=tiny_model, create=True, device="cpu")
    report = index_paths(library, [folder / "photos"], ocr=True)
    assert report.added == len(made) + 1 and report.ocr is not None and report.ocr.read == len(made) + 1
    yield library, made, folder
    library.close()


def test_each_word_finds_its_image_in_the_top_3(read_library) -> None:
    library, made, _ = read_library
    for path, (kind, words) in made.items():
        for word in words:
            for mode in ("keyword", "hybrid"):
                hits = library.search(text=word, mode=mode, k=3)
                assert str(path) in [hit.path for hit in hits], (kind, word, mode)
    assert ocr_enabled(library)


def test_a_photo_without_text_is_not_found_by_words(read_library) -> None:
    library, made, folder = read_library
    plain = str(folder / "photos" / "plain.jpg")
    plain_id = library.catalog.ids_at_paths([plain])[plain]
    assert library.catalog.ocr_lines([plain_id]) == {plain_id: []}  # read: nothing (the confidence filter)
    for word in ["settings", "receipt", "zebra", "quantum", "harbour", "3.99"] + [w for _, ws in made.values() for w in ws]:
        assert plain not in [hit.path for hit in library.search(text=word, mode="keyword", k=10)], word


def test_hits_carry_snippet_and_boxes_of_the_matched_line(read_library) -> None:
    library, made, _ = read_library
    path, (_, words) = next((p, v) for p, v in made.items() if v[0] == "sign")
    hit = library.search(text=words[0], mode="hybrid", k=3)[0]
    assert hit.path == str(path) and hit.snippet is not None and f"«{words[0].upper()}»" in hit.snippet
    assert hit.boxes and len(hit.boxes) == 1
    (x0, y0), (x1, y1) = hit.boxes[0][0], hit.boxes[0][2]
    assert 100 <= x0 < x1 <= 560 and 140 <= y0 < y1 <= 330  # on the sign (tests/text_images.sign)
    assert hit.to_json()["boxes"] == hit.boxes


def test_ocr_is_incremental_and_follows_changed_files(read_library) -> None:
    library, made, folder = read_library
    assert read_texts(library).read == 0  # everything read already
    path, (_, words) = next((p, v) for p, v in made.items() if v[0] == "poster")
    render_set(folder / "tmp", per_kind=1, seed=40, kinds=["poster"])
    new_path, (_, new_words) = next(iter(render_set(folder / "tmp", per_kind=1, seed=40, kinds=["poster"]).items()))
    path.write_bytes(new_path.read_bytes())  # the poster now says other words
    report = index_paths(library, [folder / "photos"])  # the library has OCR on: the run reads the changed file
    assert report.updated == 1 and report.ocr is not None and report.ocr.read == 1
    assert str(path) in [hit.path for hit in library.search(text=new_words[0], mode="keyword", k=3)]
    assert str(path) not in [hit.path for hit in library.search(text=words[0], mode="keyword", k=3)]


def test_a_stopped_pass_resumes_where_it_stopped(tmp_path: Path, library: Library) -> None:
    render_set(tmp_path / "photos", per_kind=1, seed=5, kinds=["poster", "screenshot", "turned"])
    index_paths(library, [tmp_path / "photos"])
    stop = threading.Event()
    first = read_texts(library, batch_size=1, stop=stop, progress=lambda done, total: stop.set())
    assert first.interrupted and first.read == 1
    second = read_texts(library)
    assert second.read == 2 and not second.interrupted
    assert library.catalog.ocr_counts() == {"images": 3, "read": 3, "with_text": 3, "failed": 0}


def test_bad_inputs_are_bounded_and_reported(tmp_path: Path, library: Library) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (30000, 1), (255, 255, 255)).save(photos / "strip.png")
    (photos / "bomb.png").write_bytes(huge_png(20000, 20000))
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    started = time.monotonic()
    report = index_paths(library, [photos], ocr=True)
    assert time.monotonic() - started < 60
    reasons = {Path(failure.path).name: failure.error for failure in report.failed}
    assert "too thin or too elongated" in reasons["strip.png"] and reasons["strip.png"].startswith("OCR: ")
    assert "bomb.png" in reasons and "broken.jpg" in reasons  # not indexed at all: never reached OCR
    assert library.catalog.ocr_counts()["failed"] == 1
    assert read_texts(library).read == 0  # recorded: not tried again until the file changes


def test_a_book_page_is_read_whole() -> None:
    page = Path(__file__).parent / "data" / "page.png"  # a real scan (tests/data/README.md)
    found = TextReader().read(page)
    text = found.text.lower()
    assert len(found.lines) >= 6 and "region-based segmentation" in text and "markers" in text


def test_models_come_from_the_wheel_never_a_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from rapidocr.utils import download_file

    def refuse(*_args, **_kwargs):
        raise AssertionError("rapidocr tried to download")

    monkeypatch.setattr(download_file.DownloadFile, "run", classmethod(refuse))
    render_set(tmp_path, per_kind=1, seed=9, kinds=["sign"])
    assert TextReader().read(next(tmp_path.glob("*.png"))).lines


def test_clipdex_ocr_command(tmp_path: Path, library: Library) -> None:
    made = render_set(tmp_path / "photos", per_kind=1, seed=11, kinds=["sign"])
    index_paths(library, [tmp_path / "photos"])
    assert not ocr_enabled(library)
    runner = CliRunner()
    result = runner.invoke(app, ["ocr", "--library", str(library.path), "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["read"] == 1 and ocr_enabled(library)
    word = next(iter(made.values()))[1][0]
    result = runner.invoke(app, ["search", word, "--library", str(library.path), "--mode", "keyword", "--json"])
    assert [hit["path"] for hit in json.loads(result.stdout)] == [str(next(iter(made)))]
    render_set(tmp_path / "photos", per_kind=2, seed=12, kinds=["poster"])  # new photos: a later index run reads them
    result = runner.invoke(app, ["index", str(tmp_path / "photos"), "--library", str(library.path), "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ocr"]["read"] == 2


def test_without_rapidocr_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys

    from clipdex.search.errors import MissingDependency

    monkeypatch.setitem(sys.modules, "rapidocr", None)  # as if not installed
    render_set(tmp_path, per_kind=1, seed=9, kinds=["sign"])
    with pytest.raises(MissingDependency, match=r"pip install 'clipdex\[ocr\]'"):
        TextReader().read(next(tmp_path.glob("*.png")))


def test_chinese_words_in_images_are_found_by_keyword_and_hybrid(tmp_path: Path, library: Library) -> None:
    for number, word in enumerate(CHINESE_WORDS):
        chinese_sign(word, seed=number).save(tmp_path / f"board-{number}.jpg")
    photo_background((640, 480), 7).save(tmp_path / "plain.jpg")
    index_paths(library, [tmp_path], ocr=True)
    for number, word in enumerate(CHINESE_WORDS):
        for mode in ("keyword", "hybrid"):
            hits = library.search(text=word, mode=mode, k=3)
            assert str(tmp_path / f"board-{number}.jpg") in [hit.path for hit in hits], (word, mode)
        assert library.search(text=word, mode="keyword", k=1)[0].snippet == f"«{word}»"  # the matched text marked
    boards_with = {str(tmp_path / f"board-{number}.jpg") for number, word in enumerate(CHINESE_WORDS) if "王" in word}
    assert {hit.path for hit in library.search(text="王", mode="keyword", k=5)} == boards_with  # one character, no spaces
