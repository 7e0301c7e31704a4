"""Every fast decoding path equals the dense step and the full forward pass.

Sparse-active vs dense state step, key-value cache vs state, chunked prefill, ragged batches vs one
stream at a time, bf16 weights, stops and streaming.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from bdh import BDH, BDHConfig, BDHState
from bdh.decode import DecodeOptions, decode_weights
from bdh.generate import generate_batch, stop_sequences
from bdh.ops import naive, recurrent
from bdh.ops.kv import KVCache, crossover, kv_chunk, kv_token
from bdh.ops.rope import frequencies, rope
from bdh.ops.sparse import state_step_dense, state_step_sparse, y_path_dense, y_path_sparse

RTOL = 1e-5


def sparse_x(*shape: int, p: float = 0.1, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=dtype) * (torch.rand(*shape, generator=g) < p)


def make_model(seed: int = 0, sparse: bool = False, **overrides) -> BDH:
    """The tiny preset; `sparse` leans every stream towards one direction e and every neuron
    away from it, so ~10–20% of x fire, as in a trained model (random weights fire ~50%)."""
    torch.manual_seed(seed)
    model = BDH(BDHConfig.from_name("tiny", **{"damping": None, **overrides})).eval()
    with torch.no_grad():
        model.lm_head.mul_(50)  # well separated logits: argmax is stable under rounding
        if sparse:
            D = model.config.n_embd
            e = torch.randn(D)
            e = (e - e.mean()) / (e - e.mean()).norm()
            model.embed.weight.add_(0.3 * e)
            model.decoder.add_(0.005 * e)
            model.encoder.sub_(0.02 * e.view(1, D, 1))
    return model


def ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Logits equal to 1e-5 relative to their scale."""
    torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * float(b.detach().abs().max()))


# ---------------------------------------------------------------------- ops: sparse = dense
@pytest.mark.parametrize("p", [0.0, 0.05, 0.3, 1.0])
def test_sparse_state_step_equals_dense(p):
    G, N, D = 6, 16, 5
    k = sparse_x(G, N, p=p)
    v = torch.randn(G, D, dtype=torch.float64)
    S = torch.randn(G, N, D, dtype=torch.float64)
    S_dense, S_sparse = S.clone(), S.clone()
    out_dense = state_step_dense(k, v, S_dense)
    out_sparse = state_step_sparse(k, v, S_sparse)
    torch.testing.assert_close(out_sparse, out_dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S_sparse, S_dense, rtol=1e-12, atol=1e-12)
    assert torch.equal(S_sparse[k == 0], S[k == 0])  # untouched rows are not even rewritten


