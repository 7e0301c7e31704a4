"""Per-token decode latency and peak memory against context length, all decoding paths, one run.

    python benchmarks/bench_decode.py                       # small preset, random weights
    python benchmarks/bench_decode.py --checkpoint runs/x   # a model trained by `bdh train`
    python benchmarks/bench_decode.py --quick               # contexts 64, 256, 1024; no memory
    python benchmarks/bench_decode.py --preset reference --contexts 256,1024 --max-full 0

For each context c, interleaved in one run and repeated over rounds (medians, per-round ratios):
- full:   one forward pass over the whole c-token prefix per new token (the reference's way);
- dense:  one step from the state S, every row of S, D_y and E touched;
- sparse: one step reading/writing only the rows of active neurons (`bdh.ops.sparse`); both
          compute x = relu(v D_x) with the same encoder (the fused one with --kernels cpp), so
          their ratio is what the sparsity saves;
- kv:     one step from a key-value cache of the c tokens (measured up to --max-kv; the engine
          itself switches to the state at T* = n·D/(n+D)).
Then: sparse vs dense at one context with the logits compared and densities printed; the
memory-bandwidth lower bound of a step (measured bandwidth, measured density) and the achieved
fraction; peak memory of each path per context, each in a fresh process.

Random weights fire ~50% of neurons; by default they are shifted so ~10% fire, as in a trained
model (--sparsify 0 keeps them as drawn). With --checkpoint, prompts are the corpus's text.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bdh import BDH, BDHConfig
from bdh.decode import DecodeOptions, Decoder
from bdh.ops import cpu_kernels
from common import (
    RESULTS,
    code_version,
    current_peak_rss_bytes,
    ensure_quiet_threads,
    fmt_bytes,
    fmt_seconds,
    interleaved,
    machine_info,
    machine_line,
    median,
    median_ratio,
    memory_bandwidth,
    reset_peak_rss,
    run_isolated,
    write_json,
)

CONTEXTS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
QUICK_CONTEXTS = (64, 256, 1024)
METHODS = ("full", "dense", "sparse", "kv")


# ---------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="small", help="config preset (default: small)")
    p.add_argument("--checkpoint", type=Path, default=None, help="a `bdh train` run or checkpoint")
    p.add_argument("--sparsify", type=float, default=0.1, help="target x density of random weights")
    p.add_argument(
        "--damping", choices=("none", "alibi"), default="none",
        help="state damping of random weights (default: none, as the README's table: a damped"
        " state is rescaled at every step, so it decodes by the dense step); a checkpoint keeps"
        " its own",
    )  # fmt: skip
    p.add_argument("--contexts", type=lambda s: [int(c) for c in s.split(",")], default=None)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7, quick 3)")
    p.add_argument("--steps", type=int, default=8, help="decode steps per sample")
    p.add_argument("--max-full", type=int, default=4096, help="longest context for full")
    p.add_argument("--max-kv", type=int, default=1024, help="longest context for the kv path")
    p.add_argument("--compare-at", type=int, default=1024, help="context of sparse vs dense")
    p.add_argument("--kernels", choices=("auto", "torch", "cpp"), default="auto")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--quick", action="store_true", help="3 contexts, 3 rounds, no memory")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: latency as seen; cpu: process CPU time, the latency alone on a shared machine"
        " (use with --threads 1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "bench_decode.json")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables here")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "CONTEXT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.contexts is None:
        args.contexts = list(QUICK_CONTEXTS if args.quick else CONTEXTS)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 7
    args.no_memory = args.no_memory or args.quick
    return args


# ---------------------------------------------------------------------- model and text
def build_model(args: argparse.Namespace) -> tuple[BDH, torch.Tensor, str]:
    """The model, a token stream long enough for every context, and how the weights were made."""
    if args.checkpoint is not None:
        return _from_checkpoint(args)
    torch.manual_seed(args.seed)
    damping = None if args.damping == "none" else args.damping
    model = BDH(BDHConfig.from_name(args.preset, damping=damping)).eval()
    what = "random weights"
    if args.sparsify > 0:
        got = sparsify_(model, args.sparsify, args.seed)
        what += f" shifted so x fires ~{got:.0%}"
    need = max(args.contexts) + (args.rounds + 2) * args.steps + 64
    g = torch.Generator().manual_seed(args.seed)
    return model, torch.randint(0, model.config.vocab_size, (need,), generator=g), what


def _from_checkpoint(args: argparse.Namespace) -> tuple[BDH, torch.Tensor, str]:
    from bdh.checkpoint import load_checkpoint
    from bdh.data import load_corpus

    ck = load_checkpoint(args.checkpoint)
    source = ck.meta.get("train", {}).get("data", "shakespeare")
    text = load_corpus(str(source)).split("val")
    need = max(args.contexts) + (args.rounds + 2) * args.steps + 64
    tokens = torch.as_tensor(ck.tokenizer.encode(text[: 8 * need]).astype("int64"))[:need]
    what = f"trained checkpoint {ck.path} (step {ck.meta.get('step', '?')}, {source} val text)"
    args.preset = ck.meta.get("train", {}).get("preset") or "checkpoint"
    return ck.model.eval(), tokens, what


@torch.no_grad()
def sparsify_(model: BDH, target: float, seed: int) -> float:
    """Shift random weights so that ~target of x fires; returns the density reached.

    LayerNorm removes any constant shift, so instead every stream is leaned towards one zero-mean
    direction e (embedding and decoder rows get +e; y ≥ 0 keeps E y leaning that way) and every
    neuron's encoder column away from it (−β e), with β found by bisection.
    """
    g = torch.Generator().manual_seed(seed)
    D = model.config.n_embd
    e = torch.randn(D, generator=g)
    e = (e - e.mean()) / (e - e.mean()).norm()
    model.embed.weight.add_(0.3 * e)
    model.decoder.add_(0.005 * e)
    base = model.encoder.clone()
    idx = torch.randint(0, model.config.vocab_size, (1, 257), generator=g)
    lo, hi, got = 0.0, 0.2, 1.0
    for _ in range(12):
        beta = (lo + hi) / 2
        model.encoder.copy_(base - beta * e.view(1, D, 1))
        got = step_stats(model, idx)["x"]
        lo, hi = (beta, hi) if got > target else (lo, beta)
    return got


def step_stats(model: BDH, idx: torch.Tensor, steps: int = 1) -> dict[str, float]:
    """Mean densities of x, rotated keys and y over layers, over the last `steps` tokens of idx."""
    dec = model.decoding_engine(DecodeOptions(kv="off", kernels="torch"))
    state = dec.init_state(1)
    dec.prefill(idx[:, :-steps], state)
    totals = {"x": 0.0, "k": 0.0, "y": 0.0}
    T = idx.shape[1]
    for t in range(T - steps, T):
        dec.step(idx[:, t : t + 1], state)
        for key in totals:
            totals[key] += sum(s[key] for s in dec.last_stats) / len(dec.last_stats) / steps
    return totals


# ---------------------------------------------------------------------- cases
def engine_options(method: str, args: argparse.Namespace, kv_room: int = 0) -> DecodeOptions:
    kernels = args.kernels_used
    if method == "dense":  # the same encoder as the sparse step: only the sparsity differs
        return DecodeOptions(attention="dense", y_path="dense", kv="off", kernels=kernels)
    if method == "sparse":
        return DecodeOptions(attention="sparse", y_path="sparse", kv="off", kernels=kernels)
    if method == "kv":  # sparse reads of the cache; room so the timed steps stay in the cache
        return DecodeOptions(kv="on", kv_crossover=kv_room, kernels=kernels)
    raise ValueError(method)


def decode_case(model: BDH, tokens: torch.Tensor, c: int, options: DecodeOptions) -> Callable:
    """One step per call from a state that has read c tokens; feeds the text's next tokens."""
    dec = Decoder(model, options)
    state = dec.init_state(1)
    dec.prefill(tokens[None, :c], state)
    cursor = [c]

    def run() -> Any:
        cursor[0] += 1
        return dec.step(tokens[None, cursor[0] - 1 : cursor[0]], state)

    return run


