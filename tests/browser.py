"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol, for the tests that look at a
page as a person would: load it, wait for text, click, read what is shown, take a screenshot."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from tests.conftest import free_port, wait_for


def chromium() -> str | None:
    """The Chromium executable, or None when it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One headless Chromium tab. ``with Browser() as b: b.goto(url); b.wait_text("val_dice")``."""

    def __init__(self, width: int = 1600, height: int = 900):
        import websocket

        self.profile = tempfile.mkdtemp(prefix="tskd-chromium-")
        port = free_port()
        self.proc = subprocess.Popen(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                f"--remote-debugging-port={port}",
                "--remote-allow-origins=*",
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        pages = self._wait(lambda: [t for t in self._json(port, "list") or [] if t.get("type") == "page"], 60)
        self.ws = websocket.create_connection(
            pages[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True
        )
        self._ids = itertools.count(1)
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.resize(width, height)

    @staticmethod
    def _json(port: int, what: str):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/{what}", timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            return None

    @staticmethod
    def _wait(predicate, timeout: float, what: str = "Chromium", every: float = 0.25):
        return wait_for(what, predicate, timeout, every)

    def send(self, method: str, **params) -> dict:
        """One DevTools command; its result (events that arrive meanwhile are skipped)."""
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        out = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in out:
            raise RuntimeError(f"{expression[:80]}: {out['exceptionDetails'].get('text')}")
        return out["result"].get("value")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self._wait(lambda: self.js("document.readyState") == "complete", 60, f"{url} to load")

    def wait(self, predicate, timeout: float = 90, what: str = "the page"):
        """Wait until ``predicate()`` is true (the page renders in steps: columns, then the rows sorted)."""
        return self._wait(predicate, timeout, what)

    def text(self) -> str:
        """What the page shows, as text."""
        return self.js("document.body ? document.body.innerText : ''") or ""

    def wait_text(self, *texts: str, timeout: float = 90) -> str:
        """Wait until the page shows every one of ``texts``; the page's text."""
        try:
            self._wait(lambda: all(t in self.text() for t in texts), timeout, f"{texts} on the page")
        except AssertionError as exc:
            shown = " | ".join(self.text().split("\n"))
            raise AssertionError(
                f"{exc}; missing {[t for t in texts if t not in shown]}; it shows: {shown[:1500]}"
            ) from None
        return self.text()

    def click(
        self, text: str, selector: str = "a, button, [role=button], [role=tab], [role=menuitem]"
    ) -> None:
        """Click the first element matching ``selector`` whose text is ``text``."""
        found = self.js(
            f"(() => {{ const el = [...document.querySelectorAll({json.dumps(selector)})]"
            f".find(e => e.innerText && e.innerText.trim() === {json.dumps(text)}); if (el) el.click(); return !!el; }})()"
        )
        assert found, f"nothing to click named {text!r}"

    def resize(self, width: int, height: int) -> None:
        """The viewport's size (what a screenshot shows)."""
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def screenshot(self, path: Path) -> Path:
        """A PNG of the viewport."""
        data = self.send("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
