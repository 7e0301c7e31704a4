"""Fuzzing the user's inputs: every case ends in a result or one line and exit code 1.

Hypothesis draws `config.json` values, byte flips and truncations of every checkpoint file, CLI
arguments and malformed data files; each case runs the CLI in-process (`bdh.cli.main`) and
checks its outcome: exit code 0, or exit code 1 with exactly one line on stderr and no traceback.
Any other exception fails the case (the CLI lets unexpected errors through as tracebacks), and a
case that runs longer than HANG_SECONDS fails as a hang.

Profiles: the default suite draws a few cases per target; `BDH_FUZZ=long` draws LONG_FACTOR times
more. `BDH_FUZZ_REPORT=FILE` writes the case counts and outcomes as JSON.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bdh.cli import main
from conftest import synthetic_text

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = os.environ.get("BDH_FUZZ") == "long"
LONG_FACTOR = 20
HANG_SECONDS = 120  # generous: the machine may be shared; a real hang never ends


def fuzz(examples: int):
    """Hypothesis settings of one target: `examples` cases (times LONG_FACTOR when long)."""
    return settings(
        max_examples=examples * (LONG_FACTOR if LONG else 1),
        deadline=None,  # timing varies on shared cores; hangs are caught by the alarm instead
        derandomize=not LONG,  # the default suite draws the same cases every time
        suppress_health_check=list(HealthCheck),
        database=None,
    )


OUTCOMES: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    target = os.environ.get("BDH_FUZZ_REPORT")
    if target:
        cases: dict = {}
        for (name, outcome), n in OUTCOMES.items():
            cases.setdefault(name, {})[outcome] = n
        report = {"profile": "long" if LONG else "default", "cases": cases}
        report["total"] = sum(OUTCOMES.values())
        Path(target).write_text(json.dumps(report, indent=2) + "\n")


class Hang(Exception):
    pass


@contextlib.contextmanager
def _alarm(seconds: int):
    def ring(signum, frame):
        raise Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(target: str, argv: list[str]) -> tuple[int, str]:
    """Run `bdh argv` in-process; assert it ended in a result or one clean error line."""
    err, out = io.StringIO(), io.StringIO()
    with _alarm(HANG_SECONDS), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: --help or a bad argument
            code = e.code
    lines = err.getvalue().strip().splitlines()
    assert code in (0, 1), (argv, code, err.getvalue())
    assert "Traceback" not in err.getvalue(), err.getvalue()
    if code == 1:
        assert len(lines) == 1 and "error" in lines[0], (argv, err.getvalue())
    OUTCOMES[target, "result" if code == 0 else "one-line error"] += 1
    return code, lines[0] if lines else ""


# ---------------------------------------------------------------- fixtures: two trained runs


TINY = ["--batch-size", "4", "--block-size", "16", "--eval-batches", "2", "--threads", "1"]
TINY += ["--no-progress", "--max-steps", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A byte-level BDH and a BPE GPT (learned positions: a context it cannot exceed)."""
    root = tmp_path_factory.mktemp("fuzz")
    data = root / "text.txt"
    data.write_text(synthetic_text(6000))
    out = {"data": data}
    with contextlib.redirect_stdout(io.StringIO()):
        for name, extra in {
            "bdh": ["--preset", "tiny"],
            "gpt": ["--model", "gpt", "--preset", "tiny", "--tokenizer", "bpe"],
        }.items():
            args = ["train", "--data", str(data), "--out", str(root / name), *TINY, *extra]
            assert main(args) == 0
            out[name] = root / name
    return out


@pytest.fixture
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("case")


def _copy_run(run: Path, scratch: Path) -> Path:
    target = scratch / f"run{len(list(scratch.iterdir()))}"
    shutil.copytree(run, target)
    return target


