"""The SD 1.5 UNet conversion demo as a script: ``python -m demos.conversion [OUT_DIR]``
(``jaxdiff demo --conversion``); the code is ``conversion.demo``."""

import sys

from conversion.demo import main

if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
