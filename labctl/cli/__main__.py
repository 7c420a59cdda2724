"""``python -m labctl.cli``: the same as the ``labctl`` command."""

import sys

from labctl.cli.main import main

sys.exit(main())
