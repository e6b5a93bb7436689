"""The status page in a real browser: Debian's headless chromium, driven by Selenium
through chromedriver, against a live activator with stand-in engines.

Selenium blocks, and the activator under test runs on this test's event loop, so each
browser script runs in a thread (asyncio.to_thread) and reaches back into the loop with
run_coroutine_threadsafe for the requests it sends. Waits in the browser are polls with
a deadline (WebDriverWait), never sleeps.

Screenshots go to the test's tmp_path; their paths are printed (pytest -s shows them).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import re
import shutil
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from activator.app import build_app
from activator.config.load import load_config
from activator.reload import ConfigFile
from activator.ui import SESSION_COOKIE, EventStreams
from activator.ui.routes import EVENTS_PATH
from tests.conftest import ActivatorFactory
from tests.fakekube.server import FakeKube
from tests.harness import Running, chat, model_config, post, unique, wait_for
from tests.test_scale_out import LONG, open_stream, scaled
from tests.test_ui import ADMIN_KEY, gated_model
from tests.tools import in_ci, unavailable
from tests.ui_support import open_ui_routes

# Generous: a loaded CI machine starts engines and repaints slowly. A bound, not a target.
WAIT_S = 60.0
DESKTOP = (1280, 900)
PHONE = (390, 844)  # a common phone's CSS viewport
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)

Driver = Any  # selenium.webdriver.Chrome; selenium may be missing where this is collected


def _missing(what: str) -> NoReturn:
    unavailable(
        f"{what} (bash .ci/tools.sh installs it)",
        required=in_ci(),
        fail_reason=f"{what}; CI must have it (bash .ci/tools.sh installs it)",
    )


@pytest.fixture
def chrome(tmp_path: Path) -> Iterator[Callable[[], Driver]]:
    """Start headless chromium sessions (each with a fresh profile); all quit after."""
    chromium = shutil.which("chromium")
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        _missing("chromium and chromedriver are not on PATH (Debian: chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (pip install -e '.[test]')")
    drivers: list[Driver] = []

    def start() -> Driver:
        options = webdriver.ChromeOptions()
        options.binary_location = str(chromium)
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={tmp_path / f'profile-{len(drivers)}'}")
        options.add_argument("--window-size={},{}".format(*DESKTOP))
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        # The path given: Selenium Manager (which would download a driver) never runs.
        driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        driver.quit()


# ----- what the tests read on the page ----------------------------------------------------


def card(driver: Driver, model: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'article.model[data-model="{model}"]')


def shown_state(driver: Driver, model: str) -> str | None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        text: str = card(driver, model).find_element(By.CSS_SELECTOR, ".state").text
    except (NoSuchElementException, StaleElementReferenceException):
        return None  # not drawn yet, or redrawn while we looked
    return text


def wait_until(driver: Driver, condition: Callable[[], object], what: str) -> Any:
    """Poll `condition` until it holds; a look that raced a redraw or a navigation (an
    element gone stale between finding and reading it) is polled again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(
        driver,
        WAIT_S,
        poll_frequency=0.05,
        ignored_exceptions=(StaleElementReferenceException,),
    ).until(lambda _: condition(), message=f"the page did not show {what}")


def wait_state(driver: Driver, model: str, state: str) -> None:
    wait_until(driver, lambda: shown_state(driver, model) == state, f"{model} {state}")


def click(driver: Driver, model: str, button: str) -> None:
    from selenium.webdriver.common.by import By

    card(driver, model).find_element(By.CSS_SELECTOR, f"button.{button}").click()


def desktop_and_phone(driver: Driver, directory: Path) -> None:
    """ui-desktop.png and ui-phone.png of the page as it is; on a phone's width the page
    must not scroll sideways. Back at the desktop size after."""
    screenshot(driver, directory / "ui-desktop.png")
    driver.set_window_size(*PHONE)
    wait_until(
        driver,
        lambda: driver.execute_script("return window.innerWidth") <= PHONE[0],
        "the phone-sized viewport",
    )
    overflow = driver.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"the page scrolls sideways on a phone by {overflow}px"
    screenshot(driver, directory / "ui-phone.png")
    driver.set_window_size(*DESKTOP)


