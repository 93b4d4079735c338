"""The live notes page in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium): captions are POSTed over HTTP to a real gateway in
front of a real redis-server and a real worker (tiny seeded model), and the page shows the
rolling notes as they arrive, an answer to a question typed into its ask box, then the final
notes with their key moments, quotes and times.

``SINKSTREAM_GATEWAY_PAGE_MODEL=smollm2 SINKSTREAM_GATEWAY_SCREENSHOT=docs/gateway-notes.png``
runs it with the real default model and keeps the screenshot (how docs/gateway-notes.png was
made); by default the screenshot goes to the test's temporary folder.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sinkstream.cli.localredis import RedisServer
from tests.integration.gateway.server import GatewayProcess, Tokens, bearer, gateway_env
from tests.integration.pipeline.harness import WorkerPool, worker_env

SAMPLE = Path(__file__).resolve().parents[3] / "sinkstream" / "samples" / "launch-review.vtt"
MODEL = os.environ.get("SINKSTREAM_GATEWAY_PAGE_MODEL", "tiny-llama")
SLOW = MODEL != "tiny-llama"
TIMEOUT = 900.0 if SLOW else 180.0
pytestmark = pytest.mark.timeout(1200 if SLOW else 400)


def _driver() -> Any:
    """A headless Chromium, or a clear skip where it cannot be installed (never in CI)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    selenium = pytest.importorskip("selenium.webdriver")
    if not (chromium and driver):
        reason = ("Debian's chromium and chromium-driver are not installed: "
                  "apt-get install chromium chromium-driver (./setup.sh does it as root)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    options = selenium.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1500", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    from selenium.webdriver.chrome.service import Service

    return selenium.Chrome(service=Service(driver), options=options)


@pytest.fixture
def browser() -> Iterator[Any]:
    driver = _driver()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[GatewayProcess, Tokens, WorkerPool]]:
    redis_server = RedisServer(tmp_path / "redis").start()
    tokens = Tokens.create(tmp_path / "tokens.json")
    env = worker_env(redis_server.url, tmp_path, model=MODEL,
                     SINKSTREAM_SUMMARY_EVERY_TOKENS="40" if not SLOW else "256",
                     SINKSTREAM_RECENT_TOKENS="48" if not SLOW else "1020",
                     SINKSTREAM_MAX_BATCH_ENTRIES="6" if not SLOW else "64",
                     SINKSTREAM_SUMMARY_MAX_NEW_TOKENS="24" if not SLOW else "96",
                     SINKSTREAM_TORCH_THREADS="1")
    if SLOW:
        env.pop("SINKSTREAM_MODEL_CACHE_DIR")  # the prepared default model's cache
    pool = WorkerPool(env, tmp_path)
    gateway = GatewayProcess(gateway_env(redis_server.url, tokens.path),
                             tmp_path / "gateway.log")
    try:
        pool.start("page")
        gateway.start()
        yield gateway, tokens, pool
    finally:
        gateway.stop()
        pool.close()
        redis_server.stop(hard=True)


def _cue_chunks(size: int) -> list[str]:
    """The demo meeting's cues, ``size`` per chunk, as a caption service would post them."""
    blocks = SAMPLE.read_text().split("\n\n")
    cues = [b for b in blocks if "-->" in b]
    return ["\n\n".join(cues[i:i + size]) + "\n" for i in range(0, len(cues), size)]


def _wait(what: str, check: Callable[[], Any], timeout: float, context: Callable[[], str]
          ) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{context()}")


