"""The demo page at /: served without a key and kept out of the API schema (in process), then end to
end in headless Chromium (Debian's package, driven by Playwright): upload a shapes test scene, wait
for the captions, check them and the attention heatmap, and save desktop and phone screenshots.

The browser test serves the trained default model (conftest.DEFAULT_BUNDLE) when it exists (and then also
checks that the caption is true of the scene), else the tiny random bundle. Screenshots go to the
test's tmp_path, and also to DEMO_SCREENSHOTS_DIR when that is set (for CI artifacts).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import uploads
from conftest import DEFAULT_BUNDLE
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings
from captioning.decoding import DecodeOptions
from captioning.scene_checker import check_caption
from training.datasets.shapes import make_example

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

ROOT = Path(__file__).resolve().parents[2]
TRAINED_BUNDLE = DEFAULT_BUNDLE
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGE_DEFAULTS = DecodeOptions(
    strategy="beam", beam_size=3, num_captions=3, mirror_view=False
)  # as app/static/index.html; plus grounded=True where the model has a scene head (page_options)
SCENES_TO_TRY = 20
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 375, "height": 740}
CAPTION_TIMEOUT_MS = 30_000


# --- served like any other route (no browser needed) -----------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_bundle):
    with TestClient(create_app(Settings(artifacts_dir=tiny_bundle, api_key="page-key"))) as client:
        yield client


def test_page_and_assets_are_served_without_a_key(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'id="file-input"' in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    for missing in ("/static/index.html.bak", "/static/..%2Fmain.py", "/static/"):
        assert client.get(missing).status_code == 404
    assert "/" not in client.get("/openapi.json").json()["paths"]


def test_page_fetches_nothing_from_elsewhere():
    static = ROOT / "app" / "static"
    for name in ("index.html", "app.js", "style.css"):
        text = (static / name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name


# --- end to end in Chromium ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def playwright_api():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        pytest.skip(
            f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install chromium) or set CHROMIUM_PATH"
        )
    return sync_api


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Path:
    return TRAINED_BUNDLE if (TRAINED_BUNDLE / "manifest.json").exists() else tiny_bundle


@pytest.fixture(scope="module")
def served_app(bundle):
    return create_app(Settings(artifacts_dir=bundle, max_batch_size=16))


@pytest.fixture(scope="module")
def server_url(playwright_api, served_app):
    """The app under uvicorn in a thread, on a free loopback port."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(served_app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="demo-page-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the demo server did not become ready")
        time.sleep(0.2)
    yield url
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def browser(playwright_api, tmp_path_factory):
    with playwright_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=DESKTOP,
            has_touch=True,
        )
        yield context
        context.close()


def page_options(captioner) -> DecodeOptions:
    """What the page asks for: its defaults, grounded where the model can (GET /model says)."""
    return replace(PAGE_DEFAULTS, grounded=captioner.scene_head is not None)


@pytest.fixture(scope="module")
def scene(served_app, server_url, bundle, tmp_path_factory):
    """A shapes test scene saved as PNG, with the caption the page should show first: the first
    scene that the trained model captions correctly offline (any scene for the random bundle)."""
    captioner = served_app.state.captioner
    for index in range(SCENES_TO_TRY):
        example = make_example("test", index)
        best = captioner.caption([example.pixels], page_options(captioner))[0][0]
        right = check_caption(best.text, example.scene).correct and not best.written_from_scene  # one with words
        if bundle != TRAINED_BUNDLE or right:
            path = tmp_path_factory.mktemp("scene") / f"{example.image_id}.png"
            Image.fromarray(example.pixels).save(path)
            return path, example.scene, best.text
    pytest.fail(f"the trained model captions none of the first {SCENES_TO_TRY} test scenes correctly")


def heatmap_pixels_drawn(page) -> int:
    """Pixels of the overlay canvas that are not fully transparent."""
    return page.evaluate("""() => {
        const canvas = document.getElementById("heatmap");
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        let drawn = 0;
        for (let i = 3; i < data.length; i += 4) if (data[i] > 0) drawn += 1;
        return drawn;
    }""")


