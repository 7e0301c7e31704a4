"""Experiments that compare BDH with the GPT baseline, each in one command.

    bdh experiment scaling [--quick] [...]       # loss vs parameters, time and FLOPs (Fig. 7)
    bdh experiment translation [--quick] [...]   # En-Fr BLEU/chrF at equal parameters and tokens
    bdh experiment length [--quick] [...]        # loss against position, far past the block
    bdh experiment merge [--quick] [...]         # Table 2: two fine-tunes of one base, merged
    bdh experiment surprisal --ckpt C [--quick]  # neuron activity against surprisal (Fig. 14)
    bdh experiment synapses --ckpt C [--quick]   # concept synapses, held-out (Figs. 11-13)
    bdh experiment neuron-graph --ckpt C [...]   # G = D_x E: tails, modularity (Figs. 9-10)

`benchmarks/scaling.py` and `benchmarks/translation.py` run the same code. Each writes
`<name>.json` (every number), `<name>.md` (the README table) and, for scaling and length,
`<name>.png`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

EXPERIMENTS = ("scaling", "translation", "length", "merge", "surprisal", "synapses", "neuron-graph")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `bdh experiment NAME`; every default is None, so the experiment's own
    defaults (full or --quick) apply to what is left out."""
    sub = p.add_subparsers(dest="experiment", required=True, metavar="NAME")
    scaling = sub.add_parser("scaling", help="BDH vs GPT validation loss at matched sizes")
    scaling.add_argument("--sizes", type=_names, help="ladder sizes, comma-separated"
                         " (default: 360k,1m,3m; quick: q70k,q170k,q470k)")  # fmt: skip
    scaling.add_argument("--data", metavar="SOURCE", help="bdh.data source (default: shakespeare)")
    scaling.add_argument("--lrs", type=_floats, help="peak learning rates tried per model and"
                         " size, comma-separated (default: 3e-4,1e-3,3e-3,1e-2)")  # fmt: skip
    scaling.add_argument("--gpt-lrs", type=_floats, help="the GPT's own rates, comma-separated"
                         " (default: 3e-4,1e-3,3e-3,1e-2,3e-2)")  # fmt: skip
    scaling.add_argument("--seeds", type=_ints, help="seeds, comma-separated (default: 1337,1338)")
    scaling.add_argument(
        "--select-seeds", type=int, metavar="K",
        help="the first K seeds train at every rate and choose it; the others train only at the"
        " chosen rate (default: 1)",
    )  # fmt: skip
    for name, what in (("val", "validation slice: estimates and choice"), ("test", "test slice")):
        scaling.add_argument(f"--{name}-tokens", type=int, metavar="N",
                             help=f"{what} (default: 65536; quick 2048)")  # fmt: skip
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
    length = sub.add_parser(
        "length", help="loss against position past the training block: BDH variants and GPT"
    )
    length.add_argument("--size", help="ladder size of every model (default: 360k)")
    length.add_argument("--variants", type=_names, help="comma-separated, of none, alibi,"
                        " learned, carry, gpt (default: all)")  # fmt: skip
    length.add_argument("--data", metavar="SOURCE", help="bdh.data source (default: shakespeare)")
    length.add_argument(
        "--stream-length", type=int, metavar="L",
        help="tokens per held-out stream, >= 16 x block (default: 4096; quick 256)",
    )  # fmt: skip
    length.add_argument(
        "--eval-streams", type=int, metavar="N", help="held-out streams (default: 32; quick 2)"
    )
    for q in (scaling, translation, length):
        _common_arguments(q, tuned=q is not scaling)
    from bdh.experiments.merge import add_merge_arguments

    add_merge_arguments(sub)

    from bdh.experiments import surprisal

    surprisal.add_arguments(
        sub.add_parser("surprisal", help="a checkpoint's neuron activity against its surprisal")
    )
    from bdh.experiments import synapses

    synapses.add_arguments(
        sub.add_parser("synapses", help="a concept's synapse: searched, tested held-out, En/Fr")
    )

    _neuron_graph_arguments(sub)


