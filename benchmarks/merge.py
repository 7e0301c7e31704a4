"""Merging by neuron concatenation, the Table 2 analogue (paper §7.1), in one run.

    python benchmarks/merge.py            # 2-layer D=128 models, 3,660 steps in all
    python benchmarks/merge.py --quick    # a tiny model, seconds: a smoke test

The data come from $BDH_SHARED_DATA (default ../shared/data; never copied into the repository), or
--data DIR. The same as `bdh experiment merge`; every option is listed by --help. Finished stages
are reused from runs/merge. Writes merge.json, merge.md and merge-samples.md into
benchmarks/results/ unless --out.
"""

from __future__ import annotations

import sys

from bdh.cli import main
from common import RESULTS, ensure_quiet_threads

if __name__ == "__main__":
    ensure_quiet_threads()
    argv = sys.argv[1:]
    if "--out" not in argv and not any(a.startswith("--out=") for a in argv):
        argv += ["--out", str(RESULTS)]
    sys.exit(main(["experiment", "merge", *argv]))
