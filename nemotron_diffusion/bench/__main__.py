"""`python -m nemotron_diffusion.bench ...`: the same as `nemotron-diffusion bench ...`."""

import sys

from ..cli import main


if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
