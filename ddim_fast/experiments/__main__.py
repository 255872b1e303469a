"""``python -m ddim_fast.experiments eval|figure|sample ...``: the ``ddim-fast`` command."""

import sys

from ddim_fast.cli import main

sys.exit(main())
