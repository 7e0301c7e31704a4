"""BDH vs the parameter-matched GPT at three sizes: loss vs parameters, time and FLOPs (Fig. 7).

    python benchmarks/scaling.py            # 360k/1m/3m on shakespeare, 262k tokens each (~10 min)
    python benchmarks/scaling.py --quick    # q70k/q170k/q470k, 8k tokens each (~30 s)
    python benchmarks/scaling.py --sizes 1m,3m,10m --tokens 10000000   # a bigger machine

The same as `bdh experiment scaling`; every option is listed by --help. Writes scaling.json,
scaling.md (the README table) and scaling.png into benchmarks/results/ unless --out is given.
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
    sys.exit(main(["experiment", "scaling", *argv]))
