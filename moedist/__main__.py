"""`python -m moedist ...` is the `moedist` console script."""
import sys

from moedist.cli import main

if __name__ == "__main__":   # spawn workers re-import this module as __mp_main__: do not re-run
    sys.exit(main())
