"""The HTML review report: self-contained, states its sampling, works in a real Chromium."""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.inspection.query import DecisionFilter, DecisionQuery
from pipeline.inspection.report import ReportOptions, write_report
from pipeline.inspection.report_gallery import (
    OUTLINE_INNER,
    OUTLINE_OUTER,
    outlined_thumbnail,
)
from tests.conftest import HOSTILE_PLAN, PLAN, REPO_ROOT, make_rows, write_run

ARTIFACTS = REPO_ROOT / "artifacts"
CHROMIUM = os.environ.get("BSGAL_CHROMIUM", "/usr/bin/chromium")
PER_CLASS = 2  # thumbnails per class and decision in these tests


def _expected_cards(rows: list[dict], per_class: int) -> dict[tuple[str, str], int]:
    """Thumbnails per (class, decision) when at most ``per_class`` are shown."""
    counts: dict[tuple[str, str], int] = {}
    for r in rows:
        decision = "accepted" if r["accepted"] else r["reason"].split("_")[0]
        key = (r["class_name"], decision)
        counts[key] = counts.get(key, 0) + 1
    return {k: min(per_class, n) for k, n in counts.items()}


# ---------------------------------------------------------------------- without a browser


def test_outline_is_drawn_on_the_mask_edge_only() -> None:
    image = np.full((20, 30, 3), 90, dtype=np.uint8)
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:15, 8:20] = True
    thumb = outlined_thumbnail(image, mask, size=30)  # same size: pixels map 1:1
    assert thumb.shape == (20, 30, 3)
    assert (thumb[5, 8:20] == OUTLINE_INNER).all() and (thumb[14, 8:20] == OUTLINE_INNER).all()
    assert (thumb[4, 8:20] == OUTLINE_OUTER).all() and (thumb[5:15, 7] == OUTLINE_OUTER).all()
    assert (thumb[6:14, 9:19] == 90).all()  # inside untouched
    assert (thumb[0:3] == 90).all()  # far outside untouched
    small = outlined_thumbnail(np.zeros((200, 100, 3), np.uint8), None, size=50)
    assert small.shape == (50, 25, 3)


def test_report_is_self_contained_and_states_its_sampling(run_dir, tmp_path: Path) -> None:
    out, rows = run_dir
    path = tmp_path / "report.html"
    with DecisionQuery(str(out)) as q:
        stats = write_report(q, str(path), ReportOptions(thumbs_per_class=PER_CLASS))
    page = path.read_text()
    assert stats.bytes == len(page.encode())
    expected = _expected_cards(rows, PER_CLASS)
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == stats.thumbnails == sum(expected.values())
    assert all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    for s in srcs[:3]:  # real images
        Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).verify()
    # Nothing is fetched: no external src/href, no stylesheet or script from elsewhere, and a
    # Content-Security-Policy that forbids it anyway.
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "default-src 'none'" in page
    assert "accepted: showing 2 of 6 (random sample)" in page  # cat: 6 accepted
    assert "rejected: showing 2 of 4 (random sample)" in page  # yak: 4 rejected
    assert "rejected: showing 2 of 2</div>" in page  # cat: all shown, no sample note
    assert "up to 2 per class and decision" in page
    meta = json.loads(re.search(r'id="report-meta">(.*?)</script>', page).group(1))
    assert meta["selected_rows"] == 22 and meta["cards"] == sum(expected.values())
    assert 'id="threshold-line"' in page and 'id="truth-table"' in page


def _bars(svg: str, decision: str) -> list[tuple[int, float, float]]:
    return [(int(n), float(a), float(b)) for n, a, b in re.findall(
        rf'<title>{decision}: (\d+) with [^<]* in \[([-\d.e]+), ([-\d.e]+)\)</title>', svg)]


