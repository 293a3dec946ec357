"""The playground in a real headless Chromium (Debian's, driven by Playwright's Python client; no
browser download) against `engine serve` as a subprocess: type, submit, see the completion."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.runtime.engine import Engine
from harness.processes import ServerProcess, create_key_cli, start_server

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, flan_model_dir: Path
) -> Iterator[tuple[ServerProcess, str]]:
    tmp = tmp_path_factory.mktemp("playground")
    store = f"sqlite:///{tmp}/engine.db"
    key = create_key_cli(store, "browser")
    server = start_server(["--model", str(flan_model_dir), "--store", store], tmp / "server.log")
    yield server, key
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if CHROMIUM is None:
        pytest.skip("chromium missing (Debian package chromium; `make system-deps`)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_type_submit_and_see_the_completion(
    served: tuple[ServerProcess, str], browser: object, flan_model_dir: Path
) -> None:
    server, key = served
    prompt = "A step by step recipe to make bolognese pasta:"
    expected = (
        Engine(flan_model_dir).generate([prompt], max_new_tokens=64, top_k=4, penalty_alpha=0.6)[0].text
    )
    page = browser.new_page(viewport={"width": 1200, "height": 900})  # type: ignore[attr-defined]
    page.goto(server.url + "/")
    page.wait_for_selector("#demo-banner:not([hidden])")
    assert "random weights" in page.inner_text("#demo-banner").lower()
    # The seed's three parameters, with the seed's help texts; the others folded away.
    assert page.input_value("#max_new_tokens") == "64"
    assert page.input_value("#top_k") == "4"
    assert page.input_value("#penalty_alpha") == "0.6"
    assert "roughly 4 characters" in page.inner_text("#max_new_tokens-help")
    assert "zero-ing out the probabilities" in page.inner_text("#top_k-help")
    assert "degeneration penalty in contrastive search" in page.inner_text("#penalty_alpha-help")
    assert not page.is_visible("#num_beams")
    # Record every status the output panel shows.
    page.evaluate(
        """() => { window.statuses = [];
        new MutationObserver(() => window.statuses.push(document.getElementById('status').textContent))
          .observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true}); }"""
    )
    # Keyboard: type the key and the prompt; Tab reaches Submit; Ctrl+Enter in the prompt submits.
    page.focus("#api-key")
    page.keyboard.type(key)
    page.focus("#prompt")
    page.keyboard.type(prompt)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "submit"
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.id") == "prompt"
    page.keyboard.press("Control+Enter")
    page.wait_for_function("document.getElementById('status').textContent === 'Done.'", timeout=60_000)
    assert page.inner_text("#completion") == expected
    assert "generated" in page.inner_text("#usage")
    statuses = page.evaluate("window.statuses")
    assert any(s.startswith("Queued") for s in statuses), statuses
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)

    # An error is shown in the page, in words.
    page.fill("#api-key", "ek_wrong_key")
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    assert "unknown or revoked API key" in page.inner_text("#error")
    page.close()


def test_readable_on_a_phone(served: tuple[ServerProcess, str], browser: object) -> None:
    server, key = served
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)  # type: ignore[attr-defined]
    page.goto(server.url + "/")
    page.wait_for_selector("#demo-banner:not([hidden])")
    # One column: nothing wider than the screen, the side panel below the prompt.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    prompt_box = page.locator("#prompt").bounding_box()
    side_box = page.locator(".side-pane").bounding_box()
    assert prompt_box is not None and side_box is not None
    assert side_box["y"] > prompt_box["y"]
    assert page.locator("#submit").bounding_box()["height"] >= 44  # a finger-sized target
    page.fill("#api-key", key)
    page.fill("#prompt", "Hello")
    page.fill("#max_new_tokens", "8")
    page.click("#submit")
    page.wait_for_function("document.getElementById('status').textContent === 'Done.'", timeout=60_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-phone.png"), full_page=True)
    page.close()


def test_the_completion_grows_token_by_token_before_the_job_is_done(
    served: tuple[ServerProcess, str], browser: object, flan_model_dir: Path
) -> None:
    """The page reads the job's event stream: its output shows text while the status is not
    Done yet, grows in many steps, and ends as the offline engine's text."""
    server, key = served
    prompt = "Tell me a long story:"
    # About a second of work on the test model, so that the page's stream opens while it runs:
    # 300 tokens over 8 candidates took 0.16 s once the kernel and the continuous loop got faster.
    params = {"max_new_tokens": 500, "min_new_tokens": 500, "top_k": 64, "penalty_alpha": 0.6}
    expected = Engine(flan_model_dir).generate([prompt], **params)[0].text
    page = browser.new_page(viewport={"width": 1200, "height": 900})  # type: ignore[attr-defined]
    page.goto(server.url + "/")
    page.wait_for_selector("#demo-banner:not([hidden])")
    page.fill("#api-key", key)
    page.fill("#prompt", prompt)
    page.evaluate(
        """(params) => { for (const [name, value] of Object.entries(params))
             document.getElementById(name).value = String(value); }""",
        params,
    )
    page.evaluate(
        """() => { window.seen = [];
        new MutationObserver(() => window.seen.push([
            document.getElementById('completion').textContent.length,
            document.getElementById('status').textContent]))
          .observe(document.getElementById('completion'), {childList: true, characterData: true, subtree: true}); }"""
    )
    page.click("#submit")
    page.wait_for_function("document.getElementById('status').textContent === 'Done.'", timeout=120_000)
    assert page.inner_text("#completion") == expected
    seen = page.evaluate("window.seen")
    growing = [length for length, status in seen if status != "Done." and length > 0]
    assert len(set(growing)) >= 10, seen  # many partial outputs shown while it ran
    assert growing == sorted(growing)
    assert any(status.startswith("Generating") for _, status in seen), seen
    page.close()
