"""Load a local page in headless Chromium (Debian's ``chromium``) and say what it did.

Speaks the Chrome DevTools Protocol over ``--remote-debugging-pipe`` (JSON messages ending in a
NUL byte on file descriptors 3 and 4 of the browser), so no websocket library and no port are
needed. ``load_page`` opens one tab, records every request the page makes and every request
that failed, the console and log messages (a Content-Security-Policy refusal is one), uncaught
exceptions, and then reads the DOM: the ``id`` of every ``section`` and its text.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CHROMIUM", "PageLoad", "load_page"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_FLAGS = (
    "--headless",
    "--no-sandbox",  # root in CI
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-crash-reporter",
    "--remote-debugging-pipe",
)
_SECTIONS = """JSON.stringify([...document.querySelectorAll('section[id]')].map(
    s => [s.id, s.innerText]))"""
_IMAGES = """JSON.stringify([...document.images].map(i => [i.complete, i.naturalWidth]))"""


@dataclass
class PageLoad:
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    failed: list[str] = field(default_factory=list)  # "url: error" of each request that failed
    messages: list[str] = field(default_factory=list)  # "level: text" of console and log entries
    exceptions: list[str] = field(default_factory=list)
    sections: dict[str, str] = field(default_factory=dict)  # section id -> its text
    images: list[tuple[bool, int]] = field(default_factory=list)  # (loaded, natural width) each


class _DevTools:
    """One browser process and its protocol pipe."""

    def __init__(self, user_data_dir: str) -> None:
        to_browser_r, self._out = os.pipe()
        self._in, from_browser_w = os.pipe()

        def pipe_fds() -> None:  # in the child: the protocol's fds are 3 (read) and 4 (write)
            read, write = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w))
            os.dup2(read, 3)
            os.dup2(write, 4)

        self.process = subprocess.Popen(
            [CHROMIUM, *_FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=pipe_fds,
            pass_fds=(3, 4),
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next = 0
        self.events: list[dict[str, Any]] = []

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from chromium in time")
            if select.select([self._in], [], [], left)[0]:
                chunk = os.read(self._in, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"chromium closed the protocol pipe (exit status {self.process.poll()})")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(event.get("method") == method for event in self.events):
            self.events.append(self._receive(deadline))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._in)
        os.close(self._out)


def _value(devtools: _DevTools, session: str, expression: str) -> Any:
    result = devtools.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
    return json.loads(result["result"]["value"])


def load_page(path: Path, timeout: float = 60) -> PageLoad:
    """Open ``path`` (a local file) in a fresh headless Chromium and report what happened."""
    if CHROMIUM is None:
        raise FileNotFoundError("no chromium on PATH")
    with tempfile.TemporaryDirectory(prefix="aqexport-chromium-") as profile:
        devtools = _DevTools(profile)
        try:
            target = devtools.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            session = devtools.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Network", "Page", "Runtime", "Log"):
                devtools.call(f"{domain}.enable", session=session)
            devtools.events.clear()  # about:blank's own events
            devtools.call("Page.navigate", {"url": Path(path).resolve().as_uri()}, session)
            devtools.wait_for("Page.loadEventFired", timeout)
            load = PageLoad(
                sections=dict(_value(devtools, session, _SECTIONS)),
                images=[tuple(i) for i in _value(devtools, session, _IMAGES)],
            )
        finally:
            devtools.close()
    urls: dict[str, str] = {}
    for event in devtools.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Network.requestWillBeSent":
            urls[params["requestId"]] = params["request"]["url"]
            load.requests.append(params["request"]["url"])
        elif method == "Network.loadingFailed":
            load.failed.append(f"{urls.get(params['requestId'], '?')[:100]}: {params.get('errorText')}")
        elif method == "Log.entryAdded":
            load.messages.append(f"{params['entry']['level']}: {params['entry']['text']}")
        elif method == "Runtime.consoleAPICalled":
            texts = [str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", [])]
            load.messages.append(f"{params['type']}: {' '.join(texts)}")
        elif method == "Runtime.exceptionThrown":
            load.exceptions.append(str(params["exceptionDetails"].get("text")))
    return load
