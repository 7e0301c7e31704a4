"""The benchmark scripts run end to end at toy sizes and write the JSON their README tables use."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

# The scripts re-exec themselves unless an OpenMP wait policy is set (benchmarks/common.py).
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(REPO / "benchmarks" / script), *args]
    done = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_bench_decode_compares_every_path_and_checks_the_logits(tmp_path):
    out = tmp_path / "decode.json"
    done = _run(
        "bench_decode.py", "--preset", "tiny", "--contexts", "16,48", "--rounds", "1",
        "--steps", "2", "--max-full", "48", "--max-kv", "48", "--compare-at", "48",
        "--kernels", "torch", "--no-memory", "--out", str(out),
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert "machine:" in done.stdout and result["config"]["n_embd"] == 32
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    assert result["code"].startswith(f"git {head}" if head else "unknown")
    rows = {r["context"]: r for r in result["rows"]}
    assert set(rows) == {16, 48}
    for method in ("full", "dense", "sparse", "kv"):
        assert rows[48][f"{method}_s"] > 0
    errors = result["compare"]["rel_error_vs_dense"]
    assert set(errors) == {"dense", "dense-torch", "sparse-torch", "sparse", "sparse-bf16"}
    assert max(errors["sparse"], errors["sparse-torch"], errors["dense-torch"]) < 1e-5
    assert result["bound"]["seconds"] > 0 and "lower bound / sparse step" in result["checks"]


def test_bench_train_quick_cell_matches_losses_and_counts_flops(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_train
    finally:
        sys.path.pop(0)
    from bdh import BDHConfig

    cfg = BDHConfig.from_name("tiny")
    # Below the chunked crossover both paths are credited the same causal FLOPs.
    assert bench_train.needed_flops(cfg, 2, 16, "ours") == bench_train.needed_flops(
        cfg, 2, 16, "literal"
    )
    cell = bench_train.time_cell("tiny", 2, 16, ["literal", "ours"], rounds=1)
    assert cell["same_loss_1e-5"] and cell["loss_abs_diff"] <= 1e-5
    assert cell["ours"]["tokens_per_s"] > 0 and 0 < cell["ours"]["matmul_fraction"]
    assert "speedup_vs_literal" in cell["ours"]
    # Both cases ran with the same allocator setting and thread count.
    assert cell["process"]["ours"] == cell["process"]["literal"]
    assert cell["process"]["ours"]["threads"] >= 1