def upload_and_wait(page, url, path):
    page.goto(url)
    # The options the page offers depend on GET /model (mirror view, grounded): read it first.
    # A locator, not wait_for_function: Playwright may evaluate a string predicate with eval() in the
    # page, which its Content-Security-Policy refuses (one fresh-clone CI run failed with that EvalError
    # here; not reproduced on demand). A locator's text filter runs in Playwright's own script.
    page.locator("#model-info").filter(has_text=re.compile(r"^Model ")).wait_for()
    page.set_input_files("#file-input", str(path))
    page.wait_for_selector("#captions li .word", timeout=CAPTION_TIMEOUT_MS)


def first_caption(page) -> tuple[str, str]:
    first = page.locator("#captions li").first
    words = first.locator(".word").all_inner_texts()
    return " ".join(words), first.locator(".confidence-value").inner_text()


def save_screenshot(page, tmp_path, name):
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("DEMO_SCREENSHOTS_DIR"):
        target = Path(os.environ["DEMO_SCREENSHOTS_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)
    return path


def test_upload_shows_captions_and_hovering_a_word_shows_its_heatmap(
    browser, server_url, served_app, bundle, scene, tmp_path
):
    path, shapes_scene, expected_caption = scene
    page = browser.new_page()
    page.set_viewport_size(DESKTOP)
    upload_and_wait(page, server_url, path)

    text, confidence = first_caption(page)
    assert text == expected_caption and confidence.endswith("% confidence")
    assert page.locator("#captions li").count() == PAGE_DEFAULTS.num_captions
    if bundle == TRAINED_BUNDLE:
        assert check_caption(text, shapes_scene).correct, f"{text!r} is not true of the scene"
    assert page.locator("#model-info").inner_text().startswith("Model ")
    assert not page.locator("#api-key-row").is_visible()  # this service needs no key

    assert heatmap_pixels_drawn(page) == 0
    word = page.locator("#captions li").first.locator(".word").nth(2)
    word.hover()
    assert heatmap_pixels_drawn(page) > 0
    assert page.locator("#legend").is_visible()
    assert word.inner_text() in page.locator("#attention-label").inner_text()
    box = page.locator("#preview").bounding_box()
    canvas = page.locator("#heatmap").bounding_box()
    assert (round(canvas["width"]), round(canvas["height"])) == (round(box["width"]), round(box["height"]))
    assert save_screenshot(page, tmp_path, "demo-desktop.png").stat().st_size > 0

    page.mouse.move(0, 0)  # leaving the word clears the overlay
    assert heatmap_pixels_drawn(page) == 0

    # Without the mirror view (nor the check against the scene) the page asks for plain beam search,
    # and shows its answer.
    captioner = served_app.state.captioner
    grounded = captioner.scene_head is not None
    assert page.locator("#grounded").is_visible() == grounded
    assert not page.locator("#mirror-view").is_checked()  # off by default: default/5 gains little from it
    if grounded:
        page.uncheck("#grounded")
    with page.expect_response(lambda r: "/caption?" in r.url) as response:
        page.click("#caption-button")
    assert "mirror_view=false" in response.value.url and "grounded" not in response.value.url
    page.wait_for_selector("#captions li .word", timeout=CAPTION_TIMEOUT_MS)
    plain_options = replace(PAGE_DEFAULTS, mirror_view=False)
    plain = captioner.caption([Image.open(path).convert("RGB")], plain_options)
    assert first_caption(page)[0] == plain[0][0].text
    if grounded:  # and checked again, it asks for the grounded reranking
        page.check("#grounded")
        with page.expect_response(lambda r: "/caption?" in r.url) as response:
            page.click("#caption-button")
        assert "grounded=true" in response.value.url
        page.wait_for_selector("#captions li .word", timeout=CAPTION_TIMEOUT_MS)
        reranked = captioner.caption([Image.open(path).convert("RGB")], replace(plain_options, grounded=True))
        assert first_caption(page)[0] == reranked[0][0].text
    page.close()


def test_on_a_phone_a_tap_pins_the_heatmap_and_nothing_overflows(browser, server_url, scene, tmp_path):
    path = scene[0]
    page = browser.new_page()
    page.set_viewport_size(PHONE)
    upload_and_wait(page, server_url, path)
    word = page.locator("#captions li").first.locator(".word").first
    word.tap()
    assert word.get_attribute("aria-pressed") == "true"
    assert heatmap_pixels_drawn(page) > 0
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    save_screenshot(page, tmp_path, "demo-phone.png")
    page.close()


def test_a_caption_written_from_the_scene_is_shown_and_marked(browser, server_url, scene):
    """Grounded decoding can put a caption written from the model's reading first: it has no
    log_prob and no words with attention. The page shows it, says where it came from, and still
    shows the decoder's captions after it with their words. The service's answer is edited on its
    way to the page, since which pictures get one depends on the model."""
    written = {
        "text": "there is a red cross",
        "confidence": 0.61,
        "agrees_with_scene": True,
        "written_from_scene": True,
    }

    def add_written(route):  # the page's own request, sent again from here (route.fetch drops a form's file)
        with open(scene[0], "rb") as image:
            answer = httpx.post(route.request.url, files={"image": ("scene.png", image, "image/png")}, timeout=60)
        body = answer.json()
        body["captions"] = [written] + body["captions"][:-1]
        route.fulfill(json=body)

    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.route("**/caption?**", add_written)
    upload_and_wait(page, server_url, scene[0])
    first = page.locator("#captions li").first
    assert first.locator(".caption-text").inner_text() == "there is a red cross"
    assert "written from the objects the model sees" in first.inner_text()
    assert "written from" in first.locator(".confidence-value").get_attribute("title")
    assert page.locator("#captions li").nth(1).locator(".word").count() > 0
    assert errors == []
    page.close()


def test_an_api_error_is_shown_readably(browser, server_url, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(uploads.TEXT)
    page = browser.new_page()
    page.goto(server_url)
    page.set_input_files("#file-input", str(not_an_image))
    alert = page.locator("#error")
    alert.wait_for(state="visible", timeout=CAPTION_TIMEOUT_MS)
    assert "not a recognisable image" in alert.inner_text() and "invalid_image" in alert.inner_text()
    assert page.locator("#captions li").count() == 0
    page.close()


def test_a_service_that_never_answers_is_given_up_on_after_60_s(browser, server_url, scene):
    """A proxy that holds the request would leave "Captioning..." for ever: the page gives up after
    REQUEST_TIMEOUT_MS (app.js), says so, and is ready for the next image. The page's clock is
    Playwright's, moved on by hand; the held request is never answered."""
    page = browser.new_page()
    page.clock.install()
    held = []
    page.route("**/caption?**", lambda route: held.append(route))  # neither fulfilled nor continued: it hangs
    page.goto(server_url)
    page.set_input_files("#file-input", str(scene[0]))
    page.locator("#status").filter(has_text=re.compile(r"^Captioning")).wait_for()  # a locator: see upload_and_wait
    assert held, "the page sent no caption request"
    page.clock.run_for(59_000)
    assert page.locator("#error").is_hidden()
    page.clock.run_for(2_000)
    alert = page.locator("#error")
    alert.wait_for(state="visible", timeout=5_000)
    assert "did not answer within 60 s" in alert.inner_text()
    assert page.locator("#status").inner_text() == ""
    assert page.locator("#result").get_attribute("aria-busy") is None
    page.close()


def test_when_the_service_wants_a_key_the_page_asks_for_it_and_sends_it(browser, server_url, scene):
    page = browser.new_page()
    unauthorised = {"error": {"code": "unauthorized", "message": "a valid API key is required"}, "request_id": "x"}
    page.route("**/model", lambda route: route.fulfill(status=401, json=unauthorised))
    page.goto(server_url)
    page.locator("#api-key-row").wait_for(state="visible")
    page.fill("#api-key", "demo-secret")
    page.press("#api-key", "Tab")  # `change` stores it
    with page.expect_request("**/caption?**") as request:
        page.set_input_files("#file-input", str(scene[0]))
    assert request.value.headers["x-api-key"] == "demo-secret"
    assert page.evaluate("sessionStorage.getItem('captioning.apiKey')") == "demo-secret"
    page.close()


# --- things to try: samples, the drawing pad, the out-of-domain warning ----------------------------


def has_domain_check(bundle: Path) -> bool:
    return "domain.npz" in (bundle / "manifest.json").read_text()


def test_samples_are_served_from_a_fixed_list(client):
    from app.routes.demo import SAMPLES

    for name, media_type in SAMPLES.items():
        response = client.get(f"/static/samples/{name}")
        assert response.status_code == 200 and response.headers["content-type"] == media_type
    assert client.get("/static/samples/..%2Fapp.js").status_code == 404
    assert client.get("/static/samples/other.png").status_code == 404


def test_a_sample_is_captioned_in_one_click_and_a_non_scene_is_flagged(browser, server_url, bundle):
    page = browser.new_page()
    page.goto(server_url)
    page.click('[data-sample="dark.png"]')
    page.wait_for_selector("#captions li .word", timeout=CAPTION_TIMEOUT_MS)
    text, confidence = first_caption(page)
    assert text and confidence.endswith("% confidence")
    assert not page.locator("#domain-warning").is_visible()
    if has_domain_check(bundle):
        page.click('[data-sample="not-a-scene.png"]')
        page.locator("#domain-warning").wait_for(state="visible", timeout=CAPTION_TIMEOUT_MS)
        assert "does not look like" in page.locator("#domain-warning").inner_text()
        assert "domain score" in page.locator("#timing").inner_text()
    page.close()


def test_a_drawing_on_the_pad_is_captioned(browser, server_url, bundle):
    from captioning.scenes import Scene, ShapeObject

    page = browser.new_page()
    page.set_viewport_size(DESKTOP)
    page.goto(server_url)
    pad = page.locator("#pad")
    assert page.locator("#pad-caption").is_disabled()
    box = pad.bounding_box()
    drawn = []
    for shape, colour, size, x, y in (("circle", "red", "large", 64, 96), ("square", "blue", "small", 192, 160)):
        page.select_option("#pad-shape", shape)
        page.select_option("#pad-colour", colour)
        page.select_option("#pad-size", size)
        pad.click(position={"x": x * box["width"] / 256, "y": y * box["height"] / 256})
        extent = {"large": 0.3, "small": 0.13}[size] * 256 / 2
        drawn.append(ShapeObject(shape, colour, size, x, y, extent))
    page.click("#pad-caption")
    page.wait_for_selector("#captions li .word", timeout=CAPTION_TIMEOUT_MS)
    text, _ = first_caption(page)
    assert page.locator("#preview").get_attribute("alt").endswith("drawing.png")
    if bundle == TRAINED_BUNDLE:
        verdict = check_caption(text, Scene(256, tuple(drawn), "drawn"))
        assert verdict.correct, f"{text!r} for a large red circle and a small blue square: {verdict}"
        assert not page.locator("#domain-warning").is_visible()
    page.close()


def test_a_file_chosen_again_dropped_anywhere_or_pasted_is_captioned(browser, server_url, scene):
    """Choosing the same file again sent nothing (the input kept its value), a drop outside the drop
    zone made the browser open the image in place of the page, and a pasted image was ignored."""
    path, _, _ = scene
    page = browser.new_page()
    sent = []
    page.on("request", lambda request: sent.append(request.url) if "/caption?" in request.url else None)

    def wait_for_requests(count):
        deadline = time.monotonic() + CAPTION_TIMEOUT_MS / 1000
        while len(sent) < count:
            assert time.monotonic() < deadline, f"{len(sent)} caption requests, expected {count}"
            page.wait_for_timeout(50)
        page.wait_for_selector("#captions li .word", timeout=CAPTION_TIMEOUT_MS)

    upload_and_wait(page, server_url, path)
    page.set_input_files("#file-input", str(path))  # the same file again
    wait_for_requests(2)
    handled = page.evaluate("""async () => {
        const blob = await (await fetch("/static/samples/dark.png")).blob();
        const transfer = () => {
            const data = new DataTransfer();
            data.items.add(new File([blob], "given.png", { type: "image/png" }));
            return data;
        };
        const drop = new DragEvent("drop", { dataTransfer: transfer(), bubbles: true, cancelable: true });
        document.querySelector("h1").dispatchEvent(drop);  // outside the drop zone
        const paste = new ClipboardEvent("paste", { clipboardData: transfer(), bubbles: true, cancelable: true });
        document.body.dispatchEvent(paste);
        return [drop.defaultPrevented, paste.defaultPrevented];
    }""")
    assert handled == [True, True]
    wait_for_requests(4)
    assert "given.png" in page.locator("#preview").get_attribute("alt")
    page.close()