def test_histograms_count_every_scored_candidate(run_dir, tmp_path: Path) -> None:
    out, rows = run_dir
    path = tmp_path / "report.html"
    with DecisionQuery(str(out)) as q:
        write_report(q, str(path))
    page = path.read_text()
    scores = re.search(r'<svg id="score-histogram".*?</svg>', page).group(0)
    assert sum(n for n, _, _ in _bars(scores, "accepted")) == 10
    assert sum(n for n, _, _ in _bars(scores, "rejected")) == 9
    # The threshold rises with the step in these rows, so the page also shows score minus the
    # threshold in force: accepted candidates all lie right of 0, rejected ones left of it.
    margin = re.search(r'<svg id="margin-histogram".*?</svg>', page).group(0)
    assert sum(n for n, _, _ in _bars(margin, "accepted")) == 10
    assert all(hi > 0 for _, _, hi in _bars(margin, "accepted"))
    assert all(lo < 0 for _, lo, _ in _bars(margin, "rejected"))


def test_sample_is_reproducible_and_seeded(run_dir, tmp_path: Path) -> None:
    out, _ = run_dir

    def picked(seed: int) -> list[str]:
        with DecisionQuery(str(out)) as q:
            write_report(q, str(tmp_path / f"r{seed}.html"),
                         ReportOptions(thumbs_per_class=1, seed=seed))
        return re.findall(r'data-sample="([^"]+)"', (tmp_path / f"r{seed}.html").read_text())

    assert picked(0) == picked(0)
    assert any(picked(s) != picked(0) for s in (1, 2, 3))


def test_many_classes_get_galleries_up_to_max_classes(tmp_path: Path) -> None:
    plan = [(i, f"class{i:02d}", "r", [("accepted", "none"), ("rejected_score", "none")] * (
        1 + (i % 3))) for i in range(1, 9)]
    write_run(str(tmp_path / "run"), make_rows(plan, size=(16, 16)), max_rows=64)
    with DecisionQuery(str(tmp_path / "run")) as q:
        stats = write_report(q, str(tmp_path / "r.html"),
                             ReportOptions(thumbs_per_class=1, max_classes=3))
    page = (tmp_path / "r.html").read_text()
    assert stats.gallery_classes == 3 and stats.classes == 8
    assert page.count('<section class="gallery"') == 3
    assert "the 3 classes with the most candidates, of 8" in page
    assert stats.thumbnails == 3 * 2


