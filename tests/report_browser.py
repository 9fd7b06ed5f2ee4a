"""Open an HTML report in Debian's headless Chromium and measure it from inside the page.

No driver and no DevTools client: a copy of the report gets two small scripts, one at the
top of <head> that records every error and console.error, one at the end that measures the
page after load (horizontal overflow of the page, of every card and every table; the smallest
computed font size of any visible text, SVG text included; the per-sample table and its
filters) and writes the result as JSON into the DOM, which `chromium --dump-dom` prints.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         "--disable-extensions", "--mute-audio"]

_HEAD = """<script>window.__avpErrors = [];
window.addEventListener('error', function (e) { window.__avpErrors.push('error: ' + e.message); });
(function () { var ce = console.error; console.error = function () {
  window.__avpErrors.push('console.error: ' + Array.prototype.join.call(arguments, ' ')); ce.apply(console, arguments); }; })();
</script>"""

_PROBE = """<script>
window.addEventListener('load', function () {
  var out = {errors: window.__avpErrors, width: window.innerWidth, overflow: []};
  var doc = document.documentElement;
  if (doc.scrollWidth > window.innerWidth + 1) out.overflow.push('page ' + doc.scrollWidth + ' > ' + window.innerWidth);
  document.querySelectorAll('section.card').forEach(function (c) {
    if (c.scrollWidth > c.clientWidth + 1) out.overflow.push('card #' + c.id + ' ' + c.scrollWidth + ' > ' + c.clientWidth);
    var right = c.getBoundingClientRect().right;
    c.querySelectorAll('table').forEach(function (t) {
      var r = t.getBoundingClientRect().right;
      if (r > right + 1) out.overflow.push('table in #' + c.id + ' ends at ' + Math.round(r) + ' > card ' + Math.round(right));
    });
  });
  var min = 1e9, where = '';
  document.querySelectorAll('body *').forEach(function (el) {
    if (el.tagName === 'SCRIPT' || el.tagName === 'STYLE' || el.tagName === 'TITLE') return;
    var own = false;
    el.childNodes.forEach(function (n) { if (n.nodeType === 3 && n.textContent.trim()) own = true; });
    if (!own || !el.getClientRects().length) return;
    var f = parseFloat(getComputedStyle(el).fontSize);
    var box = el.closest('svg');
    if (box) {  // an SVG drawn smaller than its viewBox shrinks its text too
      var vb = box.viewBox && box.viewBox.baseVal;
      if (vb && vb.width) f *= box.getBoundingClientRect().width / vb.width;
    }
    if (f < min) { min = f; where = el.tagName + '.' + (el.getAttribute('class') || '') + ': ' + el.textContent.trim().slice(0, 30); }
  });
  out.min_font_px = min; out.min_font_where = where;
  var t = document.getElementById('avp-samples');
  if (t) {
    out.sample_rows = t.querySelectorAll('tbody tr.srow').length;
    var kind = document.querySelector('#avp-filter [data-f=kind]');
    kind.value = '1'; kind.dispatchEvent(new Event('input'));
    var kinds = {};
    t.querySelectorAll('tbody tr.srow td:nth-child(2) .kind').forEach(function (k) { kinds[k.textContent] = 1; });
    out.kinds_after_filter = Object.keys(kinds);
    out.count_text = document.getElementById('avp-count').textContent;
    var first = t.querySelector('tbody tr.srow');
    if (first) { first.click(); out.detail_rows = t.querySelectorAll('tbody tr.detail table.conds tr').length; }
    kind.value = ''; kind.dispatchEvent(new Event('input'));
  }
  var pre = document.createElement('pre'); pre.id = 'avp-probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _instrument(html: str, extra_css: str = "") -> str:
    style = f"<style>{extra_css}</style>" if extra_css else ""
    html = html.replace("<head>", "<head>" + _HEAD, 1)
    return html.replace("</body>", style + _PROBE + "</body>", 1)


def _run(browser: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="avp-chromium-") as profile:
        return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout)


def probe(report: Path, width: int, workdir: Path, timeout: float = 120) -> dict:
    """Load the report at `width` px and return what the in-page probe measured."""
    browser = chromium()
    if browser is None:
        raise FileNotFoundError("chromium not found")
    page = Path(workdir).resolve() / f"{report.stem}.probe-{width}.html"
    page.write_text(_instrument(report.read_text(encoding="utf-8")), encoding="utf-8")
    res = _run(browser, [f"--window-size={width},1000", "--virtual-time-budget=10000", "--dump-dom",
                         page.as_uri()], timeout)
    m = re.search(r'<pre id="avp-probe">(.*?)</pre>', res.stdout, re.S)
    if m is None:
        raise RuntimeError(f"the probe wrote nothing (exit {res.returncode}); stderr:\n{res.stderr[-3000:]}")
    text = m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    out = json.loads(text)
    out["stderr_console"] = [ln for ln in res.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    return out


def screenshot(report: Path, out: Path, width: int, height: int, only_css: str = "", timeout: float = 120) -> Path:
    """A PNG of the report at `width` x `height` px; `only_css` hides what the picture does not need."""
    browser = chromium()
    if browser is None:
        raise FileNotFoundError("chromium not found")
    out = Path(out).resolve()
    page = out.with_suffix(".html")
    page.write_text(_instrument(report.read_text(encoding="utf-8"), only_css + " #avp-probe {display: none}"),
                    encoding="utf-8")
    res = _run(browser, [f"--window-size={width},{height}", "--virtual-time-budget=10000",
                         f"--screenshot={out}", page.as_uri()], timeout)
    if not out.is_file():
        raise RuntimeError(f"no screenshot (exit {res.returncode}); stderr:\n{res.stderr[-3000:]}")
    page.unlink()
    return out


# CSS that leaves one part of the report on the page (screenshots of the claims table and of
# the per-sample view, as in docs/).
ONLY_CLAIMS = ("header.top, nav.toc, main > section:not(#{section}) {{display: none !important}} "
               "#{section} > :not(h2):not(.lead):not(h3):not(table.claims) {{display: none !important}} "
               "#{section} > h3 ~ h3 {{display: none !important}} table.claims details {{display: none}}")
ONLY_SAMPLES = "header.top, nav.toc, main > section:not(#samples) {display: none !important}"
