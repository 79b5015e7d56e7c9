"""`python -m dgemma`: the `dgemma` command (also what `torchrun -m dgemma train` runs)."""

import sys

from .cli import main

sys.exit(main())
