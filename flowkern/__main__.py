"""python -m flowkern: the `flowkern` command (also under torchrun: torchrun ... -m flowkern train ...)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
