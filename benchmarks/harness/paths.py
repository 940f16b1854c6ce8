"""Where the benchmark's files live: beside the `benchmarks` package, not under the current directory."""

from __future__ import annotations

import os

# benchmarks/harness/paths.py -> benchmarks/
BENCHMARKS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# benchmarks/synthesis_overhead.py writes <name>.json and <name>.md beside itself.
SYNTHESIS_OVERHEAD_NAME = "synthesis_overhead"
# benchmarks/fsdp_state.py writes <name>.json and <name>.md beside itself.
FSDP_STATE_NAME = "fsdp_state"
# `python -m benchmarks --suite speed` writes <name>/<name>.json and .md (benchmarks/speed.py).
SPEED_NAME = "speed"
# A transfer suite's extra figure: source accuracy after conversion and fine-tuned accuracy per method.
TRANSFER_PLOT = "transfer.png"


def suite_dir(suite_name: str) -> str:
    """`benchmarks/<suite>`: a suite's default output directory, where the README looks for its results."""
    return os.path.join(BENCHMARKS_DIR, suite_name)
