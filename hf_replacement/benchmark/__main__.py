"""`python -m hf_replacement.benchmark`: the benchmark without the rest of the `hf-replacement` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
