"""One prepared accelerator run (issue 18): prove or refute jaxdiff's GPU/TPU claims in one
call of a few minutes, every step timed and skipped cleanly when the time budget runs out.

Steps, in order of importance (each records its seconds, its status and the peak device
memory after it):
  1. correctness: the SD 1.5 UNet architecture (random weights, the same in PyTorch and
     jaxdiff) on the device in float32 and bfloat16 against the CPU float32 result at a
     small latent size; attention "xla" vs "cudnn" vs "chunked" agreement; diffusers on the
     device against the same CPU reference.
  2. UNet forward at 64x64 latents, batch 1/2/8: jaxdiff bf16 with xla and cudnn attention
     and fp32, against diffusers PyTorch bf16 / fp16 (SDPA) on the same device; compile times.
  3. DDIM-50 text-to-image latency, batch 1 with guidance 7.5 (the UNet loop and the VAE
     decode; the text encoder is excluded on both sides): jaxdiff vs a diffusers loop.
  4. parallel sampling of one prompt: sequential vs ParaDiGMS / ParaSolver / ParaTAA with the
     window as one batched call (chunk=None) at DDIM-50 and DDPM-1000 (wall clock, rounds,
     agreement with sequential), and the cost of one window evaluation vs window size.
  5. FasterDiffusion encoder propagation vs sequential DDIM-50.

Writes OUT/device.json (every number) and OUT/device.md (RESULTS.md's "Accelerator"
section; ``--results benchmarks/RESULTS.md`` writes it there too).

Preparation (on a machine with network; what travels is ~15 MB):
    make device-wheels      # diffusers and what it needs beyond the device's packages,
                            # as wheels for Python 3.12 in benchmarks/.wheels
Run (the device has jax with CUDA, flax, optax, orbax, torch, transformers, safetensors,
tqdm; nothing is downloaded there), through the device tool with
carry=["benchmarks/.wheels"] and timeout_s=420:
    pip install -q --no-index --no-deps benchmarks/.wheels/*.whl; \\
      PYTHONPATH=. python benchmarks/device.py --out $OUT --budget 330
CPU smoke test (tiny configs, under a minute; tests/test_device_script.py runs it):
    python benchmarks/device.py --smoke --out /tmp/device
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

TINY_UNET = dict(block_out_channels=[16], layers_per_block=1, norm_num_groups=8,
                 down_block_types=["CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D"], cross_attention_dim=16,
                 attention_head_dim=4, sample_size=16)     # smoke: compiles in about a second
TINY_VAE = dict(block_out_channels=[16, 32], norm_num_groups=8, latent_channels=4,
                layers_per_block=1, sample_size=32,
                down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
              block_out_channels=[128, 256, 512, 512], norm_num_groups=32, sample_size=512,
              down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1, clip_sample=False, set_alpha_to_one=False,
                    num_train_timesteps=1000)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


class Budget:
    """Runs the steps in order; a step whose estimate exceeds what is left is skipped, a
    step that fails records its error and the run goes on."""

    def __init__(self, seconds: float, device_memory):
        self.t0, self.seconds, self.memory = time.perf_counter(), float(seconds), device_memory
        self.steps: dict = {}

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def run(self, name: str, estimate: float, fn):
        if self.left() < estimate:
            self.steps[name] = {"status": "skipped", "reason": f"{self.left():.0f} s left, "
                                f"estimate {estimate:.0f} s"}
            print(f"[device] {name}: skipped ({self.left():.0f} s left)", flush=True)
            return None
        t = time.perf_counter()
        print(f"[device] {name} ...", flush=True)
        try:
            result, status = fn(), "ok"
        except Exception as e:      # a failing step is a finding, not the end of the run
            result, status = {"error": f"{type(e).__name__}: {e}",
                              "traceback": traceback.format_exc()[-2000:]}, "error"
            print(f"[device] {name}: {type(e).__name__}: {e}", flush=True)
        self.steps[name] = {"status": status, "seconds": time.perf_counter() - t,
                            "peak_memory_gib": self.memory(), **(result or {})}
        return result


def _timed(fn, repeats: int) -> dict:
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"first_s": first, "median_s": statistics.median(times), "runs_s": times}


class Setup:
    def __init__(self, smoke: bool):
        import jax
        import torch

        from conversion.testing import SD15_UNET_CONFIG

        self.smoke = smoke
        self.jax_device = jax.devices()[0]
        self.platform = self.jax_device.platform
        self.cuda = torch.cuda.is_available() and not smoke
        self.torch_device = "cuda" if self.cuda else "cpu"
        self.unet_cfg = TINY_UNET if smoke else SD15_UNET_CONFIG
        self.vae_cfg = TINY_VAE if smoke else SD_VAE
        self.small = 8 if smoke else 16             # correctness latent size
        self.size = 16 if smoke else 64             # timing latent size
        self.batches = [2] if smoke else [1, 2, 8]
        self.repeats = 2 if smoke else 10
        self.ctx_dim = self.unet_cfg["cross_attention_dim"]
        self.impls = ["xla", "chunked"] if self.platform == "cpu" else ["xla", "cudnn"]
        self.ddim_steps = 8 if smoke else 50
        self.ddpm_steps = 16 if smoke else 1000
        self.window = 8 if smoke else 96
        torch.manual_seed(0)
        self._models = {}
        self.diffusers_error = None
        try:
            from diffusers import AutoencoderKL, UNet2DConditionModel
        except Exception as e:     # e.g. the device's huggingface_hub is too old: jaxdiff's
            self.diffusers_error = f"{type(e).__name__}: {e}"    # own steps still run
            self.torch_unet = self.torch_vae = None
            return
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        self.torch_unet = UNet2DConditionModel(**self.unet_cfg).eval()
        self.torch_vae = AutoencoderKL(**self.vae_cfg).eval()

    def need_diffusers(self):
        if self.torch_unet is None:
            raise RuntimeError(f"diffusers unavailable ({self.diffusers_error})")

    def _jax_model(self, family: str, cfg: dict, torch_module, dtype: str):
        """The PyTorch module's weights converted, or (no diffusers) jaxdiff's own seeded
        initialisation of the same architecture."""
        import jax.numpy as jnp
        from flax import nnx

        import conversion
        from conversion.convert import family_of

        if torch_module is not None:
            return conversion.convert(torch_module, dtype=getattr(jnp, dtype))
        fam = family_of(family)
        return fam.model_cls(fam.config_cls.from_dict(cfg), dtype=getattr(jnp, dtype),
                             rngs=nnx.Rngs(0))

    def unet(self, dtype: str, impl: str = "xla"):
        from jaxdiff.models import set_attention

        key = (dtype, impl)
        if key not in self._models:
            m = self._jax_model("UNet2DConditionModel", self.unet_cfg, self.torch_unet, dtype)
            self._models[key] = set_attention(m, None if impl == "xla" and
                                              self.platform == "cpu" else impl)
        return self._models[key]

    def inputs(self, batch: int, size: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((batch, size, size, 4), dtype=np.float32)
        t = np.resize(np.array([999.0, 500.0], np.float32), batch)
        ctx = rng.standard_normal((batch, 77, self.ctx_dim), dtype=np.float32)
        return x, t, ctx


def _forward_fn(unet):
    import jax
    from flax import nnx

    graphdef, state = nnx.split(unet)
    f = jax.jit(lambda st, x, t, c: nnx.merge(graphdef, st)(x, t, c))
    return lambda x, t, c: f(state, x, t, c)


def step_correctness(s: Setup) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    x, t, ctx = s.inputs(2, s.small)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        ref = np.asarray(_forward_fn(s.unet("float32"))(jnp.asarray(x), jnp.asarray(t),
                                                         jnp.asarray(ctx)))
    args = [jax.device_put(jnp.asarray(a), s.jax_device) for a in (x, t, ctx)]
    out = {"latent": s.small, "vs_cpu_float32": {}}
    for dtype in ("float32", "bfloat16"):
        for impl in ["xla", "chunked"] + (["cudnn"] if s.platform == "gpu" else []):
            if impl == "cudnn" and dtype == "float32":
                continue                      # cuDNN flash attention takes bf16/fp16
            got = np.asarray(_forward_fn(s.unet(dtype, impl))(*args), np.float32)
            out["vs_cpu_float32"][f"jaxdiff {dtype} {impl}"] = _rel(got, ref)
    if s.torch_unet is None:
        out["diffusers"] = s.diffusers_error
        return out
    with torch.no_grad():
        m = s.torch_unet.to(s.torch_device)
        tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(s.torch_device)
        y = m(tx, torch.from_numpy(t).to(s.torch_device),
              torch.from_numpy(ctx).to(s.torch_device)).sample.float().cpu().numpy()
    out["vs_cpu_float32"]["diffusers float32"] = _rel(y.transpose(0, 2, 3, 1), ref)
    return out


def _torch_forward(s: Setup, dtype, batch: int):
    import torch

    m = s.torch_unet.to(s.torch_device, dtype)
    x, t, ctx = s.inputs(batch, s.size)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(s.torch_device, dtype)
    tt = torch.from_numpy(t).to(s.torch_device)
    tc = torch.from_numpy(ctx).to(s.torch_device, dtype)

    def run():
        with torch.no_grad():
            m(tx, tt, tc)
        if s.cuda:
            torch.cuda.synchronize()
    return run


def step_forward(s: Setup) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    rows = {}
    configs = [("bfloat16", impl) for impl in s.impls[:1 if s.smoke else None]] + [
        ("float32", "xla")]
    for batch in s.batches:
        args = [jnp.asarray(a) for a in s.inputs(batch, s.size)]
        for dtype, impl in configs:
            f = _forward_fn(s.unet(dtype, impl))
            rows[f"jaxdiff {dtype} {impl} b{batch}"] = _timed(
                lambda: jax.block_until_ready(f(*args)), s.repeats)
        tdtypes = ([] if s.torch_unet is None else
                   [torch.float32] if not s.cuda else [torch.bfloat16, torch.float16])
        for td in tdtypes:
            rows[f"diffusers {str(td).split('.')[-1]} sdpa b{batch}"] = _timed(
                _torch_forward(s, td, batch), s.repeats)
    if s.torch_unet is not None:
        s.torch_unet.to("cpu", torch.float32)
    return {"latent": s.size, "rows": rows, "diffusers": s.diffusers_error}


def _vae(s: Setup, dtype: str):
    return s._jax_model("AutoencoderKL", s.vae_cfg, s.torch_vae, dtype)


def step_ddim(s: Setup) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import DDIMScheduler

    import jaxdiff
    from jaxdiff import solvers
    from jaxdiff.guidance import classifier_free

    s.need_diffusers()
    n, dtype = s.ddim_steps, "bfloat16" if s.platform != "cpu" else "float32"
    x, _, ctx = s.inputs(1, s.size)
    uncond = np.zeros_like(ctx)
    unet, vae = s.unet(dtype, s.impls[-1]), _vae(s, dtype)
    solver = solvers.make("ddim", SD_SCHEDULER, n)
    decode = jax.jit(lambda z: vae.decode(z / 0.18215))
    model_fn = classifier_free(unet, jnp.asarray(ctx), jnp.asarray(uncond), 7.5)

    def mine():
        z = jaxdiff.sample(model_fn, solver, jnp.asarray(x))
        return jax.block_until_ready(decode(z))

    td = torch.bfloat16 if s.cuda else torch.float32
    m = s.torch_unet.to(s.torch_device, td)
    v = s.torch_vae.to(s.torch_device, td)
    sched = DDIMScheduler(**SD_SCHEDULER)
    emb = torch.from_numpy(np.concatenate([uncond, ctx])).to(s.torch_device, td)
    tx0 = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(s.torch_device, td)

    def theirs():
        sched.set_timesteps(n)
        z = tx0 * sched.init_noise_sigma
        with torch.no_grad():
            for t in sched.timesteps:
                e = m(torch.cat([z, z]), t, emb).sample
                eu, ec = e.chunk(2)
                z = sched.step(eu + 7.5 * (ec - eu), t, z).prev_sample
            img = v.decode(z / 0.18215).sample
        if s.cuda:
            torch.cuda.synchronize()
        return img

    r = {"steps": n, "dtype": dtype, "jaxdiff": _timed(mine, 2 if not s.smoke else 1),
         "diffusers": _timed(theirs, 2 if not s.smoke else 1)}
    r["ratio_diffusers_over_jaxdiff"] = r["diffusers"]["median_s"] / r["jaxdiff"]["median_s"]
    s.torch_unet.to("cpu", torch.float32)
    s.torch_vae.to("cpu", torch.float32)
    return r


def _one_prompt(s: Setup, dtype: str):
    import jax.numpy as jnp

    from jaxdiff.guidance import classifier_free

    x, _, ctx = s.inputs(1, s.size, seed=3)
    model_fn = classifier_free(s.unet(dtype, s.impls[-1]), jnp.asarray(ctx),
                               jnp.asarray(np.zeros_like(ctx)), 7.5)
    return model_fn, jnp.asarray(x)


def step_picard(s: Setup) -> dict:
    import jax

    from jaxdiff import solvers
    from jaxdiff.sampling import Picard, Sequential, run

    dtype = "bfloat16" if s.platform != "cpu" else "float32"
    model_fn, x_T = _one_prompt(s, dtype)
    out = {"dtype": dtype, "runs": {}}
    key = jax.random.key(0)
    for sched_name, n, window in (("ddim", s.ddim_steps, min(s.window, s.ddim_steps)),
                                  ("ddpm", s.ddpm_steps, s.window)):
        solver = solvers.make(sched_name, SD_SCHEDULER, n)
        seq_box = {}

        def seq():
            seq_box["x"] = jax.block_until_ready(run(Sequential(), model_fn, solver, x_T,
                                                     key=key)[0])
        res = {"sequential": _timed(seq, 1)}
        ref = np.asarray(seq_box["x"], np.float32)
        for method in ("paradigms", "parasolver", "taa"):
            if method == "parasolver" and (sched_name == "ddpm" or s.smoke):
                continue                      # (taa carries ParaSolver's initialisation)
            if method == "paradigms" and sched_name == "ddpm" and s.smoke:
                continue
            box = {}
            sampler = Picard(parallel=window, tolerance=0.1, method=method, chunk=None)

            def par():
                x0, st = run(sampler, model_fn, solver, x_T, key=key)
                box["x"], box["stats"] = jax.block_until_ready(x0), st
            r = _timed(par, 1)
            r.update(rounds=int(box["stats"].iterations),
                     model_evaluations=int(box["stats"].model_evaluations),
                     rms_to_sequential=float(np.sqrt(np.mean(
                         (np.asarray(box["x"], np.float32) - ref) ** 2))),
                     speedup=res["sequential"]["median_s"] / r["median_s"])
            res[method] = r
        out["runs"][f"{sched_name}-{n} window {window}"] = res
    return out


def step_window_cost(s: Setup) -> dict:
    """One batched window evaluation (the UNet on 2 x window latents: guidance doubles the
    batch) against window size: where a larger window stops being free."""
    import jax
    import jax.numpy as jnp

    dtype = "bfloat16" if s.platform != "cpu" else "float32"
    f = _forward_fn(s.unet(dtype, s.impls[-1]))
    rows = {}
    for w in ([1, 4] if s.smoke else [1, 8, 24, 48, 96]):
        args = [jnp.asarray(a) for a in s.inputs(2 * w, s.size)]
        rows[str(w)] = _timed(lambda: jax.block_until_ready(f(*args)), 3)
    return {"dtype": dtype, "rows": rows}


def step_propagation(s: Setup) -> dict:
    import jax

    from jaxdiff import solvers
    from jaxdiff.sampling import EncoderPropagation, Sequential, run

    dtype = "bfloat16" if s.platform != "cpu" else "float32"
    model_fn, x_T = _one_prompt(s, dtype)
    solver = solvers.make("ddim", SD_SCHEDULER, s.ddim_steps)
    box = {}

    def go(sampler, name):
        def f():
            box[name] = jax.block_until_ready(run(sampler, model_fn, solver, x_T)[0])
        return f
    seq = _timed(go(Sequential(), "seq"), 2)
    ks = "paper" if s.ddim_steps == 50 else "every:4"
    fast = _timed(go(EncoderPropagation(key_steps=ks), "fast"), 2)
    return {"steps": s.ddim_steps, "key_steps": ks, "sequential": seq, "propagation": fast,
            "speedup": seq["median_s"] / fast["median_s"],
            "rel_l2_to_sequential": _rel(box["fast"], box["seq"])}


def _memory_fn(s: Setup):
    def peak():
        try:
            stats = s.jax_device.memory_stats() or {}
            return round(stats.get("peak_bytes_in_use", 0) / 2 ** 30, 3)
        except Exception:       # CPU devices may have no memory stats
            return None
    return peak


def report(data: dict) -> str:
    lines = [f"Device: {data['device']}; jax {data['jax']}, torch {data['torch']}; "
             f"{'smoke run (CPU, tiny configs)' if data['smoke'] else 'full run'}; budget "
             f"{data['budget_s']:.0f} s, used {data['used_s']:.0f} s.", ""]
    lines += ["| step | status | seconds | peak device GiB |", "|---|---|---:|---:|"]
    for name, st in data["steps"].items():
        lines.append(f"| {name} | {st['status']} | {st.get('seconds', 0):.1f} | "
                     f"{st.get('peak_memory_gib')} |")
    c = data["steps"].get("1 correctness", {})
    if c.get("status") == "ok":
        lines += ["", f"Correctness, UNet output rel L2 vs CPU float32 ({c['latent']}x{c['latent']} "
                  "latents):", ""] + [f"- {k}: {v:.2e}" for k, v in c["vs_cpu_float32"].items()]
    f = data["steps"].get("2 forward", {})
    if f.get("status") == "ok":
        lines += ["", f"UNet forward, {f['latent']}x{f['latent']} latents (median s, first "
                  "call s):", "", "| config | median s | first call s |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['median_s']:.4f} | {v['first_s']:.1f} |"
                  for k, v in f["rows"].items()]
    d = data["steps"].get("3 ddim-50 latency", {})
    if d.get("status") == "ok":
        lines += ["", f"DDIM-{d['steps']} + VAE decode, batch 1, guidance 7.5, {d['dtype']}: "
                  f"jaxdiff {d['jaxdiff']['median_s']:.2f} s (first call "
                  f"{d['jaxdiff']['first_s']:.1f} s), diffusers {d['diffusers']['median_s']:.2f}"
                  f" s: diffusers / jaxdiff = {d['ratio_diffusers_over_jaxdiff']:.2f}x."]
    p = data["steps"].get("4 parallel sampling", {})
    if p.get("status") == "ok":
        lines += ["", "Parallel sampling, one prompt (median s; rounds; RMS to sequential):", "",
                  "| schedule | method | seconds | rounds | speed-up | RMS to sequential |",
                  "|---|---|---:|---:|---:|---:|"]
        for sched, res in p["runs"].items():
            for method, r in res.items():
                lines.append(f"| {sched} | {method} | {r['median_s']:.2f} | "
                             f"{r.get('rounds', '-')} | {r.get('speedup', 1.0):.2f}x | "
                             f"{r.get('rms_to_sequential', 0.0):.2e} |")
    w = data["steps"].get("4b window cost", {})
    if w.get("status") == "ok":
        lines += ["", "One window evaluation vs window size (s): " + ", ".join(
            f"{k}: {v['median_s']:.4f}" for k, v in w["rows"].items())]
    e = data["steps"].get("5 encoder propagation", {})
    if e.get("status") == "ok":
        lines += ["", f"Encoder propagation, DDIM-{e['steps']} key steps {e['key_steps']}: "
                  f"{e['speedup']:.2f}x vs sequential (rel L2 {e['rel_l2_to_sequential']:.2e})."]
    lines += ["", "Reproduce: see benchmarks/device.py's docstring (make bench-device)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for device.json and device.md")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny configs (< 60 s)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all steps (default 330; smoke 55)")
    ap.add_argument("--results", default=None, help="also write the section into this "
                    "RESULTS.md")
    a = ap.parse_args(argv)
    if a.smoke:
        import os
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import torch

    budget = a.budget if a.budget is not None else (55.0 if a.smoke else 330.0)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    s = Setup(a.smoke)
    b = Budget(budget - (time.perf_counter() - t0), _memory_fn(s))
    scale = 0.1 if a.smoke else 1.0
    b.run("1 correctness", 40 * scale, lambda: step_correctness(s))
    b.run("2 forward", 90 * scale, lambda: step_forward(s))
    b.run("3 ddim-50 latency", 45 * scale, lambda: step_ddim(s))
    b.run("4 parallel sampling", 90 * scale, lambda: step_picard(s))
    b.run("4b window cost", 40 * scale, lambda: step_window_cost(s))
    b.run("5 encoder propagation", 40 * scale, lambda: step_propagation(s))
    data = {"device": f"{s.jax_device.device_kind} ({s.platform})", "jax": jax.__version__,
            "torch": torch.__version__, "python": platform.python_version(),
            "smoke": a.smoke, "budget_s": budget, "used_s": time.perf_counter() - t0,
            "steps": b.steps}
    (out_dir / "device.json").write_text(json.dumps(data, indent=1, default=float))
    text = report(data)
    (out_dir / "device.md").write_text(text + "\n")
    print(text)
    if a.results:
        from common import write_section
        import common

        common.RESULTS = Path(a.results)
        write_section("Accelerator", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
