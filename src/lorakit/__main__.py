"""``python -m lorakit`` runs the CLI."""

import sys

from lorakit.cli import main

sys.exit(main())
