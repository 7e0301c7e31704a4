"""The trained-model comparison: the converted graph predicts what its tensor twin predicts, and the
benchmark script runs end to end (a trained checkpoint plugs in with --checkpoint)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from bdh import BDH, BDHConfig
from bdh.graph.compare import compare, ladder, table

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "graph_vs_tensor.py"


def small_random(**overrides) -> BDH:
    config = BDHConfig(
        n_layer=2, n_embd=16, n_head=2, mlp_internal_dim_multiplier=4, dropout=0.0,
        vocab_size=32, **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    return BDH(config).eval()


def test_ladder_changes_one_option_at_a_time():
    names = [name for name, _ in ladder(small_random().config)]
    assert names == [
        "tensor: as trained",
        "tensor: + neuron residual (Eq. 8)",
        "tensor: + no RoPE",
        "tensor: + Normfree (Eq. 7)",
    ]
    already = small_random(residual="neuron", rope=False).config
    assert [n for n, _ in ladder(already)] == ["tensor: as trained", "tensor: + Normfree (Eq. 7)"]


def test_graphs_match_their_twins_on_a_reference_style_model():
    ids = np.random.default_rng(0).integers(0, 32, 24)
    rows = compare(small_random(), ids, rungs="all")
    graphs = [r for r in rows if r.name.startswith("graph")]
    assert [r.name for r in graphs] == [
        "graph: as trained",
        "graph: + neuron residual (Eq. 8)",
        "graph: + no RoPE",
        "graph: BDH (paper)",
    ]
    for r in graphs:
        assert r.top1_vs_twin == 1.0
        assert r.max_rel_diff_vs_twin < 1e-12
    assert rows[0].top1_vs_trained == 1.0
    assert graphs[0].top1_vs_trained == 1.0  # the exact conversion predicts what the model does
    assert "graph: BDH (paper)" in table(rows)


def test_a_model_trained_as_the_graph_twin_converts_with_identical_predictions():
    """Trained with residual="neuron", rope=False: only the LayerNorm separates it from BDH."""
    model = small_random(residual="neuron", rope=False)
    rows = compare(model, np.random.default_rng(1).integers(0, 32, 24))
    assert [r.name for r in rows] == [
        "tensor: as trained",
        "tensor: + Normfree (Eq. 7)",
        "graph: as trained",
        "graph: BDH (paper)",
    ]
    assert rows[2].top1_vs_trained == 1.0
    assert abs(rows[2].nll - rows[0].nll) < 1e-9


def test_benchmark_script_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("graph_vs_tensor", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "rows.json"
    script.main(["--random", "tiny", "--tokens", "12", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    graphs = [r for r in rows if r["name"].startswith("graph")]
    assert [r["top1_vs_twin"] for r in graphs] == [1.0, 1.0]
    assert graphs[0]["top1_vs_trained"] == 1.0


def test_benchmark_script_reads_a_checkpoint_and_its_own_held_out_text(tmp_path, text_file):
    from bdh.train import TrainConfig, train

    run = tmp_path / "run"
    cfg = TrainConfig(data=str(text_file), out=str(run), preset="tiny", max_steps=2, batch_size=2,
                      block_size=16, eval_interval=2, eval_batches=1, ckpt_interval=2)  # fmt: skip
    train(cfg, progress=False, log=lambda line: None)
    spec = importlib.util.spec_from_file_location("graph_vs_tensor", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "rows.json"
    script.main(["--checkpoint", str(run), "--tokens", "12", "--json", str(out)])
    payload = json.loads(out.read_text())
    held_out = text_file.read_bytes()[int(0.9 * text_file.stat().st_size) :]
    assert payload["tokens"] == 12 and payload["source"].startswith("checkpoint")
    assert payload["passage"] == held_out[:12].decode()  # from the validation split
    graphs = [r for r in payload["rows"] if r["name"].startswith("graph")]
    assert [r["top1_vs_twin"] for r in graphs] == [1.0, 1.0]
    assert graphs[0]["top1_vs_trained"] == 1.0