def _neuron_graph_arguments(sub: Any) -> None:
    p = sub.add_parser("neuron-graph", help="the neuron graph G = D_x E of a checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint directory (or its run directory)")
    p.add_argument("--out", default="benchmarks/results", help="where to write JSON and PNGs")
    p.add_argument("--name", help="file stem neuron-graph-NAME (default: the run's directory)")
    p.add_argument(
        "--max-edges",
        type=int,
        default=262_144,
        metavar="M",
        help="edges kept per block and sign; bounds the sweep (default: 262144)",
    )
    p.add_argument("--runs", type=int, default=5, help="Louvain runs per graph, best kept")
    p.add_argument("--sweep-points", type=int, default=6, help="edge counts in the sweep")
    p.add_argument("--seed", type=int, default=0, help="seed of Louvain and the baselines")
    p.add_argument("--init-seed", type=int, help="seed of the untrained twin (default: the run's)")
    p.add_argument("--backend", help="Louvain backend: sknetwork (if installed) or networkx")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = default")


def _common_arguments(p: argparse.ArgumentParser, tuned: bool = True) -> None:
    """Options every training experiment has; `tuned` adds the single lr and seed (the scaling
    experiment sweeps rates and seeds instead)."""
    p.add_argument("--quick", action="store_true", help="tiny sizes and budget: a smoke test")
    p.add_argument(
        "--tokens", type=int, metavar="N",
        help="training tokens per run (default: 2097152 scaling, 655360 translation; quick 8192)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, metavar="B", help="rows per step (default: 8)")
    p.add_argument("--block-size", type=int, metavar="T", help="tokens per row (default: 128)")
    if tuned:
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


def _listed(convert: Any, what: str) -> Any:
    """An argparse type: comma-separated values of `convert`, with a one-line error."""

    def parse(text: str) -> list[Any]:
        try:
            return [convert(s) for s in _names(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, got {text!r}"
            ) from None

    return parse


_floats, _ints = _listed(float, "numbers"), _listed(int, "integers")


def config_from_args(args: argparse.Namespace) -> Any:
    """The experiment's config: its defaults (or quick defaults) with the options given."""
    from bdh.experiments.length import LengthConfig
    from bdh.experiments.scaling import ScalingConfig
    from bdh.experiments.translation import TranslationConfig

    cls = {"scaling": ScalingConfig, "translation": TranslationConfig, "length": LengthConfig}[
        args.experiment
    ]
    skip = {"verb", "experiment", "quick", "out", "fresh"}
    given = {k: v for k, v in vars(args).items() if v is not None and k not in skip}
    if given.get("limit") == 0:
        given["limit"] = None
    given["reuse"] = not args.fresh
    return cls.quick(**given) if args.quick else cls(**given)


def run(args: argparse.Namespace, log: Any = print) -> dict[str, Path]:
    """Run the experiment of `args` and write its outputs; returns {kind: path}."""
    if args.experiment == "merge":
        from bdh.experiments.merge import run_from_args

        return run_from_args(args, log)
    if args.experiment == "surprisal":
        from bdh.experiments import surprisal

        return surprisal.run(args, log)
    if args.experiment == "synapses":
        from bdh.experiments import synapses

        return synapses.run(args, log)
    if args.experiment == "neuron-graph":
        return _run_neuron_graph(args, log)
    cfg = config_from_args(args)
    out = Path(args.out or cfg.runs)
    name = args.experiment + ("-quick" if args.quick else "")
    if args.experiment == "scaling":
        from bdh.experiments import scaling as exp

        payload = exp.run_scaling(cfg, log)
    elif args.experiment == "length":
        from bdh.experiments import length as exp  # type: ignore[no-redef]

        payload = exp.run_length(cfg, log)
    else:
        from bdh.experiments import translation as exp  # type: ignore[no-redef]

        payload = exp.run_translation(cfg, log)
    table = exp.table_markdown(payload)
    paths = write_outputs(out, name, payload, table)
    if args.experiment in ("scaling", "length"):
        paths["png"] = exp.plot(payload, out / f"{name}.png")
    log("\n" + table)
    for path in paths.values():
        log(f"wrote {path}")
    return paths


def _run_neuron_graph(args: argparse.Namespace, log: Any) -> dict[str, Path]:
    from bdh.experiments import neuron_graph as exp

    skip = {"verb", "experiment"}
    cfg = exp.NeuronGraphConfig(**{k: v for k, v in vars(args).items() if k not in skip})
    result = exp.run_neuron_graph(cfg, log)
    name = cfg.name or exp.default_name(cfg.ckpt)
    return exp.write_outputs(result, Path(cfg.out), name, log)


def write_outputs(out: Path, name: str, payload: dict[str, Any], table: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    paths["md"].write_text(table)
    return paths
