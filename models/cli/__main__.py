"""``python -m models.cli``: the ``servery`` command."""

import sys

from models.cli import main

sys.exit(main())
