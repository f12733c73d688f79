"""``python -m qreason ARGS``: the same as the ``qreason`` command."""

import sys

from qreason.cli import main

sys.exit(main())
