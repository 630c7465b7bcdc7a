"""Entry point for ``python -m leuko``."""

import sys

from leuko.cli import main

sys.exit(main())
