"""``python -m albef`` is the ``albef`` command."""

import sys

from albef.cli import main

sys.exit(main())