def test_report_command_applies_filters(run_dir, tmp_path: Path) -> None:
    out, rows = run_dir
    path = tmp_path / "sub" / "cats.html"
    result = CliRunner().invoke(main, ["inspect", str(out), "--html", str(path), "--class",
                                       "cat", "--thumbs-per-class", "3"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {path} (")
    page = path.read_text()
    assert page.count('<section class="gallery"') == 1
    assert "filters: class=cat" in page
    n_cat = sum(r["class_name"] == "cat" for r in rows)
    assert f"{n_cat} selected" in page


def test_report_without_truth_or_scores(tmp_path: Path) -> None:
    plan = [(1, "cat", "f", [("invalid_empty_mask", "")] * 3)]
    write_run(str(tmp_path / "run"), make_rows(plan, truth=False))
    with DecisionQuery(str(tmp_path / "run"), DecisionFilter()) as q:
        write_report(q, str(tmp_path / "r.html"))
    page = (tmp_path / "r.html").read_text()
    assert "No scored candidates in this selection." in page
    assert "Precision/recall skipped" in page


class _Elements(HTMLParser):
    """Every element of a page with its attributes, the text outside scripts, and the body of
    each script element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.scripts: list[tuple[dict, str]] = []
        self._script: dict | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._script = dict(attrs)
            self.scripts.append((self._script, ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._script = None

    def handle_data(self, data: str) -> None:
        if self._script is not None:
            attrs, body = self.scripts[-1]
            self.scripts[-1] = (attrs, body + data)
        else:
            self.text.append(data)


def test_untrusted_names_are_text_not_markup(tmp_path: Path) -> None:
    rows = make_rows(HOSTILE_PLAN)
    write_run(str(tmp_path / "run"), rows)
    names = tuple(name for _, name, _, _ in HOSTILE_PLAN)
    path = tmp_path / "r.html"
    with DecisionQuery(str(tmp_path / "run"), DecisionFilter(classes=names)) as q:
        write_report(q, str(path), ReportOptions(thumbs_per_class=PER_CLASS))
    page = path.read_text()
    doc = _Elements()
    doc.feed(page)
    # Only the report's own elements and attributes: no handler, no injected image or script.
    assert not [(t, a) for t, a in doc.tags if any(k.startswith("on") for k in a)]
    images = [a for t, a in doc.tags if t == "img"]
    assert len(images) == len(rows) and all(a["src"].startswith("data:image/jpeg") for a in images)
    assert [a.get("id") for a, _ in doc.scripts] == ["report-meta", None]
    # The metadata JSON survives the "</script>" in a class name and holds the names intact.
    meta = json.loads(doc.scripts[0][1])
    assert meta["filters"]["class"] == list(names)
    # Names, groups and prompts are shown as the text they are, in text and in attributes.
    text = "".join(doc.text)
    for name in names:
        assert name in text
    assert 'r"><img src=y onerror=alert(2)>' in text
    sections = [a for t, a in doc.tags if t == "section"]
    assert sorted(a["data-class"] for a in sections) == sorted(names)
    titles = [a["title"] for t, a in doc.tags if t == "figure"]
    assert any(f"prompt: a photo of a single {names[1]}" in t for t in titles)


# ---------------------------------------------------------------------------- in Chromium


def _fd_at_least_10(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class HeadlessChromium:
    """Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: the
    browser reads commands on fd 3 and answers on fd 4, NUL-separated JSON), so no port is
    opened and no websocket client is needed."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", "--disable-default-apps", "--mute-audio",
             "--remote-debugging-pipe"]

    def __init__(self, executable: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="bsgal-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The child's ends move to fds >= 10 so that they cannot be fd 3 or 4 themselves.
        to_browser_r, from_browser_w = (_fd_at_least_10(to_browser_r),
                                        _fd_at_least_10(from_browser_w))
        # bash puts the pipe ends on fd 3 and 4 and execs Chromium (no preexec_fn: this test
        # process has threads, and forking with them is only safe up to exec).
        wiring = f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- ' \
                 f'{from_browser_w}>&-'
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", wiring, "bash", executable, *self.FLAGS,
             f"--user-data-dir={self.profile}", "about:blank"],
            pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        self.session = ""

    def send(self, method: str, params: dict | None = None, timeout: float = 30,
             session: bool = True) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read(deadline))

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise TimeoutError("no answer from Chromium")
            if select.select([self._from_browser], [], [], min(left, 1.0))[0]:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise EOFError("Chromium closed the DevTools pipe")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def open(self, url: str, width: int = 1280, height: int = 900) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)
        self.session = self.send("Target.attachToTarget", {"targetId": target["targetId"],
                                                           "flatten": True},
                                 session=False)["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                         "deviceScaleFactor": 1,
                                                         "mobile": False})
        self.send("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression,
                                                "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False, timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        shutil.rmtree(self.profile, ignore_errors=True)


def _chromium() -> str:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"Chromium not found at {CHROMIUM}: the report test needs a real browser. "
                    "Install Debian's package (apt-get install -y --no-install-recommends "
                    "chromium; `make chromium` and .ci/run do this) or set BSGAL_CHROMIUM.")
    return CHROMIUM


VISIBLE_CARDS = """(() => {
  const out = {};
  document.querySelectorAll('section.gallery').forEach(s => {
    s.querySelectorAll('.card').forEach(c => {
      if (c.getClientRects().length === 0) return;
      const key = s.dataset.class + '/' + c.dataset.decision;
      out[key] = (out[key] || 0) + 1;
    });
  });
  return out;
})()"""


def _select(browser: HeadlessChromium, element_id: str, value: str) -> None:
    browser.js(f"(() => {{ const s = document.getElementById('{element_id}'); "
               f"s.value = '{value}'; s.dispatchEvent(new Event('change')); }})()")


