"""`make bench`: every benchmark, each writing its section of benchmarks/RESULTS.md."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import digits_quality  # noqa: E402
import sampling  # noqa: E402
import unet_forward  # noqa: E402


def main():
    unet_forward.main([])
    sampling.main([])
    digits_quality.main([])


if __name__ == "__main__":
    main()
