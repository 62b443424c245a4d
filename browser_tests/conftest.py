"""Fixtures for the browser tests: a JupyterLab server on loopback and headless Chromium driven by Playwright.

These tests live outside tests/ and notebooks/ so that ``make test`` never collects them: they need a
browser and take minutes. ``make browser-test`` runs them.

The server is isolated: its own settings, workspace, config, data and runtime folders in a temporary
directory, quick mode on, and the run log in that directory, so a browser run leaves no trace in the
user's JupyterLab or run log. Autosave is off, so the notebooks in notebooks/ are never rewritten with
the outputs of this run, and the checkpoints JupyterLab makes on opening a notebook go to the temporary
directory too.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SCREENSHOTS = ROOT / "build" / "browser"
SERVER_START_TIMEOUT_S = 120

# JupyterLab settings for the test server. Autosave off: the notebooks must stay as they are on disk.
# Windowing off: every cell is in the page, so a cell far down can be found and scrolled to.
# No news or update checks: nothing reaches for the network, no pop-up covers the notebook.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}


def chromium_path() -> str:
    """The system Chromium (Debian package ``chromium``); Playwright's own browser download is not used."""
    path = os.environ.get("PEFT_LAB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("No Chromium found: install it (Debian: apt-get install -y chromium) or set "
                    "PEFT_LAB_CHROMIUM to its path.", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {proc.returncode} while starting; its log:\n"
                               + log.read_text(errors="replace")[-4000:])
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"JupyterLab did not answer {url} within {SERVER_START_TIMEOUT_S} s; its log:\n"
                       + log.read_text(errors="replace")[-4000:])


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """A running JupyterLab on notebooks/: yields ``(base_url, token, log_path)``."""
    tmp = tmp_path_factory.mktemp("lab")
    settings = tmp / "settings"
    for name, values in LAB_SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    for sub in ("workspaces", "config", "data", "runtime"):
        (tmp / sub).mkdir()
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "PEFT_LAB_QUICK": "1", "PEFT_LAB_RUNLOG": str(tmp / "runs.jsonl"),
           "HF_HUB_OFFLINE": "1", "JUPYTER_CONFIG_DIR": str(tmp / "config"),
           "JUPYTER_DATA_DIR": str(tmp / "data"), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime")}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={NOTEBOOKS}", f"--LabApp.user_settings_dir={settings}",
           f"--LabApp.workspaces_dir={tmp / 'workspaces'}", "--LabApp.news_url=",
           # JupyterLab makes a checkpoint of each notebook it opens: keep them out of notebooks/
           f"--FileCheckpoints.root_dir={tmp / 'checkpoints'}",
           # the test reads the notebook model (to find the panel cell, to wait for cells) via window.jupyterapp
           "--LabApp.expose_app_in_browser=True"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")  # JupyterLab refuses root otherwise (containers, CI)
    log = tmp / "jupyterlab.log"
    print(f"\n[browser] starting JupyterLab on 127.0.0.1:{port} (log: {log})", flush=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=NOTEBOOKS, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for_server(f"{base}/api/status?token={token}", proc, log)
        yield base, token, log
    finally:
        # its own process group: the kernels it started go with it
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium's sandbox cannot run as root
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), headless=True, args=args)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