@pytest.mark.browser
def test_report_in_headless_chromium(run_dir, tmp_path: Path) -> None:
    executable = _chromium()
    out, rows = run_dir
    path = tmp_path / "report.html"
    with DecisionQuery(str(out)) as q:
        write_report(q, str(path), ReportOptions(thumbs_per_class=PER_CLASS))
    expected = _expected_cards(rows, PER_CLASS)
    browser = HeadlessChromium(executable)
    try:
        browser.open(path.as_uri())
        # Every thumbnail decoded, at the size the page says.
        images = browser.js("Array.from(document.images).map(i => [i.complete, i.naturalWidth,"
                            " i.naturalHeight, i.width])")
        assert len(images) == sum(expected.values())
        assert all(done and w > 0 and h > 0 and w == shown for done, w, h, shown in images)
        # All classes and decisions visible at first.
        visible = browser.js(VISIBLE_CARDS)
        assert visible == {f"{c}/{d}": n for (c, d), n in expected.items()}
        # The class filter hides the other classes' cards.
        yak_id = next(cid for cid, name, *_ in PLAN if name == "yak")
        _select(browser, "filter-class", str(yak_id))
        visible = browser.js(VISIBLE_CARDS)
        assert visible == {f"yak/{d}": n for (c, d), n in expected.items() if c == "yak"}
        assert browser.js("document.getElementById('filter-info').textContent") == (
            f"{sum(visible.values())} thumbnails match")
        # And the decision filter the other decisions'.
        _select(browser, "filter-class", "")
        _select(browser, "filter-decision", "rejected")
        visible = browser.js(VISIBLE_CARDS)
        assert visible == {f"{c}/rejected": n for (c, d), n in expected.items()
                           if d == "rejected"}
        _select(browser, "filter-decision", "")
        # Score and reason on hover: the card's tooltip, and its caption shows under the mouse.
        card = browser.js("(() => { const c = document.querySelector('.card[data-decision="
                          "\"rejected\"]'); c.scrollIntoView(); const r = c.getBoundingClientRe"
                          "ct(); return {title: c.title, x: r.x + r.width / 2, y: r.y + r.heigh"
                          "t / 2, caption: getComputedStyle(c.querySelector('figcaption'))."
                          "display}; })()")
        assert "score " in card["title"] and "reason rejected_score" in card["title"]
        assert card["caption"] == "none"
        browser.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": card["x"],
                                                  "y": card["y"]})
        shown = browser.js("getComputedStyle(document.querySelector('.card[data-decision="
                           "\"rejected\"] figcaption')).display")
        assert shown == "block"
        # No request left the file: only the page itself and inline data.
        urls = [e["params"]["request"]["url"] for e in browser.events
                if e.get("method") == "Network.requestWillBeSent"]
        assert urls and all(u.startswith(("file:", "data:")) for u in urls), urls
        errors = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]
        assert errors == []
        # Where the time went: one drawn bar per stage, the longest for the costliest stage
        # per accepted instance (the fixture's rows: train 0.3 s, generate 0.5 s).
        bars = browser.js("Array.from(document.querySelectorAll('#cost-chart rect.cost-bar'))"
                          ".map(r => [r.dataset.stage, r.getBoundingClientRect().width])")
        assert [s for s, _ in bars] == ["generate", "annotate", "check", "score", "train"]
        widths = dict(bars)
        assert widths["generate"] == max(widths.values()) and widths["check"] > 0
        assert widths["train"] > widths["annotate"] > widths["check"]
        # A full-page screenshot kept as an artifact.
        browser.js("window.scrollTo(0, 0)")
        height = browser.js("document.documentElement.scrollHeight")
        browser.send("Emulation.setDeviceMetricsOverride", {"width": 1280,
                                                            "height": min(int(height), 6000),
                                                            "deviceScaleFactor": 1,
                                                            "mobile": False})
        shot = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"})["data"])
    finally:
        browser.close()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "report_screenshot.png").write_bytes(shot)
    image = Image.open(io.BytesIO(shot))
    image.load()
    assert image.format == "PNG" and image.size == (1280, min(int(height), 6000))
    pixels = np.asarray(image.convert("RGB"))
    assert len(shot) > 20_000 and pixels.std() > 20  # a real page, not a blank one
    # The thumbnails are on screen: the yellow of the mask outlines is there.
    yellow = (pixels[..., 0] > 200) & (pixels[..., 1] > 170) & (pixels[..., 2] < 90)
    assert yellow.sum() > 100
