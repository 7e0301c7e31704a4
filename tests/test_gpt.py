"""The GPT baseline: KV-cache decoding equals the full forward pass, positions, checks, presets."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from bdh import BDH
from bdh.baseline import GPT, GPTConfig, flops_per_token, matched_pair, param_gap
from bdh.baseline.presets import LADDER, MATCH_TOLERANCE, QUICK_LADDER, preset_config
from bdh.checkpoint import load_checkpoint
from bdh.cli import main
from bdh.config import BDHConfig, ConfigError

POSITIONS = ["learned", "alibi"]


def make_model(position: str, dtype: torch.dtype = torch.float32, **kw) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig.from_name("tiny", position=position, **kw)
    return GPT(config).to(dtype).eval()


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def stepwise_logits(model: GPT, idx: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """Logits from feeding idx through model.step in pieces of the given lengths."""
    state = model.init_state(idx.shape[0])
    out, start = [], 0
    for t in pieces:
        logits, state = model.step(idx[:, start : start + t], state)
        out.append(logits)
        start += t
    assert state.pos == idx.shape[1]
    return torch.cat(out, dim=1)


# -------------------------------------------------------------------- cache vs full forward
@pytest.mark.parametrize("position", POSITIONS)
def test_token_by_token_cache_reproduces_forward_float64(position):
    model = make_model(position, torch.float64)
    idx = tokens(2, 23)
    with torch.no_grad():
        full, _ = model(idx)
        cached = stepwise_logits(model, idx, [1] * 23)
    torch.testing.assert_close(cached, full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("position", POSITIONS)
def test_token_by_token_cache_reproduces_forward_float32(position):
    model = make_model(position)
    idx = tokens(3, 40)
    with torch.no_grad():
        full, _ = model(idx)
        cached = stepwise_logits(model, idx, [1] * 40)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", POSITIONS)
def test_step_with_several_tokens_reproduces_forward(position):
    model = make_model(position, torch.float64)
    idx = tokens(2, 31)
    with torch.no_grad():
        full, _ = model(idx)
        cached = stepwise_logits(model, idx, [7, 1, 5, 13, 2, 3])
    torch.testing.assert_close(cached, full, rtol=1e-12, atol=1e-12)


def test_state_is_advanced_in_place_and_cloned_state_resumes_identically():
    model = make_model("alibi")
    state = model.init_state(2)
    assert state.pos == 0 and state.nbytes == 0
    _, returned = model.step(tokens(2, 5), state)
    assert returned is state and state.pos == 5
    c = model.config
    # layers * (k, v) * B * pos * D * 4 bytes
    assert state.nbytes == c.n_layer * 2 * 2 * 5 * c.n_embd * 4
    fork = state.clone()
    nxt = tokens(2, 3, seed=7)
    a, _ = model.step(nxt, state)
    b, _ = model.step(nxt, fork)
    assert torch.equal(a, b)


# -------------------------------------------------------------------- positions
def test_learned_positions_have_a_max_context():
    model = make_model("learned")
    limit = model.config.block_size
    model(tokens(1, limit))
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(1, limit + 1))
    state = model.init_state(1)
    model.step(tokens(1, limit), state)
    with pytest.raises(ValueError, match="block_size"):
        model.step(tokens(1, 1), state)


def test_alibi_has_no_max_context_and_no_position_table():
    model = make_model("alibi")
    assert model.wpe is None
    logits, _ = model(tokens(1, 3 * model.config.block_size))
    assert logits.shape == (1, 3 * model.config.block_size, 256)
    assert model.config.num_params == model.num_params()


def test_positions_change_the_function():
    """Learned positions and ALiBi both make the output depend on order (no bag of tokens)."""
    for position in POSITIONS:
        model = make_model(position)
        idx = tokens(1, 8)
        a, _ = model(idx)
        b, _ = model(idx.flip(1))
        assert not torch.allclose(a[0, -1], b[0, -1])


# -------------------------------------------------------------------- API and checks
def test_loss_at_init_is_near_uniform_and_ignores_minus_one():
    model = make_model("learned")
    idx = tokens(4, 32)
    targets = tokens(4, 32, seed=2)
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(256)) < 0.1
    targets[:, :16] = -1
    _, partial = model(idx, targets)
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(
        logits[:, 16:].reshape(-1, 256), targets[:, 16:].reshape(-1)
    )
    torch.testing.assert_close(partial, expected)


@pytest.mark.parametrize("bad", [256, -1, 1000])
def test_bad_token_ids_raise_one_line_value_error(bad):
    model = make_model("alibi")
    idx = tokens(1, 6)
    idx[0, 3] = bad
    for call in (lambda: model(idx), lambda: model.step(idx, model.init_state(1))):
        with pytest.raises(ValueError, match=rf"token id {bad} outside \[0, 256\)") as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="integer token ids"):
        model(idx.float())
    targets = tokens(1, 6)
    targets[0, 0] = 300
    with pytest.raises(ValueError, match="targets holds token id 300"):
        model(tokens(1, 6), targets)


def test_step_rejects_a_batch_size_other_than_the_state():
    model = make_model("alibi")
    with pytest.raises(ValueError, match="batch size 3"):
        model.step(tokens(3, 2), model.init_state(2))


def test_backward_reaches_every_parameter_and_embedding_is_tied():
    model = make_model("learned", dropout=0.1).train()
    _, loss = model(tokens(2, 16), tokens(2, 16, seed=3))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert not any("lm_head" in name for name, _ in model.named_parameters())


def test_generate_greedy_matches_rerunning_the_full_forward():
    model = make_model("alibi")
    prompt = tokens(2, 5)
    out = model.generate(prompt, max_new_tokens=8, top_k=1)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], prompt)
    naive = prompt
    for _ in range(8):  # the spec: re-run everything, take the argmax
        logits, _ = model(naive)
        naive = torch.cat([naive, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, naive)


# -------------------------------------------------------------------- config
def test_config_json_round_trip_and_validation(tmp_path):
    config = GPTConfig.from_name("small", position="alibi", meta={"note": "x"})
    assert GPTConfig.from_json(config.to_json()) == config
    path = tmp_path / "config.json"
    config.to_json(path)
    assert GPTConfig.from_json(path) == config
    for bad in ({"n_head": 5}, {"position": "rope"}, {"dropout": 1.0}, {"n_layer": 0}):
        with pytest.raises(ConfigError):
            GPTConfig.from_name("tiny", **bad)
    with pytest.raises(ConfigError, match="unknown GPT preset"):
        GPTConfig.from_name("huge")
    with pytest.raises(ConfigError, match="unknown GPT config field"):
        GPTConfig.from_dict({"n_neurons": 3})


def test_config_param_count_matches_the_module():
    for kw in ({}, {"bias": False}, {"position": "alibi"}):
        config = GPTConfig.from_name("tiny", **kw)
        assert config.num_params == GPT(config).num_params()


# -------------------------------------------------------------------- matched ladder
@pytest.mark.parametrize("size", [*LADDER, *QUICK_LADDER])
def test_ladder_pairs_are_parameter_matched(size):
    bdh_config, gpt_config = matched_pair(size)
    assert abs(param_gap(bdh_config, gpt_config)) <= MATCH_TOLERANCE
    if size in QUICK_LADDER:  # cheap to build: check the formulas against the modules
        assert gpt_config.num_params == GPT(gpt_config).num_params()
        assert bdh_config.num_params == BDH(bdh_config).num_params()
    # BDH pays several times the GPT's FLOPs per token at equal parameters.
    assert flops_per_token(bdh_config, 256) > flops_per_token(gpt_config, 256)


def test_ladder_follows_the_paper_rule():
    """BDH grows only its neurons; GPT grows both width and depth."""
    pairs = [matched_pair(size) for size in LADDER]
    bdhs, gpts = [b for b, _ in pairs], [g for _, g in pairs]
    fixed = {(b.n_embd, b.n_head, b.n_layer) for b in bdhs}
    assert len(fixed) == 1
    assert [b.n for b in bdhs] == sorted({b.n for b in bdhs})
    for small, big in itertools.pairwise(gpts):
        assert big.n_embd > small.n_embd and big.n_layer > small.n_layer


def test_every_ladder_size_is_a_preset_of_both_models():
    for size in [*LADDER, *QUICK_LADDER]:
        bdh_config, gpt_config = matched_pair(size)
        assert preset_config(BDHConfig, size) == bdh_config
        assert preset_config(GPTConfig, size) == gpt_config
    # Fields of a --config file apply over a ladder size; named presets still work.
    assert preset_config(GPTConfig, "1m", vocab_size=128).vocab_size == 128
    assert preset_config(BDHConfig, "small") == BDHConfig.from_name("small")
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'.*ladder size: 360k"):
        preset_config(GPTConfig, "huge")
    with pytest.raises(ConfigError, match="unknown GPT config field"):
        preset_config(GPTConfig, "1m", neurons=3)


def test_gpt_trains_samples_and_evaluates_through_the_cli(tmp_path, text_file, capsys):
    """`bdh train --model gpt`: the same commands and checkpoint format as BDH."""
    out = tmp_path / "run"
    args = ["train", "--model", "gpt", "--preset", "q70k", "--data", str(text_file)]
    args += ["--out", str(out), "--max-steps", "3", "--batch-size", "4", "--block-size", "16"]
    assert main([*args, "--eval-batches", "1", "--no-progress"]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.kind == "gpt" and ckpt.config == matched_pair("q70k")[1]
    assert main(["sample", "--ckpt", str(out), "--prompt", "The", "--max-new-tokens", "8"]) == 0
    assert main(["eval", "--ckpt", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens"] > 0 and math.isfinite(result["loss"])


def test_generate_checks_sampling_arguments():
    model = make_model("alibi")
    with pytest.raises(ValueError, match="temperature"):
        model.generate(tokens(1, 3), 2, temperature=0.0)
    g = torch.Generator().manual_seed(5)
    a = model.generate(tokens(1, 3), 6, top_p=0.9, generator=g)
    b = model.generate(tokens(1, 3), 6, top_p=0.9, generator=g.manual_seed(5))
    assert torch.equal(a, b)