def test_sparse_recurrence_equals_naive_form():
    """Rotated sparse keys through the sparse step, token by token = the spec's token loop."""
    B, nh, T, N, D = 2, 3, 11, 8, 5
    x = sparse_x(B, nh, T, N, p=0.2)
    v = torch.randn(B, 1, T, D, dtype=torch.float64)
    freqs = frequencies(N, dtype=torch.float64) * 7
    out_ref, S_ref = naive(x, v, freqs)
    S = torch.zeros(B * nh, N, D, dtype=torch.float64)
    q = rope(x, freqs, 0)
    outs = []
    for t in range(T):
        vg = v[:, :, t].expand(B, nh, D).reshape(B * nh, D)
        outs.append(state_step_sparse(q[:, :, t].reshape(B * nh, N), vg, S).view(B, nh, D))
    torch.testing.assert_close(torch.stack(outs, dim=2), out_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S.view(B, nh, N, D), S_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("damped", [False, True])
def test_recurrent_form_with_sparse_steps_equals_naive(damped):
    B, nh, T, N, D = 2, 3, 9, 8, 5
    x = sparse_x(B, nh, T, N, p=0.2)
    v = torch.randn(B, 1, T, D, dtype=torch.float64)
    S0 = torch.randn(B, nh, N, D, dtype=torch.float64)
    freqs = frequencies(N, dtype=torch.float64) * 7
    lam = torch.tensor([0.9, 1.0, 0.7], dtype=torch.float64) if damped else None
    out_ref, S_ref = naive(x, v, freqs, S0, 4, lam)
    with torch.no_grad():
        out, S = recurrent(x, v, freqs, S0.clone(), 4, lam, sparse=True)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S, S_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("B", [1, 3])
def test_sparse_y_path_equals_dense(B):
    torch.manual_seed(0)
    nh, N, D = 2, 16, 6
    x = sparse_x(B, nh, N, p=0.15)
    a = torch.randn(B, nh, D, dtype=torch.float64)
    enc_v = torch.randn(nh, D, N, dtype=torch.float64)
    dec = torch.randn(nh * N, D, dtype=torch.float64)
    rows = enc_v.transpose(1, 2).reshape(nh * N, D).contiguous()
    u_dense, y_dense = y_path_dense(x, a, enc_v, dec)
    u_sparse, y_sparse = y_path_sparse(x, a, rows, dec)
    torch.testing.assert_close(u_sparse, u_dense, rtol=1e-12, atol=1e-12)
    assert y_sparse == pytest.approx(y_dense) and y_dense <= 0.5  # union over the streams


# ---------------------------------------------------------------------- ops: KV cache = state
@pytest.mark.parametrize("damped", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_kv_cache_equals_naive_and_folds_into_the_state(damped, sparse):
    B, nh, T, N, D = 2, 3, 13, 8, 5
    x = sparse_x(B, nh, T, N, p=0.3)
    v = torch.randn(B, 1, T, D, dtype=torch.float64)
    freqs = frequencies(N, dtype=torch.float64) * 7
    lam = torch.tensor([0.9, 1.0, 0.7], dtype=torch.float64) if damped else None
    out_ref, S_ref = naive(x, v, freqs, None, 0, lam)
    cache = KVCache.zeros(1, B, nh, N, D, capacity=16, dtype=torch.float64)
    keys, values = cache.keys[0], cache.values[0]
    out_a = kv_chunk(x[:, :, :5], v[:, :, :5], freqs, keys, values, 0, lam)  # prefill 5 ...
    q = rope(x, freqs, 0)
    outs = [out_a]
    for t in range(5, T):  # ... then one token at a time
        o = kv_token(q[:, :, t], v[:, 0, t], keys, values, t, lam, sparse=sparse)
        outs.append(o.unsqueeze(2))
    cache.length = T
    torch.testing.assert_close(torch.cat(outs, dim=2), out_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cache.to_state(lam)[0], S_ref, rtol=1e-12, atol=1e-12)


def test_crossover_is_where_the_cache_matches_the_state_size():
    n, D = 32768, 256
    T = crossover(n, D)
    assert T * (n + D) <= n * D < (T + 1) * (n + D)  # ≈ 254 at the reference defaults
    assert T == 254


# ---------------------------------------------------------------------- the engine = full forward
ENGINES = {
    "dense": DecodeOptions(attention="dense", y_path="dense", kv="off"),
    "sparse": DecodeOptions(attention="sparse", y_path="sparse", kv="off"),
    "kv-dense": DecodeOptions(attention="dense", y_path="dense", kv="on", kv_crossover=23),
    "kv-sparse": DecodeOptions(attention="sparse", y_path="sparse", kv="on", kv_crossover=23),
    "auto": DecodeOptions(kv_crossover=23, prefill_chunk=9),
}
MODELS = {
    "default": {},
    "damping": {"damping": [0.95, 0.8]},
    "neuron-residual": {"residual": "neuron"},
    "no-rope": {"rope": False},
}


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("model_kind", list(MODELS))
def test_engine_reproduces_the_full_forward(engine, model_kind):
    """Prefill pieces, single tokens across the KV→state crossover, another piece: = model(idx)."""
    model = make_model(sparse=True, **MODELS[model_kind])
    idx = ids(2, 50)
    full = model(idx)[0].detach()
    dec = model.decoding_engine(ENGINES[engine])
    state = dec.init_state(2)
    bounds = [0, 7, 8, 12, *range(13, 31), 50]  # the cache folds into S at 23
    with torch.no_grad():
        out = [dec.step(idx[:, a:b], state) for a, b in itertools.pairwise(bounds)]
    close(torch.cat(out, dim=1), full)
    assert state.pos == 50 and state.kv is None


def test_sparse_and_kv_paths_agree_with_dense_on_sparse_activations():
    """The sparse step really runs (measured density low) and gives the dense step's logits."""
    model = make_model(sparse=True)
    prompt, nxt = ids(1, 20), ids(1, 12, seed=3)
    options = {
        "dense": DecodeOptions(attention="dense", kv="off"),
        "sparse": DecodeOptions(attention="sparse", kv="off"),
        "kv-sparse": DecodeOptions(attention="sparse", kv="on", kv_crossover=64),
    }
    logits = {}
    for name, opts in options.items():
        dec = model.decoding_engine(opts)
        state = dec.init_state(1)
        dec.prefill(prompt, state)
        logits[name] = torch.cat([dec.step(nxt[:, i : i + 1], state) for i in range(12)], dim=1)
        assert {s["attention"] for s in dec.last_stats} == {name}
        assert max(s["k"] for s in dec.last_stats) <= 0.5  # rotary pairs: ≤ 2× the x density
    close(logits["sparse"], logits["dense"])
    close(logits["kv-sparse"], logits["dense"])


def test_auto_choice_follows_the_measured_density():
    dense_model, sparse_model = make_model(), make_model(sparse=True)
    for model, expected in ((dense_model, "dense"), (sparse_model, "sparse")):
        dec = model.decoding_engine(DecodeOptions(kv="off", max_sparse_density=0.3))
        state = dec.init_state(1)
        dec.prefill(ids(1, 30), state)
        dec.step(ids(1, 1, seed=2), state)
        xs = [s["x"] for s in dec.last_stats]
        assert {s["y_path"] for s in dec.last_stats} == {expected}, xs
        if expected == "sparse":
            assert max(xs) <= 0.3 and all(s["y"] <= s["x"] for s in dec.last_stats)


@pytest.mark.parametrize("threads", [None, 0, 1])
def test_small_steps_run_on_one_thread_and_restore_the_setting(monkeypatch, threads):
    model = make_model(sparse=True)
    idx = ids(1, 40)
    full = model(idx)[0].detach()
    dec = model.decoding_engine(DecodeOptions(kv="off", threads=threads))
    fed: list[int] = []  # tokens per call of the engine's inner step
    inner = dec._step
    monkeypatch.setattr(dec, "_step", lambda i, s: fed.append(i.shape[1]) or inner(i, s))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # as on a 2-core machine
    set_to: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    state = dec.init_state(1)
    dec.prefill(idx[:, :30], state)
    steps = [dec.step(idx[:, t : t + 1], state) for t in range(30, 40)]
    close(torch.cat(steps, dim=1), full[:, 30:])
    assert fed == [30] + [1] * 10
    if threads == 0:  # torch's setting, untouched
        assert set_to == []
    else:  # tiny is small: each one-token step runs on one thread, then back to 2;
        assert set_to == [1, 2] * 10  # the 30-token prefill kept its threads


def test_chunked_prefill_reads_long_prompts_in_bounded_pieces(monkeypatch):
    model = make_model()
    idx = ids(1, 100)
    full = model(idx)[0].detach()
    seen: list[int] = []
    dec = model.decoding_engine(DecodeOptions(kv="off", prefill_chunk=16))
    run = dec._tokens
    monkeypatch.setattr(dec, "_tokens", lambda x, s: seen.append(x.shape[1]) or run(x, s))
    state = dec.init_state(1)
    last = dec.prefill(idx, state)
    close(last, full[:, -1])
    assert max(seen) <= 16 and sum(seen) == 100 and state.pos == 100


def test_bf16_weights_keep_a_float32_state():
    model = make_model(sparse=True)
    idx = ids(1, 60)
    full = model(idx)[0].detach()
    dec = model.decoding_engine(DecodeOptions(weights="bfloat16", kv="off"))
    state = dec.init_state(1)
    dec.prefill(idx[:, :30], state)
    out = torch.cat([dec.step(idx[:, t : t + 1], state) for t in range(30, 60)], dim=1)
    assert all(S.dtype == torch.float32 for S in state.layers)
    scale = float(full.detach().abs().max())
    assert float((out - full[:, 30:]).abs().max()) <= 3e-2 * scale  # bf16 rounding only
    assert decode_weights(model, torch.bfloat16).encoder.dtype == torch.bfloat16


def test_decode_weights_follow_in_place_updates():
    model = make_model()
    before = decode_weights(model, torch.bfloat16).encoder.clone()
    with torch.no_grad():
        model.encoder.mul_(2)
    after = decode_weights(model, torch.bfloat16).encoder
    torch.testing.assert_close(after.float(), 2 * before.float(), rtol=1e-2, atol=1e-3)


def test_step_with_autograd_uses_the_differentiable_trunk():
    model = make_model()
    state = model.init_state(1)
    _, state = model.step(ids(1, 5), state)
    logits2, _ = model.step(ids(1, 1), state)
    logits2.sum().backward()
    assert model.encoder.grad is not None and model.encoder.grad.abs().sum() > 0


# ---------------------------------------------------------------------- ragged batches
def test_ragged_batch_equals_one_stream_at_a_time():
    model = make_model()
    prompts = [ids(1, n, seed=n)[0] for n in (3, 17, 9, 1)]
    batched = generate_batch(model, prompts, 25, top_k=1)
    for p, out in zip(prompts, batched, strict=True):
        alone = model.generate(p.view(1, -1), 25, top_k=1)[0, p.numel() :]
        assert torch.equal(out, alone)


def test_ragged_state_logits_equal_separate_states():
    """Stacked states at different positions decode with per-stream phases: same logits."""
    model = make_model()
    dec = model.decoding_engine(DecodeOptions(kv="off"))
    prompts = [ids(1, n, seed=n) for n in (5, 12)]
    singles = [dec.init_state(1) for _ in prompts]
    for p, s in zip(prompts, singles, strict=True):
        dec.prefill(p, s)
    batched = BDHState.stack([s.clone() for s in singles])
    assert batched.ragged and batched.positions().tolist() == [5, 12]
    nxt = ids(2, 4, seed=9)
    together = torch.cat([dec.step(nxt[:, i : i + 1], batched) for i in range(3)], dim=1)
    together = torch.cat([together, dec.step(nxt[:, 3:], batched)], dim=1)  # t > 1 on ragged
    for b, s in enumerate(singles):
        alone = torch.cat([dec.step(nxt[b : b + 1, i : i + 1], s) for i in range(4)], dim=1)
        close(together[b : b + 1], alone)


def test_ragged_and_kv_states_select_stack_save_load(tmp_path):
    model = make_model()
    dec = model.decoding_engine(DecodeOptions(kv="on"))  # holds ≤ T* tokens: ≤ bytes of S
    a, b = dec.init_state(1), dec.init_state(1)
    dec.prefill(ids(1, 4), a)
    dec.prefill(ids(1, 7), b)
    assert a.kv is not None and a.nbytes <= model.init_state(1).nbytes  # short context: cache
    both = BDHState.stack([a, b])
    assert both.kv is None and both.positions().tolist() == [4, 7]
    only_b = both.select([1])
    assert not only_b.ragged and only_b.pos == 7
    torch.testing.assert_close(only_b.layers[0], b.clone().materialise().layers[0])
    both.save(tmp_path / "s.safetensors")
    loaded = BDHState.load(tmp_path / "s.safetensors")
    assert loaded.positions().tolist() == [4, 7]


# ---------------------------------------------------------------------- stops and streaming
def test_end_token_and_stop_sequences_end_generation():
    model = make_model()
    prompt = ids(1, 6)
    free = model.generate(prompt, 30, top_k=1)[0, 6:].tolist()
    end = free[9]
    first = free.index(end)
    out = model.generate(prompt, 30, top_k=1, stop=end)
    assert out[0, 6:].tolist() == free[: first + 1]  # kept up to and including the end token
    pair = bytes(free[12:14])  # a two-byte stop string, as bytes
    hit = next(i for i in range(1, 30) if bytes(free[i - 1 : i + 1]) == pair)
    out = model.generate(prompt, 30, top_k=1, stop=[pair, 999 % 256 + 1000 - 1000])
    assert len(out[0, 6:]) <= hit + 1
    assert stop_sequences(["ab", 7, [1, 2]], 256) == [(97, 98), (7,), (1, 2)]


def test_batched_stops_and_callback_stream_every_token():
    model = make_model()
    prompts = [ids(1, n, seed=n)[0] for n in (4, 8)]
    free = generate_batch(model, prompts, 20, top_k=1)
    stop = int(free[0][5])
    seen: list[tuple[int, int]] = []
    out = generate_batch(
        model, prompts, 20, top_k=1, stop=stop, callback=lambda r, t: seen.append((r, t))
    )
    for r, o in enumerate(out):
        ends = [i for i, t in enumerate(free[r].tolist()) if t == stop]
        expected = free[r][: ends[0] + 1] if ends else free[r]
        assert torch.equal(o, expected)
        assert [t for rr, t in seen if rr == r] == o.tolist()


def test_stop_errors_are_one_line_messages():
    model = make_model()
    with pytest.raises(ValueError, match="stop needs batch 1"):
        model.generate(ids(2, 3), 4, stop=0)
    with pytest.raises(ValueError, match="token ids in"):
        model.generate(ids(1, 3), 4, stop=[[300]])
    with pytest.raises(ValueError, match="needs `encode`"):
        stop_sequences("ab", vocab_size=1000)
    with pytest.raises(ValueError, match="attention must be one of"):
        DecodeOptions(attention="fast")


# ---------------------------------------------------------------------- fused C++ kernels (opt-in)
@pytest.mark.parametrize("B", [1, 3])  # the first call compiles the kernels (~30 s)
def test_cpp_kernels_equal_the_torch_sparse_step(B):
    from bdh.ops import cpu_kernels

    if (why := cpu_kernels.missing_toolchain()) is not None:
        pytest.skip(why)
    cpu_kernels.load()  # with a compiler present, a failed build fails here with its message
    G, N, D, nh = B * 2, 64, 16, 2
    k = sparse_x(G, N, p=0.2, dtype=torch.float32)
    v = torch.randn(G, D)
    S = torch.randn(G, N, D)
    S_torch, S_cpp = S.clone(), S.clone()
    out_torch = state_step_sparse(k, v, S_torch)
    out_cpp = cpu_kernels.state_step(k, v, S_cpp)
    torch.testing.assert_close(out_cpp, out_torch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S_cpp, S_torch, rtol=1e-6, atol=1e-6)
    x = sparse_x(B, nh, N, p=0.2, dtype=torch.float32)
    a = torch.randn(B, nh, D)
    rows, dec = torch.randn(nh * N, D), torch.randn(nh * N, D)
    u_torch, _ = y_path_sparse(x, a, rows, dec)
    u_cpp, _ = cpu_kernels.y_path(x, a, rows, dec)
    torch.testing.assert_close(u_cpp, u_torch, rtol=1e-4, atol=1e-4)
    u_bf16, _ = cpu_kernels.y_path(x, a, rows.bfloat16(), dec.bfloat16())
    u_ref, _ = y_path_sparse(x, a, rows.bfloat16().float(), dec.bfloat16().float())
    torch.testing.assert_close(u_bf16, u_ref, rtol=1e-4, atol=1e-4)
    v_in, enc = torch.randn(B, D), torch.randn(nh, D, N)
    x_ref = torch.relu(v_in @ enc).transpose(0, 1)
    torch.testing.assert_close(cpu_kernels.encode(v_in, enc), x_ref, rtol=1e-5, atol=1e-5)
    x_ref = torch.relu(v_in @ enc.bfloat16().float()).transpose(0, 1)
    torch.testing.assert_close(
        cpu_kernels.encode(v_in, enc.bfloat16()), x_ref, rtol=1e-5, atol=1e-5
    )
    model = make_model(sparse=True)
    idx = ids(2, 40)
    full = model(idx)[0].detach()
    dec_engine = model.decoding_engine(DecodeOptions(kernels="cpp", kv="off", attention="sparse"))
    state = dec_engine.init_state(2)
    dec_engine.prefill(idx[:, :10], state)
    out = torch.cat([dec_engine.step(idx[:, t : t + 1], state) for t in range(10, 40)], dim=1)
    close(out, full[:, 10:])


def test_kv_auto_policy_follows_the_kernels():
    model = make_model()
    assert model.decoding_engine(DecodeOptions(kernels="torch")).init_state(1).kv is not None
    assert model.decoding_engine(DecodeOptions(kernels="cpp")).init_state(1).kv is None
    assert model.decoding_engine(DecodeOptions(kv="on", kernels="cpp")).init_state(1).kv is not None


def test_default_limits_keep_small_models_dense_with_torch_ops():
    """Torch gathers cost more than they save on small layers (measured): dense unless cpp."""
    model = make_model(sparse=True)
    for kernels, expected in (("torch", "dense"), ("cpp", "sparse")):
        dec = model.decoding_engine(DecodeOptions(kv="off", kernels=kernels))
        assert dec._sparse("auto", 0.1) == (expected == "sparse")


def test_only_a_missing_toolchain_makes_the_kernels_unavailable(monkeypatch):
    from bdh.ops import cpu_kernels

    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    assert "no-such-c++-compiler" in cpu_kernels.missing_toolchain()
    cpu_kernels.available.cache_clear()
    try:
        assert cpu_kernels.available() is False  # no build is attempted without a compiler
    finally:
        cpu_kernels.available.cache_clear()
