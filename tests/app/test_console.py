"""The browser console (`/`, app/static/console) in a real headless Chromium: Debian's chromium
package driven by Playwright through its executable (the test setup installs it, `.ci/run`;
Playwright never downloads a browser). One service with a real worker, one browser, for the
module: enter the key, upload a model, merge with sliders and follow the job to its end,
download the result, look at a dump's gallery and a sweep's grid; no console errors. And
`/docs` renders its operations with every request off this host refused.

Screenshots go to a temporary directory, and to MERGEPROBE_SCREENSHOTS_DIR when it is set
(`MERGEPROBE_SCREENSHOTS_DIR=docs/console` refreshes the README's)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import install_model, running_service, serving, wait_for

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium")) if p and os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (/usr/bin/chromium): `apt-get install chromium` "
    "(.ci/run does it); Playwright is never let to download a browser",
)
KEY = "console-test-key"
VIEWPORT = {"width": 1280, "height": 800}
# A slow disk simulated on the worker, so that a merge of the tiny models runs long enough to be
# watched (and photographed) while it runs.
TENSOR_DELAY = "0.0015"


class Console:
    def __init__(self, base: str, page, api: httpx.Client, shots: list[Path], errors: list[str]) -> None:
        self.base, self.page, self.api, self.shots, self.errors = base, page, api, shots, errors

    def screenshot(self, name: str) -> None:
        first = self.shots[0] / f"{name}.png"
        self.page.screenshot(path=str(first))
        for extra in self.shots[1:]:
            extra.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(first, extra / first.name)

    def run_job(self, kind: str, body: dict) -> dict:
        response = self.api.post(f"/v1/jobs/{kind}", json=body)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]

        def done():
            job = self.api.get(f"/v1/jobs/{job_id}").json()
            return job if job["status"] in ("succeeded", "failed", "canceled") else None

        job = wait_for(done, timeout=180, interval=0.2)
        assert job["status"] == "succeeded", job
        return job

    def all_loaded(self, selector: str) -> bool:
        """Every <img> under selector has loaded (lazy ones made eager first)."""
        return self.page.evaluate(
            """(selector) => {
                const imgs = [...document.querySelectorAll(selector + ' img')].filter((i) => !i.hidden);
                imgs.forEach((i) => (i.loading = 'eager'));
                return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0);
            }""",
            selector,
        )


@pytest.fixture(scope="module")
def console(redis_url, tmp_path_factory, tiny_models) -> Iterator[Console]:
    playwright = pytest.importorskip("playwright.sync_api")
    from app.main import create_app

    shots = [tmp_path_factory.mktemp("console-screenshots")]
    if os.environ.get("MERGEPROBE_SCREENSHOTS_DIR"):
        shots.append(Path(os.environ["MERGEPROBE_SCREENSHOTS_DIR"]))
    with running_service(redis_url, tmp_path_factory.mktemp("console") / "data") as service:
        install_model(service, tiny_models["sd1"])
        service.start_worker(MERGEPROBE_DEBUG_TENSOR_DELAY=TENSOR_DELAY)
        with (
            serving(create_app(service.settings(api_keys=KEY))) as base,
            httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as api,
            playwright.sync_playwright() as p,
        ):
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
            page = context.new_page()
            page.set_default_timeout(30_000)
            errors: list[str] = []
            page.on("console", lambda m: m.type == "error" and errors.append(f"console: {m.text}"))
            page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
            try:
                yield Console(base, page, api, shots, errors)
            finally:
                context.close()
                browser.close()


def test_key_then_library_and_upload(console, tiny_models):
    page = console.page
    page.goto(console.base + "/")
    # The page and its scripts load without a key; nothing is asked of the API before one is given.
    page.fill("#api-key", KEY)
    page.click("text=Use key")
    page.wait_for_selector('#models tr[data-model="tiny-sd1-a"]')
    assert page.evaluate("localStorage.getItem('mergeprobe.key')") == KEY

    page.set_input_files("#upload-file", str(tiny_models["sd1-b"]))
    assert page.input_value("#upload-name") == "tiny-sd1-b.safetensors"
    page.click("#upload-button")
    page.wait_for_selector("#upload-status:has-text('Added tiny-sd1-b.safetensors')")
    assert page.get_attribute(".upload .progress", "aria-valuenow") == "100"
    row = page.wait_for_selector('#models tr[data-model="tiny-sd1-b"]')
    assert "sd1" in row.inner_text()
    console.screenshot("library")
    assert console.errors == []


def test_merge_with_sliders_progress_and_download(console, tmp_path):
    page = console.page
    page.goto(console.base + "/#/merge")
    page.wait_for_selector("#sliders input[data-block='OUT11']")
    assert page.locator("#sliders input[type=range]").count() == 26  # BASE + 25 blocks
    page.select_option("#model-a", "tiny-sd1-a")
    page.select_option("#model-b", "tiny-sd1-b")

    # Live validation: a spec string's problem is shown at its position.
    page.select_option("#alpha-kind", "spec")
    page.fill("#alpha-spec", "IN00-IN05:0.2, OUT99:1")
    page.wait_for_selector("#merge-problem .problem")
    assert "alpha" in page.inner_text("#merge-problem")
    assert page.inner_text(".mark-box mark") == "O"  # the block that does not exist
    assert page.is_disabled("#merge-submit")
    # The refused dry runs are the only failed loads so far.
    console.errors[:] = [e for e in console.errors if "status of 400" not in e]
    assert console.errors == []

    page.select_option("#alpha-kind", "sliders")
    page.select_option("#preset", "GRAD_V")
    page.evaluate(
        """() => {
            const r = document.querySelector("#sliders input[data-block='OUT05']");
            r.value = '0.9';
            r.dispatchEvent(new Event('input', {bubbles: true}));
        }"""
    )
    page.fill("#output-name", "console-merge.safetensors")
    page.wait_for_selector("#plan:has-text('console-merge.safetensors')")
    page.fill("#plan-filter", "OUT05 merge")
    page.wait_for_selector("#plan tbody tr")
    assert all("output_blocks.5." in k for k in page.locator("#plan tbody td.mono").all_inner_texts())
    page.fill("#plan-filter", "")
    console.screenshot("merge-form")

    page.click("#merge-submit")
    page.wait_for_url("**/#/jobs/*")
    job_id = page.url.rsplit("/", 1)[1]
    page.wait_for_selector("#job-status")
    page.wait_for_function(
        """() => document.getElementById('job-status').textContent === 'succeeded'
            || Number(document.querySelector('#job-progress .progress').getAttribute('aria-valuenow')) >= 30"""
    )
    console.screenshot("job-running")
    page.wait_for_selector("#job-status:text('succeeded')", timeout=120_000)
    assert page.get_attribute("#job-progress .progress", "aria-valuenow") == "100"
    job = console.api.get(f"/v1/jobs/{job_id}").json()
    assert job["request"]["alpha"][18] == 0.9 and job["request"]["model_b"] == "tiny-sd1-b"  # OUT05

    with page.expect_download() as info:
        page.click("#result-download")  # a plain link: the download cookie authorises it
    target = tmp_path / "downloaded.safetensors"
    info.value.save_as(target)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == job["result"]["model"]["sha256"]

    # The result is in the library, with its lineage.
    page.goto(console.base + "/#/library")
    lineage = page.wait_for_selector('#models tr[data-model="console-merge"] td.lineage')
    assert "tiny-sd1-a.safetensors" in lineage.inner_text() and "tiny-sd1-b" in lineage.inner_text()
    console.screenshot("library")
    assert console.errors == []


def test_dump_gallery(console):
    job = console.run_job(
        "dump",
        {
            "model": "tiny-sd1-a",
            "prompt": "a cute (~: IN00-IN04: red; M00: blue :~) girl",
            "steps": 2,
            "width": 64,
            "height": 64,
            "features": {"layers": "IN04, M00, OUT05", "steps": "1,2"},
            "attention": {"layers": "M00, OUT05", "steps": "2"},
            "layer_prompt_diff": True,
        },
    )
    page = console.page
    page.goto(f"{console.base}/#/jobs/{job['id']}")
    page.wait_for_selector("#dump-gallery canvas.thumb")
    # The colour scale draws each feature map into a canvas once its image has loaded.
    page.wait_for_function(
        "[...document.querySelectorAll('#dump-gallery canvas.thumb')].every((c) => c.width > 0)"
    )
    assert page.locator("#gallery tbody tr").count() == 3 and page.locator("#gallery thead th").count() == 3
    assert page.locator("#tokens .token").count() >= 4
    wait_for(lambda: console.all_loaded("#attention"), timeout=20)
    assert page.locator("#layer-prompts tr.differs").count() > 0
    page.locator("#dump-gallery").scroll_into_view_if_needed()
    page.evaluate("document.getElementById('dump-gallery').scrollIntoView()")
    console.screenshot("dump-gallery")
    page.select_option("#gallery-scale", "saved")
    wait_for(lambda: console.all_loaded("#dump-gallery"), timeout=20)
    page.click("#gallery img.thumb >> nth=0")
    page.wait_for_function("document.getElementById('zoom-img').naturalWidth > 0")
    page.click("[data-zoom=in]")
    page.click("[data-zoom=close]")
    assert console.errors == []


def test_sweep_grid(console):
    job = console.run_job(
        "sweep",
        {
            "model_a": "tiny-sd1-a",
            "variants": {"blocks": "IN00-OUT11", "alpha": 0, "beta": 0.75},
            "seeds": [1],
            "prompt": "a cat",
            "steps": 2,
            "width": 64,
            "height": 64,
        },
    )
    page = console.page
    page.goto(f"{console.base}/#/jobs/{job['id']}")
    page.wait_for_selector("#sweep-grid img")
    wait_for(lambda: console.all_loaded("#sweep-grid"), timeout=20)
    assert page.locator("#ranking rect.bar").count() == 25
    seen = set()
    wait_for(lambda: seen.add(page.inner_text("#flicker-which")) or len(seen) == 2, timeout=5)
    wait_for(lambda: console.all_loaded("#flicker"), timeout=20)
    console.screenshot("sweep-grid")
    assert console.errors == []


def test_the_key_never_goes_into_a_cookie(console):
    """Cookies are not isolated by port: any other app on this host could read a script-readable
    one. The console's only cookie is the service's HttpOnly download token, under /v1/."""
    page = console.page
    page.goto(console.base + "/#/library")
    page.wait_for_selector('#models tr[data-model="tiny-sd1-a"]')
    assert KEY not in page.evaluate("document.cookie")
    cookies = page.context.cookies()
    assert all(KEY not in c["value"] for c in cookies), cookies
    (download,) = [c for c in cookies if c["name"] == "mergeprobe_download"]
    assert download["httpOnly"] and download["path"] == "/v1/" and download["sameSite"] == "Strict"
    assert not any(c["name"] == "mergeprobe_key" for c in cookies)
    # The console's page asks for no inline style (the CSP has no 'unsafe-inline' for styles).
    csp = httpx.get(console.base + "/").headers["content-security-policy"]
    assert "'unsafe-inline'" not in csp
    assert console.errors == []


def test_the_download_cookie_only_reads_downloads(console):
    """The console's cookie authorises GET/HEAD of files and artifacts only, never a change."""
    session = console.api.post("/v1/console/session")
    assert session.status_code == 204 and KEY not in session.headers["set-cookie"]
    token = session.cookies["mergeprobe_download"]
    with httpx.Client(base_url=console.base, timeout=30) as browser_like:
        browser_like.cookies.set("mergeprobe_download", token)  # no path: httpx sends it everywhere
        assert browser_like.get("/").status_code == 200  # the page itself needs no key
        assert browser_like.head("/v1/models/tiny-sd1-a/file").status_code == 200
        assert browser_like.get("/v1/models").status_code == 401
        assert browser_like.get("/openapi.json").status_code == 401
        assert browser_like.delete("/v1/models/tiny-sd1-b").status_code == 401
        assert browser_like.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}).status_code == 401
    for wrong in ("wrong", KEY, f"{token.split('.')[0]}.{'0' * 64}"):
        with httpx.Client(base_url=console.base, cookies={"mergeprobe_download": wrong}, timeout=30) as c:
            assert c.head("/v1/models/tiny-sd1-a/file").status_code == 401, wrong
    with httpx.Client(base_url=console.base, cookies={"mergeprobe_key": KEY}, timeout=30) as old:
        assert old.head("/v1/models/tiny-sd1-a/file").status_code == 401


