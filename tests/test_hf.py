"""BDH in transformers (`bdh.hf`, the extra `hf`): each check compares transformers' way of
computing something with ours on the same model — logits, greedy and sampled generation, cached
decoding, left padding, the pipeline, one Trainer step — and export → import is bit-exact."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bdh.hf  # noqa: E402 (registers the Auto classes; only once transformers is known)
from bdh import BDH, BDHConfig  # noqa: E402
from bdh.baseline.gpt import GPT, GPTConfig  # noqa: E402
from bdh.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from bdh.cli import main  # noqa: E402
from bdh.hf.convert import ConversionError, export_hf, import_hf, to_hf  # noqa: E402
from bdh.tokenizer import BPETokenizer, ByteTokenizer  # noqa: E402
from bdh.train import TrainConfig, train  # noqa: E402
from conftest import REPO, synthetic_text  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = {"progress": False, "log": lambda line: None}
RTOL = 1e-5


def _train_cfg(root: Path, name: str, **changes) -> TrainConfig:
    data = root / "corpus.txt"
    if not data.exists():
        data.write_text(synthetic_text(20_000))
    fields = dict(
        data=str(data), out=str(root / name), preset="tiny", max_steps=40, batch_size=8,
        block_size=32, warmup_steps=2, eval_interval=40, eval_batches=1, ckpt_interval=40,
        lr=1e-2, threads=1,
    )  # fmt: skip
    return TrainConfig(**{**fields, **changes})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny BDH trained for 40 steps on synthetic text: its checkpoint directory."""
    root = tmp_path_factory.mktemp("hf")
    return train(_train_cfg(root, "run"), **QUIET).checkpoint


@pytest.fixture(scope="module")
def folder(trained, tmp_path_factory) -> Path:
    """The trained checkpoint exported as a transformers folder."""
    return export_hf(trained, tmp_path_factory.mktemp("hf-export") / "bdh")


@pytest.fixture(scope="module")
def ours(trained) -> BDH:
    return load_checkpoint(trained).model.eval()


