"""`python -m agents ...`: the same as `dom0 agent ...`."""

import sys

from agents.cli import main

sys.exit(main())
