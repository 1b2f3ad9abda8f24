"""``python -m funcppo``: see :mod:`funcppo.cli.main`."""

import sys

from funcppo.cli.main import main

sys.exit(main())
