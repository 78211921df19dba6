"""``python -m engine.cli``: the ``tagrelay`` command without its console script."""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
