"""``python -m ffengine`` runs the ``ffengine`` command line."""

import sys

from ffengine.cli import main

if __name__ == "__main__":
    sys.exit(main())