def screenshot(driver: Driver, path: Path) -> Path:
    """The whole page as PNG: the viewport is stretched to the page's height for the shot
    (at the current width, so the layout is the one being tested)."""
    width = driver.execute_script("return window.innerWidth")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"status page screenshot: {path}")
    return path


def script_errors(driver: Driver) -> list[str]:
    """Uncaught JavaScript errors the page logged."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and "Uncaught" in entry["message"]
    ]


def notice_text(driver: Driver) -> str:
    from selenium.webdriver.common.by import By

    text: str = driver.find_element(By.ID, "notice").text
    return text


def in_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
    """Run `coro` on the test's event loop from the browser thread."""
    return asyncio.run_coroutine_threadsafe(coro, loop)


# ----- the tests ----------------------------------------------------------------------------


async def test_status_page_follows_a_wake_a_failure_a_waiting_pool_and_a_stop(
    activator: ActivatorFactory, chrome: Callable[[], Driver], tmp_path: Path
) -> None:
    cold_gate, chat_gate = tmp_path / "cold.gate", tmp_path / "chat.gate"
    running = await activator(
        {
            "pools": {"gpu": {"gpus": 1}},
            "models": {
                "cold": gated_model(
                    unique("ui-cold"), cold_gate, aliases=["small"], startup_timeout="5m"
                ),
                "chat": gated_model(unique("ui-chat"), chat_gate, pool="gpu", startup_timeout="5m"),
                "code": model_config(unique("ui-code"), pool="gpu"),
                "broken": model_config(unique("ui-broken"), "--crash-during-startup"),
            },
        }
    )
    loop = asyncio.get_running_loop()

    def browse() -> None:
        from selenium.common.exceptions import (
            NoSuchElementException,
            StaleElementReferenceException,
        )
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        driver = chrome()
        driver.get(running.url + "/ui")
        wait_state(driver, "cold", "stopped")
        assert "live" in driver.find_element(By.ID, "connection").text

        # A request wakes the cold model: the page follows it with no reload.
        answer = in_loop(loop, post(running, "/v1/chat/completions", chat("small")))
        wait_state(driver, "cold", "starting")
        cold_gate.touch()
        wait_state(driver, "cold", "ready")
        assert answer.result(WAIT_S)[0] == 200
        phases = card(driver, "cold").find_element(By.CSS_SELECTOR, ".phase-legend").text
        assert "ready" in phases and "launched" in phases
        wait_until(
            driver,
            lambda: "cold: 1 wake," in driver.find_element(By.ID, "wakes").text,
            "the wake in the chart",
        )

        # The Wake button; a start that fails shows its reason and the engine's output.
        click(driver, "broken", "wake")
        wait_state(driver, "broken", "failed")
        error = card(driver, "broken").find_element(By.CSS_SELECTOR, ".last-error").text
        assert error.startswith("Last error:")
        card(driver, "broken").find_element(By.CSS_SELECTOR, "details.log summary").click()
        log = card(driver, "broken").find_element(By.CSS_SELECTOR, ".log-lines")
        wait_until(driver, lambda: log.text not in ("", "loading…"), "the engine log")

        # A 1-GPU pool: chat holds the GPU while it starts, code waits for it.
        holding = in_loop(loop, post(running, "/v1/chat/completions", chat("chat")))
        waiting = in_loop(loop, post(running, "/v1/chat/completions", chat("code")))

        def pool_text() -> str:
            # Pool cards are redrawn whole on every change: find it afresh each time.
            try:
                text: str = driver.find_element(By.CSS_SELECTOR, '[data-pool="gpu"]').text
            except (NoSuchElementException, StaleElementReferenceException):
                return ""
            return text

        def chat_holds_code_waits() -> bool:
            # One read per poll: a redraw between two reads would compare different cards.
            text = pool_text()
            return (
                "GPUs in use: 1 of 1" in text
                and "code 1 held" in text
                and "chat" in text
                and shown_state(driver, "code") == "stopped"
            )

        wait_until(driver, chat_holds_code_waits, "chat holding the pool's GPU and code waiting")
        assert not script_errors(driver)
        desktop_and_phone(driver, tmp_path)

        # Stop asks first; accepting it stops the model.
        click(driver, "cold", "stop")
        WebDriverWait(driver, WAIT_S).until(expected_conditions.alert_is_present()).accept()
        wait_state(driver, "cold", "stopped")
        # "Stopping cold." was shown until then (not pinned: a fast stop may beat a look).
        wait_until(driver, lambda: notice_text(driver) == "", "the notice gone once stopped")
        assert not script_errors(driver)
        holding.cancel()
        waiting.cancel()

    await asyncio.to_thread(browse)


