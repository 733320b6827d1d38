"""The chat page in a real browser: headless Chromium (Debian's `chromium`, through Playwright's
`executable_path`; Playwright's own browser download needs the internet) against `minigpt serve`
started as a user would. Run by `make test-e2e`, not `make test`.

MINIGPT_E2E_MODEL=DIR serves that model instead of a tiny random one (for a readable
screenshot); MINIGPT_E2E_SCREENSHOT=PATH.png keeps the screenshot there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from minigpt.checkpoints import save_model
from minigpt.model import GPT
from tests.conftest import SRC, free_port, tiny_config, wait_until_healthy

playwright = pytest.importorskip("playwright.sync_api")


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no chromium on PATH: `make test-e2e` installs it (apt-get install chromium)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = os.environ.get("MINIGPT_E2E_MODEL")
    name = []
    if not model:
        torch.manual_seed(0)
        model = tmp_path_factory.mktemp("model")
        save_model(model, GPT(tiny_config(block_size=256)), step=0)
        name = ["--served-model-name", "tiny (random weights)"]
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "minigpt", "serve", "--model", str(model), "--port", str(port)]
        + name,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        first_line = proc.stdout.readline()
        assert f"{url}/" in first_line, first_line  # it prints the chat page's address
        wait_until_healthy(proc, url)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_chat_page_streams_a_reply_and_starts_a_new_chat(server, tmp_path):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 900, "height": 640})
        page.goto(server + "/")
        page.click("summary")
        page.fill("#system", "You are a friendly assistant.")
        page.fill("#max-tokens", "60")
        page.click("summary")  # settings closed again: the conversation fills the screenshot
        page.fill("#input", "Hello! What do you like to do?")
        # count how often the reply's text changes: a streamed reply grows in several steps
        page.evaluate(
            """() => { window.updates = 0;
              new MutationObserver((records) => { for (const r of records)
                  if (r.target.classList && r.target.classList.contains('assistant'))
                    window.updates++; })
                .observe(document.getElementById('log'), {subtree: true, childList: true}); }"""
        )
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.user")
        page.wait_for_selector("#send:not([hidden])", timeout=60_000)  # the reply has ended
        reply = page.locator(".msg.assistant").last.inner_text()
        assert reply.strip() and not page.locator(".msg.error").count()
        assert page.evaluate("window.updates") >= 2  # the text arrived in pieces
        assert page.locator("#regenerate").is_enabled()
        screenshot = os.environ.get("MINIGPT_E2E_SCREENSHOT") or str(tmp_path / "chat.png")
        page.screenshot(path=screenshot)
        # a phone-sized window keeps the input and send button on screen
        page.set_viewport_size({"width": 390, "height": 740})
        assert page.locator("#send").is_visible() and page.locator("#input").is_visible()
        page.click("#new-chat")
        assert page.locator(".msg").count() == 0 and page.locator("#empty").is_visible()
        browser.close()
