"""English→French: BDH vs the GPT baseline at equal parameters and tokens, BLEU and chrF.

    python benchmarks/translation.py            # 1m pair, first 50k Tatoeba pairs (~5 min)
    python benchmarks/translation.py --quick    # q70k pair, 2k pairs, 8k tokens (~15 s)

The pairs come from $BDH_SHARED_DATA/tatoeba_eng_fra.tsv (default ../shared/data; never copied
into the repository), or --pairs FILE. The same as `bdh experiment translation`; every option is
listed by --help. Writes translation.json and translation.md into benchmarks/results/ unless --out.
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
    sys.exit(main(["experiment", "translation", *argv]))
