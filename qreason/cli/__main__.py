"""``python -m qreason.cli ARGS``."""

import sys

from qreason.cli import main

sys.exit(main())
