"""`python -m resilient_train <command>`."""

import sys

from resilient_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
