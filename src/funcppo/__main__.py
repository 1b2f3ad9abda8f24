"""``python -m funcppo``: see :mod:`funcppo.cli`."""

import sys

from funcppo.cli import main

sys.exit(main())
