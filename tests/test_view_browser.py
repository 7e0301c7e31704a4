"""The viewer page in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright.

The page must load with no console error and no network request, a click on a token must list its
neurons and a click on a neuron must open its page, with numbers that equal the model's (computed
here from one pass through `run_with_cache`). Skipped, with the reason, where there is no browser
or no Playwright (`pip install -e .[view-test]`, `apt-get install chromium`); under CI=true a
missing browser fails instead, so CI can never pass them by skipping.
Set BDH_VIEW_SHOTS=DIR to keep the screenshots of the views.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bdh.interpret.view import CHROMIUM_ARGS, find_chromium, view
from bdh.tokenizer import ByteTokenizer
from test_interpret_hooks import trained_model

TEXT = "the king and the lord of the night; the crown of the sweet king. " * 3


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI must run the browser tests (.ci/run installs chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright is not installed (pip install -e .[view-test])")
    executable = find_chromium()
    if executable is None:
        _missing("no Chromium found (apt-get install chromium, or set BDH_CHROMIUM)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=executable,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1300, "height": 900},
        )
        yield context
        context.close()


@pytest.fixture(scope="module")
def model():
    return trained_model()


@pytest.fixture(scope="module")
def page_file(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("view") / "report.html"
    view(model, ByteTokenizer(), TEXT, title="test page").save(path)
    return path


@pytest.fixture(scope="module")
def reference(model):
    """One pass over the passage: what the page must show."""
    ids = torch.from_numpy(ByteTokenizer().encode(TEXT).astype(np.int64))[None]
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    return cache


@pytest.fixture(scope="module")
def opened(browser, page_file):
    """The page, opened once; the console messages and the requests it made."""
    page = browser.new_page()
    log: dict[str, list] = {"console": [], "errors": [], "requests": []}
    page.on("console", lambda m: log["console"].append((m.type, m.text)))
    page.on("pageerror", lambda e: log["errors"].append(str(e)))
    page.on("request", lambda r: log["requests"].append(r.url))
    page.goto(page_file.as_uri(), wait_until="load")
    yield page, log
    page.close()


def neurons(t: torch.Tensor) -> torch.Tensor:
    return t[0].transpose(0, 1).flatten(1)  # (T, n), head-major


def test_loads_with_no_console_error_and_no_request(opened, page_file):
    page, log = opened
    page.click('.tok[data-t="3"]')  # the views' code runs too before the logs are read
    page.click("#token-panel .neuron >> nth=0")
    for tab in ("sparsity", "synapses", "tokens"):
        page.click(f'.tab[data-view="{tab}"]')
    assert log["errors"] == []
    assert [m for m in log["console"] if m[0] in ("error", "warning")] == []
    assert log["requests"] == [page_file.as_uri()]  # the document itself, nothing else


def test_clicking_a_token_lists_its_neurons(opened, reference, model):
    page, _ = opened
    k = 10
    page.click('.tab[data-view="tokens"]')
    page.click(f'.tok[data-t="{k}"]')
    assert page.locator(".tok.selected").get_attribute("data-t") == str(k)
    for l in range(model.config.n_layer):
        table = page.locator(f'#token-panel table.token-neurons[data-layer="{l}"]')
        cells = table.evaluate(
            "t => [...t.rows].slice(1).map(r => [r.cells[0].innerText, r.cells[4].innerText])"
        )
        for column, path in enumerate("xy"):
            a = neurons(reference[path, l])[k]
            top = a.topk(8)
            want = top.indices[top.values > 0].tolist()
            got = [int(row[column].split()[0]) for row in cells if row[column]]
            assert got == want, (l, path)
        header = page.locator("#token-panel h3").nth(l).inner_text()
        x, y = neurons(reference["x", l])[k], neurons(reference["y", l])[k]
        assert f"{int((x > 0).sum())} x and {int((y > 0).sum())} y active" in header


def test_clicking_a_neuron_opens_its_page(opened, reference, model):
    page, _ = opened
    page.click('.tok[data-t="10"]')
    link = page.locator("#token-panel span.neuron").first
    i = int(link.get_attribute("data-neuron"))
    link.click()
    assert f"Neuron {i} " in page.locator("#neuron-title").inner_text()
    T = reference["x", 0].shape[2]
    rows = page.locator("#neuron-rates tr").all_inner_texts()[1:]
    assert len(rows) == model.config.n_layer
    for l, row in enumerate(rows):
        layer, rate_x, rate_y = row.split("\t")
        assert int(layer) == l
        want_x = float((neurons(reference["x", l])[:, i] > 0).sum()) / T
        want_y = float((neurons(reference["y", l])[:, i] > 0).sum()) / T
        assert float(rate_x) == pytest.approx(want_x, rel=2e-3, abs=1e-9)
        assert float(rate_y) == pytest.approx(want_y, rel=2e-3, abs=1e-9)
    # how inhibitory its G_x out-edges look: the negative share of their weight
    E, Dx = model.decoder.detach().double(), model.encoder.detach().double()
    g = torch.cat([E[i] @ Dx[a] for a in range(Dx.shape[0])])
    share = float(g.clamp(max=0).abs().sum() / g.abs().sum())
    cell = page.locator("#neuron-inhibition tr").nth(1).locator("td").nth(1).inner_text()
    assert float(cell) == pytest.approx(share, rel=2e-3)
    # its logit effect: the token its decoder row through lm_head promotes most
    effect = (model.decoder[i] @ model.lm_head).detach()
    top_token = bytes([int(effect.argmax())]).decode("utf-8", errors="backslashreplace")
    first = page.locator("#neuron-logits tr").nth(1).locator("td").first.inner_text()
    assert first == json.dumps(top_token)


def test_screenshots_are_not_blank(opened, tmp_path):
    image = pytest.importorskip("PIL.Image", reason="Pillow reads the screenshots")
    page, _ = opened
    keep = os.environ.get("BDH_VIEW_SHOTS")
    for tab in ("tokens", "sparsity", "synapses"):
        page.click(f'.tab[data-view="{tab}"]')
        path = tmp_path / f"view-{tab}.png"
        page.screenshot(path=str(path))
        pixels = np.asarray(image.open(path).convert("RGB"), dtype=np.int64)
        packed = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
        assert len(np.unique(packed)) > 20 and pixels.std() > 10, tab
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(keep) / path.name)
