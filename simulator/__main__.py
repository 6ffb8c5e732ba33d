"""`python -m simulator`: the same as the `pumpsim` command."""

import sys

from simulator.cli import main

sys.exit(main())
