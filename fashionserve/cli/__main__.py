"""``python -m fashionserve.cli``: the ``fashionserve`` command without its script."""

import sys

from fashionserve.cli import main

sys.exit(main())