async def test_login_form_lets_the_admin_key_in_and_keeps_it_out_of_the_page(
    activator: ActivatorFactory, chrome: Callable[[], Driver], tmp_path: Path
) -> None:
    running = await activator(
        {
            "server": {"admin_api_key": ADMIN_KEY},
            "models": {"m": model_config(unique("ui-login"))},
        }
    )

    def browse() -> None:
        from selenium.webdriver.common.by import By

        driver = chrome()
        driver.get(running.url + "/ui")
        assert driver.current_url == running.url + "/ui/login"

        def log_in(key: str) -> None:
            field = driver.find_element(By.ID, "key")
            field.clear()
            field.send_keys(key)
            driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()

        log_in("not-the-key")
        wait_until(
            driver,
            lambda: "not the admin key" in driver.find_element(By.TAG_NAME, "body").text,
            "the wrong key refused",
        )
        assert driver.get_cookie(SESSION_COOKIE) is None
        driver.get(running.url + "/ui")
        assert driver.current_url == running.url + "/ui/login"

        log_in(ADMIN_KEY)
        wait_state(driver, "m", "stopped")
        assert driver.current_url == running.url + "/ui"
        cookie = driver.get_cookie(SESSION_COOKIE)
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
        assert cookie["path"] == "/" and cookie["value"] != ADMIN_KEY
        assert driver.execute_script("return document.cookie") == ""  # HttpOnly
        assert ADMIN_KEY not in driver.page_source

        # The cookie works for the page's own actions (with its header).
        click(driver, "m", "wake")
        wait_state(driver, "m", "ready")
        screenshot(driver, tmp_path / "ui-logged-in.png")
        assert not script_errors(driver)

        driver.find_element(By.CSS_SELECTOR, "#logout button").click()
        wait_until(driver, lambda: driver.current_url.endswith("/ui/login"), "the login page")
        assert driver.get_cookie(SESSION_COOKIE) is None
        driver.get(running.url + "/ui")
        assert driver.current_url == running.url + "/ui/login"

    await asyncio.to_thread(browse)
    assert running.model("m").state == "ready"  # the Wake click did reach the server


GIB = 1024**3
# What /admin/models and /admin/pools answer once sleep mode is in (fields this branch's
# models do not have yet), next to a model in the shape they have today.
SLEEPY_SNAPSHOT = {
    "models": [
        {
            "name": "big",
            "aliases": [],
            "state": "sleeping",
            "backend": "process",
            "pool": "gpu",
            "gpus": 1,
            "in_flight": 0,
            "queued": 0,
            "last_wake_seconds": 0.31,
            "last_wake_from": "sleep",
            "wake_phases": {"wake_up": 0.3, "ready": 0.31},
            "sleep": {
                "level": 1,
                "host_memory": 16 * GIB,
                "host_held": 16 * GIB,
                "last_sleep_seconds": 0.42,
            },
            "last_error": None,
            "idle_timeout": 600,
        },
        {
            "name": "lost",
            "aliases": [],
            "state": "unknown",
            "backend": "kubernetes",
            "pool": None,
            "gpus": 1,
            "in_flight": 0,
            "queued": 0,
            "last_wake_seconds": None,
            "wake_phases": {},
            "last_error": None,
            "idle_timeout": 600,
        },
    ],
    "pools": [
        {
            "name": "gpu",
            "gpus": 1,
            "gpus_in_use": 0,
            "host_memory": 64 * GIB,
            "host_memory_in_use": 16 * GIB,
            "models": [],
            "sleeping": [{"name": "big", "level": 1, "host_memory": 16 * GIB}],
            "waiting": [],
        }
    ],
    "wake_durations": {"bounds": [0.5, 1.0], "models": {}},
}