def test_notes_appear_in_the_page_as_captions_are_posted(
        stack: tuple[GatewayProcess, Tokens, WorkerPool], browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    gateway, tokens, pool = stack
    stream = "acme-launch-review"
    browser.get(f"{gateway.url}/streams/{stream}#token={tokens.acme}")

    def text(element_id: str) -> str:
        return str(browser.find_element(By.ID, element_id).text)

    def context() -> str:
        return f"page:\n{browser.find_element(By.TAG_NAME, 'body').text}\n" \
               f"{pool.logs()[-3000:]}\n{gateway.tail()}"

    captions = f"{gateway.url}/v1/streams/{stream}/captions"
    headers = {**bearer(tokens.acme), "Content-Type": "text/vtt"}
    chunks = _cue_chunks(6)
    for n, chunk in enumerate(chunks[: len(chunks) // 2]):
        reply = httpx.post(captions, content=chunk, headers={**headers, "Idempotency-Key":
                                                             f"chunk-{n}"})
        assert reply.status_code == 200, reply.text
    # the page signed in with the token from its fragment, which then left the URL
    _wait("the page to sign in", lambda: browser.find_element(By.ID, "main").is_displayed(),
          30, context)
    assert "token" not in browser.current_url
    _wait("a rolling summary in the page", lambda: browser.find_elements(
        By.CSS_SELECTOR, "#rolling li:not(.empty)"), TIMEOUT, context)
    _wait("the live indicator", lambda: text("live") == "live", 30, context)
    _wait("the stream's status", lambda: "tokens" in text("status"), 30, context)

    browser.find_element(By.ID, "question").send_keys("Who will merge the crash fix?")
    browser.find_element(By.CSS_SELECTOR, "#ask-form button").click()
    _wait("the answer in the page", lambda: browser.find_elements(
        By.CSS_SELECTOR, "#answers li") and not browser.find_elements(
        By.CSS_SELECTOR, "#answers .pending"), TIMEOUT, context)
    assert "Who will merge the crash fix?" in text("answers")

    for n, chunk in enumerate(chunks[len(chunks) // 2:], start=len(chunks) // 2):
        httpx.post(captions, content=chunk, headers={**headers, "Idempotency-Key": f"chunk-{n}"})
    assert httpx.post(f"{gateway.url}/v1/streams/{stream}/end", headers=bearer(tokens.acme)
                      ).status_code == 200
    _wait("the final notes", lambda: text("notes-title") == "Meeting notes", TIMEOUT, context)
    _wait("the key moments", lambda: browser.find_element(By.ID, "moments-card").is_displayed(),
          30, context)
    moments = text("moments")
    assert re.search(r"(Maya|Tomas|Priya|Jonas)", moments), moments
    assert re.search(r"\d+:\d\d", moments), "key moments carry their times"
    notes = text("notes")
    for section in ("SUMMARY", "DECISIONS", "ACTION ITEMS", "OPEN QUESTIONS"):
        assert section in notes.upper(), notes
    assert "ended" in text("status") or "idle" in text("status") or "active" in text("status")
    time.sleep(0.5)  # let the last animation settle
    shot = Path(os.environ.get("SINKSTREAM_GATEWAY_SCREENSHOT", tmp_path / "gateway-notes.png"))
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


GROUNDED = """## Summary
The team agreed the camera permission crash blocks the launch.

## Decisions
- The camera permission fix is a launch blocker ({blocker})

## Action items
- Tomas merges the fix by two o'clock [{merge}]

## Open questions
- none noted

## Key moments
- Maya: A crash on first launch is a blocker. ({blocker})
"""


def test_grounded_notes_show_their_quotes_and_times(browser: Any, tmp_path: Path) -> None:
    """Notes whose bullets cite entries (as grounded notes do) show each citation's time
    and the quoted line: from the key moments, or from the input entry itself."""
    from selenium.webdriver.common.by import By

    from sinkstream.contracts.keys import StreamKeys
    from sinkstream.contracts.outputs import SummaryKind, make_output

    server = RedisServer(tmp_path / "redis").start()
    tokens = Tokens.create(tmp_path / "tokens.json")
    gateway = GatewayProcess(gateway_env(server.url, tokens.path), tmp_path / "gateway.log")
    try:
        gateway.start()
        data = server.client(decode_responses=True)
        keys = StreamKeys.of("acme-grounded")
        blocker = data.xadd(keys.input, {"text": "A crash on first launch is a blocker.",
                                         "speaker": "Maya", "ts": "35.5"})
        merge = data.xadd(keys.input, {"text": "I will merge it by two o'clock.",
                                       "speaker": "Tomas", "ts": "40.5"})
        notes = GROUNDED.format(blocker=blocker, merge=merge)
        data.xadd(keys.output, make_output(SummaryKind.FINAL, notes, str(merge), 99,
                                           "m").fields())  # type: ignore[arg-type]
        browser.get(f"{gateway.url}/streams/acme-grounded#token={tokens.acme_read}")

        def text(element_id: str) -> str:
            return str(browser.find_element(By.ID, element_id).text)

        _wait("the notes", lambda: text("notes-title") == "Meeting notes", 30,
              lambda: browser.find_element(By.TAG_NAME, "body").text)
        notes_text = text("notes")
        assert "The camera permission fix is a launch blocker" in notes_text
        assert blocker not in notes_text, "citations are chips, not raw ids"
        assert "“I will merge it by two o'clock.”" in notes_text  # from the input entry
        assert "0:40" in notes_text and "0:35" in notes_text  # media times of the cited lines
        chips = browser.find_elements(By.CSS_SELECTOR, "#notes .cite")
        assert len(chips) == 2 and blocker in chips[0].get_attribute("title")
        assert "Maya" in text("moments")
        browser.find_element(By.ID, "question").send_keys("who?")
        browser.find_element(By.CSS_SELECTOR, "#ask-form button").click()
        _wait("the refusal", lambda: "lacks the 'ask' scope" in text("ask-error"), 15,
              lambda: browser.find_element(By.TAG_NAME, "body").text)
    finally:
        gateway.stop()
        server.stop(hard=True)
