"""`bdh <verb>`: parse arguments and call the library, nothing else.

Mistakes a user can make (a missing file, a bad value, a corrupt checkpoint) end with one line on
stderr and a non-zero exit code; set BDH_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from bdh.baseline.presets import LADDER, QUICK_LADDER
from bdh.data import NAMED_CORPORA
from bdh.train import TrainConfig

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C
DEFAULTS = TrainConfig()
LADDER_SIZES = [*LADDER, *QUICK_LADDER]

# Verbs register themselves here: name -> (help, add arguments, run).
Verb = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
VERBS: dict[str, Verb] = {}


def verb(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        VERBS[name] = (help, arguments, run)
        return run

    return register


def _bar(disabled: bool) -> bool:
    """A progress bar only on a terminal; logs and pipes get plain lines instead."""
    return not disabled and sys.stderr.isatty()


def _default(name: str) -> str:
    return f"(default: {getattr(DEFAULTS, name)})"


# ---------------------------------------------------------------------------- train


def _train_arguments(p: argparse.ArgumentParser) -> None:
    # Every default is None so that --resume can tell the options given from those left out:
    # given ones replace the saved settings, the rest come from the checkpoint.
    add = p.add_argument
    g = p.add_argument_group("model")
    g.add_argument("--model", help=f"model kind: bdh or gpt {_default('model')}")
    g.add_argument(
        "--preset",
        help="named shape: reference, small, tiny (bdh); small, tiny (gpt); or a size of the"
        f" parameter-matched ladder, for either model: {', '.join(LADDER_SIZES)} "
        + _default("preset"),
    )
    g.add_argument(
        "--config", dest="config_file", metavar="FILE",
        help="JSON object of model config fields applied over the preset, e.g. {\"n_layer\": 2}",
    )  # fmt: skip
    g = p.add_argument_group("data")
    g.add_argument(
        "--data", metavar="SOURCE",
        help=f"a text file, a folder of .txt files, or {', '.join(NAMED_CORPORA)}; a file splits"
        " 90/10 by bytes, a folder or named corpus by whole documents " + _default("data"),
    )  # fmt: skip
    g.add_argument(
        "--tokenizer", choices=("bytes", "bpe"),
        help="bytes: vocabulary 256, as in the paper; bpe: a byte-level BPE learned on the train"
        f" split and saved with the checkpoint {_default('tokenizer')}",
    )  # fmt: skip
    g.add_argument(
        "--bpe-vocab-size", type=int, metavar="V",
        help=f"vocabulary of the BPE learned on the train split {_default('bpe_vocab_size')}",
    )  # fmt: skip
    g.add_argument(
        "--batches", choices=("random", "stream"),
        help="random offsets, or temporally coherent streams where each row continues where it"
        f" stopped {_default('batches')}",
    )  # fmt: skip
    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--max-steps", type=int, metavar="N", help=f"optimizer steps {_default('max_steps')}"
    )
    g.add_argument(
        "--max-minutes", type=float, metavar="M",
        help="also stop after M minutes of training steps; the learning-rate decay then follows"
        " the clock when it is ahead of the steps, so the run ends annealed (default: no limit)",
    )  # fmt: skip
    g.add_argument(
        "--batch-size", type=int, metavar="B", help=f"rows per micro-batch {_default('batch_size')}"
    )
    g.add_argument(
        "--block-size", type=int, metavar="T", help=f"tokens per row {_default('block_size')}"
    )
    g.add_argument(
        "--grad-accum",
        type=int,
        metavar="K",
        help=f"micro-batches per step {_default('grad_accum')}",
    )
    g.add_argument("--lr", type=float, help=f"peak learning rate {_default('lr')}")
    g.add_argument("--min-lr", type=float, help="learning rate at the last step (default: lr / 10)")
    g.add_argument(
        "--warmup-steps", type=int, metavar="N", help=f"linear warmup {_default('warmup_steps')}"
    )
    g.add_argument(
        "--decay",
        choices=("cosine", "linear", "constant"),
        help=f"after warmup {_default('decay')}",
    )
    g.add_argument(
        "--weight-decay", type=float, help=f"AdamW weight decay {_default('weight_decay')}"
    )
    g.add_argument("--beta1", type=float, help=f"AdamW beta1 {_default('beta1')}")
    g.add_argument("--beta2", type=float, help=f"AdamW beta2 {_default('beta2')}")
    g.add_argument(
        "--grad-clip", type=float, help=f"max global gradient norm, 0 = off {_default('grad_clip')}"
    )
    g.add_argument(
        "--seed", type=int, help=f"seed of weights, batches and dropout {_default('seed')}"
    )
    g.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads; 0 = auto: torch's default, or 1 when the other processes"
        " already keep every core busy (default: 0)",
    )
    g = p.add_argument_group("paper regime and speed (bdh.distributed, bdh.speed)")
    g.add_argument(
        "--carry-state",
        action=argparse.BooleanOptionalAction,
        help="carry the attention state S from batch to batch (paper App. B, truncated BPTT:"
        " detached between batches, reset when the streams wrap); needs --batches stream"
        f" {_default('carry_state')}",
    )
    g.add_argument(
        "--recompute",
        action=argparse.BooleanOptionalAction,
        help="recompute each layer's activations in the backward pass: same results, a fraction"
        f" of the memory, about a third more compute {_default('recompute')}",
    )
    g.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        help="bf16: matrix products under bf16 autocast (fast only with native bf16, e.g."
        f" AVX512-BF16/AMX); the state stays float32 {_default('precision')}",
    )
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the model (needs a C++ compiler on CPU; eager with a warning"
        f" otherwise; the first steps compile) {_default('compile')}",
    )
    g.add_argument(
        "--device",
        metavar="DEVICE",
        help="cpu, cuda, cuda:K or auto (a GPU when there is one); under torchrun each process"
        f" takes the GPU of its LOCAL_RANK {_default('device')}",
    )
    g = p.add_argument_group("run")
    g.add_argument(
        "--out",
        metavar="DIR",
        help=f"run directory: checkpoint/ and metrics.jsonl {_default('out')}",
    )
    g.add_argument(
        "--eval-interval",
        type=int,
        metavar="N",
        help=f"validate every N steps {_default('eval_interval')}",
    )
    g.add_argument(
        "--eval-batches",
        type=int,
        metavar="N",
        help=f"batches per validation {_default('eval_batches')}",
    )
    g.add_argument(
        "--val-limit",
        type=int,
        metavar="N",
        help="validate on the first N tokens of the validation split only (default: all)",
    )
    g.add_argument(
        "--ckpt-interval",
        type=int,
        metavar="N",
        help=f"checkpoint every N steps {_default('ckpt_interval')}",
    )
    g.add_argument(
        "--log-interval",
        type=int,
        metavar="N",
        help=f"without a progress bar, a log line every N steps {_default('log_interval')}",
    )
    add(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint; options given here replace"
        " the saved ones",
    )
    add(
        "--no-progress",
        action="store_true",
        help="log lines instead of a progress bar (the default when stderr is not a terminal)",
    )


@verb("train", "train a model and save checkpoints", _train_arguments)
def _train(args: argparse.Namespace) -> int:
    from bdh.train import train

    skip = {"verb", "resume", "no_progress"}
    given = {k: v for k, v in vars(args).items() if v is not None and k not in skip}
    cfg = (
        TrainConfig.from_dict(given)
        if not args.resume
        else TrainConfig(out=given.get("out", DEFAULTS.out))
    )
    result = train(cfg, resume=args.resume, overrides=given, progress=_bar(args.no_progress))
    if result.status == "interrupted":  # 128 + the signal, as the shell reports it
        return 128 + result.signal if result.signal else EXIT_INTERRUPTED
    print(f"[train] done at step {result.step}; checkpoint {result.checkpoint}")
    return 0


# ---------------------------------------------------------------------------- eval


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="DIR", help="a checkpoint or a run directory")
    p.add_argument(
        "--data", metavar="SOURCE",
        help="evaluate on this source instead of the training data: a file is evaluated whole,"
        " a folder or named corpus on its validation split",
    )  # fmt: skip
    p.add_argument(
        "--split",
        choices=("train", "val", "all"),
        help="which part of the source (default: val, or all for a file)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        metavar="B",
        help="windows per forward pass (default: 32)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help="score only the first N tokens of the split (default: all of it)",
    )
    p.add_argument(
        "--stream-length", type=int, default=4096, metavar="L",
        help="the stream loss reads the split as consecutive streams of L tokens, each from an"
        " empty state carried through it, as generation reads (default: 4096); 0 = windows only",
    )  # fmt: skip
    p.add_argument(
        "--by-position", action="store_true",
        help="also the stream loss by position: 0-T, T-2T, 2T-4T, ... (T = the training block)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")  # fmt: skip


@verb("eval", "loss (nats/token) and bits per byte of a checkpoint: windows and stream",
      _eval_arguments)  # fmt: skip
def _eval(args: argparse.Namespace) -> int:
    import torch

    from bdh.streams import evaluate_checkpoint_streams, format_buckets
    from bdh.train import choose_threads, evaluate_checkpoint

    if args.stream_length < 0:
        raise ValueError(f"--stream-length must be >= 0, got {args.stream_length}")
    torch.set_num_threads(choose_threads())  # this process's setting: the CLI owns it
    progress = _bar(args.no_progress or args.json)
    result, what = evaluate_checkpoint(
        args.ckpt, args.data, args.split, args.batch_size, progress, args.max_tokens
    )
    stream = None
    if args.stream_length:
        stream, what = evaluate_checkpoint_streams(
            args.ckpt, args.data, args.split, args.max_tokens, args.stream_length,
            progress=progress,
        )  # fmt: skip
    if args.json:
        extra = {} if stream is None else {"stream": stream.to_dict()}
        if stream is not None and not args.by_position:
            del extra["stream"]["buckets"]
        print(json.dumps({**result.to_dict(), **what, **extra}))
        return 0
    print(
        f"{what['split']} split of {what['data']}: loss {result.loss:.4f} nats/token,"
        f" {result.bpb:.4f} bits/byte over {result.tokens:,} tokens ({result.bytes:,} bytes)"
    )
    if stream is not None:
        print(
            f"read as streams of {stream.length:,} tokens (the state carried, as generation"
            f" reads): loss {stream.loss:.4f} nats/token, {stream.bpb:.4f} bits/byte"
        )
    if stream is not None and args.by_position:
        print(format_buckets(stream))
    return 0


# ---------------------------------------------------------------------------- sample


def _sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="DIR", help="a checkpoint or a run directory")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=500,
        metavar="N",
        help="tokens to generate (default: 500)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        metavar="T",
        help="> 0; lower is more conservative (default: 0.8)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        metavar="K",
        help="sample among the K most likely tokens, K >= 1 (default: all)",
    )
    p.add_argument(
        "--top-p", type=float, metavar="P", help="nucleus sampling, P in (0, 1] (default: off)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")  # fmt: skip


@verb("sample", "generate text from a checkpoint, streamed as it is produced", _sample_arguments)
def _sample(args: argparse.Namespace) -> int:
    import torch

    from bdh.checkpoint import load_checkpoint
    from bdh.generate import check_sampling, stream
    from bdh.tokenizer import decode_stream
    from bdh.train import choose_threads

    check_sampling(args.temperature, args.top_k, args.top_p)
    torch.set_num_threads(choose_threads())
    ckpt = load_checkpoint(args.ckpt)
    # The prompt's own bytes: bytes that are not UTF-8 reach argv as surrogate escapes.
    prompt = os.fsencode(args.prompt or "\n")
    idx = torch.from_numpy(ckpt.tokenizer.encode(prompt).astype("int64"))[None]
    generator = torch.Generator().manual_seed(args.seed)
    ckpt.model.eval()
    tokens = stream(
        ckpt.model, idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p, generator
    )
    pieces = decode_stream(ckpt.tokenizer, (int(t[0, 0]) for t in tokens))
    first = next(pieces, "")  # errors surface before anything is printed
    sys.stdout.write(os.fsencode(args.prompt).decode("utf-8", "replace") + first)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# ---------------------------------------------------------------------------- translate


def _translate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="DIR", help="a checkpoint or a run directory")
    p.add_argument("--from", dest="src", default="en", metavar="LANG",
                   help="language code of the source, as in the <F:..> markers the model was"
                   " trained on (default: en)")  # fmt: skip
    p.add_argument("--to", dest="tgt", default="fr", metavar="LANG",
                   help="language code of the translation, as in the <T:..> markers"
                   " (default: fr)")  # fmt: skip
    p.add_argument(
        "--max-new-bytes", type=int, metavar="N",
        help="longest translation in bytes (default: twice the prompt, plus 16)",
    )  # fmt: skip
    p.add_argument("text", nargs="*", help="sentences to translate (default: lines of stdin)")


@verb(
    "translate",
    "translate sentences greedily with a model trained on <F:en>...<T:fr>... streams",
    _translate_arguments,
)
def _translate(args: argparse.Namespace) -> int:
    from bdh.translation import translate_checkpoint

    texts = args.text or [line.strip() for line in sys.stdin if line.strip()]
    for line in translate_checkpoint(args.ckpt, texts, args.src, args.tgt, args.max_new_bytes):
        print(line, flush=True)
    return 0


# ---------------------------------------------------------------------------- merge, grow, prune


def _merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("parents", nargs="+", metavar="CKPT", help="two or more BDH checkpoints")
    p.add_argument("--out", required=True, metavar="DIR", help="the merged checkpoint (new)")
    p.add_argument("--base", metavar="CKPT", help="the model the parents were fine-tuned from")
    p.add_argument(
        "--shared", choices=("mean", "task-arithmetic"), default="mean",
        help="embedding and output head: the parents' mean, or BASE + sum(parent - BASE)"
        " (needs --base) (default: mean)",
    )  # fmt: skip


@verb("merge", "join BDH models by concatenating their neurons (paper 7.1)", _merge_arguments)
def _merge(args: argparse.Namespace) -> int:
    from bdh.merge import merge_checkpoints

    print(merge_checkpoints(args.parents, args.out, args.base, args.shared))
    return 0


def _grow_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT", help="a BDH checkpoint")
    p.add_argument("--add-neurons", type=int, required=True, metavar="K",
                   help="new neurons per head (a multiple of n_embd / n_head, even)")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="the grown checkpoint (new)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new weights (default: 0)")


@verb("grow", "add neurons that leave the model's outputs unchanged until it trains",
      _grow_arguments)  # fmt: skip
def _grow(args: argparse.Namespace) -> int:
    from bdh.merge import grow_checkpoint

    print(grow_checkpoint(args.ckpt, args.out, args.add_neurons, seed=args.seed))
    return 0


def _prune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT", help="a BDH checkpoint")
    p.add_argument("--keep", type=float, required=True, metavar="F",
                   help="fraction of the neurons to keep, rounded to a multiple of"
                   " n_embd / n_head per head")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="the pruned checkpoint (new)")
    p.add_argument("--by", choices=("decoder", "firing"), default="decoder",
                   help="score of a neuron: its decoder row norm, or how often it fires on"
                   " --data (default: decoder)")  # fmt: skip
    p.add_argument("--data", metavar="SOURCE",
                   help="text for --by firing: its training split is read (a file, a folder or"
                   " a named corpus)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=65_536, metavar="N",
                   help="tokens of --data read for --by firing (default: 65536)")  # fmt: skip


@verb("prune", "drop the neurons that matter least (the reverse of grow)", _prune_arguments)
def _prune(args: argparse.Namespace) -> int:
    from bdh.merge import prune_checkpoint

    print(prune_checkpoint(args.ckpt, args.out, args.keep, args.by, args.data, args.max_tokens))
    return 0


# ---------------------------------------------------------------------------- experiment


def _experiment_arguments(p: argparse.ArgumentParser) -> None:
    from bdh.experiments import add_arguments

    add_arguments(p)


@verb("experiment", "BDH vs the GPT baseline (scaling, translation, length), merging, or inside"
      " BDH (surprisal, synapses, neuron-graph)",
      _experiment_arguments)  # fmt: skip
def _experiment(args: argparse.Namespace) -> int:
    from bdh.experiments import run

    run(args)
    return 0


# ---------------------------------------------------------------------------- export / import


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", choices=["hf"], help="hf: a Hugging Face transformers folder")
    p.add_argument("--ckpt", required=True, metavar="DIR", help="a checkpoint or a run directory")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write")


@verb("export", "write a checkpoint in another format (hf: a transformers folder; extra `hf`)",
      _export_arguments)  # fmt: skip
def _export(args: argparse.Namespace) -> int:
    out = _hf_convert().export_hf(args.ckpt, args.out)
    print(f"[export] {args.ckpt} -> {out} (AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def _import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", choices=["hf"], help="hf: a folder written by `bdh export hf`")
    p.add_argument("folder", metavar="DIR", help="the folder to read")
    p.add_argument("--out", required=True, metavar="DIR", help="the checkpoint to write")


@verb("import", "read a folder of another format back into a checkpoint (hf; extra `hf`)",
      _import_arguments)  # fmt: skip
def _import(args: argparse.Namespace) -> int:
    out = _hf_convert().import_hf(args.folder, args.out)
    print(f"[import] {args.folder} -> {out}")
    return 0


def _hf_convert():  # -> the module bdh.hf.convert
    try:
        from bdh.hf import convert
    except ImportError as e:  # the extra is not installed: one line, not a traceback
        raise ValueError(str(e)) from None
    return convert


# ---------------------------------------------------------------------------- inspect


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    s = sub.add_parser(
        "sparsity", help="fraction of firing x and y neurons per layer and head, dead neurons"
    )
    s.add_argument("--ckpt", required=True, metavar="DIR", help="a BDH checkpoint or run directory")
    s.add_argument(
        "--data", metavar="SOURCE",
        help="read this source instead of the training data: a file whole, a folder or named"
        " corpus on its validation split",
    )  # fmt: skip
    s.add_argument("--split", choices=("train", "val", "all"),
                   help="which part of the source (default: val, or all for a file)")  # fmt: skip
    s.add_argument("--max-tokens", type=int, metavar="N",
                   help="read only the first N tokens (default: all)")  # fmt: skip
    s.add_argument(
        "--block-size", type=int, metavar="T",
        help="window length, each from an empty state (default: the training block)",
    )  # fmt: skip
    s.add_argument(
        "--untrained", action="store_true",
        help="measure the checkpoint's model before training: same config, weights drawn with"
        " the run's seed",
    )  # fmt: skip
    s.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    s.add_argument("--neurons", action="store_true",
                   help="with --json, every neuron's count of tokens it fired on")  # fmt: skip
    s.add_argument("--plot", metavar="PNG", help="write firing-rate histograms to this file")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


@verb("inspect", "look inside a BDH checkpoint: sparsity of its neurons", _inspect_arguments)
def _inspect(args: argparse.Namespace) -> int:
    from bdh.interpret import sparsity

    progress = _bar(args.no_progress or args.json)
    stats, what = sparsity.sparsity_of_checkpoint(
        args.ckpt, args.data, args.split, args.max_tokens, args.block_size, args.untrained,
        progress=progress,
    )  # fmt: skip
    summary = stats.to_dict(neurons=args.neurons) | {"measured": what}
    if args.plot:
        sparsity.plot(stats, args.plot, f"{what['model']} {what['checkpoint']}")
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{what['model']} model of {what['checkpoint']}: {what['tokens']:,} tokens of the"
            f" {what['split']} split of {what['data']} in windows of {what['block_size']}"
        )
        print(sparsity.table_markdown({what["model"]: summary}), end="")
    return 0


# ---------------------------------------------------------------------------- view


def _synapse(text: str) -> tuple[int, int, int, int]:
    try:
        l, h, i, j = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected L,H,I,J (four integers), got {text!r}"
        ) from None
    return l, h, i, j


def _view_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="DIR", help="a checkpoint or a run directory")
    p.add_argument("--text", help="the passage to view (it is also the neuron pages' corpus)")
    p.add_argument(
        "--data",
        metavar="SOURCE",
        help="view the start of this source's validation split instead (a file, folder or named"
        " corpus); its first --corpus-tokens tokens are the neuron pages' corpus",
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=2000,
        metavar="N",
        help="passage length in tokens (default: 2000)",
    )
    p.add_argument(
        "--corpus-tokens",
        type=int,
        default=20_000,
        metavar="N",
        help="corpus length with --data (default: 20000)",
    )
    p.add_argument(
        "--synapse",
        type=_synapse,
        action="append",
        default=[],
        metavar="L,H,I,J",
        help="trace σ(i, j) of layer L, head H over the passage (repeatable)",
    )
    p.add_argument(
        "--synapses",
        metavar="FILE",
        help="trace the synapses listed in a synapse search result (JSON)",
    )
    p.add_argument("--out", default="report.html", help="the page to write (default: report.html)")


@verb(
    "view",
    "one self-contained HTML page of a passage's tokens, neurons and synapses",
    _view_arguments,
)
def _view(args: argparse.Namespace) -> int:
    from bdh.interpret.view import view_checkpoint

    page = view_checkpoint(
        args.ckpt,
        args.text,
        args.data,
        args.tokens,
        args.corpus_tokens,
        args.synapse,
        args.synapses,
    )
    path = page.save(args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


# ---------------------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line and exit code 1 like every other mistake."""

    def error(self, message: str) -> NoReturn:
        self.exit(
            EXIT_ERROR, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bdh", description="BDH (Baby Dragon Hatchling): train, sample and evaluate."
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (help, arguments, _) in VERBS.items():
        arguments(sub.add_parser(name, help=help, description=help))
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from bdh.train import TrainingDiverged

    # ValueError covers ConfigError, DataError, CheckpointError, TokenizerError and the model's
    # and sampler's argument checks; OSError a file that cannot be read or written.
    return (ValueError, OSError, TrainingDiverged)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = VERBS[args.verb][2]
    try:
        return run(args)
    except KeyboardInterrupt:
        print("bdh: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _user_errors() as e:
        if os.environ.get("BDH_DEBUG"):
            raise
        print(f"bdh {args.verb}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
