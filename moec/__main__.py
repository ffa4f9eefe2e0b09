"""`python -m moec ...`: the `moec` command (moec.cli)."""

import sys

from moec.cli import main

sys.exit(main())
