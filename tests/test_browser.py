"""The web page in a real headless browser: Debian's chromium, driven by Playwright.

The browser is the system's (`apt-get install chromium`; .ci/run installs it), not one
Playwright downloads. Without it these tests fail, saying what to install.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from clipdex.indexer import index_paths
from clipdex.search.catalog.database import NewItem
from clipdex.search.http import create_app, serve_in_thread
from clipdex.search.library import Library
from clipdex.search.encoders.model import ModelSpec
from tests.conftest import write_image

CHROMIUM = Path(os.environ.get("CLIPDEX_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = "browser-test-token"
TEXTS = ("a sunny beach with palm trees", "minutes of the board meeting")
WAIT_MS = 20_000
ALL_THUMBNAILS_SHOWN = """() => {
    const images = [...document.querySelectorAll('.hit img')];
    return images.length > 0 && images.every((image) => image.complete && image.naturalWidth > 0);
}"""


@pytest.fixture(scope="module")
def photos_and_server(tmp_path_factory: pytest.TempPathFactory, tiny_model: ModelSpec) -> Iterator[tuple[list[Path], str, Library]]:
    folder = tmp_path_factory.mktemp("browser")
    library = Library.open(folder / "library", model=tiny_model, create=True, device="cpu")
    photos = [write_image(folder / "photos" / f"photo{number}.jpg", seed=number, size=(96, 72)) for number in range(8)]
    index_paths(library, [folder / "photos"])
    with library.writer() as writer:
        writer.commit([NewItem(kind="text", text=text, vector=library.encode_text(text)) for text in TEXTS])
    with serve_in_thread(create_app(library, token=TOKEN)) as url:
        yield photos, url, library
    library.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need playwright: pip install -e '.[dev]'")
    if not CHROMIUM.is_file():
        pytest.fail(f"no chromium at {CHROMIUM}: install Debian's package (apt-get install -y chromium), "
                    "or point $CLIPDEX_CHROMIUM at a chromium binary")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context (empty localStorage); fails the test on any script error."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.set_default_timeout(WAIT_MS)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    context.close()
    assert errors == []


def item_id(library: Library, path: Path) -> int:
    return library.catalog.files_under([str(path.parent)])[str(path)].id


def open_with_token(page: Any, url: str) -> None:
    from playwright.sync_api import expect

    page.goto(f"{url}/#token={TOKEN}")
    expect(page.locator("#status")).to_contain_text("8 images and 2 texts")
    assert "token" not in page.url
    assert page.evaluate("localStorage.getItem('clipdex.token')") == TOKEN


def test_text_search_thumbnails_and_more_like_this(page: Any, photos_and_server: tuple[list[Path], str, Library]) -> None:
    from playwright.sync_api import expect

    photos, url, library = photos_and_server
    open_with_token(page, url)
    page.fill("#query", TEXTS[0])
    page.press("#query", "Enter")
    expect(page.locator(".hit")).to_have_count(10)
    first = page.locator(".hit").first
    expect(first).to_have_attribute("data-kind", "text")
    expect(first.locator(".score")).to_have_text("1.000")
    page.wait_for_function(ALL_THUMBNAILS_SHOWN)  # fetched with the token, shown from blob: URLs

    chosen = page.locator(".hit[data-kind=image]").nth(3)
    chosen_id = chosen.get_attribute("data-id")
    chosen.click()
    expect(page.locator("#status")).to_contain_text("more like")
    expect(page.locator(".hit").first).to_have_attribute("data-id", chosen_id)
    expect(page.locator(".hit").first.locator(".score")).to_have_text("1.000")
    assert page.input_value("#query") == ""


def test_image_upload_and_filters(page: Any, photos_and_server: tuple[list[Path], str, Library]) -> None:
    from playwright.sync_api import expect

    photos, url, library = photos_and_server
    open_with_token(page, url)
    page.set_input_files("#image-input", str(photos[5]))
    expect(page.locator("#image-label")).to_have_text("photo5.jpg")
    expect(page.locator(".hit").first).to_have_attribute("data-id", str(item_id(library, photos[5])))

    page.click("#filters summary")
    page.select_option("#filter-kind", "text")  # a filter change runs the search again
    expect(page.locator(".hit")).to_have_count(2)
    expect(page.locator(".hit[data-kind=image]")).to_have_count(0)

    page.select_option("#filter-kind", "any")
    page.fill("#filter-min-width", "97")
    page.press("#filter-min-width", "Enter")
    expect(page.locator("#status")).to_contain_text("No results")
    expect(page.locator(".hit")).to_have_count(0)


def test_a_late_answer_never_replaces_a_newer_search(page: Any, photos_and_server: tuple[list[Path], str, Library]) -> None:
    """Two searches in flight, answered out of order: the page shows the newer one's answer."""
    from playwright.sync_api import expect

    _photos, url, _library = photos_and_server
    held: list[Any] = []

    def hold_the_first(route: Any) -> None:
        if held:
            route.continue_()
        else:
            held.append(route)  # answered only after the newer search has been shown

    open_with_token(page, url)
    page.route("**/search", hold_the_first)
    page.fill("#query", "a photo")
    page.press("#query", "Enter")
    page.wait_for_function("() => document.getElementById('status').textContent === 'Searching…'")
    page.click("#filters summary")
    page.fill("#filter-min-width", "97")
    page.press("#filter-min-width", "Enter")
    expect(page.locator("#status")).to_contain_text("No results")
    assert len(held) == 1

    with page.expect_request_finished(lambda request: request.url.endswith("/search")):
        held[0].continue_()
    page.wait_for_timeout(300)  # time for the page to handle the late answer
    expect(page.locator("#status")).to_contain_text("No results")
    expect(page.locator(".hit")).to_have_count(0)