def full_case(model: BDH, tokens: torch.Tensor, c: int) -> Callable:
    prefix = tokens[None, :c]

    def run() -> Any:
        with torch.no_grad():
            return model(prefix)[0][:, -1]

    return run


def latency(model: BDH, tokens: torch.Tensor, args: argparse.Namespace) -> dict[int, dict]:
    """Seconds per token for every method and context, interleaved: {c: {method: samples}}."""
    cases: dict[str, Callable] = {}
    inner: dict[str, int] = {}
    room = (args.rounds + 2) * args.steps + 1
    for c in args.contexts:
        if c <= args.max_full:
            cases[f"full@{c}"] = full_case(model, tokens, c)
        for method in ("dense", "sparse", "kv"):
            if method == "kv" and c > args.max_kv:
                continue
            options = engine_options(method, args, kv_room=c + room)
            cases[f"{method}@{c}"] = decode_case(model, tokens, c, options)
            inner[f"{method}@{c}"] = args.steps
    times = interleaved(cases, rounds=args.rounds, warmup=1, inner=inner, clock=args.clock)
    out: dict[int, dict] = {c: {} for c in args.contexts}
    for name, samples in times.items():
        method, c = name.split("@")
        out[int(c)][method] = samples
    return out


# ---------------------------------------------------------------------- sparse vs dense
def compare_sparse_dense(model: BDH, tokens: torch.Tensor, args: argparse.Namespace) -> dict:
    """At one context: logits of every variant vs dense on the same tokens, and their speed."""
    c = args.compare_at
    variants = {
        "dense": engine_options("dense", args),
        "dense-torch": DecodeOptions(attention="dense", y_path="dense", kv="off", kernels="torch"),
        "sparse-torch": DecodeOptions(
            attention="sparse", y_path="sparse", kv="off", kernels="torch"
        ),
        "sparse": engine_options("sparse", args),
        "sparse-bf16": DecodeOptions(
            attention="sparse",
            y_path="sparse",
            kv="off",
            kernels=args.kernels_used,
            weights="bfloat16",
        ),
    }
    steps = 16
    logits = {}
    for name, options in variants.items():
        dec = Decoder(model, options)
        state = dec.init_state(1)
        dec.prefill(tokens[None, :c], state)
        logits[name] = torch.cat(
            [dec.step(tokens[None, c + i : c + i + 1], state) for i in range(steps)]
        )
    scale = float(logits["dense"].abs().max())
    errors = {k: float((v - logits["dense"]).abs().max()) / scale for k, v in logits.items()}
    cases = {k: decode_case(model, tokens, c, o) for k, o in variants.items()}
    times = interleaved(cases, args.rounds, 1, dict.fromkeys(cases, args.steps), clock=args.clock)
    density = step_stats(model, tokens[None, : c + steps], steps)
    return {"context": c, "rel_error_vs_dense": errors, "samples": times, "density": density}


