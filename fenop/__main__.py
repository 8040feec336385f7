"""``python -m fenop`` runs the ``fenop`` command."""

import sys

from fenop.cli import main

sys.exit(main())
