"""`make bench`: every benchmark, each writing its section of benchmarks/RESULTS.md."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import digits_quality  # noqa: E402
import faster_diffusion  # noqa: E402
import paradigms_diffusers  # noqa: E402
import paradigms_digits  # noqa: E402
import sampling  # noqa: E402
import timetuner_digits  # noqa: E402
import unet_forward  # noqa: E402
import compile_times  # noqa: E402
import picard_methods  # noqa: E402
import parataa  # noqa: E402
import window_cost  # noqa: E402
import time_grids  # noqa: E402
import sdxl_controlnet  # noqa: E402
import everyday  # noqa: E402
import loading  # noqa: E402


def main():
    unet_forward.main([])
    sampling.main([])
    digits_quality.main([])
    paradigms_diffusers.main([])
    # the full grid (45 runs, hours on 2 CPU cores): paradigms_digits.main([])
    paradigms_digits.main(["--grid", "quick", "--per-class", "5"])
    timetuner_digits.main([])
    faster_diffusion.main([])
    compile_times.main([])
    picard_methods.main([])
    parataa.main([])   # the authors' rows as measured; --original PATH reruns them
    window_cost.main([])
    time_grids.main([])
    sdxl_controlnet.main([])
    loading.main([])
    everyday.main([])


if __name__ == "__main__":
    main()