# ---------------------------------------------------------------------- memory-bandwidth bound
def step_bytes(model: BDH, density: dict[str, float]) -> dict[str, float]:
    """Bytes a step cannot avoid: D_x and D_y once per layer, the E rows of active y,
    the state rows of active keys read and written once, at the measured densities."""
    c = model.config
    f = model.lm_head.element_size()
    nD = c.n * c.n_embd
    per_layer = 2 * nD * f + density["y"] * nD * f + 2 * density["k"] * nD * 4
    head = (c.vocab_size * c.n_embd) * f + c.n_embd * f  # lm_head, one embedding row
    return {"per_layer": per_layer, "total": c.n_layer * per_layer + head}


def bound(model: BDH, density: dict[str, float], bandwidth: dict[str, float]) -> dict[str, float]:
    bw = max(bandwidth["read_Bps"], bandwidth["copy_Bps"])
    nbytes = step_bytes(model, density)["total"]
    return {"bytes": nbytes, "bandwidth_Bps": bw, "seconds": nbytes / bw}


# ---------------------------------------------------------------------- peak memory
def child(args: argparse.Namespace) -> None:
    """In a fresh process: prefill one context with one method, decode, print peak RSS (JSON)."""
    method, c = args.child[0], int(args.child[1])
    model, tokens, _ = build_model(args)
    args.kernels_used = resolve_kernels(args.kernels)
    base = current_rss()
    reset_peak_rss()  # from here on: what this path adds to a loaded model
    if method == "full":
        full_case(model, tokens, c)()
    else:
        room = 2 * args.steps + 1
        run = decode_case(model, tokens, c, engine_options(method, args, kv_room=c + room))
        for _ in range(args.steps):
            run()
    print(json.dumps({"peak": current_peak_rss_bytes(), "base": base}))