def test_paging_with_more_results(page: Any, photos_and_server: tuple[list[Path], str, Library]) -> None:
    from playwright.sync_api import expect

    _photos, url, _library = photos_and_server
    open_with_token(page, url)
    page.click("#filters summary")
    page.fill("#filter-k", "4")
    page.fill("#query", "a photo")
    page.press("#query", "Enter")
    expect(page.locator(".hit")).to_have_count(4)
    first_page = page.locator(".hit").evaluate_all("hits => hits.map((hit) => hit.dataset.id)")
    page.click("#more-button")
    expect(page.locator(".hit")).to_have_count(8)
    all_ids = page.locator(".hit").evaluate_all("hits => hits.map((hit) => hit.dataset.id)")
    assert all_ids[:4] == first_page and len(set(all_ids)) == 8


def test_dropped_image_is_the_query(page: Any, photos_and_server: tuple[list[Path], str, Library]) -> None:
    from playwright.sync_api import expect

    photos, url, library = photos_and_server
    open_with_token(page, url)
    data = base64.b64encode(photos[2].read_bytes()).decode()
    page.evaluate(
        """(data) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
            document.getElementById("drop-zone").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }""",
        data,
    )
    expect(page.locator("#image-label")).to_have_text("dropped.jpg")
    expect(page.locator(".hit").first).to_have_attribute("data-id", str(item_id(library, photos[2])))
    expect(page.locator(".hit").first.locator(".score")).to_have_text("1.000")


def test_page_asks_for_the_token(page: Any, photos_and_server: tuple[list[Path], str, Library]) -> None:
    from playwright.sync_api import expect

    _photos, url, _library = photos_and_server
    page.goto(f"{url}/")
    expect(page.locator("#token-panel")).to_be_visible()
    expect(page.locator("#status")).to_contain_text("needs an access token")

    page.fill("#token-input", "not-the-token")
    page.press("#token-input", "Enter")
    expect(page.locator("#status")).to_contain_text("refused this token")
    expect(page.locator("#token-panel")).to_be_visible()

    page.fill("#token-input", TOKEN)
    page.press("#token-input", "Enter")
    expect(page.locator("#token-panel")).to_be_hidden()
    expect(page.locator("#status")).to_contain_text("8 images and 2 texts")
    page.fill("#query", "anything")
    page.press("#query", "Enter")
    page.wait_for_function(ALL_THUMBNAILS_SHOWN)


