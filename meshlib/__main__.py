"""``python -m meshlib`` is the ``meshlib`` command."""

import sys

from .cli import main

sys.exit(main())
