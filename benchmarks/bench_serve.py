"""The serving benchmark, runnable from a checkout: the same as `dgemma bench-serve` (dgemma/bench/serve.py)."""

import sys

from dgemma.bench.serve import main

if __name__ == "__main__":
    sys.exit(main())
