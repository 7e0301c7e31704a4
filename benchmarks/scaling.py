"""BDH vs the parameter-matched GPT: each at its best learning rate, over seeds (Fig. 7).

    python benchmarks/scaling.py            # 360k and 1m, 2M tokens per run, 4 rates x 2 seeds
    python benchmarks/scaling.py --quick    # q70k and q170k, 8k tokens per run (~30 s)
    python benchmarks/scaling.py --sizes 360k,1m,3m --seeds 1337,1338,1339   # extends, reusing runs

The same as `bdh experiment scaling`; every option is listed by --help. Writes scaling.json,
scaling.md (the README tables) and scaling.png into benchmarks/results/ unless --out is given.
Finished runs are kept in runs/scaling/ and reused, so an interrupted sweep resumes.
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
