"""Train the digits model: ``python -m jaxdiff.zoo.digits.train --out DIR --steps N --seed S``.

Epsilon-prediction DDPM training (Ho et al. 2020) with AdamW, an EMA of the weights, 10% label
dropout to the null label (so one network serves classifier-free guidance), and orbax
checkpoints every ``--ckpt-every`` steps. Rerunning the same command resumes from the latest
checkpoint in ``DIR/checkpoints``; batches and noise are derived from ``(seed, step)`` so a
resumed run sees the same data as an uninterrupted one. At the end the EMA weights are
written to ``DIR/unet`` (``jaxdiff.checkpoint.save_model``) with ``DIR/scheduler_config.json``:
``--out jaxdiff/zoo/digits/weights`` refreshes the shipped model.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxdiff.zoo.digits import data, model as dm


class TrainState(NamedTuple):
    params: Any      # nnx.State of the UNet
    ema: Any         # nnx.State, same structure
    opt_state: Any
    step: jax.Array  # int32 scalar


def make_optimizer(lr: float, steps: int, warmup: int = 200):
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, max(steps // 10, 1)),
                                               max(steps, 2), end_value=lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(sched, b1=0.9, b2=0.999, weight_decay=1e-4))


def _loss(graphdef, params, x0, labels, key, abar, label_dropout):
    """Epsilon-prediction MSE at uniformly drawn integer timesteps."""
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    b = x0.shape[0]
    t = jax.random.randint(k_t, (b,), 0, abar.shape[0])
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    drop = jax.random.uniform(k_drop, (b,)) < label_dropout
    labels = jnp.where(drop, dm.NULL_LABEL, labels)
    a = abar[t][:, None, None, None]
    x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps
    unet = nnx.merge(graphdef, params)
    pred = unet(x_t, t.astype(jnp.float32), dm.class_tokens(labels), class_labels=labels)
    return jnp.mean((pred - eps) ** 2)


@functools.partial(jax.jit, static_argnames=("graphdef", "lr", "steps", "ema_decay",
                                             "label_dropout"))
def train_step(ts: TrainState, x0, labels, key, abar, *, graphdef, lr: float, steps: int,
               ema_decay: float, label_dropout: float):
    """One AdamW + EMA update. Module-level jit: repeated ``train`` calls reuse the program."""
    optimizer = make_optimizer(lr, steps)
    loss, grads = jax.value_and_grad(
        lambda p: _loss(graphdef, p, x0, labels, key, abar, label_dropout))(ts.params)
    updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
    params = optax.apply_updates(ts.params, updates)
    step = ts.step + 1
    # EMA with the usual warm-up so that early weights do not dominate short runs.
    d = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ts.ema, params)
    return TrainState(params, ema, opt_state, step), loss


def _batch(images, labels, seed: int, step: int, batch_size: int):
    """Epoch-wise shuffling keyed by (seed, epoch): resumable without saving a data cursor."""
    n = len(labels)
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    idx = perm[i * batch_size:(i + 1) * batch_size]
    return images[idx], labels[idx]


def _ckpt_manager(directory: Path, every: int):
    import orbax.checkpoint as ocp
    opts = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=every, create=True)
    return ocp.CheckpointManager(directory.absolute(), options=opts)


def _to_saveable(ts: TrainState) -> dict:
    # Flat leaf lists: independent of how nnx / optax structure their state classes.
    return {"leaves": [np.asarray(x) for x in jax.tree.leaves(ts)]}


def _from_saved(saved: dict, like: TrainState) -> TrainState:
    treedef = jax.tree.structure(like)
    return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in saved["leaves"]])


def train(out, steps: int, seed: int = 0, *, batch_size: int = 64, lr: float = 2e-3,
          ema_decay: float = 0.999, label_dropout: float = 0.1, ckpt_every: int = 500,
          progress: bool = True, export: bool = True, stop_after: int | None = None) -> dict:
    """Train (or resume) to ``steps`` steps; returns a summary dict (also written as JSON).

    ``stop_after``: stop (with a checkpoint) after that many total steps, as an interrupted
    run would; the learning-rate schedule still spans ``steps``."""
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_split = data.load("train")
    images, labels = train_split.images, train_split.labels

    unet = dm.build(seed)
    graphdef, params = nnx.split(unet)
    optimizer = make_optimizer(lr, steps)
    ts = TrainState(params, jax.tree.map(jnp.array, params), optimizer.init(params),
                    jnp.zeros((), jnp.int32))
    abar = jnp.asarray(dm.alphas_cumprod(), jnp.float32)
    step_fn = functools.partial(train_step, abar=abar, graphdef=graphdef, lr=float(lr),
                                steps=int(steps), ema_decay=float(ema_decay),
                                label_dropout=float(label_dropout))

    mngr = _ckpt_manager(out / "checkpoints", ckpt_every)
    start = 0
    latest = mngr.latest_step()
    if latest is not None:
        like = _to_saveable(ts)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        saved = mngr.restore(latest, args=ocp.args.StandardRestore(abstract))
        ts = _from_saved(saved, ts)
        start = int(ts.step)
    base_key = jax.random.PRNGKey(seed)

    losses = []
    t0 = time.time()
    end = steps if stop_after is None else min(steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=steps, desc="train digits",
               disable=not progress, mininterval=1.0)
    for step in bar:
        x0, y = _batch(images, labels, seed, step, batch_size)
        ts, loss = step_fn(ts, jnp.asarray(x0), jnp.asarray(y),
                           jax.random.fold_in(base_key, step))
        losses.append(loss)
        if (step + 1) % 50 == 0 or step + 1 == end:
            recent = float(np.mean(jax.device_get(losses[-50:])))
            bar.set_postfix(loss=f"{recent:.4f}")
        if (step + 1) % ckpt_every == 0 or step + 1 == end:
            mngr.save(step + 1, args=ocp.args.StandardSave(_to_saveable(ts)), force=True)
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    elapsed = time.time() - t0

    losses = [float(x) for x in jax.device_get(losses)]
    summary = {"steps": end, "total_steps": steps, "resumed_from": start, "seed": seed, "batch_size": batch_size,
               "lr": lr, "ema_decay": ema_decay, "label_dropout": label_dropout,
               "seconds_this_run": round(elapsed, 1),
               "final_loss_mean_last_200": (float(np.mean(losses[-200:])) if losses else None)}
    summary["state"] = ts
    if export and end == steps:
        ema_unet = nnx.merge(graphdef, ts.ema)
        export_model(ema_unet, out, summary)
    (out / "training.json").write_text(json.dumps(
        {k: v for k, v in summary.items() if k != "state"}, indent=1))
    return summary


def export_model(unet, out, summary: dict | None = None) -> None:
    from jaxdiff.checkpoint import save_model
    out = Path(out)
    save_model(unet, out / "unet", overwrite=True)
    (out / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDPMScheduler", **dm.SCHEDULE}, indent=1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (checkpoints, EMA model)")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--ckpt-every", type=int, default=500)
    a = p.parse_args(argv)
    s = train(a.out, a.steps, a.seed, batch_size=a.batch_size, lr=a.lr, ema_decay=a.ema_decay,
              ckpt_every=a.ckpt_every)
    print(json.dumps({k: v for k, v in s.items() if k != "state"}, indent=1))


if __name__ == "__main__":
    main()