# ---------------------------------------------------------------- config.json values

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from([0, 1, 2, -1, 2**31, 2**63, 10**6, 0.5, "bdh", "gpt", "bpe", "../x"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)
CONFIG_FIELDS = ["n_layer", "n_embd", "n_head", "mlp_internal_dim_multiplier", "dropout"]
CONFIG_FIELDS += ["vocab_size", "attention", "chunk_size", "damping", "no_bptt", "residual"]
CONFIG_FIELDS += ["layernorm", "rope", "meta", "block_size", "bias", "position", "unknown"]
TOP_FIELDS = ["format", "version", "model", "config", "tokenizer", "weights_sha256", "meta"]


@st.composite
def config_edits(draw):
    """A few (where, field, value) edits; where is the model config or the top level."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            field = draw(st.sampled_from(CONFIG_FIELDS))
            # n_layer costs time, not memory, in BDH (one set of weights for every layer):
            # a deep but valid config is a slow model, not a hang, so keep it small here.
            value = draw(st.integers(-3, 64) if field == "n_layer" else JSON_VALUES)
            edits.append(("config", field, value))
        else:
            edits.append(("top", draw(st.sampled_from(TOP_FIELDS)), draw(JSON_VALUES)))
    return edits


@fuzz(25)
@given(kind=st.sampled_from(["bdh", "gpt"]), edits=config_edits())
def test_fuzz_config_json_values(runs, scratch, kind, edits):
    run = _copy_run(runs[kind], scratch)
    file = run / "checkpoint" / "config.json"
    data = json.loads(file.read_text())
    for where, field, value in edits:
        if where == "top":
            data[field] = value
        elif isinstance(data.get("config"), dict):
            data["config"][field] = value
    file.write_text(json.dumps(data))
    run_cli("config.json values", ["sample", "--ckpt", str(run), "--max-new-tokens", "2"])


# ---------------------------------------------------------------- bytes of every checkpoint file

FILES = {
    "bdh": ["config.json", "model.safetensors", "trainer_state.json", "trainer_state.safetensors"],
    "gpt": ["tokenizer.json"],
}


@st.composite
def damage(draw, size: int):
    """Flips, a truncation or appended junk, anywhere or in the first bytes (the headers)."""
    how = draw(st.sampled_from(["flip", "flip-header", "truncate", "append"]))
    if how == "truncate":
        return how, [draw(st.integers(0, max(0, size - 1)))]
    if how == "append":
        return how, list(draw(st.binary(min_size=1, max_size=64)))
    top = min(size, 200) if how == "flip-header" else size
    positions = st.integers(0, max(0, top - 1))
    return how, draw(st.lists(st.tuples(positions, st.integers(1, 255)), min_size=1, max_size=8))


def _damaged(data: bytes, how: str, what: list) -> bytes:
    if how == "truncate":
        return data[: what[0]]
    if how == "append":
        return data + bytes(what)
    out = bytearray(data)
    for pos, mask in what:
        out[pos] ^= mask
    return bytes(out)


@fuzz(25)
@given(
    target=st.sampled_from([(k, f) for k, files in FILES.items() for f in files]),
    without_checksum=st.booleans(),
    data=st.data(),
)
def test_fuzz_byte_flips_and_truncations_of_every_checkpoint_file(
    runs, scratch, target, without_checksum, data
):
    kind, name = target
    run = _copy_run(runs[kind], scratch)
    ckpt = run / "checkpoint"
    if without_checksum:  # as a stranger could: reach the safetensors parser itself
        config = json.loads((ckpt / "config.json").read_text())
        config.pop("weights_sha256")
        (ckpt / "config.json").write_text(json.dumps(config))
    raw = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes(_damaged(raw, *data.draw(damage(len(raw)))))
    if name.startswith("trainer_state"):  # read only when resuming: resume for one step
        step = json.loads(raw)["step"] if name.endswith(".json") else 2
        argv = ["train", "--resume", "--out", str(run), "--max-steps", str(step + 1)]
    else:
        argv = ["sample", "--ckpt", str(run), "--max-new-tokens", "2", "--prompt", "The "]
    run_cli(f"bytes of {name}", argv)


# ---------------------------------------------------------------- CLI arguments

NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "-1", "1", "nan", "inf", "-inf", "1e308", "", " ", "0x10", "٣", "1_0"]),
)
# Text with what a terminal can hand over: any Unicode, lone surrogates (undecodable bytes in
# argv arrive as surrogate escapes), control characters, and very long prompts.
TEXT = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.sampled_from(["", "\0", "\udcff\udcfe", "x" * 300, "\n" * 70]),
)
SMALL = st.integers(-5, 8).map(str)  # counts that would otherwise run for long stay small


@fuzz(25)
@given(
    kind=st.sampled_from(["bdh", "gpt"]),
    options=st.dictionaries(
        st.sampled_from(["--temperature", "--top-k", "--top-p", "--seed", "--max-new-tokens"]),
        NUMBERS,
        max_size=4,
    ),
    tokens=SMALL,
    prompt=TEXT,
)
@example(kind="gpt", options={}, tokens="0", prompt="\udc80")  # found: BPE took no surrogates
@example(kind="bdh", options={"--temperature": "4e-78"}, tokens="1", prompt="")  # found: NaN
def test_fuzz_sample_arguments(runs, kind, options, tokens, prompt):
    if "--max-new-tokens" in options and not _small(options["--max-new-tokens"]):
        options["--max-new-tokens"] = tokens
    argv = ["sample", "--ckpt", str(runs[kind]), "--prompt", prompt]
    argv += [x for pair in options.items() for x in pair]
    if "--max-new-tokens" not in options:
        argv += ["--max-new-tokens", tokens]
    run_cli("sample arguments", argv)


def _small(text: str) -> bool:
    try:
        return int(text) <= 8
    except ValueError:
        return True  # not an integer: argparse refuses it


@fuzz(12)
@given(
    kind=st.sampled_from(["bdh", "gpt"]),
    batch=NUMBERS,
    max_tokens=st.one_of(NUMBERS, st.integers(1, 500).map(str)),
    split=st.sampled_from(["train", "val", "all", "nope", ""]),
)
@example(kind="bdh", batch="-1", max_tokens="16", split="train")  # found: 0 windows, 0 / 0
def test_fuzz_eval_arguments(runs, kind, batch, max_tokens, split):
    if _int(batch) is not None and _int(batch) > 64:
        batch = "64"  # windows per pass: a valid huge batch is a memory request, not a mistake
    argv = ["eval", "--ckpt", str(runs[kind]), "--batch-size", batch, "--split", split]
    argv += ["--max-tokens", max_tokens, "--no-progress"]
    run_cli("eval arguments", argv)


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


TRAIN_NUMBERS = ["--lr", "--min-lr", "--warmup-steps", "--weight-decay", "--beta1", "--beta2"]
TRAIN_NUMBERS += ["--grad-clip", "--seed", "--eval-interval", "--ckpt-interval", "--block-size"]
TRAIN_NUMBERS += ["--grad-accum", "--batch-size", "--max-minutes", "--bpe-vocab-size"]


@fuzz(15)
@given(
    options=st.dictionaries(st.sampled_from(TRAIN_NUMBERS), NUMBERS, min_size=1, max_size=3),
    preset=st.sampled_from(["tiny", "tiny", "nope", ""]),
)
@example(options={"--lr": "1e308"}, preset="tiny")  # found: AdamW overflowed float32
@example(options={"--seed": str(2**64)}, preset="tiny")
def test_fuzz_train_arguments(runs, scratch, options, preset):
    for name in ("--batch-size", "--block-size", "--grad-accum", "--bpe-vocab-size"):
        if name in options and (_int(options[name]) or 0) > 32:
            options[name] = "32"  # bounded work; 0, negative and non-numbers still reach us
    argv = ["train", "--data", str(runs["data"]), "--out", str(scratch / "run")]
    argv += ["--preset", preset, *TINY, "--max-steps", "1"]
    argv += [x for pair in options.items() for x in pair]
    run_cli("train arguments", argv)


# ---------------------------------------------------------------- malformed data files


@st.composite
def data_sources(draw, root: Path) -> Path:
    how = draw(st.sampled_from(["binary", "invalid-utf8", "empty-files", "no-txt", "tiny", "mix"]))
    path = root / f"data{len(list(root.iterdir()))}"
    if how in ("binary", "invalid-utf8", "tiny"):
        size = {"binary": (0, 3000), "invalid-utf8": (1, 3000), "tiny": (0, 20)}[how]
        body = draw(st.binary(min_size=size[0], max_size=size[1]))
        if how == "invalid-utf8":
            body = b"\xff\xfe" + body + b"\xc3"  # never valid UTF-8
        path = path.with_suffix(".txt")
        path.write_bytes(body)
        return path
    path.mkdir()
    count = draw(st.integers(1, 4))
    for i in range(count):
        if how == "empty-files":
            (path / f"{i}.txt").write_bytes(b"")
        elif how == "no-txt":
            (path / f"{i}.bin").write_bytes(b"not text")
        else:  # a mix of empty, binary and real documents
            body = draw(st.sampled_from([b"", synthetic_text(600, seed=i).encode(), b"\xff" * 99]))
            (path / f"{i}.txt").write_bytes(body)
    return path


@fuzz(15)
@given(
    verb=st.sampled_from(["train", "eval"]),
    tokenizer=st.sampled_from(["bytes", "bpe"]),
    data=st.data(),
)
def test_fuzz_malformed_data_files(runs, scratch, verb, tokenizer, data):
    source = data.draw(data_sources(scratch))
    if verb == "train":
        argv = ["train", "--data", str(source), "--out", str(scratch / "run"), "--preset", "tiny"]
        argv += [*TINY, "--max-steps", "1", "--tokenizer", tokenizer, "--bpe-vocab-size", "260"]
    else:
        argv = ["eval", "--ckpt", str(runs["bdh" if tokenizer == "bytes" else "gpt"])]
        argv += ["--data", str(source), "--no-progress"]
    run_cli("malformed data files", argv)


# ---------------------------------------------------------------- a few in a real process


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "--ckpt", "{bdh}", "--prompt", "\udcff\udcfe", "--max-new-tokens", "2"],
        ["sample", "--ckpt", "{gpt}", "--prompt", "caf\udcc3", "--max-new-tokens", "2"],
        ["eval", "--ckpt", "{gpt}", "--batch-size", "-3"],
    ],
)
def test_a_few_cases_in_a_real_process(runs, argv):
    argv = [a.format(**runs) for a in argv]
    # A real argv carries bytes: undecodable ones arrive as surrogate escapes, as drawn above.
    argv = [a.encode("utf-8", "surrogateescape") for a in argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "bdh.cli", *argv], capture_output=True, env=env, timeout=120
    )
    err = done.stderr.decode(errors="replace")
    assert done.returncode in (0, 1) and "Traceback" not in err, err
    if done.returncode == 1:
        assert len(err.strip().splitlines()) == 1, err
    OUTCOMES["real process", "result" if done.returncode == 0 else "one-line error"] += 1
