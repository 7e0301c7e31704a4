"""The viewer page (`bdh.interpret.view`, `bdh view`): the numbers it carries are the model's.

Each number of the page is checked against a second computation: the windowed, state-carrying
walk against one pass over the whole passage, a token's top neurons against x computed by hand
from the observed residual stream, the graph neighbours against the dense G, the logit effects
against float64 numpy, and the page's inlined data against the data it was rendered from.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bdh.interpret.view import (
    graph_neighbours,
    logit_effects,
    negative_share,
    read_page_data,
    read_synapse_file,
    render_html,
    stream_stats,
    view,
    view_data,
)
from bdh.model import BDH
from bdh.tokenizer import ByteTokenizer
from test_interpret_hooks import trained_model

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "the king and the lord of the night. </script><script>alert(1)</script> the crown"
WINDOW = 7  # several windows, none aligned with the text


@pytest.fixture(scope="module")
def model() -> BDH:
    return trained_model()


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return ByteTokenizer().encode(TEXT).astype(np.int64)


@pytest.fixture(scope="module")
def one_pass(model, ids):
    """The reference: one forward pass over the whole passage, every point recorded."""
    with torch.no_grad():
        return model.run_with_cache(torch.from_numpy(ids)[None])


@pytest.fixture(scope="module")
def data(model, ids):
    return view_data(model, ByteTokenizer(), TEXT, window=WINDOW)


def heads_concat(t: torch.Tensor) -> torch.Tensor:
    """(1, nh, T, N) → (T, n), neuron k of head h at h·N + k."""
    return t[0].transpose(0, 1).flatten(1)


def test_surprisal_and_predictions_are_the_one_pass_logits(data, one_pass, ids):
    logits, _ = one_pass
    logp = torch.log_softmax(logits[0].double(), -1)
    want = -logp[torch.arange(len(ids) - 1), torch.from_numpy(ids[1:])]
    assert data["surprisal"][0] is None
    np.testing.assert_allclose(data["surprisal"][1:], want.numpy(), rtol=1e-3, atol=1e-5)
    p, top = logp.exp().topk(5, -1)
    assert data["pred_ids"] == top.tolist()
    np.testing.assert_allclose(data["pred_p"], p.numpy(), rtol=1e-3, atol=1e-6)


def test_active_counts_are_the_one_pass_counts(data, one_pass, model):
    _, cache = one_pass
    for l in range(model.config.n_layer):
        for path in "xy":
            want = (heads_concat(cache[path, l]) > 0).sum(1).tolist()
            assert data[f"{path}_count"][l] == want, (path, l)


def test_token_top_neurons_equal_x_by_hand(data, one_pass, model):
    """Layer 0: x = relu(v D_x) from the observed stream v, computed here, not by the model."""
    _, cache = one_pass
    v0 = cache["layers.0.v"][0]  # (T, D)
    x = torch.relu(torch.einsum("td,hdn->thn", v0.double(), model.encoder.detach().double()))
    x = x.flatten(1)
    v, i = x.topk(8, dim=1)
    assert data["top"]["x"][0] == i.tolist()
    np.testing.assert_allclose(data["top"]["x_value"][0], v.numpy(), rtol=1e-3)
    # and y of every layer against the one pass
    for l in range(model.config.n_layer):
        yv, _ = heads_concat(cache["y", l]).topk(8, dim=1)
        np.testing.assert_allclose(data["top"]["y_value"][l], yv.numpy(), rtol=1e-3, atol=1e-6)


def test_windowed_stats_equal_one_pass(model, ids, one_pass):
    _, cache = one_pass
    windowed = stream_stats(model, ids, window=WINDOW)
    whole = stream_stats(model, ids, window=len(ids))
    assert windowed.tokens == whole.tokens == len(ids)
    assert torch.equal(windowed.fire_x, whole.fire_x)
    assert torch.equal(windowed.fire_y, whole.fire_y)
    torch.testing.assert_close(windowed.top_value, whole.top_value, rtol=1e-4, atol=1e-6)
    for l in range(model.config.n_layer):
        assert torch.equal(windowed.fire_y[l], (heads_concat(cache["y", l]) > 0).sum(0))
    # the best context of each neuron is where its y is largest over all layers
    ys = torch.stack([heads_concat(cache["y", l]) for l in range(model.config.n_layer)])
    best = ys.flatten(0, 1).max(0)  # over (layer, position)
    L, T = ys.shape[0], ys.shape[1]
    fired = best.values > 0
    torch.testing.assert_close(windowed.top_value[fired, 0], best.values[fired], rtol=1e-4, atol=0)
    where = windowed.top_layer[:, 0] * T + windowed.top_pos[:, 0]
    vals_there = ys.flatten(0, 1)[where, torch.arange(ys.shape[2])]
    torch.testing.assert_close(vals_there[fired], best.values[fired], rtol=1e-4, atol=0)
    assert L == model.config.n_layer


def test_neuron_page_data(data, model, ids):
    nr = data["neurons"]
    n = model.config.n_head * model.config.N
    whole = stream_stats(model, ids, window=len(ids))
    assert nr["fire_x"] == whole.fire_x.tolist()
    i = int(whole.top_value[:, 0].argmax())
    v, layer, before, tok, _after = nr["contexts"][i][0]
    pos = int(whole.top_pos[i, 0])
    assert layer == int(whole.top_layer[i, 0])
    assert tok == TEXT[pos] and (TEXT[:pos]).endswith(before)
    assert v == pytest.approx(float(whole.top_value[i, 0]), rel=1e-3)
    assert len(nr["freqs"]) == model.config.N and len(nr["contexts"]) == n
    np.testing.assert_allclose(nr["freqs"], model.attn.freqs.reshape(-1).numpy(), rtol=1e-5)


def test_logit_effects_against_numpy(model):
    up_i, up_v, down_i, down_v = logit_effects(model, k=4)
    E = model.decoder.detach().double().numpy()
    H = model.lm_head.detach().double().numpy()
    effect = E @ H
    order = np.argsort(-effect, axis=1)
    np.testing.assert_array_equal(up_i.numpy(), order[:, :4])
    np.testing.assert_allclose(up_v.numpy(), np.take_along_axis(effect, order[:, :4], 1), rtol=1e-4)
    np.testing.assert_array_equal(down_i.numpy(), order[:, ::-1][:, :4])
    low = order[:, ::-1][:, :4]
    np.testing.assert_allclose(down_v.numpy(), np.take_along_axis(effect, low, 1), rtol=1e-4)


@pytest.mark.parametrize("which", ["x", "y"])
def test_graph_neighbours_tiled_equal_dense(model, which):
    """Row tiles of 5 (not dividing n) against the dense G = E D over all heads, diagonal out."""
    enc = (model.encoder if which == "x" else model.encoder_v).detach().double()
    E = model.decoder.detach().double()
    G = torch.cat([E @ enc[a] for a in range(enc.shape[0])], 1)  # column a·N + j
    G.fill_diagonal_(-torch.inf)
    out_i, out_v, in_i, in_v = graph_neighbours(model, which, k=3, rows=5)
    want_out = G.topk(3, dim=1)
    want_in = G.T.topk(3, dim=1)
    assert torch.equal(out_i, want_out.indices)
    assert torch.equal(in_i, want_in.indices)
    torch.testing.assert_close(out_v.double(), want_out.values, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(in_v.double(), want_in.values, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("which", ["x", "y"])
def test_negative_share_tiled_equals_dense(model, which, data):
    enc = (model.encoder if which == "x" else model.encoder_v).detach().double()
    E = model.decoder.detach().double()
    G = torch.cat([E @ enc[a] for a in range(enc.shape[0])], 1)
    want = G.clamp(max=0).abs().sum(1) / G.abs().sum(1)
    torch.testing.assert_close(
        negative_share(model, which, rows=5).double(), want, rtol=1e-4, atol=0
    )
    np.testing.assert_allclose(data["neurons"][f"g{which}_negative"], want.numpy(), rtol=1e-3)


def test_page_is_self_contained_and_carries_the_data(data):
    page = render_html(data)
    assert read_page_data(page) == json.loads(json.dumps(data))
    # The passage's own "</script>" is escaped: the page has exactly its two script elements.
    assert page.count("</script>") == 2
    lowered = page.lower()
    for remote in ("src=", "href=", "<link", "@import", "url(", "fetch(", "xmlhttprequest"):
        assert remote not in lowered, remote
    assert "default-src 'none'" in page  # and the browser refuses any load besides


def test_repr_html_is_an_isolated_frame(model):
    page = view(model, ByteTokenizer(), "the king", window=4)
    frame = page._repr_html_()
    assert frame.startswith("<iframe srcdoc=") and "<script" not in frame


def test_read_synapse_file(tmp_path):
    path = tmp_path / "found.json"
    top = [
        {"layer": 1, "head": 0, "i": 5, "j": 3, "u": 9.0},
        {"layer": 1, "head": 1, "i": 2, "j": 0},
    ]
    path.write_text(json.dumps({"config": {"layer": 1}, "results": {"top": top}}))
    assert read_synapse_file(path) == [(1, 0, 5, 3), (1, 1, 2, 0)]
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        read_synapse_file(path)
    path.write_text("[]")
    with pytest.raises(ValueError, match="lists no synapse"):
        read_synapse_file(path)


def test_synapse_traces_are_the_readout(model, ids):
    synapses = pytest.importorskip("bdh.interpret.synapses", reason="needs bdh.interpret.synapses")
    d = view_data(model, ByteTokenizer(), ids, synapse_pairs=[(1, 0, 3, 2)], window=WINDOW)
    want = synapses.synapses(model, torch.from_numpy(ids)[None], 1, 0, [(3, 2)])[0, :, 0]
    np.testing.assert_allclose(d["synapses"][0]["trace"], want.numpy(), rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    from bdh.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("view") / "ckpt"
    save_checkpoint(path, model, "bdh", ByteTokenizer())
    return path


@pytest.fixture
def bdh(capsys):
    """Run `bdh ARGS` in this process → (exit code, stdout, stderr)."""
    from bdh.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_cli_writes_the_page(ckpt, tmp_path, model, bdh):
    out = tmp_path / "page.html"
    code, _, err = bdh("view", "--ckpt", str(ckpt), "--text", TEXT, "--out", str(out))
    assert code == 0, err
    got = read_page_data(out.read_text())
    want = view_data(model, ByteTokenizer(), TEXT)
    assert got["surprisal"] == want["surprisal"] and got["top"] == want["top"]
    assert got["meta"]["T"] == len(TEXT.encode())


def test_cli_data_source(ckpt, tmp_path, text_file, bdh):
    out = tmp_path / "page.html"
    code, _, err = bdh("view", "--ckpt", str(ckpt), "--data", str(text_file), "--tokens", "50",
            "--corpus-tokens", "300", "--out", str(out))  # fmt: skip
    assert code == 0, err
    got = read_page_data(out.read_text())
    assert got["meta"]["T"] == 50 and got["meta"]["corpus_tokens"] == 300


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "either --text or --data"),
        (("--text", "ab", "--data", "x"), "either --text or --data"),
        (("--text", "ab", "--synapse", "0,0,0,0"), "outside the model"),
        (("--text", "ab", "--synapse", "1,0,99999,0"), "outside the model"),
        (("--text", "ab", "--tokens", "0"), "must be ≥ 1"),
        (("--text", ""), "passage is empty"),
        (("--text", "ab", "--synapses", "/nonexistent.json"), "No such file"),
    ],
)
def test_cli_mistakes_are_one_line(ckpt, args, message, bdh):
    code, _, err = bdh("view", "--ckpt", str(ckpt), *args)
    assert code == 1
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_cli_missing_checkpoint(tmp_path, bdh):
    code, _, err = bdh("view", "--ckpt", str(tmp_path / "nope"), "--text", "ab")
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
