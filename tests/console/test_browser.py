"""The console end to end in a real headless Chromium (Debian's `chromium`, driven by Playwright;
the system browser is launched, none is downloaded) against a real `modelyard serve` with the
real smollm2-135m: sign in; create a key, use it with the official `openai` client, see its usage
after a flush, revoke it and see the API refuse it; stream a completion in the playground; the
CSP and cookie flags as the browser applies them; a remote endpoint going from loading to ready
without a reload. Screenshots of every page are saved under the test's tmp directory (printed),
never committed."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from testkit.servers import MODEL, served

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.model

ADMIN, VIEWER = "e2e-admin-token", "e2e-viewer-token"
ENGINE = "context = 256\nparallel = 2\nthreads = 1\n"
WAIT_MS = 30_000


def chromium() -> str:
    path = os.environ.get("MODELYARD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Debian's chromium is needed (scripts/install --dev installs it: apt-get install chromium)"
    return path


def config(d: Path) -> str:
    return (f'[server]\nlog_level = "info"\ndatabase_url = "sqlite:///{d / "control.db"}"\n\n'
            f'[[admin_tokens]]\nname = "ops"\ntoken = "{ADMIN}"\n\n'
            f'[[admin_tokens]]\nname = "audit"\nrole = "viewer"\ntoken = "{VIEWER}"\n\n'
            f'[[endpoints]]\nname = "{MODEL}"\nmodel = "{MODEL}"\n{ENGINE}')


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    d = tmp_path_factory.mktemp("console-e2e")
    with served(d, config(d)) as s:
        yield s


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("console-screenshots")
    print(f"\nconsole screenshots: {d}")
    return d


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def new_page(browser, width: int = 1280, height: int = 800) -> tuple[Page, list[str]]:
    """A fresh context (own cookies) and page; console messages collected (CSP violations land there)."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    messages: list[str] = []
    page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
    page.on("dialog", lambda d: d.accept())
    return page, messages


def sign_in(page: Page, base: str, token: str) -> None:
    page.goto(base + "/console/")
    expect(page).to_have_url(re.compile(r"/console/login$"))
    page.fill("#token", token)
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/console/endpoints$"))


def no_csp_violations(messages: list[str]) -> None:
    bad = [m for m in messages if "Content Security Policy" in m or m.startswith("pageerror")]
    assert not bad, bad


