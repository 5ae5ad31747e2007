"""`python -m pnp`: the command line (see pnp.cli)."""

import sys

from .cli import main

sys.exit(main())
