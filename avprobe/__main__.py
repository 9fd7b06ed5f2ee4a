"""`python -m avprobe ...` (and `accelerate launch -m avprobe collect ...`): the avprobe CLI."""

import sys

from avprobe.cli import main

if __name__ == "__main__":
    sys.exit(main())
