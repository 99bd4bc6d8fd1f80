"""The quickstart notebook as a person uses it: JupyterLab in headless Chromium, driven by Playwright.

Runs every cell, checks that the RegionPicker canvas shows the picture, adds an object and draws a stroke
with the mouse, asks the kernel for the new mask, drags the AttentionExplorer's layer slider and checks that
the figure and its readout changed. Screenshots go to the test's tmp_path and to runs/browser/.

Notable:
- Debian's chromium is installed by the test when /usr/bin/chromium is missing (as root, with apt);
  Playwright's own browser download is never used.
- JupyterLab runs on 127.0.0.1 at a free port with a random token and temporary config, data, runtime,
  settings and workspace folders (news, update checks, the PyPI extension manager and cell windowing off),
  serving a copy of the notebook. `expose_app_in_browser` hands the test JupyterLab's command registry (run
  all, insert and run a cell), as JupyterLab's own UI tests do. The server and its kernel are shut down in
  the fixture, always.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, sync_playwright

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "00_quickstart.ipynb"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update"]
SETTINGS = {  # JupyterLab user settings for the test's temporary settings folder
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}
RUN_ALL_SECONDS = 240

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]


def ensure_chromium() -> None:
    """Install Debian's chromium when it is missing (CI machines start without it)."""
    if Path(CHROMIUM).exists():
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.fail(f"{CHROMIUM} is missing and cannot be installed here: run `apt-get install -y chromium` as root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode:
            pytest.fail(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def jupyterlab(tmp_path):
    """(base url, token, folder) of a JupyterLab serving a copy of the quickstart; shut down afterwards."""
    work, state = tmp_path / "work", tmp_path / "jupyter"
    work.mkdir()
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    for name, values in SETTINGS.items():
        path = state / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, HF_HUB_OFFLINE="1", JUPYTER_CONFIG_DIR=str(state / "config"),
               JUPYTER_DATA_DIR=str(state / "data"), JUPYTER_RUNTIME_DIR=str(state / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(state / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(state / "workspaces"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={work}", "--LabApp.expose_app_in_browser=True",
         "--LabApp.extension_manager=readonly", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(server, url, token, tmp_path / "jupyterlab.log")
        yield url, token, work
    finally:
        shutdown(server, url, token)
        log.close()


def wait_for_server(server: subprocess.Popen, url: str, token: str, log: Path, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(urllib.request.Request(f"{url}/api/status", headers=_auth(token)), timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer within {seconds} s:\n{log.read_text()[-3000:]}")


def shutdown(server: subprocess.Popen, url: str, token: str) -> None:
    """Ask the server to stop (it shuts its kernels down), then make sure the process is gone."""
    try:
        request = urllib.request.Request(f"{url}/api/shutdown", method="POST", headers=_auth(token))
        urllib.request.urlopen(request, timeout=10)
    except OSError:
        pass
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _auth(token: str) -> dict:
    return {"Authorization": f"token {token}"}


# JavaScript run in the page, against JupyterLab's application object.
PANEL = "window.jupyterapp.shell.currentWidget"
KERNEL_IDLE = f"""() => {{
    const panel = window.jupyterapp && {PANEL};
    const kernel = panel && panel.sessionContext && panel.sessionContext.session && panel.sessionContext.session.kernel;
    return Boolean(kernel && kernel.status === 'idle');
}}"""
NOTEBOOK_STATE = f"""() => {{
    const panel = {PANEL};
    const kernel = panel.sessionContext.session.kernel;
    const cells = panel.content.widgets.filter(cell => cell.model.type === 'code');
    const errors = cells.flatMap(cell => cell.model.outputs.toJSON().filter(o => o.output_type === 'error'))
                        .map(o => o.ename + ': ' + o.evalue + '\\n' + o.traceback.join('\\n'));
    return {{idle: kernel.status === 'idle', done: cells.every(cell => cell.model.executionCount !== null),
             errors}};
}}"""
RUN_NEW_CELL = f"""async (code) => {{
    const app = window.jupyterapp, notebook = {PANEL}.content;
    notebook.activeCellIndex = notebook.widgets.length - 1;
    await app.commands.execute('notebook:insert-cell-below');
    notebook.activeCell.model.sharedModel.setSource(code);
    await app.commands.execute('notebook:run-cell');
}}"""
LAST_CELL_TEXT = f"""() => {{
    const cells = {PANEL}.content.widgets;
    return cells[cells.length - 1].model.outputs.toJSON()
        .map(o => o.text || (o.data && o.data['text/plain']) || (o.evalue || '')).join('');
}}"""


def run_all_cells(page: Page, seconds: float = RUN_ALL_SECONDS) -> None:
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = page.evaluate(NOTEBOOK_STATE)
        if state["errors"]:
            pytest.fail("a notebook cell failed:\n" + "\n".join(state["errors"])[-4000:])
        if state["done"] and state["idle"]:
            return
        time.sleep(1)
    pytest.fail(f"the notebook did not finish within {seconds} s")


def run_in_kernel(page: Page, code: str, marker: str, seconds: float = 60) -> str:
    """Run `code` in a new last cell and return its output once it contains `marker`."""
    page.evaluate(RUN_NEW_CELL, code)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = page.evaluate(LAST_CELL_TEXT)
        if marker in text:
            return text
        time.sleep(0.5)
    pytest.fail(f"no {marker!r} in the new cell's output within {seconds} s: {page.evaluate(LAST_CELL_TEXT)!r}")


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)


def test_quickstart_in_jupyterlab(jupyterlab, tmp_path):
    ensure_chromium()
    url, token, _ = jupyterlab
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(f"{url}/lab/tree/{NOTEBOOK.name}?token={token}")
            page.wait_for_function(KERNEL_IDLE, timeout=120_000, polling=500)
            run_all_cells(page)
            page.screenshot(path=shots / "notebook.png")
            check_region_picker(page, shots)
            check_attention_explorer(page, shots)
            output = run_in_kernel(
                page, 'print("CHECK", len(picker.objects), int(picker.masks["<object2>"].sum()), explorer.view.layer)',
                "CHECK")
            objects, drawn, layer = (int(v) for v in output.split("CHECK")[1].split()[:3])
            assert objects == 3 and drawn > 0, f"the stroke made no mask in the kernel: {output!r}"
            shown = page.locator(".pixelrefer-attention-explorer .pixelrefer-readout").inner_text()
            assert shown.startswith(f"layer {layer} of") and layer != 0, (shown, layer)
        finally:
            browser.close()
    keep = REPO / "runs" / "browser"
    keep.mkdir(parents=True, exist_ok=True)
    for shot in shots.iterdir():
        shutil.copy(shot, keep / shot.name)


def check_region_picker(page: Page, shots: Path) -> None:
    """The canvas shows the picture; "+ object" then a mouse stroke makes a non-empty third object."""
    picker = page.locator(".pixelrefer-region-picker")
    canvas = picker.locator("canvas").last
    canvas.scroll_into_view_if_needed()
    page.wait_for_timeout(500)  # let the canvas receive its first frame
    before = canvas.screenshot(path=shots / "picker_before.png")
    shown = pixels(before)
    assert shown.std() > 20 and len(np.unique(shown.reshape(-1, 3), axis=0)) > 20, "the canvas shows no picture"
    status = picker.locator(".widget-html").last
    picker.locator("button", has_text="+ object").click()
    status.filter(has_text="<object2>: 0 px").wait_for(timeout=30_000)
    box = canvas.bounding_box()
    start_x, y = box["x"] + 0.08 * box["width"], box["y"] + 0.9 * box["height"]
    page.mouse.move(start_x, y)
    page.mouse.down()
    page.mouse.move(start_x + 0.3 * box["width"], y - 0.05 * box["height"], steps=15)
    page.mouse.up()
    deadline = time.monotonic() + 30
    while "<object2>: 0 px" in status.inner_text() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert "<object2>: 0 px" not in status.inner_text(), "the stroke did not reach the kernel"
    page.wait_for_timeout(500)
    after = canvas.screenshot(path=shots / "picker_after_stroke.png")
    assert np.abs(pixels(after) - shown).mean() > 0.5, "the stroke is not drawn on the canvas"
    picker.screenshot(path=shots / "picker.png")


def check_attention_explorer(page: Page, shots: Path) -> None:
    """Dragging the layer slider to its end shows another layer's figure and readout."""
    explorer = page.locator(".pixelrefer-attention-explorer")
    explorer.scroll_into_view_if_needed()
    figure, readout = explorer.locator("img"), explorer.locator(".pixelrefer-readout")
    readout.wait_for(timeout=30_000)
    first_text, first_src = readout.inner_text(), figure.get_attribute("src")
    assert first_text.startswith("layer 0 of")
    before = explorer.screenshot(path=shots / "explorer_layer_first.png")
    handle, track = explorer.locator(".noUi-handle"), explorer.locator(".noUi-base")
    grip, rail = handle.bounding_box(), track.bounding_box()
    page.mouse.move(grip["x"] + grip["width"] / 2, grip["y"] + grip["height"] / 2)
    page.mouse.down()
    page.mouse.move(rail["x"] + rail["width"] + 20, grip["y"] + grip["height"] / 2, steps=10)
    page.mouse.up()
    deadline = time.monotonic() + 30
    while readout.inner_text() == first_text and time.monotonic() < deadline:
        time.sleep(0.3)
    assert readout.inner_text() != first_text, "moving the slider did not update the readout"
    page.wait_for_function("([img, src]) => img.src !== src && img.complete",
                           arg=[figure.element_handle(), first_src], timeout=30_000)
    after = explorer.screenshot(path=shots / "explorer_layer_last.png")
    assert not readout.inner_text().startswith("layer 0 of")
    first, last = pixels(before), pixels(after)
    height, width = min(first.shape[0], last.shape[0]), min(first.shape[1], last.shape[1])
    assert np.abs(first[:height, :width] - last[:height, :width]).mean() > 0.5, "the figure did not change"
    explorer.locator("select").select_option(label="head 1")
    readout.filter(has_text="head 1").wait_for(timeout=30_000)
    explorer.screenshot(path=shots / "explorer_head_1.png")
    viewer = page.locator(".pixelrefer-similarity-viewer")
    viewer.scroll_into_view_if_needed()
    viewer.locator("img").wait_for(timeout=30_000)
    viewer.screenshot(path=shots / "similarity_viewer.png")
