"""``python -m hookinf``: the console script."""

import sys

from hookinf.cli import main

sys.exit(main())
