"""The transformers checks of tests/test_hf.py, run once on a trained checkpoint.

    python benchmarks/hf_check.py --ckpt runs/quickstart [--text FILE] [--out FILE.json]

Exports the checkpoint to a transformers folder, loads it with `AutoModelForCausalLM` and
`pipeline`, and compares every result with our own computation on the same model: logits (full
and through the cache), token-by-token decoding, greedy generation, left-padded batches, one
`Trainer` step's loss, and export → import. Differences are relative to the largest |logit|.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed", "O", "KING HENRY:\nOnce more unto"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def ids_of(text: str, tokenizer: Any) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(text).astype("int64")).view(1, -1)


def check(ckpt: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    import bdh.hf  # noqa: F401 (registers the Auto classes)
    from bdh.checkpoint import load_checkpoint
    from bdh.hf.convert import export_hf, import_hf, to_hf

    loaded = load_checkpoint(ckpt)
    ours, tok = loaded.model.eval(), loaded.tokenizer
    folder = export_hf(ckpt, work / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(args.seed)
    V = ours.config.vocab_size

    with torch.no_grad():
        idx = torch.randint(0, V, (args.batch, args.length), generator=g)
        expected = ours(idx)[0]
        out["logits_rel_diff_full"] = rel(theirs(idx, use_cache=False).logits, expected)
        out["logits_rel_diff_cache_prefill"] = rel(theirs(idx, use_cache=True).logits, expected)
        # token by token through the cache, every position against the full forward pass
        step = theirs(idx[:, :1])
        cache = step.cache if "cache" in step else step.past_key_values  # name before 5.24
        pieces = [step.logits]
        for t in range(1, args.length):
            pieces.append(theirs(idx[:, t : t + 1], cache=cache).logits)
        out["cached_decoding_rel_diff_every_position"] = rel(torch.cat(pieces, 1), expected)

    prompt = ids_of(PROMPTS[0], tok)
    mine = ours.generate(prompt, args.new_tokens, top_k=1)
    got = theirs.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
    out["greedy_generate_equal"] = bool(torch.equal(mine, got))

    rows = [ids_of(p, tok)[0] for p in PROMPTS]
    T = max(len(r) for r in rows)
    padded = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(padded)
    for b, r in enumerate(rows):
        padded[b, T - len(r) :], mask[b, T - len(r) :] = r, 1
    with torch.no_grad():
        logits = theirs(padded, attention_mask=mask).logits
        diffs = [rel(logits[b, -len(r) :], ours(r.view(1, -1))[0][0]) for b, r in enumerate(rows)]
    out["left_padding_rel_diff_max"] = max(diffs)
    gen = theirs.generate(padded, attention_mask=mask, max_new_tokens=40, do_sample=False)
    out["left_padding_generate_equal"] = all(
        torch.equal(gen[b, T:], ours.generate(r.view(1, -1), 40, top_k=1)[0, len(r) :])
        for b, r in enumerate(rows)
    )

    pipe = transformers.pipeline("text-generation", model=str(folder))
    text = pipe(PROMPTS[0], max_new_tokens=args.new_tokens, do_sample=False)[0]["generated_text"]
    from bdh.tokenizer import decode

    out["pipeline_equals_our_greedy_text"] = text == decode(tok, mine[0].tolist())
    out["pipeline_sample"] = text

    # One Trainer step on one batch, against our trainer's loss on that batch (train mode):
    # windows of --text, or of the greedy continuation when no text is given.
    source = ids_of(Path(args.text).read_text(), tok)[0] if args.text else mine[0]
    starts = torch.randint(0, len(source) - 65, (4,), generator=g)
    batch = torch.stack([source[s : s + 65] for s in starts.tolist()])
    ours.train()
    with torch.no_grad():
        our_loss = float(ours(batch[:, :-1], batch[:, 1:])[1])
    ours.eval()
    targs = transformers.TrainingArguments(
        output_dir=str(work / "trainer"), per_device_train_batch_size=4, max_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    data = [{"input_ids": r, "labels": r} for r in batch]
    trainer = transformers.Trainer(model=to_hf(ours), args=targs, train_dataset=data)
    hf_loss = trainer.train().training_loss
    out["trainer_step_loss"], out["our_loss_same_batch"] = hf_loss, our_loss
    out["trainer_loss_rel_diff"] = abs(hf_loss - our_loss) / abs(our_loss)

    back = load_checkpoint(import_hf(folder, work / "back")).model.state_dict()
    original = ours.state_dict()
    out["export_import_bit_exact"] = back.keys() == original.keys() and all(
        torch.equal(back[k], original[k]) for k in original
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="runs/quickstart")
    p.add_argument("--out", default=str(common.RESULTS / "hf_check_quickstart.json"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", help="a text file for the Trainer's batch (default: generated text)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    config = {**vars(args), "transformers": transformers.__version__}
    print(f"[hf_check] config {json.dumps(config)}")
    print(common.machine_line())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = check(args.ckpt, Path(tmp), args)
    for key, value in results.items():
        print(f"{key}: {value!r}")
    record = {
        "config": config,
        "machine": common.machine_info(),
        "results": results,
        "seconds": round(time.perf_counter() - start, 1),
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"[hf_check] wrote {args.out}")


if __name__ == "__main__":
    main()
