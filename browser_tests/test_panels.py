"""The experiment panels (peft_lab/widgets.py) in a real browser: JupyterLab in headless Chromium.

The unit tests drive a panel from Python (``panel.run_button.click()``); they cannot see whether the
widgets render in JupyterLab, whether a slider moved in the page reaches the kernel, or whether the live
loss plot and the comparison table arrive in the page. This test does what a learner does: it opens
each notebook that has a panel, runs the cells up to and including the panel (quick mode), sets a
control, clicks Run and reads the page. A screenshot of each panel goes to build/browser/.

Cells are found by their source (the cell that builds the panel), never by index: the notebooks change.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

# A code cell that builds a panel: ``panel = widgets.lora_panel(base, tok, ...)``.
PANEL_CALL = r"widgets\.(\w+_panel)\("
PANEL_ASSIGNMENT = r"(\w+)\s*=\s*widgets\.\w+_panel\("  # the panel's variable, to ask the kernel about its runs

# For each panel: the slider to set (its description in widgets.py), a value other than its default, and
# what the run's row in the comparison table then shows (the panel's label for the run, see PANELS there).
# A row naming the value proves that a slider moved in the page reached the kernel.
CONTROLS = {
    "freezing_panel": ("N blocks", 1, "last {}"),
    "lora_panel": ("rank r", 2, "r={}"),
    "prefix_panel": ("prefix P", 4, "P={}"),
    "prompt_panel": ("prompt P", 4, "P={}"),
}
PANEL_STEPS = 2  # training steps per panel run: the test checks the plumbing, not the learning

# Which panel notebooks to open: "all", or notebook number prefixes ("02 03"). Each costs its cells up to the
# panel (measured on a 2-core CPU: 01 3.6 min, 02 4.5, 03 2.0, 04 3.9), and CI has about 10 minutes for
# this test. The default, LoRA (02) and prefix (03), between them render every kind of control any panel has
# (int, float and log sliders, multiple selection, checkbox, dropdown, text); 01 and 04 build the same
# ExperimentPanel from a subset of these. PEFT_LAB_BROWSER_NOTEBOOKS=all opens all four.
DEFAULT_SELECTION = "02 03"

OPEN_TIMEOUT_MS = 120_000  # JupyterLab page and kernel ready
RUN_ABOVE_TIMEOUT_S = 480  # the notebook's cells up to the panel, quick mode (2-4.5 min measured, 2-core CPU)
PANEL_RUN_TIMEOUT_MS = 180_000  # one panel run: 2 steps, then accuracy and forgetting measured


def panel_notebooks() -> list[tuple[str, str, str]]:
    """(notebook file name, panel function, variable) for every notebook with a cell that builds a panel."""
    found = []
    for path in sorted(NOTEBOOKS.glob("[0-9]*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        for cell in cells:
            match = re.search(PANEL_CALL, "".join(cell["source"])) if cell["cell_type"] == "code" else None
            if match:
                assigned = re.search(PANEL_ASSIGNMENT, "".join(cell["source"]))
                found.append((path.name, match.group(1), assigned.group(1) if assigned else "panel"))
                break
    return found


ALL_PANEL_NOTEBOOKS = panel_notebooks()
SELECTION = os.environ.get("PEFT_LAB_BROWSER_NOTEBOOKS", DEFAULT_SELECTION).strip().lower()
PANEL_NOTEBOOKS = [entry for entry in ALL_PANEL_NOTEBOOKS
                   if SELECTION == "all" or entry[0].startswith(tuple(SELECTION.replace(",", " ").split()))]


def test_panel_notebooks_found():
    """Guards the parametrisation below: if the search for panel cells broke, it would test nothing."""
    assert ALL_PANEL_NOTEBOOKS, f"no notebook in {NOTEBOOKS} has a cell matching {PANEL_CALL!r}"
    assert PANEL_NOTEBOOKS, (f"PEFT_LAB_BROWSER_NOTEBOOKS={SELECTION!r} selects none of the panel notebooks "
                             f"{[nb for nb, _, _ in ALL_PANEL_NOTEBOOKS]}")
    unknown = [fn for _, fn, _ in PANEL_NOTEBOOKS if fn not in CONTROLS]
    assert not unknown, f"panels {unknown} have no entry in CONTROLS of {Path(__file__).name}: add which slider to set"


def log(name: str, message: str, start: float) -> None:
    print(f"[browser] {name}: {message} ({time.monotonic() - start:.0f} s)", flush=True)


# JavaScript run in the page through window.jupyterapp (the server exposes it; see conftest.py). Every
# snippet finds the notebook by its path, never as "the current widget": if anything else opens in the
# page (a restored tab), the cells still run, and are read, in this notebook.
NOTEBOOK_JS = """const app = window.jupyterapp;
  const panel = app && Array.from(app.shell.widgets('main')).find(w => w.context && w.context.path === path);"""

KERNEL_READY_JS = """(path) => {
  %s
  const kernel = panel && panel.sessionContext && panel.sessionContext.session && panel.sessionContext.session.kernel;
  return !!(kernel && kernel.status === 'idle' && panel.content && panel.content.model && panel.content.widgets.length);
}""" % NOTEBOOK_JS

# Marks the panel cell for locators, clears every saved output (so nothing stale shows, and an
# "Error displaying widget" can only come from this run), then runs the cells above the panel and the
# panel cell itself. The notebook commands act on the current notebook: this one is made current before
# each. The outcome lands in window.__peftLab.
START_RUN_JS = """([path, pattern]) => {
  %s
  const nb = panel.content;
  const re = new RegExp(pattern);
  let index = -1;
  for (let i = 0; i < nb.model.cells.length; i++) {
    const cell = nb.model.cells.get(i);
    if (cell.type === 'code' && re.test(cell.sharedModel.getSource())) { index = i; break; }
  }
  if (index < 0) return -1;
  nb.widgets[index].node.setAttribute('data-peft-lab-panel', '');
  window.__peftLab = {done: false, ok: null};
  const select = () => { app.shell.activateById(panel.id); nb.deselectAll(); nb.activeCellIndex = index; };
  select();
  app.commands.execute('notebook:clear-all-cell-outputs')
    .then(() => { select(); return app.commands.execute('notebook:run-all-above'); })
    .then(ok => { if (!ok) return false; select(); return app.commands.execute('notebook:run-cell'); })
    .then(ok => { window.__peftLab = {done: true, ok: ok}; },
          err => { window.__peftLab = {done: true, ok: false, error: String(err)}; });
  return index;
}""" % NOTEBOOK_JS

PROGRESS_JS = """([path, index]) => {
  %s
  const nb = panel.content;
  let run = 0;
  for (let i = 0; i <= index; i++) {
    const cell = nb.model.cells.get(i);
    if (cell.type === 'code' && cell.executionCount !== null) run++;
  }
  let code = 0;
  for (let i = 0; i <= index; i++) if (nb.model.cells.get(i).type === 'code') code++;
  return {run, code, panelRan: nb.model.cells.get(index).executionCount !== null,
          done: window.__peftLab.done, ok: window.__peftLab.ok, error: window.__peftLab.error || null};
}""" % NOTEBOOK_JS

ERRORS_JS = """([path, index]) => {
  %s
  const nb = panel.content;
  const errors = [];
  for (let i = 0; i <= index; i++) {
    const cell = nb.model.cells.get(i);
    if (cell.type !== 'code') continue;
    for (let j = 0; j < cell.outputs.length; j++) {
      const out = cell.outputs.get(j).toJSON();
      if (out.output_type === 'error') {
        const first = cell.sharedModel.getSource().split('\\n')[0];
        errors.push(`cell ${i} (${first}): ${out.ename}: ${out.evalue}`);
      }
    }
  }
  return errors;
}""" % NOTEBOOK_JS

# What the panel cell's outputs hold (their MIME types and plain text), for the message when no panel shows.
PANEL_OUTPUTS_JS = """([path, index]) => {
  %s
  const cell = panel.content.model.cells.get(index);
  const outs = [];
  for (let j = 0; j < cell.outputs.length; j++) {
    const out = cell.outputs.get(j).toJSON();
    outs.push(`${out.output_type}: ${Object.keys(out.data || {}).join(', ')} ${JSON.stringify((out.data || {})['text/plain'] || out.text || '').slice(0, 200)}`);
  }
  return {count: cell.executionCount, outputs: outs};
}""" % NOTEBOOK_JS

KERNEL_EXPRESSION_JS = """async ([path, expression]) => {
  %s
  const kernel = panel.sessionContext.session.kernel;
  const reply = await kernel.requestExecute({code: '', silent: true, user_expressions: {value: expression}}).done;
  const value = reply.content.user_expressions.value;
  if (value.status !== 'ok') throw new Error(`${expression}: ${value.ename}: ${value.evalue}`);
  return value.data['text/plain'];
}""" % NOTEBOOK_JS


def run_up_to_panel(page, notebook: str, name: str, start: float) -> int:
    """Run the notebook's cells up to and including the panel cell; returns the panel cell's index."""
    index = page.evaluate(START_RUN_JS, [notebook, PANEL_CALL])
    assert index >= 0, f"{name}: JupyterLab shows no code cell matching {PANEL_CALL!r}"
    deadline = time.monotonic() + RUN_ABOVE_TIMEOUT_S
    last_report = 0.0
    while True:
        state = page.evaluate(PROGRESS_JS, [notebook, index])
        if state["done"]:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"{name}: the cells up to the panel (cell {index}) did not finish within "
                        f"{RUN_ABOVE_TIMEOUT_S} s; {state['run']}/{state['code']} code cells had run", pytrace=False)
        if time.monotonic() - last_report > 20:
            log(name, f"running cells up to the panel: {state['run']}/{state['code']} code cells", start)
            last_report = time.monotonic()
        time.sleep(2)
    errors = page.evaluate(ERRORS_JS, [notebook, index])
    assert not errors, f"{name}: cells failed before the panel could be tested:\n" + "\n".join(errors)
    assert state["ok"], f"{name}: JupyterLab reports the run up to the panel did not complete: {state['error']}"
    assert state["panelRan"], f"{name}: the cells above the panel ran, but the panel cell (cell {index}) did not"
    log(name, f"ran {state['code']} code cells up to the panel (cell {index})", start)
    return index


def set_slider(page, panel, description: str, value: int) -> None:
    """Type ``value`` into the readout of the slider labelled ``description``, as a learner would."""
    slider = panel.locator(".widget-slider", has=page.locator(".widget-label", has_text=re.compile(f"^{re.escape(description)}$")))
    assert slider.count() == 1, f"the panel has {slider.count()} sliders labelled {description!r}, expected 1"
    readout = slider.locator(".widget-readout")
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(str(value))
    page.keyboard.press("Enter")
    from playwright.sync_api import expect

    expect(readout).to_have_text(str(value), timeout=10_000)


def kernel_value(page, notebook: str, expression: str) -> str:
    """``expression`` evaluated in the notebook's kernel (a silent request: no cell, no execution count)."""
    return page.evaluate(KERNEL_EXPRESSION_JS, [notebook, expression])