def current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def memory(args: argparse.Namespace, argv: list[str]) -> dict[int, dict[str, dict]]:
    """Peak RSS above the process's baseline (model loaded), per method and context."""
    script = str(Path(__file__).resolve())
    out: dict[int, dict[str, dict]] = {}
    for c in args.contexts:
        out[c] = {}
        for method in METHODS:
            if (method == "full" and c > args.max_full) or (method == "kv" and c > args.max_kv):
                continue
            out[c][method] = run_isolated([script, *argv, "--child", method, str(c)])
    return out


# ---------------------------------------------------------------------- reporting
def resolve_kernels(choice: str) -> str:
    if choice == "auto":
        return "cpp" if cpu_kernels.available() else "torch"
    return choice


def rows_of(lat: dict[int, dict], mem: dict[int, dict] | None) -> list[dict[str, Any]]:
    base = min(lat)
    rows = []
    for c, m in sorted(lat.items()):
        row: dict[str, Any] = {"context": c}
        for method, samples in m.items():
            row[f"{method}_s"] = median(samples)
            if method in lat[base]:
                row[f"{method}_vs_shortest"] = median_ratio(samples, lat[base][method])
        if "full" in m:
            for method in ("dense", "sparse", "kv"):
                if method in m:
                    row[f"full_over_{method}"] = median_ratio(m["full"], m[method])
        if mem and c in mem:
            for method, r in mem[c].items():
                row[f"{method}_peak_extra"] = r["peak"] - r["base"]
                row[f"{method}_peak"] = r["peak"]
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], mem: bool) -> str:
    head = "| context | full | dense | sparse | kv | full/sparse |"
    sep = "|---:|---:|---:|---:|---:|---:|"
    if mem:
        head += " peak RSS (above the loaded model): full | dense | sparse | kv |"
        sep += "---:|---:|---:|---:|"
    lines = [head, sep]
    for r in rows:
        cells = [str(r["context"])]
        for m in METHODS:
            cells.append(fmt_seconds(r[f"{m}_s"]) if f"{m}_s" in r else "–")
        ratio = r.get("full_over_sparse")
        cells.append(f"{ratio:.0f}×" if ratio else "–")
        if mem:
            for m in METHODS:
                if f"{m}_peak" not in r:
                    cells.append("–")
                    continue
                extra = fmt_bytes(r[f"{m}_peak_extra"])
                cells.append(f"{fmt_bytes(r[f'{m}_peak'])} (+{extra})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_table(cmp: dict) -> str:
    t = cmp["samples"]
    lines = ["| variant | per token | dense / variant | max logit error vs dense (rel.) |"]
    lines.append("|---|---:|---:|---:|")
    for name, samples in t.items():
        speed = median_ratio(t["dense"], samples)
        err = cmp["rel_error_vs_dense"][name]
        lines.append(f"| {name} | {fmt_seconds(median(samples))} | {speed:.2f}× | {err:.1e} |")
    return "\n".join(lines)


def checks(rows: list[dict], cmp: dict, bnd: dict, sparse_s: float) -> dict[str, dict]:
    """The project's decoding targets that this run can speak to: value, target, met."""
    by = {r["context"]: r for r in rows}
    t = cmp["samples"]
    found: list[tuple[str, float | None, float, bool]] = [  # name, value, limit, at_least
        ("dense state step, context 4096 / 64", _get(by, 4096, "dense_vs_shortest"), 1.5, False),
        ("full / dense step at 1024", _get(by, 1024, "full_over_dense"), 50, True),
        ("dense / sparse step", median_ratio(t["dense"], t["sparse"]), 1.5, True),
        ("sparse logits rel. error", cmp["rel_error_vs_dense"]["sparse"], 1e-5, False),
        ("sparse latency 8192 / 256", _ratio(by, "sparse_s", 8192, 256), 1.2, False),
        ("peak memory 8192 / 256", _ratio(by, "sparse_peak_extra", 8192, 256), 1.1, False),
        ("lower bound / sparse step", bnd["seconds"] / sparse_s, 0.5, True),
        ("full / sparse step at 1024", _get(by, 1024, "full_over_sparse"), 100, True),
    ]
    out = {}
    for name, value, limit, at_least in found:
        if value is not None:
            met = value >= limit if at_least else value <= limit
            target = f"{'>=' if at_least else '<='} {limit:g}"
            out[name] = {"value": value, "target": target, "met": met}
    return out


def _get(by: dict, c: int, key: str) -> float | None:
    return by.get(c, {}).get(key)


def _ratio(by: dict, key: str, a: int, b: int) -> float | None:
    x, y = _get(by, a, key), _get(by, b, key)
    return None if x is None or y is None else x / y


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    ensure_quiet_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    args.kernels_used = resolve_kernels(args.kernels)
    model, tokens, weights = build_model(args)
    cfg, info = model.config, machine_info()
    head = (
        f"config: preset={args.preset} L={cfg.n_layer} D={cfg.n_embd} nh={cfg.n_head} N={cfg.N}"
        f" n={cfg.n} params={model.num_params():,} T*={Decoder(model).crossover} batch=1"
        f" float32; {weights}; sparse kernels: {args.kernels_used}"
    )
    print(head)
    print(machine_line(info))
    print(
        f"rounds={args.rounds} (+1 warm-up), {args.steps} steps per sample, {args.clock} clock;"
        " medians\n"
    )
    bw = memory_bandwidth(clock=args.clock)
    lat = latency(model, tokens, args)
    cmp = compare_sparse_dense(model, tokens, args)
    bw_end = memory_bandwidth(clock=args.clock)
    bw = {k: max(bw[k], bw_end[k]) for k in bw}
    mem = None if args.no_memory else memory(args, [a for a in argv if a != "--quick"])
    rows = rows_of(lat, mem)
    at = args.compare_at if args.compare_at in lat else max(lat)
    sparse_s = median(lat[at]["sparse"])
    bnd = bound(model, cmp["density"], bw)
    d = cmp["density"]
    lines = [
        head,
        machine_line(info),
        "",
        table(rows, mem is not None),
        "",
        f"sparse vs dense at context {cmp['context']} (density of x {d['x']:.1%},"
        f" rotated keys {d['k']:.1%}, y {d['y']:.1%}, mean over layers):",
        "",
        compare_table(cmp),
        "",
        f"memory bandwidth {bw['read_Bps'] / 1e9:.1f} GB/s read, {bw['copy_Bps'] / 1e9:.1f} GB/s"
        f" copy; lower bound of a step {fmt_bytes(bnd['bytes'])} → {fmt_seconds(bnd['seconds'])};"
        f" sparse step at {at}: {fmt_seconds(sparse_s)} = {bnd['seconds'] / sparse_s:.0%} of the"
        " bound's speed",
    ]
    text = "\n".join(lines[3:])
    print(text)
    result = checks(rows, cmp, bnd, sparse_s)
    print()
    for name, v in result.items():
        print(f"{name}: {v['value']:.3g} (target {v['target']}) {'MET' if v['met'] else 'NOT MET'}")
    payload = {
        "benchmark": "bench_decode",
        "code": code_version(),
        "argv": argv,
        "config": cfg.to_dict(),
        "weights": weights,
        "machine": info,
        "bandwidth": bw,
        "bound": bnd,
        "rows": rows,
        "samples": {str(c): m for c, m in lat.items()},
        "compare": cmp,
        "memory": mem,
        "checks": result,
        "markdown": "\n".join(lines),
    }
    print(f"\nwrote {write_json(args.out, payload)}")
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
