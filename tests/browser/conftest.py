"""Headless Chromium for browser tests: installed on demand, started offline, fresh per test.

The browser tests drive the real ``tagrelay.js`` in Debian's ``chromium`` with its matching
``chromium-driver`` through selenium. When either binary is missing, the session installs
both with apt (as root) or fails saying what to install. Chromium runs with background
networking, component updates and sync off: the tests use only loopback servers, and the
machines they run on may have no internet at all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
APT_PACKAGES = ("chromium", "chromium-driver")


def _install_chromium() -> str | None:
    """Install Chromium and its driver with apt; None on success, else why it failed."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available on this machine"
    if os.geteuid() != 0:
        return "installing needs root (apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES],
    ):
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=900, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`{' '.join(command)}` failed: {exc}"
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
            return f"`{' '.join(command)}` exited with {done.returncode}:\n{tail}"
    return None


@pytest.fixture(scope="session")
def chromium() -> tuple[Path, Path]:
    """Paths of Chromium and chromedriver, installing both when either is missing."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        problem = _install_chromium()
        if problem or not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
            pytest.fail(
                "the browser tests need headless Chromium: install the Debian packages "
                f"{' and '.join(APT_PACKAGES)} (/usr/bin/chromium, /usr/bin/chromedriver). "
                f"Automatic install failed: {problem or 'the binaries are still missing'}",
                pytrace=False,
            )
    try:
        import selenium  # noqa: F401  # only to fail with a clear message
    except ImportError:
        pytest.fail("the browser tests need selenium: pip install selenium", pytrace=False)
    return CHROMIUM, CHROMEDRIVER


@pytest.fixture
def browser(chromium: tuple[Path, Path], tmp_path: Path) -> Iterator[WebDriver]:
    """A headless Chromium with a fresh profile, driven by selenium; quit at teardown."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = str(binary)
    for flag in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespaces for the sandbox
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    # An explicit driver path keeps Selenium Manager (which downloads drivers) out of it.
    service = Service(executable_path=str(driver_path), log_output=str(tmp_path / "driver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
