"""``python -m fedrank`` is the ``fedrank`` command."""

import sys

from fedrank.cli import main

sys.exit(main())
