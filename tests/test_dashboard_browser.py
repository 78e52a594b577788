"""One real-browser test: `finsentinel dashboard` as a server, Debian's Chromium driven by
Playwright signs in, opens the top case, records a review, and the review is in the ledger."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dashboard_seed import PASSWORD, USER, seed

from pipeline.dashboard.auth import hash_password
from pipeline.ledger import Ledger

CHROMIUM = Path("/usr/bin/chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, server: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"finsentinel dashboard exited with {server.returncode}: "
                                 f"{server.stdout.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the dashboard did not listen on port {port} within {timeout} s")


@pytest.fixture
def server(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's Chromium at /usr/bin/chromium (apt-get install chromium; "
                    ".ci/run installs it); Playwright's own browser download is not used")
    pytest.importorskip("playwright.sync_api")
    seeded = seed(f"sqlite:///{tmp_path / 'ledger.sqlite'}", tmp_path / "work")
    port = _free_port()
    env = {**os.environ, "FINSENTINEL_DASHBOARD_USERS": f"{USER}:{hash_password(PASSWORD)}"}
    env.pop("FINSENTINEL_DB", None)
    command = [str(Path(sys.executable).with_name("finsentinel")), "dashboard",
               "--db", seeded["db"], "--port", str(port), "--root", str(seeded["indexes"])]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        _wait_for(port, process)
        yield {**seeded, "url": f"http://127.0.0.1:{port}", "process": process}
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def test_sign_in_open_a_case_and_record_a_review_in_chromium(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    # The command line that started the server shows no credentials (none in this URL either,
    # but the URL travels by environment whatever it holds).
    argv = Path(f"/proc/{server['process'].pid}/cmdline").read_bytes().split(b"\0")
    assert not any(b"sqlite" in a for a in argv)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                    args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1500, "height": 1800})
        page.set_default_timeout(60_000)
        page.goto(server["url"])
        expect(page.get_by_text("Sign in to see alerts")).to_be_visible()
        assert page.get_by_text("nearest neighbours").count() == 0
        page.get_by_role("textbox", name="User").fill(USER)
        page.get_by_role("textbox", name="Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Alerts")).to_be_visible()
        expect(page.get_by_text(f"Signed in as {USER}")).to_be_visible()

        page.get_by_role("button", name="Open case").click()
        expect(page.get_by_role("heading", name="Case", exact=True)).to_be_visible()
        decision_id = page.get_by_role("textbox", name="Decision id").input_value()
        expect(page.get_by_text("Nearest labelled neighbours")).to_be_visible()
        page.get_by_role("textbox", name="Comment").fill("confirmed with the card holder")
        page.get_by_role("button", name="confirmed-fraud").click()
        expect(page.get_by_text(f"confirmed-fraud by {USER}.")).to_be_visible()
        page.get_by_role("heading", name="Case", exact=True).scroll_into_view_if_needed()
        page.wait_for_timeout(1500)  # let the charts finish drawing for the screenshot
        shot = tmp_path / "dashboard-case.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()

    assert shot.stat().st_size > 20_000
    with Ledger(server["db"]) as ledger:
        reviews = ledger.feedback(decision_id=decision_id)
        fraud = ledger.decisions(kind="fraud")
        latest = max(d["subject_time"][:10] for d in fraud)  # the Alerts page's default day
        top = max((d for d in fraud if d["subject_time"].startswith(latest)),
                  key=lambda d: d["score"])
        assert ledger.verify().ok
    assert decision_id == top["decision_id"]
    assert [(r["label"], r["reviewer"], r["comment"]) for r in reviews] == [
        ("confirmed-fraud", USER, "confirmed with the card holder")]
