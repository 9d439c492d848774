"""`dom0 install ...` (placeholder until the installer issue lands)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    print("dom0 install: not built yet (see the installer issue)", file=sys.stderr)
    return 1
