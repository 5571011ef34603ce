"""``python -m certkit`` runs the command line interface."""

import sys

from certkit.cli import main

sys.exit(main())
