"""Sample quality for the digits model: classifier accuracy and FD-digits.

A small CNN trained on the training split (``python -m jaxdiff.zoo.digits.metrics --train``
writes ``weights/classifier.npz``) serves two measurements of class-conditional samples:

* ``accuracy(images, labels)``: does a sample drawn for "7" look like a 7 to the classifier;
* ``fd_digits(images, real_images)``: the Frechet distance between Gaussians fitted to the
  classifier's penultimate features (64-d), as FID does with Inception features. Against
  held-out real digits by default. ``fd_floor(n)`` is the same number for *real* training
  digits, the value a perfect sampler would reach with n samples (FD is biased upwards for
  small n, so compare at equal n).

Images here are in [0, 1], [N, 16, 16, 1], as the pipeline returns them.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.zoo.digits import data

CLASSIFIER_PATH = Path(__file__).parent / "weights" / "classifier.npz"
FEATURE_DIM = 64


def init_classifier(seed: int = 0) -> dict:
    k = jax.random.split(jax.random.PRNGKey(seed), 4)

    def he(key, shape, fan_in):
        return np.asarray(jax.random.normal(key, shape) * np.sqrt(2.0 / fan_in), np.float32)

    return {"conv1_w": he(k[0], (3, 3, 1, 16), 9), "conv1_b": np.zeros(16, np.float32),
            "conv2_w": he(k[1], (3, 3, 16, 32), 144), "conv2_b": np.zeros(32, np.float32),
            "fc1_w": he(k[2], (512, FEATURE_DIM), 512), "fc1_b": np.zeros(FEATURE_DIM, np.float32),
            "fc2_w": he(k[3], (FEATURE_DIM, 10), FEATURE_DIM) * 0.1,
            "fc2_b": np.zeros(10, np.float32)}


def _conv(x, w, b):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(y + b)


def _pool(x):  # 2x2 average pool
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean((2, 4))


def _features_and_logits(params, x):  # x [N, 16, 16, 1] in [-1, 1]
    h = _pool(_conv(x, params["conv1_w"], params["conv1_b"]))
    h = _pool(_conv(h, params["conv2_w"], params["conv2_b"]))
    f = jax.nn.relu(h.reshape(h.shape[0], -1) @ params["fc1_w"] + params["fc1_b"])
    return f, f @ params["fc2_w"] + params["fc2_b"]


_apply = jax.jit(_features_and_logits)


def train_classifier(seed: int = 0, epochs: int = 40, batch_size: int = 64,
                     lr: float = 3e-3) -> tuple[dict, float]:
    """-> (params, held-out accuracy). Light augmentation (1-pixel shifts, a little noise)
    keeps it from keying on pixel-exact details that samples never reproduce."""
    import optax

    tr, te = data.load("train"), data.load("test")
    params = {k: jnp.asarray(v) for k, v in init_classifier(seed).items()}
    steps_per_epoch = len(tr.labels) // batch_size
    opt = optax.adamw(optax.cosine_decay_schedule(lr, epochs * steps_per_epoch), weight_decay=1e-4)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, y, key):
        k1, k2 = jax.random.split(key)
        shift = jax.random.randint(k1, (2,), -1, 2)
        x = jnp.roll(x, shift, axis=(1, 2))
        x = x + 0.05 * jax.random.normal(k2, x.shape)

        def loss_fn(p):
            _, logits = _features_and_logits(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss

    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    for epoch in range(epochs):
        perm = rng.permutation(len(tr.labels))
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            key, sub = jax.random.split(key)
            params, opt_state, _ = step(params, opt_state, jnp.asarray(tr.images[idx]),
                                        jnp.asarray(tr.labels[idx]), sub)
    params = {k: np.asarray(v) for k, v in params.items()}
    _, logits = _apply(params, jnp.asarray(te.images))
    acc = float(np.mean(np.argmax(np.asarray(logits), -1) == te.labels))
    return params, acc


@functools.lru_cache(maxsize=None)
def _load_params(path: str = str(CLASSIFIER_PATH)) -> dict:
    if not Path(path).exists():
        raise FileNotFoundError(f"no digits classifier at {path}; train one with "
                                "`python -m jaxdiff.zoo.digits.metrics --train`")
    with np.load(path) as z:
        return {k: jnp.asarray(z[k]) for k in z.files}


def _as_model_input(images) -> jax.Array:
    x = np.asarray(images, np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:] != (16, 16, 1):
        raise ValueError(f"images must be [N, 16, 16, 1] in [0, 1], got shape {x.shape}")
    return jnp.asarray(x * 2.0 - 1.0)


def features(images) -> np.ndarray:
    """[N, 16, 16, 1] in [0, 1] -> [N, 64] penultimate classifier features."""
    f, _ = _apply(_load_params(), _as_model_input(images))
    return np.asarray(f, np.float64)


def predict(images) -> np.ndarray:
    _, logits = _apply(_load_params(), _as_model_input(images))
    return np.argmax(np.asarray(logits), -1)


def accuracy(images, labels) -> float:
    """Fraction of images the classifier assigns to the label they were drawn for."""
    labels = np.asarray(labels).reshape(-1)
    pred = predict(images)
    if len(pred) != len(labels):
        raise ValueError(f"{len(pred)} images but {len(labels)} labels")
    return float(np.mean(pred == labels))


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), via symmetric eigendecompositions
    (tr (S1 S2)^1/2 = tr (S1^1/2 S2 S1^1/2)^1/2), which stays real and stable for the
    rank-deficient covariances of small sample sets."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def real_images(split: str = "test") -> np.ndarray:
    """Real digits of a split in [0, 1], [N, 16, 16, 1]."""
    return data.to_unit(data.load(split).images)


def fd_digits(images, real: Optional[np.ndarray] = None) -> float:
    """FD-digits of ``images`` against ``real`` (default: the 360 held-out real digits)."""
    real = real_images("test") if real is None else real
    return frechet_distance(features(images), features(real))


def fd_floor(n: Optional[int] = None, seed: int = 0) -> float:
    """Real-vs-real FD-digits: ``n`` training digits (all 1437 if None; a seeded class-balanced
    subset otherwise) against the held-out ones. Compare samples with ``fd_floor(len(samples))``."""
    tr = data.load("train")
    idx = np.arange(len(tr.labels))
    if n is not None:
        rng = np.random.default_rng(seed)
        per = [rng.permutation(np.flatnonzero(tr.labels == c)) for c in range(10)]
        idx = np.concatenate([p[:int(np.ceil(n / 10))] for p in per])[:n]
    return fd_digits(data.to_unit(tr.images[idx]))


def evaluate(pipe, solver="ddim", num_inference_steps: int = 50, guidance_scale: float = 1.0,
             per_class: int = 10, seed: int = 0) -> dict:
    """Accuracy and FD-digits of ``per_class`` samples of each digit, with the real-vs-real
    floor at the same sample count and the sampling time per image (after compilation)."""
    import time

    labels = [d for d in range(10) for _ in range(per_class)]
    kw = dict(labels=labels, num_inference_steps=num_inference_steps, solver=solver,
              guidance_scale=guidance_scale)
    pipe(seed=seed + 1, **kw)  # compile
    t0 = time.perf_counter()
    images = pipe(seed=seed, **kw)
    seconds = time.perf_counter() - t0
    return {"solver": solver if isinstance(solver, str) else type(solver).__name__,
            "steps": num_inference_steps, "guidance_scale": guidance_scale,
            "n": len(labels), "accuracy": accuracy(images, labels),
            "fd_digits": fd_digits(images), "fd_floor": fd_floor(len(labels)),
            "seconds_per_sample": seconds / len(labels)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="train / report the digits quality classifier")
    p.add_argument("--train", action="store_true", help="train and write weights/classifier.npz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(CLASSIFIER_PATH))
    a = p.parse_args(argv)
    if a.train:
        params, acc = train_classifier(a.seed)
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, **params)
        out.with_suffix(".json").write_text(json.dumps(
            {"test_accuracy": acc, "seed": a.seed, "feature_dim": FEATURE_DIM}, indent=1))
        _load_params.cache_clear()
        print(f"classifier test accuracy {acc:.4f} -> {out}")
    print(json.dumps({"fd_floor_all": fd_floor(), "fd_floor_100": fd_floor(100)}, indent=1))


if __name__ == "__main__":
    main()
