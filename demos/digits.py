"""The main job as a script: ``python -m demos.digits [OUT_DIR]`` (``jaxdiff demo``); the
code is ``jaxdiff.zoo.digits.demo``."""

import sys

from jaxdiff.zoo.digits.demo import main

if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
