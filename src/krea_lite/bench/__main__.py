"""`python -m krea_lite.bench`: the command line, and the child of each cell (`--cell JSON`, see Runner.child)."""

import sys

from krea_lite.bench import main

if __name__ == "__main__":
    sys.exit(main())
