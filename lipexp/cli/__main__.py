"""``python -m lipexp.cli ...``: the ``lipexp`` command."""

import sys

from lipexp.cli import main

sys.exit(main())
