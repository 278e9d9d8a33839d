"""The built-in dashboard in a real browser (Debian's headless Chromium through Selenium and
ChromeDriver): it needs the admin token, loads without a console error, and its numbers are
`tollgate usage`'s and `tollgate get limits`' for the same traffic (driven through Envoy with
the openai SDK), with the rate-limit pressure and a credential cooling down on the same page."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from extproc.launch import Stack, free_port, start_extproc
from tests.e2e.conftest import ADMIN_TOKEN, CliRunner, chat_body, spent_and_held

pytestmark = [pytest.mark.e2e, pytest.mark.browser]
ROOT = Path(__file__).resolve().parents[2]
CACHE_WAIT = 5.5  # the dashboard keeps a summary 5 s (server/dashboard.py CACHE_S)


def _installed() -> bool:
    return bool(shutil.which("chromium") and shutil.which("chromedriver"))


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    if not _installed():  # `make test` installs them first; a bare `pytest` does it here
        subprocess.run([str(ROOT / "scripts" / "install-browser.sh")], check=True, timeout=900)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="tollgate-chromium-")
    # Headless, no sandbox (root), and none of Chromium's own background calls (the network
    # here is closed; they would only fail, loudly).
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def dashboard(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.extproc.http}/dashboard"


def console_errors(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """The console's errors since the last call (reading the log empties it)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]  # type: ignore[no-untyped-call]


def sign_in(driver: webdriver.Chrome, stack: Stack, token: str) -> None:
    driver.get(f"{dashboard(stack)}/login")
    field = driver.find_element(By.ID, "token")
    field.send_keys(token)
    driver.find_element(By.ID, "sign-in").click()
    # The click returns before the next page may have loaded: wait for one of the two outcomes.
    WebDriverWait(driver, 15).until(
        lambda d: d.find_elements(By.ID, "totals") or d.find_elements(By.ID, "login-error"))


def cells(row: WebElement) -> dict[str, str]:
    return {c.get_attribute("data-field") or "": c.text
            for c in row.find_elements(By.CSS_SELECTOR, "[data-field]")}


def table(driver: webdriver.Chrome, dim: str) -> dict[str, dict[str, str]]:
    return {r.get_attribute(f"data-{dim}") or "": cells(r)
            for r in driver.find_elements(By.CSS_SELECTOR, f"#usage-by-{dim} tbody tr")}


def report(cli: CliRunner, by: str, since: str) -> dict[str, dict[str, Any]]:
    rows = orjson.loads(cli("usage", "--by", by, "--since", since, "-o", "json").stdout)
    return {r[by]: r for r in rows}