def test_follow_reopens_a_stream_cut_off_before_its_end(console):
    """A stream that closes without its `end` event (a proxy's timeout, a restart) is not the job's
    end: the console asks for the job and follows it again; a 401 brings back the key form."""
    page = console.page
    page.goto(console.base + "/#/library")
    page.wait_for_selector('#models tr[data-model="tiny-sd1-a"]')
    job = {"id": "cutoff", "kind": "merge", "status": "running", "progress": 0.5}
    opened: list[str] = []

    def events(route) -> None:
        opened.append(route.request.url)
        body = f"event: job\ndata: {json.dumps(job)}\n\n"  # and then the stream just closes
        route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=body)

    polls = iter([job, {**job, "status": "succeeded", "progress": 1.0}])
    page.route("**/v1/jobs/cutoff/events", events)
    page.route("**/v1/jobs/cutoff", lambda route: route.fulfill(json=next(polls)))
    page.route("**/v1/jobs/refused/events", lambda route: route.fulfill(status=401, json={"status": 401}))
    try:
        seen = page.evaluate(
            """async () => {
                const { follow } = await import('./static/console/jobs.js');
                const seen = [];
                await follow('cutoff', (j) => seen.push(j.status), undefined, { pause: 10 });
                return seen;
            }"""
        )
        assert seen == ["running", "running", "running", "succeeded"] and len(opened) == 2
        refused = page.evaluate(
            """async () => {
                const { follow } = await import('./static/console/jobs.js');
                let unauthorized = false;
                addEventListener('mergeprobe:unauthorized', () => (unauthorized = true), { once: true });
                const error = await follow('refused', () => {}, undefined, { pause: 10 }).catch((e) => e);
                return [String(error?.problem?.status), unauthorized];
            }"""
        )
        assert refused == ["401", True]
        page.wait_for_selector("#api-key")  # the key form is back
    finally:
        page.unroute("**/v1/jobs/cutoff/events")
        page.unroute("**/v1/jobs/cutoff")
        page.unroute("**/v1/jobs/refused/events")
    page.fill("#api-key", KEY)
    page.click("text=Use key")
    page.wait_for_selector('#models tr[data-model="tiny-sd1-a"]')
    console.errors[:] = [e for e in console.errors if "status of 401" not in e]
    assert console.errors == []


