"""`python -m benchmarks`: run a benchmark suite, or regenerate benchmarks/README.md (`--readme`)."""

import sys

from .harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