def test_the_dashboard_needs_the_admin_token(stack: Stack, browser: webdriver.Chrome) -> None:
    url = dashboard(stack)
    for headers in ({}, {"authorization": "Bearer not-the-token"}):
        page = httpx.get(url, headers=headers, timeout=10)
        assert page.status_code == 401
        assert "Admin token" in page.text and "Spend over time" not in page.text
        api = httpx.get(f"{url}/api/summary", headers=headers, timeout=10)
        assert api.status_code == 401 and api.json()["error"]["code"] == "unauthorized"
    ok = httpx.get(f"{url}/api/summary", headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                   timeout=10)
    assert ok.status_code == 200 and "total" in ok.json()
    assert "script-src" not in ok.headers["content-security-policy"]  # no script at all
    bad = httpx.get(f"{url}/api/summary?range=1y",
                    headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    assert bad.status_code == 400 and "24h" in bad.json()["error"]["message"]

    # In the browser: the login form; a wrong token is refused, the right one gets the page.
    browser.delete_all_cookies()
    browser.get(url)
    assert browser.find_elements(By.ID, "token")
    console_errors(browser)  # the 401 of the document itself is logged; that is the point
    sign_in(browser, stack, "wrong-" + ADMIN_TOKEN)
    assert browser.find_element(By.ID, "login-error").text
    assert not browser.find_elements(By.ID, "totals")
    console_errors(browser)
    sign_in(browser, stack, ADMIN_TOKEN)
    assert browser.find_elements(By.ID, "totals"), browser.page_source[:2000]
    assert console_errors(browser) == []
    # The cookie holds no token, and is for the dashboard only.
    (cookie,) = browser.get_cookies()
    assert ADMIN_TOKEN not in cookie["value"] and cookie["httpOnly"]
    assert cookie["path"] == "/dashboard"


def test_the_dashboard_shows_what_tollgate_usage_and_get_limits_show(
    stack: Stack, cli: CliRunner, browser: webdriver.Chrome,
    new_named_key: Callable[..., tuple[str, str]], second_upstream: int,
) -> None:
    tag = uuid.uuid4().hex[:6]
    (name_a, key_a), (name_b, key_b) = new_named_key(), new_named_key()
    cli("apply", "-f", "-", stdin=f"""apiVersion: tollgate.io/v1alpha1
kind: Limit
metadata: {{name: dash-{tag}}}
spec: {{type: Block, max: 5.00, threshold: 0.8, period: month, selector: {{keys: [{name_a}]}}}}
---
apiVersion: tollgate.io/v1alpha1
kind: RateLimit
metadata: {{name: dash-rl-{tag}}}
spec: {{per: key, selector: {{keys: [{name_b}]}}, requestsPerMinute: 1000}}
---
apiVersion: tollgate.io/v1alpha1
kind: Upstream
metadata: {{name: dash-up-{tag}}}
spec:
  provider: openai-compatible
  cluster: second
  models: ["dash-{tag}"]
  priority: 5
  cooldown: {{seconds: 30}}
  credentials:
    - {{name: c1, secretRef: POOL_KEY_1}}
    - {{name: c2, secretRef: POOL_KEY_2}}
""")
    a = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key_a, max_retries=0)
    b = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key_b, max_retries=0)
    # The configuration reaches every worker: wait until the new Upstream routes.
    deadline = time.monotonic() + 10
    while True:
        try:
            b.chat.completions.create(**chat_body(f"dash-{tag}"))
            break
        except openai.APIStatusError:
            assert time.monotonic() < deadline, "the new Upstream never served"
            time.sleep(0.1)
    told: dict[str, Decimal] = {name_a: Decimal(0), name_b: Decimal(0)}
    for i in range(6):
        for name, client in ((name_a, a), (name_b, b)):
            raw = client.chat.completions.with_raw_response.create(
                **chat_body("gpt-4o" if i % 2 else "gpt-4o-mini",
                            messages=[{"role": "user", "content": "Hi " * (i + 1)}]))
            told[name] += Decimal(raw.headers["x-tollgate-cost"])
    # The provider rate-limits the new Upstream's credentials (each try): they rest for 20 s.
    with pytest.raises(openai.RateLimitError):
        b.chat.completions.create(**chat_body(f"dash-{tag}"), extra_headers={
            "x-mock-status": "429", "x-mock-retry-after": "20"})

    # Settlement lands after the responses: wait until the report has every request (each
    # key also made one probe request when it was created).
    deadline = time.monotonic() + 30
    while True:
        keys = report(cli, "key", "7d")
        if (keys.get(name_a, {}).get("requests") == 7
                and Decimal(keys[name_a]["cost_usd"]) == told[name_a]
                and keys.get(name_b, {}).get("requests", 0) >= 8):
            break
        assert time.monotonic() < deadline, (keys.get(name_a), keys.get(name_b))
        time.sleep(0.2)
    # The page (7d: a range no earlier load cached) between two identical reports.
    sign_in(browser, stack, ADMIN_TOKEN)
    for _attempt in range(5):
        before = (report(cli, "key", "7d"), report(cli, "model", "7d"))
        browser.get(f"{dashboard(stack)}?range=7d")
        page_keys, page_models = table(browser, "key"), table(browser, "model")
        totals = cells(browser.find_element(By.ID, "totals"))
        errors = console_errors(browser)
        if before == (report(cli, "key", "7d"), report(cli, "model", "7d")):
            break
        time.sleep(CACHE_WAIT)  # other traffic landed meanwhile: read again, fresh
    assert errors == []
    if os.environ.get("DASHBOARD_SCREENSHOT"):  # e.g. for docs: a PNG of this page
        browser.set_window_size(1100, 2400)
        browser.save_screenshot(os.environ["DASHBOARD_SCREENSHOT"])
    by_key, by_model = before
    for rows, page in ((by_key, page_keys), (by_model, page_models)):
        assert set(page) == set(rows)
        for name, row in rows.items():
            assert page[name] == {"requests": str(row["requests"]), "cost_usd": row["cost_usd"],
                                  "input_tokens": str(row["input_tokens"]),
                                  "output_tokens": str(row["output_tokens"])}, name
    assert Decimal(totals["cost_usd"]) == sum(Decimal(r["cost_usd"]) for r in by_key.values())
    assert int(totals["requests"]) == sum(r["requests"] for r in by_key.values())

    # The chart by key: key A's bars add up to its total (it is among the top keys or in
    # "(others)"), and nothing on the chart is more than the total.
    bars = browser.find_elements(By.CSS_SELECTOR, "#chart-key rect[data-series]")
    drawn: dict[str, int] = {}
    for bar in bars:
        series = bar.get_attribute("data-series") or ""
        drawn[series] = drawn.get(series, 0) + int(bar.get_attribute("data-cost-nanos") or 0)
    assert sum(drawn.values()) == sum(r["cost_nanos"] for r in by_key.values())
    if name_a in drawn:
        assert drawn[name_a] == by_key[name_a]["cost_nanos"]

    # The limit's gauge: what `tollgate get limits` says.
    spent, held = spent_and_held(cli, f"dash-{tag}")
    row = cells(browser.find_element(By.CSS_SELECTOR, f'#limits tr[data-limit="dash-{tag}"]'))
    assert (Decimal(row["spent"]), Decimal(row["held"])) == (spent, held)
    assert spent == told[name_a] and row["state"] == "ok" and Decimal(row["max"]) == 5

    # Rate-limit pressure: key B is the busiest identity, with its 8 requests of the minute
    # (the probe that found the new Upstream, 6 chats, the refused one; not the key's first
    # probe, made before the RateLimit existed).
    rate = browser.find_element(By.CSS_SELECTOR,
                                f'#rate-limits tr[data-rate-limit="dash-rl-{tag}"]')
    busiest = rate.find_element(By.CSS_SELECTOR, "[data-identity]")
    assert busiest.get_attribute("data-identity") == name_b
    assert busiest.find_element(By.CSS_SELECTOR, '[data-field="requests"]').text == "8"

    # The credentials the provider rate-limited, and until when: the 429 was retried on the
    # pool's other credential, which the provider refused too, so both rest.
    resting = browser.find_elements(By.CSS_SELECTOR,
                                    f'#cooldowns tr[data-upstream="dash-up-{tag}"]')
    assert sorted(r.get_attribute("data-credential") for r in resting) == ["c1", "c2"]
    for row in resting:
        until = row.find_element(By.CSS_SELECTOR, '[data-field="until"]').text
        assert 0 < (_parse(until) - time.time()) <= 21

    # The JSON behind the page says the same.
    api = httpx.get(f"{dashboard(stack)}/api/summary?range=7d",
                    headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10).json()
    assert {r["key"]: r for r in api["usage"]["by_key"]}[name_a] == by_key[name_a]


def _parse(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_the_server_refuses_the_dashboard_without_a_token(redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TOLLGATE_ADMIN_TOKEN"}
    env.update(TOLLGATE_DASHBOARD="1")
    done = subprocess.run(
        [sys.executable, "-m", "extproc", "serve", "--redis-url", redis_url,
         "--grpc-port", str(free_port()), "--http-port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "TOLLGATE_DASHBOARD=1 needs TOLLGATE_ADMIN_TOKEN" in done.stderr


def test_the_dashboard_is_not_served_unless_turned_on(
    redis_url: str, tmp_path: Path, e2e_env: dict[str, str]
) -> None:
    env = {k: v for k, v in e2e_env.items() if k != "TOLLGATE_DASHBOARD"}
    proc, ports = start_extproc(tmp_path, redis_url, 1, env)
    try:
        for path in ("/dashboard", "/dashboard/api/summary", "/dashboard/login"):
            answer = httpx.get(f"http://127.0.0.1:{ports.http}{path}",
                               headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
            assert answer.status_code == 404, path
        assert httpx.get(f"http://127.0.0.1:{ports.http}/readyz", timeout=10).status_code == 200
    finally:
        proc.stop()
