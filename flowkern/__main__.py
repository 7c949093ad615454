"""python -m flowkern: the `flowkern` command (also under torchrun: torchrun ... -m flowkern train ...)."""
from .cli import console_main

if __name__ == "__main__":
    console_main()