@pytest.mark.parametrize(
    "path,ready", [("/docs", "#operations-jobs-submitMergeJob"), ("/redoc", "[data-section-id]")]
)
def test_docs_render_offline(console, path, ready):
    """/docs (Swagger UI) and /redoc (ReDoc) from the package load like a real browser's after a
    key was entered in the console (no header added by the test: the pages send the console's
    key themselves), with every request that would leave this host refused."""
    page = console.page.context.new_page()  # the console's origin: its localStorage has the key
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    blocked: list[str] = []

    def only_here(route) -> None:
        if urlsplit(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", only_here)
    try:
        page.goto(console.base + path)
        assert page.evaluate("localStorage.getItem('mergeprobe.key')") == KEY
        page.wait_for_selector(ready, timeout=30_000)
        if path == "/docs":
            assert page.locator(".opblock").count() > 20
        assert blocked == [] and errors == []
    finally:
        page.close()


def test_forget_key_drops_the_download_cookie(console):
    page = console.page
    page.goto(console.base + "/#/library")
    page.wait_for_selector('#models tr[data-model="tiny-sd1-a"]')
    assert any(c["name"] == "mergeprobe_download" for c in page.context.cookies())
    page.click("#key-forget")
    page.wait_for_selector("#api-key")
    assert not any(c["name"] == "mergeprobe_download" for c in page.context.cookies())
    assert page.evaluate("localStorage.getItem('mergeprobe.key')") is None
    page.fill("#api-key", KEY)
    page.click("text=Use key")
    page.wait_for_selector('#models tr[data-model="tiny-sd1-a"]')
    assert any(c["name"] == "mergeprobe_download" for c in page.context.cookies())
    assert console.errors == []
