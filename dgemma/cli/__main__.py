"""`python -m dgemma.cli`: the `dgemma` command."""

import sys

from .main import main

sys.exit(main())
