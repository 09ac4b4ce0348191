"""The demo page as served, without a browser: it works under the strict CSP (no inline script,
no inline event handler), every file it loads is there with a JavaScript/CSS type, and the dev
token endpoint it relies on exists only in dev mode."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, http_get

WEB = ROOT / "sfu" / "web"
SCRIPTS = [WEB / "demo.js", WEB / "client" / "blindfold.js"]


_VOID = {"meta", "link", "input", "br", "img", "hr", "source", "track", "wbr", "area", "col"}


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline_script = False
        self.handlers: list[str] = []
        self.inline_styles: list[str] = []
        self.urls: list[str] = []
        self.ids: set[str] = set()
        # The tags enclosing each element with an id (to tell what a collapsed <details> hides).
        self.ancestors: dict[str, list[str]] = {}
        self._open: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        element_id = named.get("id")
        if element_id:
            self.ids.add(element_id)
            self.ancestors[element_id] = list(self._open)
        if tag not in _VOID:
            self._open.append(f"{tag}#{element_id}" if element_id else tag)
        for name, value in attrs:
            if name.startswith("on"):
                self.handlers.append(f"<{tag} {name}>")
            if name == "style":
                self.inline_styles.append(f"<{tag} style>")
            if name in ("src", "href") and value:
                self.urls.append(value)
        if tag == "script":
            self.scripts.append(named)
            self._in_script = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i].split("#")[0] == tag:
                del self._open[i:]
                break

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_script = True


def test_demo_page_is_csp_clean_and_its_files_are_served(server_factory: Any) -> None:
    server = server_factory()
    status, headers, body = http_get(f"{server.base}/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp
    page = _Page()
    page.feed(body.decode())
    assert page.scripts, "the page loads no script"
    assert all(s.get("src") and s.get("type") == "module" for s in page.scripts), page.scripts
    assert not page.inline_script, "inline <script> would be blocked by the CSP"
    assert page.handlers == [], page.handlers
    assert page.inline_styles == [], page.inline_styles
    assert not any(u.startswith("javascript:") for u in page.urls)
    for url in page.urls:
        if not url.startswith("/"):
            continue
        status, headers, _ = http_get(f"{server.base}{url}")
        assert status == 200, url
        expected = "text/css" if url.endswith(".css") else "javascript"
        assert expected in headers["Content-Type"], (url, headers["Content-Type"])
    for path in ("/client/client/blindfold.js", "/client/e2ee/worker.js"):
        status, headers, _ = http_get(f"{server.base}{path}")
        assert status == 200, path
        assert "javascript" in headers["Content-Type"]

    # Every element the script looks up by id exists in the page.
    demo = (WEB / "demo.js").read_text()
    wanted = set(re.findall(r"\$\('([\w-]+)'\)", demo))
    assert wanted, "demo.js looks nothing up?"
    assert wanted <= page.ids, f"missing in index.html: {sorted(wanted - page.ids)}"


def test_call_page_shows_what_matters_without_expanding_anything() -> None:
    """The "you are alone" state with its copy button is in the call view itself, not in the
    collapsed "Participants and keys" section; the active speaker's tile gets a thick outline,
    a glow and a label; the page leaves on pagehide and can rejoin after a reload."""
    page = _Page()
    page.feed((WEB / "index.html").read_text())
    for element in ("alone", "alone-link", "copy-link-alone"):
        enclosing = page.ancestors[element]
        assert "section#call-view" in enclosing, (element, enclosing)
        assert not any(tag.startswith("details") for tag in enclosing), (element, enclosing)
    assert "div#alone" in page.ancestors["copy-link-alone"]

    css = (WEB / "demo.css").read_text()
    speaking = re.search(r"\.tile\.speaking\s*\{([^}]*)\}", css)
    assert speaking, "no .tile.speaking rule"
    width = re.search(r"outline:\s*(\d+)px", speaking[1])
    assert width, speaking[1]
    assert int(width[1]) >= 4, speaking[1]
    assert "box-shadow" in speaking[1]
    label = re.search(r"\.tile\.speaking::after\s*\{([^}]*)\}", css)
    assert label, "no .tile.speaking::after rule"
    assert re.search(r"content:\s*'[^']+'", label[1]), "the speaker has no label"

    demo = (WEB / "demo.js").read_text()
    assert "addEventListener('pagehide'" in demo
    hide = re.search(r"function onPageHide\(\) \{(.*?)\n\}", demo, re.S)
    assert hide, "no onPageHide"
    # leave() sends `leave` before its first await; the handler must not await anything.
    assert ".leave()" in hide[1]
    assert "await" not in hide[1]
    assert "randomRoomName()" in demo
    assert "requestSubmit()" in demo


def test_scripts_avoid_what_the_csp_or_xss_hygiene_forbids() -> None:
    for path in SCRIPTS:
        text = path.read_text()
        for pattern in (r"\beval\(", r"new Function\(", r"\.innerHTML\b", r"\.outerHTML\b"):
            assert not re.search(pattern, text), f"{path.name} uses {pattern}"
        assert "setAttribute('on" not in text


def _post_token(base: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{base}/dev/token",
        data=json.dumps({"room": "demo", "identity": "ada", "name": "Ada"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_dev_token_endpoint_only_in_dev_mode(server_factory: Any, tmp_path: Path) -> None:
    # The page asks for a token here and falls back to the paste field on 404.
    dev = server_factory()
    status, body = _post_token(dev.base)
    assert status == 200
    assert body["token"].count(".") == 2
    prod = server_factory({"dev_mode": False, "auth": {"keys": {"prod": "p" * 40}}})
    status, body = _post_token(prod.base)
    assert status == 404, body
    # The page itself is still served (with a pasted token it works the same).
    assert http_get(f"{prod.base}/")[0] == 200