@asynccontextmanager
async def scripted_page(snapshot: Callable[[], dict[str, Any]]) -> AsyncIterator[str]:
    """The real page and its event stream on loopback, serving `snapshot()` as the admin
    data (no activator behind it; no login); yields the page's URL."""
    streams = EventStreams(snapshot)
    app = web.Application()
    app.router.add_routes(open_ui_routes(streams))
    app.on_shutdown.append(streams.close)
    async with TestServer(app, host="127.0.0.1") as server:
        yield str(server.make_url("/ui"))


async def test_sleeping_models_and_host_memory_are_shown_when_the_admin_data_has_them(
    chrome: Callable[[], Driver],
) -> None:
    # Sleep mode cannot run on this branch: the page and its stream are real, the data
    # is scripted in the shape the sleep work gives describe().
    async with scripted_page(lambda: SLEEPY_SNAPSHOT) as url:

        def browse() -> None:
            from selenium.webdriver.common.by import By

            driver = chrome()
            driver.get(url)
            wait_state(driver, "big", "sleeping")
            big = card(driver, "big").text
            assert "sleep level\n1" in big and "host memory held\n16.0 GiB" in big
            assert "310 ms (from sleep)" in big and "last sleep\n420 ms" in big
            assert shown_state(driver, "lost") == "unknown"
            assert "sleep level" not in card(driver, "lost").text
            pool = driver.find_element(By.CSS_SELECTOR, '[data-pool="gpu"]').text
            assert "Host memory for sleeping models: 16.0 GiB of 64.0 GiB" in pool
            assert "big level 1, 16.0 GiB of host memory" in pool
            assert not script_errors(driver)

        await asyncio.to_thread(browse)


def packed_pool(name: str, models: list[dict[str, Any]]) -> dict[str, Any]:
    """A 1-GPU pool in memory mode (24 GiB), in the shape PoolScheduler.describe gives."""
    committed = sum(m["share"] for m in models)
    return {
        "name": name,
        "gpus": 1,
        "gpus_in_use": 1,
        "gpu_memory": 24 * GIB,
        "memory": [
            {"gpu": 0, "committed": committed, "free": 1 - committed, "models": models},
        ],
        "models": [],
        "waiting": [],
    }


PACKED_SNAPSHOT = {
    "models": [],
    "pools": [
        packed_pool(
            "packed",
            [
                {"name": "coder-chat", "state": "ready", "kind": "awake", "share": 0.45},
                {"name": "coder-fim", "state": "ready", "kind": "awake", "share": 0.3},
                {"name": "big", "state": "sleeping", "kind": "asleep", "share": 0.0625},
            ],
        ),
        {
            "name": "whole",
            "gpus": 2,
            "gpus_in_use": 0,
            "gpu_memory": None,
            "models": [],
            "waiting": [],
        },
    ],
    "wake_durations": {"bounds": [0.5, 1.0], "models": {}},
}


async def test_a_pool_in_memory_mode_shows_a_memory_bar_per_gpu_with_a_segment_per_model(
    chrome: Callable[[], Driver], tmp_path: Path
) -> None:
    async with scripted_page(lambda: PACKED_SNAPSHOT) as url:

        def browse() -> None:
            from selenium.webdriver.common.by import By

            driver = chrome()
            driver.get(url)
            wait_until(
                driver, lambda: driver.find_elements(By.CSS_SELECTOR, ".memory-bar"), "a bar"
            )
            packed = driver.find_element(By.CSS_SELECTOR, '[data-pool="packed"]')
            assert "GPU memory · 24.0 GiB per GPU" in packed.text
            assert "GPU 0: 81% committed, 19% free" in packed.text
            segments = packed.find_elements(By.CSS_SELECTOR, ".memory-bar > li[data-model]")
            shown = [
                (x.get_attribute("data-model"), x.get_attribute("data-kind")) for x in segments
            ]
            assert shown == [("coder-chat", "awake"), ("coder-fim", "awake"), ("big", "asleep")]
            # Name and share as text, the kind in words for screen readers, all in a tooltip.
            chat = segments[0]
            assert chat.get_attribute("textContent") == "coder-chat awake, 45%"
            assert chat.get_attribute("title") == (
                "coder-chat: awake, ready, 45% of the GPU, 10.8 GiB"
            )
            assert "asleep" in segments[2].get_attribute("textContent")
            # Each segment as wide as its share, then the free rest.
            widths = [s.rect["width"] for s in segments]
            assert widths[0] > widths[1] > widths[2] > 0
            free = packed.find_element(By.CSS_SELECTOR, ".memory-bar > li.mem-free")
            assert free.get_attribute("textContent") == "free 19%"
            # A pool that counts whole GPUs has no bar.
            whole = driver.find_element(By.CSS_SELECTOR, '[data-pool="whole"]')
            assert not whole.find_elements(By.CSS_SELECTOR, ".memory")
            assert "GPU memory" not in whole.text
            desktop_and_phone(driver, tmp_path)  # the bar fits a phone
            assert not script_errors(driver)

        await asyncio.to_thread(browse)