@pytest.fixture(scope="module")
def theirs(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def _text_ids(text: str) -> torch.Tensor:
    return torch.tensor([list(text.encode())])


def _cache_of(output):  # transformers 5.24 names it `cache`, earlier 5.x `past_key_values`
    return output.cache if "cache" in output else output.past_key_values


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> None:
    """Equal to rtol relative to the largest magnitude (logits near 0 have no relative scale)."""
    err = float((a - b).abs().max() / b.abs().max())
    assert err <= rtol, f"relative difference {err:.2e} > {rtol:.0e}"


# ---------------------------------------------------------------- logits and decoding


def test_logits_equal_ours_with_and_without_the_cache(ours, theirs):
    idx = torch.randint(0, 256, (3, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(idx)[0]
        _close(theirs(idx, use_cache=False).logits, expected)
        _close(theirs(idx, use_cache=True).logits, expected)  # the prefill through the state
    assert isinstance(theirs, bdh.hf.BDHForCausalLM)


def test_cached_decoding_equals_the_full_forward_at_every_position(ours, theirs):
    idx = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(idx)[0]
        out = theirs(idx[:, :7])  # a prompt, then one token at a time
        cache, pieces = _cache_of(out), [out.logits]
        assert isinstance(cache, bdh.hf.BDHCache)
        for t in range(7, 40):
            out = theirs(idx[:, t : t + 1], cache=cache)
            pieces.append(out.logits)
    assert cache.get_seq_length() == 40
    _close(torch.cat(pieces, dim=1), expected)


def test_greedy_generate_equals_our_generate(ours, theirs):
    prompt = _text_ids("The king ")
    expected = ours.generate(prompt, 60, top_k=1)
    got = theirs.generate(prompt, max_new_tokens=60, do_sample=False)
    assert torch.equal(got, expected)


def test_sampling_with_a_seed_equals_our_sampling(ours, theirs):
    prompt = _text_ids("Sweet ")
    torch.manual_seed(7)
    expected = ours.generate(prompt, 40, temperature=0.8)
    torch.manual_seed(7)
    got = theirs.generate(prompt, max_new_tokens=40, do_sample=True, temperature=0.8, top_k=None)
    assert torch.equal(got, expected)


def test_beam_search_through_the_state_equals_recomputing_the_prefix(theirs):
    prompt = _text_ids("Good night")
    kwargs = {"max_new_tokens": 12, "num_beams": 3, "do_sample": False}
    cached = theirs.generate(prompt, **kwargs)  # the cache is reordered as beams swap
    full = theirs.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, full)


def _left_padded(prompts: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :], mask[b, T - len(p) :] = p, 1
    return ids, mask


def test_left_padded_rows_give_their_unpadded_results(ours, theirs):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (9, 30, 1, 17)]
    ids, mask = _left_padded(prompts, pad=97)  # the pad id is any token: it is never read
    with torch.no_grad():
        for use_cache in (False, True):
            logits = theirs(ids, attention_mask=mask, use_cache=use_cache).logits
            for b, p in enumerate(prompts):
                _close(logits[b, -len(p) :], ours(p.view(1, -1))[0][0])
    out = theirs.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    for b, p in enumerate(prompts):
        alone = ours.generate(p.view(1, -1), 20, top_k=1)[0, len(p) :]
        assert torch.equal(out[b, ids.shape[1] :], alone), f"row {b}"


def test_padding_between_decoding_steps_is_not_read(ours, theirs):
    """A masked token fed through the cache leaves that row's state and position untouched."""
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = _cache_of(theirs(idx[:, :6]))
        step = torch.tensor([[idx[0, 6]], [5]])  # row 1 gets a pad this step
        theirs(step, attention_mask=torch.tensor([[1] * 7, [1] * 6 + [0]]), cache=cache)
        last = theirs(torch.stack([idx[0, 7:8], idx[1, 6:7]]), cache=cache).logits
        _close(last[0, 0], ours(idx[:1, :8])[0][0, -1])
        _close(last[1, 0], ours(idx[1:, :7])[0][0, -1])


# ---------------------------------------------------------------- the pipeline, the Trainer


def test_pipeline_generates_our_greedy_text_offline(folder, ours):
    pipe = transformers.pipeline("text-generation", model=str(folder))
    out = pipe("The lord ", max_new_tokens=30, do_sample=False)[0]["generated_text"]
    expected = ours.generate(_text_ids("The lord "), 30, top_k=1)[0]
    assert out == bytes(expected.tolist()).decode("utf-8", errors="replace")


def test_one_trainer_step_gives_our_trainers_first_loss(tmp_path):
    from bdh.train import _new_run

    cfg = _train_cfg(tmp_path, "ours", max_steps=1, batch_size=4, block_size=24)
    run = _new_run(cfg, log=lambda line: None)  # the initial model and batches of `train(cfg)`
    x, y = copy.deepcopy(run.sampler).next()
    model = to_hf(run.model)
    ours_loss = train(cfg, **QUIET).last_loss  # our trainer's first step, from the same seed

    # transformers' labels are the inputs (it shifts them): x followed by y's last token.
    rows = [{"input_ids": r, "labels": r} for r in torch.cat([x, y[:, -1:]], dim=1)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=len(rows),
        max_steps=1, learning_rate=cfg.lr, report_to=[], save_strategy="no", use_cpu=True,
        logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    result = transformers.Trainer(model=model, args=args, train_dataset=rows).train()
    assert result.training_loss == pytest.approx(ours_loss, rel=RTOL)


# ---------------------------------------------------------------- export and import


def _assert_same_weights(a: BDH, b: BDH) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _permuted(model: BDH, seed: int) -> BDH:
    """The same network with each head's neuron pairs (2j, 2j+1 rotate together) listed in
    another order, as a merge leaves them: the function is unchanged only if every neuron keeps
    its own rotary frequency, which is then no longer the default table."""
    out = copy.deepcopy(model)
    nh, N = model.config.n_head, model.config.N
    pairs = torch.randperm(N // 2, generator=torch.Generator().manual_seed(seed))
    perm = torch.stack([2 * pairs, 2 * pairs + 1], dim=1).flatten()
    with torch.no_grad():
        out.encoder.copy_(model.encoder[:, :, perm])
        out.encoder_v.copy_(model.encoder_v[:, :, perm])
        out.decoder.copy_(model.decoder.view(nh, N, -1)[:, perm].reshape(nh * N, -1))
        out.attn.freqs.copy_(model.attn.freqs[..., perm])
    return out


def _grown(model: BDH) -> BDH:
    """Twice the neurons per head: the model's own and a copy with other frequencies."""
    c = model.config
    big = BDH(c.replace(mlp_internal_dim_multiplier=2 * c.mlp_internal_dim_multiplier)).eval()
    nh, N = c.n_head, c.N
    with torch.no_grad():
        for name in ("encoder", "encoder_v"):
            w = getattr(model, name)
            getattr(big, name).copy_(torch.cat([w, 0.5 * w], dim=2))
        dec = model.decoder.view(nh, N, -1)
        big.decoder.copy_(torch.cat([dec, dec], dim=1).reshape(2 * nh * N, -1))
        big.attn.freqs.copy_(torch.cat([model.attn.freqs, 3.0 * model.attn.freqs], dim=-1))
        for name in ("embed.weight", "lm_head"):
            big.get_parameter(name).copy_(model.get_parameter(name))
    return big


def test_export_import_is_bit_exact_and_keeps_edited_frequencies(ours, tmp_path):
    idx = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(4))
    permuted, grown = _permuted(ours, seed=0), _grown(ours)
    with torch.no_grad():
        _close(permuted(idx)[0], ours(idx)[0])  # the permutation is a true re-listing
    for name, model in [("trained", ours), ("permuted", permuted), ("grown", grown)]:
        ckpt = save_checkpoint(tmp_path / name, model, "bdh", ByteTokenizer())
        folder = export_hf(ckpt, tmp_path / f"{name}-hf")
        back = load_checkpoint(import_hf(folder, tmp_path / f"{name}-back")).model
        _assert_same_weights(back, model)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        _assert_same_weights(loaded.bdh, model)
        with torch.no_grad():
            _close(loaded(idx, use_cache=False).logits, model.eval()(idx)[0])


def test_damping_and_options_survive_the_round_trip(tmp_path):
    torch.manual_seed(0)
    config = BDHConfig.from_name("tiny", damping=[0.9, 0.7], residual="neuron", chunk_size=5)
    model = BDH(config).eval()
    ckpt = save_checkpoint(tmp_path / "c", model, "bdh", ByteTokenizer())
    folder = export_hf(ckpt, tmp_path / "hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert loaded.config.to_bdh() == config
    assert load_checkpoint(import_hf(folder, tmp_path / "back")).config == config
    idx = torch.randint(0, 256, (1, 21))
    with torch.no_grad():  # λ is not saved with the weights: rebuilt from the configuration
        _close(loaded(idx).logits, model(idx)[0])


def test_the_readme_lines_generate_from_an_exported_folder(folder, ours, capsys):
    readme = (REPO / "README.md").read_text()
    section = readme.split("### In Hugging Face transformers", 1)[1]
    code = re.search(r"```py\n(.*?)```", section, flags=re.DOTALL).group(1)
    torch.manual_seed(11)
    exec(code.replace('"hf/bdh"', repr(str(folder))), {"__name__": "__readme__"})
    # The pipeline samples (temperature 0.7, and top-k 50 from transformers' defaults).
    torch.manual_seed(11)
    expected = ours.generate(_text_ids("ROMEO:"), 100, temperature=0.7, top_k=50)[0]
    text = transformers.AutoTokenizer.from_pretrained(folder).decode(expected)  # same � rules
    assert capsys.readouterr().out == text + "\n"
    assert text.startswith("ROMEO:") and len(expected) == 106


def test_tokenizers_load_with_autotokenizer_and_keep_our_ids(folder, tmp_path):
    text = "Héllo, wörld!\n\x00 <pad> end"
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok(text)["input_ids"] == list(text.encode())  # bytes are their own ids, no offset
    assert tok.decode(tok(text)["input_ids"]) == text

    bpe = BPETokenizer.train([synthetic_text(8_000)], vocab_size=300)
    torch.manual_seed(0)
    model = BDH(BDHConfig.from_name("tiny", vocab_size=bpe.vocab_size))
    ckpt = save_checkpoint(tmp_path / "bpe", model, "bdh", bpe)
    bpe_folder = export_hf(ckpt, tmp_path / "bpe-hf")
    tok = transformers.AutoTokenizer.from_pretrained(bpe_folder)
    assert tok(text)["input_ids"] == bpe.encode(text).tolist()
    back = load_checkpoint(import_hf(bpe_folder, tmp_path / "bpe-back"))
    assert back.tokenizer.fingerprint == bpe.fingerprint


def test_trust_remote_code_loads_from_the_folders_own_code(folder, ours):
    """In a fresh process, without `import bdh.hf`: the folder's code registers nothing first."""
    script = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        "out = m.generate(torch.tensor([list(b'The king ')]), max_new_tokens=20, do_sample=False)\n"
        "print(json.dumps(out[0].tolist()))\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    expected = ours.generate(_text_ids("The king "), 20, top_k=1)[0].tolist()
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected


# ---------------------------------------------------------------- the GPT baseline as GPT-2


@pytest.mark.parametrize("bias", [True, False])
def test_gpt_baseline_exports_to_transformers_gpt2(tmp_path, bias):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", bias=bias)).eval()
    with torch.no_grad():  # non-zero biases, LayerNorm weights and GELU inputs of order 1,
        for name, p in model.named_parameters():  # so each mapped piece is checked
            if name.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("c_fc.weight"):
                p.mul_(50)
    ckpt = save_checkpoint(tmp_path / "gpt", model, "gpt", ByteTokenizer())
    folder = export_hf(ckpt, tmp_path / "gpt2")
    gpt2 = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(gpt2).__name__ == "GPT2LMHeadModel"
    idx = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        _close(gpt2(idx).logits, model(idx)[0])
    prompt = _text_ids("The ")
    expected = model.generate(prompt, 20, top_k=1)
    assert torch.equal(gpt2.generate(prompt, max_new_tokens=20, do_sample=False), expected)


# ---------------------------------------------------------------- the command line


def test_cli_export_and_import_round_trip(trained, tmp_path, capsys):
    assert main(["export", "hf", "--ckpt", str(trained), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    _assert_same_weights(load_checkpoint(tmp_path / "back").model, load_checkpoint(trained).model)


def test_cli_mistakes_are_one_line_errors(tmp_path, capsys):
    alibi = GPT(GPTConfig.from_name("tiny", position="alibi"))
    ckpt = save_checkpoint(tmp_path / "alibi", alibi, "gpt", ByteTokenizer())
    (tmp_path / "notbdh").mkdir()
    (tmp_path / "notbdh" / "config.json").write_text('{"model_type": "gpt2"}')
    cases = [
        (["export", "hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "x")], "ALiBi"),
        (["import", "hf", str(tmp_path / "missing"), "--out", str(tmp_path / "y")], "not found"),
        (["import", "hf", str(tmp_path / "notbdh"), "--out", str(tmp_path / "y")], "'gpt2'"),
    ]
    for argv, message in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message.lower() in err.lower(), err
    with pytest.raises(ConversionError):
        import_hf(tmp_path / "notbdh", tmp_path / "z")
