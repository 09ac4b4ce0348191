"""`python -m sfu` is the same as the `sfu` console script."""

import sys

from sfu.cli import main

sys.exit(main())
