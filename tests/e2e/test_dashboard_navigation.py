"""The dashboard page in headless Chromium: a poll that was on its way when the page went to
another device (or window) must not draw what it brings, and the page's own requests carry
what a device's data puts in them intact. The endpoint and its data are
tests/e2e/test_dashboard.py's (``cloud``: DEVICE sent telemetry and alerts, IDLE sent nothing)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent.wire.batch import WireRecord
from agent.wire.records import TelemetryBody
from tests.e2e.test_dashboard import DEVICE, IDLE, browser_paths, cloud, fleet_page

__all__ = ["cloud"]  # the fixture

#: Holds the page's fetch of DEVICE's series until ``window.release()``; ``window.settled`` is
#: true once every fetch of DEVICE the page made has been read and the page's code after it ran
#: (a macrotask after the last one: the page's continuations are microtasks).
HOLD = """
const real = window.fetch.bind(window);
let pending = 0;
window.settled = false;
window.held = false;
let release;
const gate = new Promise((r) => { release = r; });
window.release = release;
window.fetch = async (path, opts) => {
  const mine = String(path).startsWith("/api/devices/%(device)s");
  if (!mine) return real(path, opts);
  pending++;
  if (String(path).startsWith("/api/devices/%(device)s/series")) { window.held = true; await gate; }
  const response = await real(path, opts);
  const json = response.json.bind(response);
  response.json = async () => {
    const out = await json();
    pending--;
    setTimeout(() => { if (pending === 0) window.settled = true; }, 0);
    return out;
  };
  return response;
};
"""


def drive(url: str) -> dict[str, Any]:
    """Open DEVICE's view with its series held, go to IDLE's, let DEVICE's poll end; return what
    the page shows (run in a thread)."""
    with fleet_page(url, "return document.querySelectorAll('.card').length") as (browser, wait):
        browser.execute_script(HOLD % {"device": DEVICE})
        browser.execute_script(f"location.hash = '#/device/{DEVICE}?window=900'")
        wait.until(lambda b: b.execute_script("return window.held"))
        browser.execute_script(f"location.hash = '#/device/{IDLE}?window=900'")
        wait.until(
            lambda b: b.execute_script(
                "const d = window.dashboard; return d.state.device === arguments[0] && "
                "d.state.polls >= 1 && document.querySelector('#device-head .title span') "
                "!== null && document.querySelector('#device-head .title span').textContent "
                "=== arguments[0]",
                IDLE,
            )
        )
        browser.execute_script("window.release()")
        wait.until(lambda b: b.execute_script("return window.settled"))
        return browser.execute_script(
            "return {head: document.querySelector('#device-head .title span').textContent,"
            " crumbs: document.getElementById('crumbs').textContent,"
            " sensors: [...document.querySelectorAll('#telemetry .sensor')]"
            ".map((b) => b.dataset.sensor),"
            " alerts: document.querySelectorAll('#alerts tbody tr').length,"
            " charts: [...window.dashboard.charts.keys()]}"
        )


@pytest.mark.timeout(180)
async def test_a_poll_of_the_device_left_does_not_draw_over_the_device_shown(cloud: Any) -> None:
    """Was: the device view's poll drew what it fetched whichever device the page showed by
    then, so a slow answer for the device left (a long window, a slow link) put its head,
    telemetry charts and alerts under the name of the device opened after it, until the next
    poll. Now a poll whose device or window is no longer the page's draws nothing."""
    server, _ = cloud
    browser_paths()  # fails (not skips) with what to install
    assert server.dashboard is not None
    seen = await asyncio.to_thread(drive, server.dashboard.url)
    assert seen["crumbs"] == f"fleet / {IDLE}"
    assert seen["head"] == IDLE  # was DEVICE
    assert seen["sensors"] == [] and seen["alerts"] == 0  # IDLE sent nothing
    assert not [name for name in seen["charts"] if name.startswith("telemetry:")]


def open_device(url: str, device: str) -> dict[str, Any]:
    """Open ``device``'s view; return the status once its first poll ended (run in a thread)."""
    with fleet_page(url, "return document.querySelectorAll('.card').length") as (browser, wait):
        browser.execute_script(f"location.hash = '#/device/{device}?window=900'")
        wait.until(
            lambda b: b.execute_script(
                "const s = document.getElementById('status').className;"
                "return window.dashboard.state.polls >= 1 || s.includes('error')"
            )
        )
        return browser.execute_script(
            "return {status: document.getElementById('status').className,"
            " text: document.getElementById('status').textContent}"
        )


@pytest.mark.timeout(180)
async def test_a_device_whose_newest_reading_is_far_off_in_time_still_shows(cloud: Any) -> None:
    """A device's clock far off: its newest reading at -1e21 (a body time the endpoint stores,
    any finite number). The window then ends at that reading, and the page sent it as the alerts'
    and link's ``until`` unencoded: JavaScript writes it -1e+21, the query's + is a space, and
    the endpoint answered 400 at every poll (the device's view showed an error and nothing
    else). Now the page encodes it."""
    server, times = cloud
    browser_paths()  # fails (not skips) with what to install
    assert server.dashboard is not None
    reading = TelemetryBody("motor", -1e21, {"current_a": 1.5})
    record = WireRecord(0, "telemetry", times["now"], reading.to_cbor())
    await server.db(lambda s: s.ingest(IDLE, [record], times["now"]))
    seen = await asyncio.to_thread(open_device, server.dashboard.url, IDLE)
    assert seen["status"] == "status live", seen["text"]
