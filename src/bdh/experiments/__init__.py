"""Experiments that compare BDH with the GPT baseline, each in one command.

    bdh experiment scaling [--quick] [...]       # loss vs parameters, time and FLOPs (Fig. 7)
    bdh experiment translation [--quick] [...]   # En-Fr BLEU/chrF at equal parameters and tokens
    bdh experiment surprisal --ckpt C [--quick]  # neuron activity against surprisal (Fig. 14)
    bdh experiment synapses --ckpt C [--quick]   # concept synapses, held-out (Figs. 11-13)

`benchmarks/scaling.py` and `benchmarks/translation.py` run the same code. Each writes
`<name>.json` (every number), `<name>.md` (the README table) and, for scaling, `<name>.png`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

EXPERIMENTS = ("scaling", "translation", "surprisal", "synapses")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `bdh experiment NAME`; every default is None, so the experiment's own
    defaults (full or --quick) apply to what is left out."""
    sub = p.add_subparsers(dest="experiment", required=True, metavar="NAME")
    scaling = sub.add_parser("scaling", help="BDH vs GPT validation loss at matched sizes")
    scaling.add_argument("--sizes", type=_names, help="ladder sizes, comma-separated"
                         " (default: 360k,1m,3m; quick: q70k,q170k,q470k)")  # fmt: skip
    scaling.add_argument("--data", metavar="SOURCE", help="bdh.data source (default: shakespeare)")
    translation = sub.add_parser("translation", help="BDH vs GPT En-Fr BLEU and chrF")
    translation.add_argument(
        "--pairs", metavar="FILE",
        help="source<TAB>target pairs (default: $BDH_SHARED_DATA/tatoeba_eng_fra.tsv)",
    )  # fmt: skip
    translation.add_argument(
        "--limit", type=int, metavar="N",
        help="use the first N pairs, 0 = all (default: 50000, the shortest sentences)",
    )  # fmt: skip
    translation.add_argument("--size", help="ladder size of both models (default: 1m)")
    translation.add_argument(
        "--test-sentences", type=int, metavar="N",
        help="held-out sources translated per direction (default: 500)",
    )  # fmt: skip
    for q in (scaling, translation):
        _common_arguments(q)
    from bdh.experiments import surprisal

    surprisal.add_arguments(
        sub.add_parser("surprisal", help="a checkpoint's neuron activity against its surprisal")
    )
    from bdh.experiments import synapses

    synapses.add_arguments(
        sub.add_parser("synapses", help="a concept's synapse: searched, tested held-out, En/Fr")
    )


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny sizes and budget: a smoke test")
    p.add_argument(
        "--tokens", type=int, metavar="N",
        help="training tokens per run (default: 262144 scaling, 655360 translation; quick 8192)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, metavar="B", help="rows per step (default: 8)")
    p.add_argument("--block-size", type=int, metavar="T", help="tokens per row (default: 128)")
    p.add_argument("--lr", type=float, help="peak learning rate of both models (default: 3e-3)")
    p.add_argument("--gpt-lr", type=float, help="the GPT's peak learning rate (default: --lr)")
    p.add_argument(
        "--eval-tokens", type=int, metavar="N",
        help="held-out tokens of the final loss, the same for every model (default: 65536)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, help="seed of weights and batches (default: 1337)")
    p.add_argument("--threads", type=int, help="torch CPU threads, 0 = torch's default")
    p.add_argument("--runs", metavar="DIR", help="run directories (default: runs/<name>)")
    p.add_argument("--out", metavar="DIR", help="where to write JSON/PNG/table (default: --runs)")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already finished")


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def config_from_args(args: argparse.Namespace) -> Any:
    """The experiment's config: its defaults (or quick defaults) with the options given."""
    from bdh.experiments.scaling import ScalingConfig
    from bdh.experiments.translation import TranslationConfig

    cls = ScalingConfig if args.experiment == "scaling" else TranslationConfig
    skip = {"verb", "experiment", "quick", "out", "fresh"}
    given = {k: v for k, v in vars(args).items() if v is not None and k not in skip}
    if given.get("limit") == 0:
        given["limit"] = None
    given["reuse"] = not args.fresh
    return cls.quick(**given) if args.quick else cls(**given)


def run(args: argparse.Namespace, log: Any = print) -> dict[str, Path]:
    """Run the experiment of `args` and write its outputs; returns {kind: path}."""
    if args.experiment == "surprisal":
        from bdh.experiments import surprisal

        return surprisal.run(args, log)
    if args.experiment == "synapses":
        from bdh.experiments import synapses

        return synapses.run(args, log)
    cfg = config_from_args(args)
    out = Path(args.out or cfg.runs)
    name = args.experiment + ("-quick" if args.quick else "")
    if args.experiment == "scaling":
        from bdh.experiments import scaling as exp

        payload = exp.run_scaling(cfg, log)
    else:
        from bdh.experiments import translation as exp  # type: ignore[no-redef]

        payload = exp.run_translation(cfg, log)
    table = exp.table_markdown(payload)
    paths = write_outputs(out, name, payload, table)
    if args.experiment == "scaling":
        paths["png"] = exp.plot(payload, out / f"{name}.png")
    log("\n" + table)
    for path in paths.values():
        log(f"wrote {path}")
    return paths


def write_outputs(out: Path, name: str, payload: dict[str, Any], table: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    paths["md"].write_text(table)
    return paths