# ----- scale-out, a reload, cost: the fields that came after the page -----------------------


def write_config(path: Path, config: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(config))


@asynccontextmanager
async def from_file(path: Path, config: dict[str, Any]) -> AsyncIterator[Running]:
    """An activator started from a config file, so that POST /admin/reload reads it again."""
    write_config(path, config)
    app = build_app(load_config(path), config=ConfigFile(path))
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    running = Running(app=app, server=server, url=url, session=aiohttp.ClientSession())
    try:

        async def ready() -> bool:
            async with running.session.get(url + "/readyz") as resp:
                return resp.status == 200

        await wait_for(ready, what="activator /readyz")
        yield running
    finally:
        await running.close()


def card_text(driver: Driver, model: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        text: str = card(driver, model).text
    except (NoSuchElementException, StaleElementReferenceException):
        return ""  # not drawn yet, or redrawn while we looked
    return text


def pod_rows(driver: Driver, model: str) -> list[str]:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return [li.text for li in card(driver, model).find_elements(By.CSS_SELECTOR, "li.pod")]
    except (NoSuchElementException, StaleElementReferenceException):
        return []


@pytest.mark.timeout(240)
async def test_status_page_shows_a_scaled_out_models_pods_a_reloads_badges_and_cost(
    kube: FakeKube, chrome: Callable[[], Driver], tmp_path: Path
) -> None:
    """Three streams scale `coder` out to 3 pods on the fake API server (target 1 request
    a pod): its card shows the replicas, each pod's load and the last scale-up. A reload
    changes `chat`'s engine command while it runs (restart pending) and removes `old`
    while a stream keeps it draining (removing). Priced models show their cost."""
    price = {"gpu_hour": 2.5}
    config = {
        "kubernetes": {
            "kubeconfig": kube.kubeconfig,
            "request_timeout": "5s",
            "scheduling_grace": "30s",
        },
        "models": {
            "coder": scaled(kube, "coder", most=4, target=1, cost=price),
            "chat": model_config(unique("ui-chat"), cost=price),
            "old": model_config(unique("ui-old"), "--stream-delay", "0.1", drain_timeout="5m"),
        },
    }
    async with (
        from_file(tmp_path / "activator.yaml", config) as running,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
    ):
        driver = await asyncio.to_thread(chrome)

        async def page(condition: Callable[[], object], what: str) -> None:
            await asyncio.to_thread(wait_until, driver, condition, what)

        async def text(model: str) -> str:
            return await asyncio.to_thread(card_text, driver, model)

        await asyncio.to_thread(driver.get, running.url + "/ui")
        await page(lambda: "replicas 0 of max 4" in card_text(driver, "coder"), "coder at 0")
        assert "No pods yet." in await text("coder")
        assert "replicas" not in await text("chat")  # not scaled out: nothing new

        # Three requests at one a pod: 0 -> 1 to start, then 3 in one write.
        streams = [open_stream(session, running, "coder", tokens=LONG) for _ in range(3)]
        for stream in streams:
            await stream.started()
        await page(
            lambda: (
                "replicas 3 of max 4 · 3 routable" in card_text(driver, "coder")
                and sorted(row.split("\n", 1)[-1] for row in pod_rows(driver, "coder"))
                == ["1/1\nroutable"] * 3
            ),
            "3 routable pods with a request each",
        )
        coder = await text("coder")
        assert "Pods · requests in flight of 1 each" in coder
        assert "last scale up 1 → 3: sized to demand, demand 3" in coder
        assert "now: 3 wanted" in coder
        names = {p["name"] for p in (await running.admin("coder"))["replicas"]["pods"]}
        # Polled: a read between a redraw's removal and insertion of the rows sees none.
        await page(
            lambda: {row.split("\n", 1)[0] for row in pod_rows(driver, "coder")} == names,
            "the pods' names as /admin/models has them",
        )

        # A reload: chat's engine changes on its next start; old is removed mid-stream.
        old = open_stream(session, running, "old", tokens=LONG)
        await old.started()
        served = config["models"]["chat"]["served_model_name"]
        assert (await post(running, "/v1/chat/completions", chat(served)))[0] == 200
        changed = copy.deepcopy(config)
        changed["models"]["chat"]["process"]["command"].append("--disable-access-log")
        del changed["models"]["old"]
        write_config(tmp_path / "activator.yaml", changed)
        status, body, _ = await post(running, "/admin/reload", None)
        assert status == 200, body
        await page(
            lambda: (
                "restart pending" in card_text(driver, "chat")
                and "removing" in card_text(driver, "old")
            ),
            "chat's restart pending and old removing",
        )
        assert "applied at the next start: process.command" in await text("chat")
        assert "restart pending" not in await text("coder")
        for model in ("coder", "chat"):  # priced; a short run costs under a cent
            assert re.search(r" GPU-h · (< \$0\.01|\$\d+\.\d\d)", await text(model))
        assert "$" not in await text("old")  # no price

        def removing_takes_no_clicks() -> bool:
            from selenium.webdriver.common.by import By

            buttons = card(driver, "old").find_elements(By.CSS_SELECTOR, ".actions button")
            return not any(b.is_enabled() for b in buttons)

        assert await asyncio.to_thread(removing_takes_no_clicks)

        await asyncio.to_thread(desktop_and_phone, driver, tmp_path)

        # The drain ends with old's stream: its card goes.
        await old.cancel()
        await page(lambda: card_text(driver, "old") == "", "old gone")
        for stream in streams:
            await stream.cancel()
        assert not await asyncio.to_thread(script_errors, driver)


def follower_snapshot(ha: dict[str, Any] | None) -> dict[str, Any]:
    """One model as a follower replica shows it: its own numbers and the cluster's."""
    model = copy.deepcopy(SLEEPY_SNAPSHOT["models"][1])  # type: ignore[index]
    model.update(name="m", state="ready", cluster={"in_flight": 5, "queued": 2})
    return {
        "models": [model],
        "pools": [],
        "wake_durations": {"bounds": [], "models": {}},
        "ha": ha,
    }


@pytest.mark.parametrize(
    ("ha", "header"),
    [
        (
            {"identity": "r2", "role": "follower", "leader": "r1"},
            "replica r2 · follower (leader: r1)",
        ),
        ({"identity": "r1", "role": "leader", "leader": "r1"}, "replica r1 · leader"),
        (
            {"identity": "r3", "role": "follower", "leader": None},
            "replica r3 · follower (leader: none yet)",
        ),
        ({"identity": "<b>r4</b>", "started": False}, "replica <b>r4</b> · joining"),
    ],
)
async def test_the_header_names_this_replica_and_its_leader_with_several_replicas(
    chrome: Callable[[], Driver], ha: dict[str, Any], header: str
) -> None:
    # The election is tested in tests/test_ha_*.py; here the page and its stream are real
    # and the snapshot is scripted in the shape activator.ui.summary gives it.
    data = follower_snapshot(ha)
    async with scripted_page(lambda: data) as url:

        def browse() -> None:
            from selenium.webdriver.common.by import By

            driver = chrome()
            driver.get(url)
            wait_state(driver, "m", "ready")
            replica = driver.find_element(By.ID, "replica")
            assert replica.text == header  # as text: markup in a name stays text
            assert "all replicas\n5 in flight · 2 held" in card(driver, "m").text
            data["ha"] = None  # HA off (or the snapshot of a single activator): no line
            wait_until(driver, lambda: not replica.is_displayed(), "no replica line")
            assert not script_errors(driver)

        await asyncio.to_thread(browse)


# ----- the first paint, the notice's end, the layout ----------------------------------------


@asynccontextmanager
async def page_with_a_silent_stream(
    snapshot: Callable[[], dict[str, Any]],
) -> AsyncIterator[tuple[str, asyncio.Event]]:
    """The real page with `snapshot()` as its data, but an event stream that opens and
    never sends a byte: what the page shows came with the page. Yields the page's URL
    and an event set once the page has asked for its stream."""
    asked = asyncio.Event()
    done = asyncio.Event()

    @web.middleware
    async def silent_stream(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != EVENTS_PATH:
            return await handler(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        asked.set()
        await done.wait()  # until the test ends (or the page goes: the handler is cancelled)
        return response

    streams = EventStreams(snapshot)
    app = web.Application(middlewares=[silent_stream])
    app.router.add_routes(open_ui_routes(streams))
    async with TestServer(app, host="127.0.0.1") as server:
        try:
            yield str(server.make_url("/ui")), asked
        finally:
            done.set()


async def test_the_page_shows_its_data_before_any_live_update(
    chrome: Callable[[], Driver],
) -> None:
    async with page_with_a_silent_stream(lambda: SLEEPY_SNAPSHOT) as (url, asked):
        loop = asyncio.get_running_loop()

        def browse() -> None:
            from selenium.webdriver.common.by import By

            driver = chrome()
            driver.get(url)
            wait_state(driver, "big", "sleeping")
            assert shown_state(driver, "lost") == "unknown"
            assert "GPUs in use: 0 of 1" in driver.find_element(By.CSS_SELECTOR, "[data-pool]").text
            assert driver.find_element(By.ID, "wakes").text == "No wake yet."
            # The page did open its stream; nothing ever comes on it.
            in_loop(loop, asked.wait()).result(WAIT_S)
            assert not script_errors(driver)

        await asyncio.to_thread(browse)


async def test_the_waking_notice_goes_once_the_model_is_ready(
    activator: ActivatorFactory, chrome: Callable[[], Driver], tmp_path: Path
) -> None:
    gate = tmp_path / "m.gate"
    running = await activator({"models": {"m": gated_model(unique("ui-notice"), gate)}})

    def browse() -> None:
        driver = chrome()
        driver.get(running.url + "/ui")
        wait_state(driver, "m", "stopped")
        click(driver, "m", "wake")
        wait_state(driver, "m", "starting")  # held there until the gate opens
        wait_until(driver, lambda: notice_text(driver) == "Waking m.", "the waking notice")
        gate.touch()
        wait_state(driver, "m", "ready")
        wait_until(driver, lambda: notice_text(driver) == "", "the notice gone once ready")
        assert not script_errors(driver)

    await asyncio.to_thread(browse)


def span_of(driver: Driver, selector: str) -> float:
    """How much of the page's width the elements matching `selector` cover together."""
    covered: float = driver.execute_script(
        """
        const found = [...document.querySelectorAll(arguments[0])];
        const rects = found.map((e) => e.getBoundingClientRect());
        const left = Math.min(...rects.map((r) => r.left));
        const right = Math.max(...rects.map((r) => r.right));
        return (right - left) / document.documentElement.clientWidth;
        """,
        selector,
    )
    return covered


async def test_cards_span_a_desktop_window_and_a_phone_never_scrolls_sideways(
    chrome: Callable[[], Driver], tmp_path: Path
) -> None:
    # Two model cards and one pool card: fewer cards than a 1280 px row has room for.
    async with scripted_page(lambda: SLEEPY_SNAPSHOT) as url:

        def browse() -> None:
            driver = chrome()
            driver.get(url)
            wait_state(driver, "big", "sleeping")
            assert driver.execute_script("return window.innerWidth") == DESKTOP[0]
            for cards in ("#models > .card", "#pools > .card"):
                covered = span_of(driver, cards)
                assert covered > 0.9, f"{cards} cover {covered:.0%} of a {DESKTOP[0]} px window"
            desktop_and_phone(driver, tmp_path)  # no sideways scroll on a phone
            assert not script_errors(driver)

        await asyncio.to_thread(browse)
