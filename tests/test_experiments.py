"""The experiments: scaling and translation end to end in --quick mode, and their arithmetic."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bdh import train as train_module
from bdh.checkpoint import load_checkpoint
from bdh.cli import main
from bdh.experiments import scaling
from bdh.experiments.runs import RunRecord, interpolate, read_curve, train_run
from bdh.experiments.scaling import (
    ScalingConfig,
    choose_lr,
    equal_flops,
    equal_time_by_rate,
    table_markdown,
)
from bdh.experiments.translation import TranslationConfig, build_dataset
from bdh.train import TrainConfig, evaluate
from conftest import REPO

TINY_BUDGET = ["--tokens", "2048", "--eval-tokens", "1024"]
SCALING_BUDGET = ["--tokens", "2048", "--val-tokens", "512", "--test-tokens", "512"]


def _record(model: str, curve: list[tuple[int, float, float]], flops: float = 0.0) -> RunRecord:
    """A finished run with this validation curve and `flops` training FLOPs per token."""
    points = [{"tokens": t, "seconds": s, "val_loss": v} for t, s, v in curve]
    tokens, seconds = curve[-1][0], curve[-1][1]
    return RunRecord(model, "1m", 1, tokens, 4, seconds, None, flops * tokens, points)


# ---------------------------------------------------------------- arithmetic


def test_interpolate_is_linear_inside_the_curve_and_none_outside():
    curve = [{"tokens": 100, "seconds": 1.0, "val_loss": 3.0}]
    curve.append({"tokens": 300, "seconds": 3.0, "val_loss": 2.0})
    assert interpolate(curve, "tokens", 200) == pytest.approx(2.5)
    assert interpolate(curve, "seconds", 3.0) == pytest.approx(2.0)
    assert interpolate(curve, "tokens", 50) is None and interpolate(curve, "tokens", 301) is None


def test_equal_time_and_equal_flops_read_bdh_where_the_cheaper_gpt_ended():
    # BDH: 400 tokens, 4x the GPT's FLOPs per token; side by side 50 vs 200 tok/s.
    bdh = _record("bdh", [(100, 2.0, 3.0), (200, 4.0, 2.6), (400, 8.0, 2.0)], flops=4.0)
    gpt = _record("gpt", [(100, 0.5, 3.2), (200, 1.0, 2.8), (400, 2.0, 2.4)], flops=1.0)
    # The GPT ended at 2 s; BDH had trained 100 tokens by then.
    assert equal_time_by_rate(bdh, gpt, {"bdh": 50.0, "gpt": 200.0}) == (
        pytest.approx(3.0),
        pytest.approx(2.4),
    )
    # The GPT's 400 tokens cost what BDH's first 100 did.
    assert equal_flops(bdh, gpt) == (pytest.approx(3.0), pytest.approx(2.4))


def test_choose_lr_takes_the_lowest_mean_and_never_a_diverged_run():
    assert choose_lr({1e-3: [2.0, 2.2], 3e-3: [2.05, 2.05], 1e-2: [2.3, 1.9]}) == 3e-3
    assert choose_lr({1e-3: [2.0], 3e-3: [float("nan")]}) == 1e-3
    assert choose_lr({1e-3: [2.0, None], 3e-3: [2.1, 2.1]}) == 3e-3  # None: a seed diverged
    assert choose_lr({1e-3: [None], 3e-3: [float("inf")]}) is None
    assert choose_lr({1e-3: [2.0], 3e-3: [2.0]}) == 1e-3  # a tie goes to the lower rate


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


def test_the_runs_of_a_size_differ_only_in_model_lr_and_seed():
    cfg = ScalingConfig()
    bdh, gpt = cfg.train_config("bdh", "1m", 1e-3, 1), cfg.train_config("gpt", "1m", 3e-3, 2)
    differ = {k for k, v in bdh.to_dict().items() if gpt.to_dict()[k] != v}
    assert differ == {"model", "out", "lr", "seed"}
    # The trainer's own validation reads only the validation slice.
    assert bdh.val_limit == cfg.val_tokens
    # The GPT may have its own grid of rates.
    own = ScalingConfig(lrs=[3e-3, 1e-3], gpt_lrs=[1e-2, 3e-2])
    assert (own.lrs_of("bdh"), own.lrs_of("gpt")) == ([1e-3, 3e-3], [1e-2, 3e-2])
    assert ScalingConfig(gpt_lrs=None).lrs_of("gpt") == ScalingConfig().lrs
    assert TranslationConfig().train_config("gpt").lr == TranslationConfig().lr


def test_bad_experiment_settings_raise_config_errors():
    with pytest.raises(ValueError, match="unknown ladder size"):
        ScalingConfig(sizes=["2m"])
    with pytest.raises(ValueError, match="at least one step"):
        ScalingConfig(tokens=10)
    with pytest.raises(ValueError, match="select_seeds"):
        ScalingConfig(seeds=[1], select_seeds=2)
    with pytest.raises(ValueError, match="distinct"):
        ScalingConfig(seeds=[1, 1])
    with pytest.raises(ValueError, match="unknown ladder size"):
        TranslationConfig(size="huge")


# ---------------------------------------------------------------- scaling, one command


def test_scaling_quick_writes_json_table_and_plot_and_reuses_runs(tmp_path, text_file):
    runs, out = tmp_path / "runs", tmp_path / "out"
    args = ["experiment", "scaling", "--quick", "--data", str(text_file), *SCALING_BUDGET]
    args += ["--lrs", "3e-3,1e-2", "--gpt-lrs", "3e-3,1e-2,3e-2"]  # the GPT's own grid
    args += ["--runs", str(runs), "--out", str(out)]
    assert main(args) == 0
    payload = json.loads((out / "scaling-quick.json").read_text())
    rows = payload["rows"]
    assert [r["size"] for r in rows] == ["q70k", "q170k"]
    for r in rows:
        tok = r["equal_tokens"]
        gaps = [b - g for b, g in zip(tok["bdh"]["values"], tok["gpt"]["values"], strict=True)]
        assert tok["gap"]["values"] == pytest.approx(gaps) and len(gaps) == 2  # paired by seed
        assert abs(r["param_gap"]) <= 0.03
        # Same token budget; BDH pays more FLOPs per token than its matched GPT.
        for model in ("bdh", "gpt"):
            for run in payload["runs"][r["size"]][model].values():
                assert run["tokens"] == tok["tokens"] and not run["reused"]
        assert r["train_flops"]["bdh"] > r["train_flops"]["gpt"]
    table = (out / "scaling-quick.md").read_text()
    assert table == table_markdown(payload) and table.count("\n| q70k |") == 3  # row, 2 sweep
    assert "| q70k | BDH |" in table and table.split("| q70k | BDH |")[1].split("\n")[0].endswith(
        "| – |"
    )
    assert (out / "scaling-quick.png").stat().st_size > 10_000
    # A second call reuses every finished run (no training: no CPU time recorded).
    assert main([*args, "--sizes", "q70k"]) == 0
    again = json.loads((out / "scaling-quick.json").read_text())
    assert (again["runs_reused"], again["runs_trained"]) == (3 + 4, 0)
    # CPU time: every run's, recorded beside it when trained and reported again when reused.
    recorded = {f: json.loads(f.read_text())["cpu_s"] for f in runs.glob("*/*/*/cpu.json")}
    assert len(recorded) == 14 and min(recorded.values()) > 0  # 2 sizes x (3 BDH + 4 GPT) runs
    assert payload["cpu_s"] == pytest.approx(sum(recorded.values()))
    assert again["cpu_s"] == pytest.approx(sum(v for f, v in recorded.items() if "q70k" in str(f)))
    assert again["rows"][0]["equal_tokens"] == rows[0]["equal_tokens"]


def test_the_sweep_chooses_the_lowest_validation_loss_before_reading_the_test_slice(
    tmp_path, text_file, monkeypatch
):
    cfg = ScalingConfig.quick(
        sizes=["q70k"], data=str(text_file), tokens=2048, val_tokens=512, test_tokens=512,
        lrs=[1e-3, 3e-2, 1.0], runs=str(tmp_path / "runs"),
    )  # fmt: skip
    split = scaling.heldout_tokens(str(text_file), 1024)
    val, test = split[:513], split[512:]
    reads: list[str] = []  # "val" / "test" for every held-out scoring, in order
    estimate, final_eval = train_module.estimate, scaling.final_eval

    def spy_estimate(model, tokens, *rest):  # the trainer's periodic validation
        assert np.array_equal(np.asarray(tokens), val), "the trainer read past the validation slice"
        reads.append("val")
        return estimate(model, tokens, *rest)

    def spy_final(record, tokens, block):
        reads.append("test" if np.array_equal(tokens, test) else "val")
        assert reads[-1] == "test" or np.array_equal(tokens, val)
        return final_eval(record, tokens, block)

    monkeypatch.setattr(train_module, "estimate", spy_estimate)
    monkeypatch.setattr(scaling, "final_eval", spy_final)
    payload = scaling.run_scaling(cfg, log=lambda line: None)

    # Every test-slice read comes after the last validation read: the choice never saw it.
    assert "test" in reads and "val" not in reads[reads.index("test") :]
    for model in ("bdh", "gpt"):
        # The chosen rate has the lowest validation loss, recomputed here from the checkpoints.
        losses = {}
        for lr in cfg.lrs:
            ckpt = load_checkpoint(
                Path(cfg.runs) / "q70k" / model / f"lr{lr:g}-seed1337" / "checkpoint"
            )
            losses[lr] = evaluate(ckpt.model, val, ckpt.tokenizer.bytes_per_token, 32).loss
            assert payload["sweep"]["q70k"][model]["lrs"][f"{lr:g}"]["val_loss"] == [
                pytest.approx(losses[lr])
            ]
        assert payload["chosen_lr"]["q70k"][model] == min(losses, key=losses.get)
        assert payload["chosen_lr"]["q70k"][model] == 3e-2  # neither end of the grid
        # Only the chosen rate's runs were scored on the test slice, one per seed.
        assert set(payload["runs"]["q70k"][model]) == {"1337", "1338"}
    assert reads.count("test") == 4


def test_a_diverging_rate_is_never_chosen_nor_trained_twice(tmp_path, text_file):
    cfg = ScalingConfig.quick(
        sizes=["q70k"], data=str(text_file), tokens=1024, val_tokens=512, test_tokens=512,
        lrs=[3e-3, 1e6], seeds=[1], runs=str(tmp_path / "runs"),
    )  # fmt: skip
    lines: list[str] = []
    payload = scaling.run_scaling(cfg, log=lines.append)
    for model in ("bdh", "gpt"):
        assert payload["sweep"]["q70k"][model]["lrs"]["1e+06"]["val_loss"] == [None]
        assert payload["chosen_lr"]["q70k"][model] == 3e-3
    assert "| q70k | BDH | " in table_markdown(payload) and "diverged" in table_markdown(payload)
    lines.clear()
    again = scaling.run_scaling(cfg, log=lines.append)
    assert sum("not trained again" in line for line in lines) == 2 and again["runs_trained"] == 0


def test_an_interrupted_run_is_resumed_and_a_finished_one_reused(tmp_path, text_file, monkeypatch):
    cfg = TrainConfig(
        data=str(text_file), out=str(tmp_path / "run"), preset="tiny", max_steps=6,
        batch_size=4, block_size=16, eval_interval=2, eval_batches=1, ckpt_interval=6, threads=1,
    )  # fmt: skip
    lines: list[str] = []
    with monkeypatch.context() as m:
        real_step = train_module._train_step

        def interrupt_at_4(run, lr):
            if run.step + 1 == 4:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the trainer saves step 4 and stops
            return real_step(run, lr)

        m.setattr(train_module, "_train_step", interrupt_at_4)
        with pytest.raises(RuntimeError, match="stopped: interrupted"):
            train_run(cfg, log=lines.append)
    record = train_run(cfg, log=lines.append)
    assert any("resuming the run" in line and "from step 4" in line for line in lines)
    assert record.steps == 6 and record.cpu_s > 0 and not record.reused
    # The resumed run ends where an uninterrupted one does.
    whole = train_run(dataclasses.replace(cfg, out=str(tmp_path / "whole")), log=lines.append)
    a, b = (load_checkpoint(r.checkpoint).model.state_dict() for r in (record, whole))
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = train_run(cfg, log=lines.append)  # finished: reused, with the CPU time it took
    assert again.reused and again.cpu_s == record.cpu_s
    assert "reusing the finished run" in lines[-1]


def test_benchmark_script_runs_the_same_experiment(tmp_path, text_file):
    cmd = [sys.executable, str(REPO / "benchmarks" / "scaling.py"), "--quick"]
    cmd += ["--sizes", "q70k", "--data", str(text_file), *SCALING_BUDGET]
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
