"""Run every benchmark under bench/ in turn (``make bench``); each prints its own ratios.

    python bench/run_all.py [--quick]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHES = ["losses.py", "sampler.py", "embed.py", "refresh.py", "data_feed.py", "train_throughput.py", "embed_cli.py"]  # by hand: data_memory.py (an hour), shapes_floor.py and shapes_cost.py (the shapes benchmark, 10-15 minutes each)


def main() -> int:
    here = Path(__file__).parent
    extra = sys.argv[1:]
    failed = []
    for name in BENCHES:
        script = here / name
        if not script.exists():
            continue
        print(f"== {name}", flush=True)
        if subprocess.run([sys.executable, str(script), *extra]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