def test_api_docs_render_offline_under_their_content_security_policy(
    page: Any, photos_and_server: tuple[list[Path], str, Library]
) -> None:
    """/docs: Swagger UI from this server only; a request anywhere else is cut, and the CSP refuses nothing."""
    from playwright.sync_api import expect

    _photos, url, _library = photos_and_server
    elsewhere: list[str] = []
    refused: list[str] = []

    def only_this_server(route: Any) -> None:
        if route.request.url.startswith(url + "/"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_this_server)
    page.on("console", lambda message: refused.append(message.text)
            if "Content Security Policy" in message.text else None)
    page.goto(f"{url}/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("clipdex")
    expect(page.locator(".opblock-summary-path", has_text="/search/image")).to_be_visible()
    page.locator(".opblock-summary-path", has_text="/health").click()  # opens the operation: React renders more
    expect(page.locator(".opblock-body").first).to_be_visible()
    assert elsewhere == [] and refused == []


def test_snippets_and_matched_boxes_on_the_page(page: Any, tmp_path: Path, tiny_model: ModelSpec) -> None:
    """A keyword hit shows its snippet under the card and the OCR line that matched outlined on the image."""
    from playwright.sync_api import expect

    from clipdex.search.catalog.keyword_sql import OcrResult

    library = Library.open(tmp_path / "library", model=tiny_model, create=True, device="cpu")
    photo = write_image(tmp_path / "photos" / "receipt.jpg", seed=3, size=(200, 100))
    write_image(tmp_path / "photos" / "other.jpg", seed=4, size=(200, 100))
    index_paths(library, [tmp_path / "photos"])
    item = library.catalog.files_at([str(photo)])[str(photo)]
    box = [[20.0, 30.0], [120.0, 30.0], [120.0, 50.0], [20.0, 50.0]]
    lines = [{"text": "WALNUT BREAD 3.99", "score": 0.98, "box": box}, {"text": "TOTAL 3.99", "score": 0.97,
                                                                        "box": [[20, 60], [90, 60], [90, 80], [20, 80]]}]
    library.catalog.store_ocr([OcrResult(item.id, item.content_hash, "WALNUT BREAD 3.99\nTOTAL 3.99", lines)])
    with serve_in_thread(create_app(library, token=TOKEN)) as url:
        page.goto(f"{url}/#token={TOKEN}")
        page.fill("#query", "walnut")
        page.press("#query", "Enter")
        card = page.locator(".hit").first
        expect(card).to_have_attribute("data-id", str(item.id))
        expect(card.locator(".snippet")).to_have_text("WALNUT BREAD 3.99 TOTAL 3.99")
        expect(card.locator(".snippet mark")).to_have_text("WALNUT")
        expect(card.locator("svg.boxes polygon")).to_have_count(1)  # the matched line, not the other
        assert card.locator("svg.boxes polygon").get_attribute("points") == "20,30 120,30 120,50 20,50"
        page.click("#filters summary")
        page.select_option("#filter-mode", "keyword")
        expect(page.locator(".hit")).to_have_count(1)
    library.close()
def test_the_where_toggle_overlays_the_map_on_each_image_hit(page: Any, photos_and_server: tuple[list[Path], str, Library]) -> None:
    from playwright.sync_api import expect

    _, url, _ = photos_and_server
    open_with_token(page, url)
    page.fill("#query", "a photo")
    page.press("#query", "Enter")
    images = page.locator(".hit[data-kind=image]")
    expect(images).to_have_count(8)
    page.wait_for_function(ALL_THUMBNAILS_SHOWN)
    assert page.locator(".hit.explained").count() == 0  # computed on demand only
    page.check("#explain-toggle")
    expect(page.locator(".hit.explained")).to_have_count(8)  # POST explain/overlay, with the token, per image hit
    page.wait_for_function("""() => [...document.querySelectorAll('.hit[data-kind=image] img')].every(
        (image) => image.src === image.dataset.overlay && image.complete && image.naturalWidth > 0)""")
    page.uncheck("#explain-toggle")
    expect(page.locator(".hit.explained")).to_have_count(0)
    page.wait_for_function("""() => [...document.querySelectorAll('.hit[data-kind=image] img')].every(
        (image) => image.src === image.dataset.thumbnail)""")
