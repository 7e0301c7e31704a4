"""The viewer page's budget: its size, how fast headless Chromium opens it; a screenshot per view.

    python benchmarks/view_budget.py --ckpt runs/quickstart --data shakespeare
    python benchmarks/view_budget.py --ckpt runs/quickstart \
        --data ../shared/data/tinyshakespeare.txt

Builds the page as `bdh view --ckpt C --data D --tokens 2000` does (the first 2,000 tokens of D's
validation split; neuron statistics over its first --corpus-tokens tokens), then opens it in
Debian's `chromium` through Playwright --rounds times, each in a fresh tab, and reports the median
time to the load event (the page's script has built every view by then: it runs before `load`)
both as the browser measures it (navigation start → loadEventEnd) and as seen from Python (goto).
Screenshots of the views go to benchmarks/results/view/. The budget: < 5 MB, opens in < 2 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bdh.interpret.view import CHROMIUM_ARGS, find_chromium, view_checkpoint
from common import RESULTS, machine_info, machine_line, write_json

BUDGET_BYTES = 5_000_000
BUDGET_SECONDS = 2.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--corpus-tokens", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument(
        "--synapse", action="append", default=[], metavar="L,H,I,J", help="trace σ(i, j)"
    )
    p.add_argument("--chromium", default=find_chromium())
    p.add_argument("--out", default=str(RESULTS / "view"))
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"config: {vars(args)}")
    print(machine_line())
    t0 = time.perf_counter()
    pairs = [tuple(map(int, t.split(","))) for t in args.synapse]
    page_obj = view_checkpoint(
        args.ckpt,
        data=args.data,
        tokens=args.tokens,
        corpus_tokens=args.corpus_tokens,
        synapse_pairs=pairs,
    )
    build = time.perf_counter() - t0
    html = Path(tempfile.mkdtemp()) / "report.html"
    page_obj.save(html)
    size = html.stat().st_size
    print(f"page: {size / 1e6:.2f} MB, built in {build:.1f} s")

    browser_ms, goto_s, requests = [], [], []
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1300, "height": 900},
        )  # fmt: skip
        context.on("request", lambda r: requests.append(r.url))
        for _ in range(args.rounds):
            tab = context.new_page()
            t = time.perf_counter()
            tab.goto(html.as_uri(), wait_until="load")
            goto_s.append(time.perf_counter() - t)
            browser_ms.append(tab.evaluate(
                "performance.getEntriesByType('navigation')[0].loadEventEnd"))  # fmt: skip
            tab.close()
        tab = context.new_page()
        tab.goto(html.as_uri(), wait_until="load")
        tab.click('.tok[data-t="120"]')
        tab.click("#token-panel span.neuron >> nth=0")
        tab.screenshot(path=str(out / "view-tokens.png"), full_page=True)
        for name in ("sparsity", "synapses"):
            tab.click(f'.tab[data-view="{name}"]')
            tab.screenshot(path=str(out / f"view-{name}.png"))
        context.close()
    outside = [u for u in requests if u != html.as_uri()]
    result = {
        "config": vars(args),
        "machine": machine_info(),
        "page_bytes": size,
        "build_seconds": build,
        "load_ms_browser": browser_ms,
        "load_s_goto": goto_s,
        "median_load_ms_browser": statistics.median(browser_ms),
        "median_load_s_goto": statistics.median(goto_s),
        "requests_other_than_the_page": outside,
        "within_budget": size < BUDGET_BYTES and statistics.median(goto_s) < BUDGET_SECONDS,
    }
    path = write_json(out / "view_budget.json", result)
    print(
        f"size {size / 1e6:.2f} MB (budget 5), load median {statistics.median(browser_ms):.0f} ms"
        f" (browser) / {statistics.median(goto_s):.2f} s (goto) over {args.rounds} rounds"
        f" (budget 2 s); other requests: {len(outside)} → {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
