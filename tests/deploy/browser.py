"""Headless Chromium driven over the Chrome DevTools protocol (a websocket,
no extra package): load a page, wait until its text shows what a reader
should see, read the DOM, take a screenshot. The Dagster UI renders in the
browser from GraphQL, so a static ``--dump-dom`` would race it."""
from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from websockets.sync.client import connect

from tests.deploy.services import background, free_port, wait_for_port

CHROMIUM = os.environ.get("RAVL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


class Page:
    def __init__(self, ws_url: str):
        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.ids = itertools.count(1)

    def call(self, method: str, **params):
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for_text(self, *needles: str, timeout: float = 90.0) -> str:
        """The page's visible text once it contains every needle."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.evaluate("document.body ? document.body.innerText : ''") or ""
            if all(n in text for n in needles):
                return text
            time.sleep(0.5)
        missing = [n for n in needles if n not in text]
        raise AssertionError(f"page never showed {missing}; it shows:\n{text[:3000]}")

    def dismiss(self, label: str = "Skip") -> bool:
        """Click the button labelled ``label`` if one shows (the UI's
        first-visit newsletter dialog covers the page)."""
        return bool(self.evaluate(
            "(() => { const b = Array.from(document.querySelectorAll('button'))"
            f".find(b => b.innerText.trim() === {json.dumps(label)}); if (b) {{ b.click(); return true; }}"
            " return false; })()"))

    def click_in_row(self, row_text: str, label: str) -> bool:
        """Click the innermost element labelled ``label`` in the table row that
        mentions ``row_text`` (a click on a wrapper would not reach the button)."""
        return bool(self.evaluate(
            "(() => { const row = Array.from(document.querySelectorAll('tr'))"
            f".find(r => r.innerText.includes({json.dumps(row_text)})); if (!row) return false;"
            " const el = Array.from(row.querySelectorAll('button, a, span, div'))"
            f".filter(e => e.innerText.trim().replace(/^\\[|\\]$/g, '') === {json.dumps(label)}).pop();"
            " if (el) { el.click(); return true; } return false; })()"))

    def wait_for_images(self, alt: str, timeout: float = 60.0) -> list:
        """``[naturalWidth, naturalHeight]`` of the decoded images with ``alt``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sizes = self.evaluate(
                f"Array.from(document.images).filter(i => i.alt === {json.dumps(alt)} && i.complete"
                " && i.naturalWidth > 0).map(i => [i.naturalWidth, i.naturalHeight])")
            if sizes:
                return sizes
            time.sleep(0.5)
        return []

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path


@contextmanager
def chromium(tmp: Path, window=(1600, 1400)):
    """A headless Chromium with a fresh profile; yields its first page."""
    port = free_port()
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", f"--remote-debugging-port={port}",
           "--remote-allow-origins=*", f"--window-size={window[0]},{window[1]}", "about:blank"]
    with background(cmd, dict(os.environ), tmp / "chromium.log"):
        wait_for_port(port)
        deadline = time.monotonic() + 30
        while True:
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
            pages = [t for t in targets if t.get("type") == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        page = Page(pages[0]["webSocketDebuggerUrl"])
        page.call("Page.enable")
        page.call("Runtime.enable")
        try:
            yield page
        finally:
            page.ws.close()
