"""The ``jaxdiff`` command.

  jaxdiff convert SRC DST [--dtype bfloat16] [--variant fp16]
      SRC: a diffusers-format pipeline folder (model_index.json) or one component folder
      (config.json + weights). DST: the same layout with every UNet / VAE / text encoder
      stored as a jaxdiff orbax checkpoint; tokenizer and scheduler files are copied, so
      ``conversion.load_pipeline(DST)`` loads it without PyTorch and without re-converting.
  jaxdiff sample MODEL "a prompt" [--negative "..."] [--solver dpm++] [--steps 30]
                [--guidance 7.5] [--seed 0] [--num 1] [--height H --width W] [--out out.png]
      MODEL: a diffusers-format folder or one converted by `jaxdiff convert`.
  jaxdiff sample --model digits [--labels 3,1,4] [--per-class 10] [--solver ddim]
                [--steps 50] [--guidance 1] [--seed 0] [--out digits.png]
      The embedded digits model: a grid of class-conditional samples, with classifier
      accuracy, FD-digits and timings printed.
  jaxdiff tune [--model digits] [--steps 10] [--tune-type parallel|sequential]
               [--solver ddim|dpmsolver++] [--iters 500] [--batch 16] [--lr 2e-3] [--seed 0]
               [--checkpoint-dir DIR] [--out outputs/ratios.json] [--eval N]
      TimeTuner: learn per-step time ratios; writes the ratios JSON (for
      ``Solver.with_ratios`` / ``ratios=``), <stem>_loss.csv and <stem>.png.
  jaxdiff demo [--conversion]
      The main job (see README); --conversion: the SD 1.5 UNet conversion demo.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def _dtype(name: str):
    import jax.numpy as jnp

    try:
        return jnp.dtype(name)
    except TypeError:
        raise SystemExit(f"unknown --dtype {name!r}; use float32, bfloat16 or float16")


def convert_folder(src, dst, dtype="float32", variant=None, overwrite=False, log=print) -> dict:
    """Convert a diffusers-format folder into jaxdiff orbax checkpoints; returns timings."""
    import conversion
    from conversion.convert import FAMILIES

    src, dst = Path(src), Path(dst)
    dt = _dtype(dtype)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder")
    timings = {}
    if (src / "model_index.json").exists():
        index = json.loads((src / "model_index.json").read_text())
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "model_index.json", dst / "model_index.json")
        for name, spec in index.items():
            if name.startswith("_") or not isinstance(spec, (list, tuple)) or spec[0] is None:
                continue
            if spec[1] in FAMILIES:
                timings[name] = _convert_one(src / name, dst / name, dt, variant, spec[1],
                                             overwrite, log)
            elif (src / name).is_dir():
                shutil.copytree(src / name, dst / name, dirs_exist_ok=True)
    else:
        timings[src.name] = _convert_one(src, dst, dt, variant, None, overwrite, log)
    return timings


def _convert_one(src, dst, dtype, variant, class_name, overwrite, log):
    import jax
    from flax import nnx

    import conversion

    t0 = time.perf_counter()
    model = conversion.load_component(src, dtype, variant=variant, class_name=class_name)
    jax.block_until_ready(nnx.state(model))
    t1 = time.perf_counter()
    conversion.save_model(model, dst, overwrite=overwrite)
    t2 = time.perf_counter()
    log(f"{src} -> {dst}: {type(model).__name__}, converted in {t1 - t0:.2f} s, "
        f"saved in {t2 - t1:.2f} s")
    return {"convert_s": t1 - t0, "save_s": t2 - t1}


def _sample_digits(args) -> int:
    from jaxdiff.zoo.digits.demo import run_digits

    labels = None
    try:
        if args.labels:
            labels = [int(v) for v in args.labels.split(",") if v.strip()]
        run_digits(args.out or "digits.png", solver=args.solver or "ddim",
                   steps=args.steps if args.steps is not None else 50,
                   guidance_scale=args.guidance if args.guidance is not None else 1.0,
                   seed=args.seed, labels=labels, per_class=args.per_class)
    except ValueError as e:
        print(f"jaxdiff sample: {e}", file=sys.stderr)
        return 2
    return 0


def _sample(args) -> int:
    import math

    if args.model_opt is not None:
        if args.model is not None:
            args.prompt = args.model
        args.model = args.model_opt
    if args.model == "digits":
        return _sample_digits(args)
    if args.model is None or args.prompt is None:
        print("jaxdiff sample: give a model folder and a prompt (or --model digits)",
              file=sys.stderr)
        return 2
    args.steps = 30 if args.steps is None else args.steps
    args.guidance = 7.5 if args.guidance is None else args.guidance
    args.out = args.out or "sample.png"

    import conversion
    from jaxdiff.images import image_grid

    try:
        pipe = conversion.load_pipeline(args.model, _dtype(args.dtype))
        t0 = time.perf_counter()
        images = pipe([args.prompt] * args.num, None if args.negative is None
                      else [args.negative] * args.num, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, seed=args.seed, solver=args.solver,
                      height=args.height, width=args.width, progress=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxdiff sample: {e}", file=sys.stderr)
        return 2
    cols = math.ceil(math.sqrt(args.num))
    image_grid(images, math.ceil(args.num / cols), cols).save(args.out)
    print(f"wrote {args.out} ({args.num} image(s), {time.perf_counter() - t0:.1f} s)")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tune"]:   # its parser lives with its code in tuning.cli (imports jax)
        from tuning.cli import main as tune
        return tune(argv[1:], prog="jaxdiff tune")
    parser = argparse.ArgumentParser(prog="jaxdiff", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="diffusers folder -> jaxdiff orbax checkpoints")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--variant", default=None, help="weight variant, e.g. fp16")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("sample", help="text-to-image with a Stable Diffusion folder, or the "
                       "embedded digits model (--model digits)")
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("prompt", nargs="?", default=None)
    p.add_argument("--model", dest="model_opt", default=None,
                   help="'digits' or a Stable Diffusion folder")
    p.add_argument("--labels", default=None, help="digits: comma-separated digits to draw")
    p.add_argument("--per-class", type=int, default=10,
                   help="digits: samples of each digit when --labels is not given")
    p.add_argument("--negative", default=None)
    p.add_argument("--solver", default=None, help="ddim, euler, dpm++, ... (default: the "
                   "folder's scheduler)")
    p.add_argument("--steps", type=int, default=None, help="default 30 (digits: 50)")
    p.add_argument("--guidance", type=float, default=None, help="default 7.5 (digits: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=int, default=1, help="images (a grid when > 1)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=None, help="PNG path (default sample.png / digits.png)")
    sub.add_parser("tune", add_help=False, help="TimeTuner: learn per-step time ratios "
                   "(jaxdiff tune --help)")
    p = sub.add_parser("demo", help="the main job (see README)")
    p.add_argument("--conversion", action="store_true",
                   help="the SD 1.5 UNet conversion demo instead")
    p.add_argument("--out-dir", default="outputs")
    args = parser.parse_args(argv)
    if args.command == "convert":
        try:
            convert_folder(args.src, args.dst, args.dtype, args.variant, args.overwrite)
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            print(f"jaxdiff convert: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "sample":
        return _sample(args)
    if args.command == "demo":
        if args.conversion:
            from conversion.demo import main as demo
            return demo(Path(args.out_dir) / "demo")
        from jaxdiff.zoo.digits.demo import main as demo
        return demo(args.out_dir)
    return 1


if __name__ == "__main__":
    sys.exit(main())