def test_sign_in_every_page_and_screenshots(srv, browser, shots):
    page, messages = new_page(browser)
    page.goto(srv.base + "/console/keys")
    expect(page).to_have_url(re.compile(r"/console/login$"))             # signed out: the login page
    page.fill("#token", "not-a-token")
    page.click("button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("not an admin token")
    sign_in(page, srv.base, ADMIN)
    row = page.locator(f'tr[data-endpoint="{MODEL}"]')
    expect(row.locator("[data-state]")).to_have_text("ready")
    assert page.evaluate("typeof window.htmx") == "object"                 # the vendored script ran
    for slug in ("endpoints", "live", "playground", "keys", "usage", "models"):
        page.goto(f"{srv.base}/console/{slug}")
        expect(page.locator("h1")).to_be_visible()
        expect(page.locator(f'nav a[aria-current="page"][href="/console/{slug}"]')).to_be_visible()
        page.screenshot(path=str(shots / f"{slug}.png"), full_page=True)
    narrow, narrow_messages = new_page(browser, 390, 844)
    sign_in(narrow, srv.base, ADMIN)
    expect(narrow.locator("table.endpoints")).to_be_visible()     # rendered (a loaded machine is slow)
    # nothing wider than the screen: the endpoints table is one card per endpoint there, each
    # value under its column's name, so it does not need to scroll sideways either
    assert narrow.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    assert narrow.evaluate("document.querySelector('table.endpoints').scrollWidth <= window.innerWidth")
    assert narrow.evaluate("getComputedStyle(document.querySelector('table.endpoints td[data-label]'), "
                           "'::before').content.includes('Kind')")
    narrow.screenshot(path=str(shots / "endpoints-narrow.png"), full_page=True)
    # keyboard: Tab reaches the navigation
    narrow.keyboard.press("Tab")
    narrow.keyboard.press("Tab")
    assert narrow.evaluate("document.activeElement.closest('nav, header') !== null")
    no_csp_violations(messages + narrow_messages)
    narrow.context.close()
    page.context.close()


def test_cookie_flags_and_csp_in_the_browser(srv, browser):
    page, messages = new_page(browser)
    sign_in(page, srv.base, ADMIN)
    cookie = next(c for c in page.context.cookies() if c["name"] == "modelyard_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
    assert not cookie["secure"]                                   # plain http on loopback only
    assert "modelyard_console" not in page.evaluate("document.cookie")     # HttpOnly: no script sees it
    response = page.goto(srv.base + "/console/keys")
    headers = response.headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    # the browser enforces it: an injected inline script does not run
    try:
        page.add_script_tag(content="window.__inline_ran = true;")
    except Exception:       # noqa: BLE001 - Playwright may report the blocked script; either way:
        pass
    assert page.evaluate("window.__inline_ran === undefined")
    assert any("Content Security Policy" in m for m in messages), messages
    page.context.close()


def test_key_create_use_usage_revoke(srv, browser, shots):
    page, messages = new_page(browser)
    sign_in(page, srv.base, ADMIN)
    page.goto(srv.base + "/console/keys")
    page.fill("form input[name=name]", "e2e-client")
    page.fill("form input[name=rpm]", "100")
    page.click("form button[type=submit]")
    secret = page.locator("#new-secret").inner_text().strip()
    assert secret.startswith("sk-my-")
    key_id = page.locator("tr[data-key]").first.get_attribute("data-key")
    client = openai.OpenAI(base_url=srv.base + "/v1", api_key=secret, max_retries=0)
    answer = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
    assert answer.usage.completion_tokens >= 1
    used = answer.usage.total_tokens
    # usage appears once the recorder has flushed (every 5 s): the page re-read from the rollups
    row = page.locator(f'tr[data-key="{key_id}"]')
    for _ in range(40):
        page.goto(srv.base + "/console/keys")
        if row.locator("[data-usage-requests]").inner_text() == "1":
            break
        page.wait_for_timeout(500)
    expect(row.locator("[data-usage-requests]")).to_have_text("1")
    expect(row).to_contain_text(str(used))
    assert secret not in page.content()                               # shown once, never again
    page.goto(srv.base + "/console/usage")
    expect(page.locator("table.usage")).to_contain_text(key_id)
    page.screenshot(path=str(shots / "usage-after.png"), full_page=True)
    page.goto(srv.base + "/console/keys")
    row.get_by_role("button", name="Revoke e2e-client").click()
    expect(row.locator("[data-status]")).to_have_text("revoked")
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=1)
    page.screenshot(path=str(shots / "keys-after.png"), full_page=True)
    no_csp_violations(messages)
    page.context.close()


def test_playground_streams_a_completion(srv, browser, shots):
    page, messages = new_page(browser)
    sign_in(page, srv.base, ADMIN)
    page.goto(srv.base + "/console/playground")
    page.get_by_role("button", name="Make a 1-hour key").click()
    expect(page.locator("#flash")).to_contain_text("expires in an hour")
    assert page.locator("#pg-key").input_value().startswith("sk-my-")
    page.fill("#pg-prompt", "Count: one, two, three,")
    page.fill("#pg-max-tokens", "12")
    page.fill("#pg-temperature", "0")
    # count the answer's growth: streamed, it changes once per chunk
    page.evaluate("""() => { window.__pieces = 0; new MutationObserver(() => window.__pieces++)
        .observe(document.getElementById('pg-output'), {childList: true, characterData: true, subtree: true}); }""")
    page.click("#pg-send")
    expect(page.locator("#pg-stats[data-state=done]")).to_be_visible()
    stats = page.locator("#pg-stats").inner_text()
    assert "usage:" in stats and "time to first token" in stats, stats
    assert page.locator("#pg-output").inner_text().strip()
    assert page.evaluate("window.__pieces") > 1
    assert "/v1/chat/completions" in page.locator("#pg-curl").inner_text()
    assert "client.chat.completions.create" in page.locator("#pg-python").inner_text()
    assert "sk-my-" not in page.locator("#pg-curl").inner_text()        # snippets never hold the key
    # the snippets run as written, with the key in the environment
    import subprocess
    import sys
    env = {**os.environ, "MODELYARD_API_KEY": page.locator("#pg-key").input_value()}
    out = subprocess.run(["bash", "-c", page.locator("#pg-curl").inner_text()], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0 and "data: [DONE]" in out.stdout, out.stdout + out.stderr
    out = subprocess.run([sys.executable, "-c", page.locator("#pg-python").inner_text()], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip(), out.stdout + out.stderr
    # the embeddings mode calls /v1/embeddings: on a completions endpoint, the API's 400 is shown
    page.check("input[name=mode][value=embeddings]")
    assert "client.embeddings.create" in page.locator("#pg-python").inner_text()
    page.click("#pg-send")
    expect(page.locator("#pg-stats[data-state=error]")).to_contain_text("HTTP 400")
    page.check("input[name=mode][value=chat]")
    page.screenshot(path=str(shots / "playground-after.png"), full_page=True)
    no_csp_violations(messages)
    page.context.close()


def test_viewer_sees_no_controls_and_is_refused(srv, browser):
    page, messages = new_page(browser)
    sign_in(page, srv.base, VIEWER)
    page.goto(srv.base + "/console/keys")
    expect(page.locator("header")).to_contain_text("read-only")
    assert page.locator("form[hx-post]").count() == 0
    # the server refuses it too, with a valid CSRF token from the page
    status = page.evaluate("""async () => {
        const h = JSON.parse(document.body.getAttribute('hx-headers'));
        const r = await fetch('/console/keys', {method: 'POST', headers: {...h, 'Content-Type': 'application/json'},
                                                body: JSON.stringify({name: 'sneaky'})});
        return r.status; }""")
    assert status == 403
    no_csp_violations(messages)
    page.context.close()


def test_live_charts_and_endpoint_figures_follow_traffic(srv, browser, shots):
    client = openai.OpenAI(base_url=srv.base + "/v1", api_key=page_key(srv), max_retries=0)
    for _ in range(2):
        assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=4).usage.completion_tokens >= 1
    page, messages = new_page(browser)
    sign_in(page, srv.base, ADMIN)
    row = page.locator(f'tr[data-endpoint="{MODEL}"]')
    expect(row.locator("td").nth(8)).to_contain_text(" ms")               # TTFT p50 / p95, last 60 s
    page.screenshot(path=str(shots / "endpoints-traffic.png"))
    page.goto(srv.base + "/console/live")
    page.evaluate("() => { window.__swaps = 0; document.body.addEventListener('htmx:afterSwap', () => window.__swaps++); }")
    expect(page.locator("section.live figure")).to_have_count(6)
    ttft = page.locator("section.live figcaption", has_text="TTFT")
    expect(ttft).not_to_contain_text("TTFT (mean): –")                      # the requests above
    for _ in range(60):                     # refreshed every 2 s from the sampler (bounded wait)
        if page.evaluate("window.__swaps") >= 2:
            break
        page.wait_for_timeout(250)
    assert page.evaluate("window.__swaps") >= 2
    page.screenshot(path=str(shots / "live-traffic.png"), full_page=True)
    no_csp_violations(messages)
    page.context.close()


def test_remote_endpoint_loading_to_ready_without_reload(srv, browser, shots, tmp_path):
    """A remote endpoint made in the page (through the run-time endpoints API) goes from not
    ready to ready as its upstream (a second modelyard) starts, no reload."""
    page, messages = new_page(browser)
    sign_in(page, srv.base, ADMIN)
    from testkit.servers import modelyard_process, wait_ready
    # the upstream's port is chosen now; it starts once the endpoint exists (so it is seen loading)
    upstream = modelyard_process(tmp_path / "upstream", f'[[endpoints]]\nname = "{MODEL}"\n{ENGINE}')
    port = upstream.port
    page.evaluate("window.__same_page = true")
    form = page.locator('form[hx-post="/console/endpoints"]')
    form.locator("input[name=name]").fill("remote-e2e")
    form.locator("select[name=engine]").select_option("openai")
    form.locator("input[name=urls]").fill(f"http://127.0.0.1:{port}/v1")
    form.locator("input[name=upstream_model]").fill(MODEL)
    form.locator("button[type=submit]").click()
    row = page.locator('tr[data-endpoint="remote-e2e"]')
    expect(row).to_be_visible()
    # its upstream is not up yet: not serving (the state says why: loading, or ready with no
    # replica answering), no healthy replica
    expect(row).to_have_attribute("data-serving", "no")
    expect(row.locator("[data-replicas]")).to_have_text(re.compile(r"^\s*0/1\s+#0 down\s*$"))
    expect(row.locator(".reason")).to_be_visible()
    page.screenshot(path=str(shots / "endpoints-remote-waiting.png"), full_page=True)
    upstream.start()
    try:
        wait_ready(upstream, "upstream ready")
        expect(row.locator("[data-state]")).to_have_text("ready", timeout=60_000)
        expect(row).to_have_attribute("data-serving", "yes", timeout=60_000)
        expect(row.locator("[data-replicas]")).to_have_text(re.compile(r"^\s*1/1\s+#0 0\s*$"))   # up, idle
        assert page.evaluate("window.__same_page === true")                 # live: no reload
        page.screenshot(path=str(shots / "endpoints-remote-ready.png"), full_page=True)
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key=page_key(srv), max_retries=0)
        assert client.completions.create(model="remote-e2e", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
        row.get_by_role("button", name="Delete remote-e2e").click()
        expect(row).to_have_count(0, timeout=60_000)
    finally:
        upstream.stop()
    no_csp_violations(messages)
    page.context.close()


def page_key(srv) -> str:
    """A fresh inference key made through the admin API (for the remote endpoint's request)."""
    r = httpx.post(srv.base + "/api/v1/control/api-keys", headers={"Authorization": f"Bearer {ADMIN}"},
                   json={"name": f"e2e-remote-{time.time_ns()}"})
    assert r.status_code == 201, r.text
    return r.json()["secret"]


def test_models_list_pull_and_refused_delete(srv, browser, shots):
    """The store's models (through its API) with the endpoints using them, a pull whose progress
    ends in "done", and a delete of a model in use refused with the API's 409."""
    page, messages = new_page(browser)
    sign_in(page, srv.base, ADMIN)
    page.goto(srv.base + "/console/models")
    row = page.locator("table.models tr", has_text=MODEL).first
    expect(row).to_contain_text(MODEL)                      # used by the endpoint of the same name
    page.fill("input[name=ref]", MODEL)                     # in the store already: a quick, offline pull
    page.get_by_role("button", name="Pull").click()
    expect(page.locator(".pull").first).to_have_attribute("data-state", "done", timeout=60_000)
    row.get_by_role("button", name=f"Delete {MODEL}").click()
    expect(page.locator("#flash")).to_contain_text("Refused (409)")
    expect(page.locator("table.models")).to_contain_text(MODEL)
    page.screenshot(path=str(shots / "models-after.png"), full_page=True)
    no_csp_violations(messages)
    page.context.close()