def click_run_and_wait(page, panel, name: str, start: float, rows_after: int) -> None:
    """Click Run; wait until the status reads done and the comparison table has ``rows_after`` rows."""
    from playwright.sync_api import expect

    panel.locator("button.jupyter-button", has_text=re.compile(r"^\s*Run\s*$")).click()
    status = panel.locator(".widget-html-content", has_text=re.compile(r"done: accuracy|Error:"))
    # the panel shows its own errors in its status line (ExperimentPanel._on_click), so wait for either
    expect(status).to_have_count(1, timeout=PANEL_RUN_TIMEOUT_MS)
    text = status.inner_text()
    assert "done: accuracy" in text, f"{name}: the panel's run failed: {text}"
    expect(panel.locator("table.dataframe tbody tr")).to_have_count(rows_after, timeout=30_000)
    log(name, f"panel run done: {text.strip()}", start)


@pytest.mark.parametrize("notebook,panel_fn,var", PANEL_NOTEBOOKS, ids=[nb for nb, _, _ in PANEL_NOTEBOOKS])
def test_panel_in_browser(lab, browser, screenshots, notebook, panel_fn, var):
    from playwright.sync_api import expect

    base, token, server_log = lab
    name = Path(notebook).stem
    description, value, row_text = CONTROLS[panel_fn]
    start = time.monotonic()
    # tall enough for a whole panel after its run (controls, plot, table, comparison plot) in one screenshot
    page = browser.new_page(viewport={"width": 1400, "height": 2200})
    page_errors = []
    page.on("pageerror", lambda err: page_errors.append(str(err)))
    try:
        # reset: start from an empty workspace, or JupyterLab restores the tabs of the previous notebook's page
        page.goto(f"{base}/lab/tree/{notebook}?token={token}&reset", timeout=OPEN_TIMEOUT_MS)
        page.wait_for_function(KERNEL_READY_JS, arg=notebook, timeout=OPEN_TIMEOUT_MS, polling=500)
        log(name, "notebook open, kernel idle", start)

        index = run_up_to_panel(page, notebook, name, start)
        panel = page.locator("[data-peft-lab-panel] .jp-OutputArea-output .widget-vbox").first
        try:
            expect(panel).to_be_visible(timeout=60_000)
        except AssertionError:
            cell = page.evaluate(PANEL_OUTPUTS_JS, [notebook, index])
            pytest.fail(f"{name}: the panel cell ran (execution count {cell['count']}) but no panel shows in the "
                        f"page; its outputs: {cell['outputs']}; JavaScript errors: {page_errors}", pytrace=False)
        panel.scroll_into_view_if_needed()
        outputs = panel.locator(".widget-output")  # ExperimentPanel: the live plot, then the comparison
        expect(outputs).to_have_count(2)
        live, results = outputs.nth(0), outputs.nth(1)
        rows = results.locator("table.dataframe tbody tr")
        expect(rows).to_have_count(0)  # nothing compared before the first click

        set_slider(page, panel, "steps", PANEL_STEPS)
        set_slider(page, panel, description, value)
        # the table lists the earlier runs the notebook passed in (compare_with) and then this one
        runs_before = int(kernel_value(page, notebook, f"len({var}.runs)"))
        click_run_and_wait(page, panel, name, start, rows_after=runs_before + 1)
        image = live.locator("img")
        expect(image).to_have_count(1)
        assert image.evaluate("img => img.complete && img.naturalWidth > 0"), \
            f"{name}: the live loss plot is an empty image"
        label = rows.last.locator("th").first.inner_text()
        assert row_text.format(value) in label, \
            f"{name}: the new comparison row is {label!r}; after setting {description!r} to {value} it should contain {row_text.format(value)!r}"
        assert kernel_value(page, notebook, f"{var}.runs[-1].config['steps']") == str(PANEL_STEPS), \
            f"{name}: the steps slider was set to {PANEL_STEPS} in the page, the kernel trained another number"
        comparison = results.locator("img")
        expect(comparison).to_have_count(1)  # the comparison plot under the table
        # a large PNG may still be decoding when it is counted: wait for it, or the screenshot catches it half drawn
        assert comparison.evaluate("img => img.decode().then(() => img.naturalWidth > 0)"), \
            f"{name}: the comparison plot is an empty image"

        broken = page.get_by_text("Error displaying widget")
        assert broken.count() == 0, f"{name}: the page shows {broken.count()} x 'Error displaying widget': " \
                                    f"{broken.first.inner_text()}"
        assert not page_errors, f"{name}: JavaScript errors in the page: {page_errors}"
        # a decoded image may still be painted in tiles: wait two frames and a moment, or the screenshot shows it half drawn
        page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
        page.wait_for_timeout(1_000)
        page.locator("[data-peft-lab-panel]").screenshot(path=str(screenshots / f"{name}.png"))
        log(name, f"passed; screenshot {screenshots / (name + '.png')}", start)
    except Exception:
        page.screenshot(path=str(screenshots / f"{name}-failed.png"))
        print(f"[browser] {name}: failed; page screenshot {screenshots / (name + '-failed.png')}, "
              f"server log {server_log}", flush=True)
        raise
    finally:
        # shut the kernel down: each notebook loads its own model, two at once would crowd a small machine
        try:
            page.evaluate("(path) => { %s return panel.sessionContext.shutdown(); }" % NOTEBOOK_JS, notebook)
        except Exception:
            pass
        page.close()
