"""The experiments: scaling and translation end to end in --quick mode, and their arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bdh.cli import main
from bdh.experiments.runs import RunRecord, interpolate, read_curve
from bdh.experiments.scaling import (
    ScalingConfig,
    equal_time_by_clock,
    equal_time_by_rate,
    table_markdown,
)
from bdh.experiments.translation import TranslationConfig, build_dataset
from conftest import REPO

TINY_BUDGET = ["--tokens", "2048", "--eval-tokens", "1024"]


def _record(model: str, curve: list[tuple[int, float, float]]) -> RunRecord:
    points = [{"tokens": t, "seconds": s, "val_loss": v} for t, s, v in curve]
    tokens, seconds = curve[-1][0], curve[-1][1]
    return RunRecord(model, "1m", 1, tokens, 4, seconds, None, 0.0, points)


# ---------------------------------------------------------------- arithmetic


def test_interpolate_is_linear_inside_the_curve_and_none_outside():
    curve = [{"tokens": 100, "seconds": 1.0, "val_loss": 3.0}]
    curve.append({"tokens": 300, "seconds": 3.0, "val_loss": 2.0})
    assert interpolate(curve, "tokens", 200) == pytest.approx(2.5)
    assert interpolate(curve, "seconds", 3.0) == pytest.approx(2.0)
    assert interpolate(curve, "tokens", 50) is None and interpolate(curve, "tokens", 301) is None


def test_equal_time_compares_bdh_where_the_faster_gpt_ended():
    # BDH: 400 tokens in 8 s; GPT: 400 tokens in 2 s.
    bdh = _record("bdh", [(100, 2.0, 3.0), (200, 4.0, 2.6), (400, 8.0, 2.0)])
    gpt = _record("gpt", [(100, 0.5, 3.2), (200, 1.0, 2.8), (400, 2.0, 2.4)])
    clock = equal_time_by_clock(bdh, gpt)
    assert clock == {"seconds": 2.0, "bdh": pytest.approx(3.0), "gpt": pytest.approx(2.4)}
    # Side by side BDH ran at 50 tok/s and GPT at 200: the GPT ended at 2 s, BDH had 100 tokens.
    rate = equal_time_by_rate(bdh, gpt, {"bdh": 50.0, "gpt": 200.0})
    assert rate == {"seconds": 2.0, "bdh": pytest.approx(3.0), "gpt": pytest.approx(2.4)}


def test_read_curve_sums_step_times_up_to_each_validation(tmp_path):
    lines = [
        {"step": 1, "loss": 5.0, "tokens": 64, "tok_per_s": 32.0},
        {"step": 2, "loss": 4.0, "tokens": 128, "tok_per_s": 64.0},
        {"step": 2, "val_loss": 3.5, "val_bpb": 5.0},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert read_curve(tmp_path / "m.jsonl", 64) == [
        {"tokens": 128, "seconds": 3.0, "val_loss": 3.5}
    ]


def test_the_two_models_of_a_size_differ_only_in_model_and_optionally_lr():
    cfg = ScalingConfig(gpt_lr=1e-3)
    bdh, gpt = cfg.train_config("bdh", "1m"), cfg.train_config("gpt", "1m")
    assert (bdh.lr, gpt.lr) == (3e-3, 1e-3)
    differ = {k for k, v in bdh.to_dict().items() if gpt.to_dict()[k] != v}
    assert differ == {"model", "out", "lr"}
    assert TranslationConfig().train_config("gpt").lr == TranslationConfig().lr


def test_bad_experiment_settings_raise_config_errors():
    with pytest.raises(ValueError, match="unknown ladder size"):
        ScalingConfig(sizes=["2m"])
    with pytest.raises(ValueError, match="at least one step"):
        ScalingConfig(tokens=10)
    with pytest.raises(ValueError, match="unknown ladder size"):
        TranslationConfig(size="huge")


# ---------------------------------------------------------------- scaling, one command


def test_scaling_quick_writes_json_table_and_plot(tmp_path, text_file):
    runs, out = tmp_path / "runs", tmp_path / "out"
    args = ["experiment", "scaling", "--quick", "--data", str(text_file), *TINY_BUDGET]
    assert main([*args, "--runs", str(runs), "--out", str(out)]) == 0
    payload = json.loads((out / "scaling-quick.json").read_text())
    rows = payload["rows"]
    assert [r["size"] for r in rows] == ["q70k", "q170k", "q470k"]
    for r in rows:
        assert r["gap_nats"] == pytest.approx(r["loss"]["bdh"] - r["loss"]["gpt"])
        assert r["gap_percent"] == pytest.approx(100 * r["gap_nats"] / r["loss"]["gpt"])
        assert abs(r["param_gap"]) <= 0.03
        # Same token budget; BDH pays more FLOPs per token than its matched GPT.
        assert payload["runs"][r["size"]]["bdh"]["tokens"] == r["tokens"]
        assert payload["runs"][r["size"]]["gpt"]["tokens"] == r["tokens"]
        assert r["train_flops"]["bdh"] > r["train_flops"]["gpt"]
        assert r["wall_s"]["bdh"] > 0 and r["wall_s"]["gpt"] > 0
    table = (out / "scaling-quick.md").read_text()
    assert table == table_markdown(payload) and table.count("\n| q") == 3
    assert (out / "scaling-quick.png").stat().st_size > 10_000
    # A second call reuses the finished runs (no training: no CPU time recorded).
    assert main([*args, "--runs", str(runs), "--out", str(out), "--sizes", "q70k"]) == 0
    again = json.loads((out / "scaling-quick.json").read_text())
    assert again["runs"]["q70k"]["bdh"]["cpu_s"] is None
    assert again["rows"][0]["loss"] == rows[0]["loss"]


def test_benchmark_script_runs_the_same_experiment(tmp_path, text_file):
    cmd = [sys.executable, str(REPO / "benchmarks" / "scaling.py"), "--quick"]
    cmd += ["--sizes", "q70k", "--data", str(text_file), *TINY_BUDGET]
    cmd += ["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| q70k |" in done.stdout
    assert (tmp_path / "out" / "scaling-quick.json").is_file()


# ---------------------------------------------------------------- translation, one command


def _pairs_file(tmp_path: Path, n: int = 300) -> Path:
    lines = [f"I see {i} cats.\tJe vois {i} chats.\n" for i in range(n)]
    lines += [f"I see {i} cats.\tJ'ai vu {i} chats.\n" for i in range(0, n, 5)]
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(lines))
    return path


def test_translation_dataset_is_a_folder_source_holding_out_valid(tmp_path):
    cfg = TranslationConfig.quick(pairs=str(_pairs_file(tmp_path)), runs=str(tmp_path / "r"))
    counts = build_dataset(cfg, log=lambda line: None)
    assert counts["test"] > 0 and counts["valid"] > 0
    assert sorted(p.name for p in cfg.dataset.iterdir()) == ["test.tsv", "train.txt", "valid.txt"]


def test_translation_quick_scores_both_models_and_translate_cli_reads_them(tmp_path, capsys):
    runs = tmp_path / "runs"
    args = ["experiment", "translation", "--quick", "--pairs", str(_pairs_file(tmp_path))]
    args += [*TINY_BUDGET, "--runs", str(runs)]
    assert main(args) == 0
    payload = json.loads((runs / "translation-quick.json").read_text())
    for model in ("bdh", "gpt"):
        run = payload["runs"][model]
        assert set(run["scores"]) == {"en->fr", "fr->en"}
        assert 0 <= run["scores"]["en->fr"]["bleu"] <= 100
        assert run["tokens"] == payload["runs"]["bdh"]["tokens"]
    assert "| BDH q70k |" in (runs / "translation-quick.md").read_text()
    capsys.readouterr()
    for model in ("bdh", "gpt"):
        argv = ["translate", "--ckpt", str(runs / model), "--max-new-bytes", "8", "I see 3 cats."]
        assert main([*argv, "I see 4 cats."]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 2  # one translation per sentence


def test_translate_rejects_a_bad_language_tag_in_one_line(tmp_path, capsys):
    code = main(["translate", "--ckpt", str(tmp_path), "--to", "f<r", "hello"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "--to must be a language tag" in err[0]
