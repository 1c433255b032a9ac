"""FasterDiffusion encoder propagation: exactness, key-step schedules, injection, pipelines."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
import jaxdiff.zoo.digits
from jaxdiff import solvers
from jaxdiff.guidance import classifier_free
from jaxdiff.sampling import EncoderPropagation, encoder_propagation, key_step_schedule
from jaxdiff.zoo.digits.model import NULL_LABEL, class_tokens

LABELS = [3, 1, 4, 1]
STEPS = 6


@pytest.fixture(scope="module")
def setup():
    pipe = jaxdiff.zoo.digits.load()
    labels = jnp.asarray(LABELS)
    null = jnp.full_like(labels, NULL_LABEL)
    cond = {"encoder_hidden_states": class_tokens(labels), "class_labels": labels}
    uncond = {"encoder_hidden_states": class_tokens(null), "class_labels": null}
    x_T = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 1))
    return pipe, cond, uncond, x_T


@pytest.mark.parametrize("name, gs", [("ddim", 2.0), ("dpm++", 1.0), ("euler", 2.0)])
def test_every_step_a_key_step_is_sequential_sampling(name, gs, setup):
    pipe, cond, uncond, x_T = setup
    s = solvers.make(name, pipe.schedule, STEPS)
    ref = jaxdiff.sample(pipe.model_fn(LABELS, gs), s, x_T)
    out, st = encoder_propagation(pipe.unet, s, x_T, cond=cond,
                                  uncond=uncond if gs != 1.0 else None, guidance_scale=gs,
                                  key_steps="all", noise_injection=0)
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) <= 1e-6
    assert (st.encoder_calls, st.decoder_evaluations) == (STEPS, STEPS)


def _reference(pipe, solver, x_T, labels, key_steps, alpha, threshold):
    """Step by step in Python: encoder features from the last key step, decoder with each
    step's own time embedding, injection before every step below the threshold."""
    unet = pipe.unet
    ctx, lab = class_tokens(labels), labels
    x = x_T * solver.init_noise_sigma
    state = solver.init(x)
    feats = None
    for i in range(solver.num_steps):
        t = float(solver.timesteps[i])
        if alpha and t < threshold:     # alpha x_T in the model-input (VP) scale
            x = x + alpha * x_T / solver.scale_model_input(jnp.ones_like(x), i)
        tb = jnp.full((x.shape[0],), t, jnp.float32)
        if i in key_steps:
            feats = unet.encode(solver.scale_model_input(x, i), tb, ctx, class_labels=lab)
        emb = unet.time_embedding_of(tb, x.shape[0], lab, None)
        out = unet.decode(feats.skips, feats.mid, emb, ctx)
        x, state = solver.step(state, i, x, out, jnp.zeros_like(x))
    return x


# Euler: the injection goes through scale_model_input (VE); multistep state across groups
# (DPM-Solver++) is checked by the decode-chunk and every-step-a-key-step tests
@pytest.mark.parametrize("name", ["euler"])
def test_reuse_and_injection_match_a_step_by_step_reference(name, setup):
    pipe, cond, _, x_T = setup
    s = solvers.make(name, pipe.schedule, STEPS)
    keys = (0, 3, 4)
    out, st = encoder_propagation(pipe.unet, s, x_T, cond=cond, key_steps=list(keys),
                                  noise_injection=0.003, injection_threshold=500)
    ref = _reference(pipe, s, x_T, jnp.asarray(LABELS), keys, 0.003, 500.0)
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) <= 1e-5
    assert st.encoder_calls == 3 and st.groups == (3, 1, 2)
    plain, _ = encoder_propagation(pipe.unet, s, x_T, cond=cond, key_steps=list(keys),
                                   noise_injection=0)
    assert float(jnp.max(jnp.abs(plain - out))) > 1e-3     # injection does something
    full = jaxdiff.sample(pipe.model_fn(LABELS, 1.0), s, x_T)
    assert float(jnp.max(jnp.abs(plain - full))) > 1e-3    # so does the reuse


def test_decode_chunks_equal_one_batched_call(setup):
    """decode_chunk=k (k of a group's steps per decoder call, in a lax.map; a group whose
    size is not a multiple of k is padded) gives the one-call result, with guidance."""
    pipe, cond, uncond, x_T = setup
    s = solvers.make("dpm++", pipe.schedule, STEPS)
    kw = dict(cond=cond, uncond=uncond, guidance_scale=2.0, key_steps=[0, 1, 4])  # 1, 3, 2
    ref, _ = encoder_propagation(pipe.unet, s, x_T, **kw)
    for chunk in (1, 2):
        out, st = encoder_propagation(pipe.unet, s, x_T, decode_chunk=chunk, **kw)
        assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) <= 1e-5, chunk
        assert st.groups == (1, 3, 2)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="decode_chunk"):
            encoder_propagation(pipe.unet, s, x_T, decode_chunk=bad, **kw)


def test_key_step_schedules():
    assert key_step_schedule("paper", 50) == (0, 1, 2, 3, 5, 10, 15, 25, 35)
    assert key_step_schedule("paper", 20) == (0, 1, 2, 3, 5, 10, 15)
    assert key_step_schedule(4, 10) == (0, 4, 8) == key_step_schedule("every:4", 10)
    assert key_step_schedule("all", 3) == (0, 1, 2)
    assert key_step_schedule([0, 2, 7], 8) == (0, 2, 7)


@pytest.mark.parametrize("spec, match", [
    ([1, 2], "start at step 0"), ([0, 5, 3], "strictly increasing"),
    ([0, 2, 2], "strictly increasing"), ([0, 12], "out of range"), ("paper", "paper lists"),
    ("often", "unknown key_steps"), (0, "k >= 1"), ("every:x", "integer k"),
    ([0, 1.5], "integers")])
def test_bad_key_steps_raise(spec, match):
    with pytest.raises(ValueError, match=match):
        key_step_schedule(spec, 12)


def test_bad_inputs_raise(setup):
    pipe, cond, uncond, x_T = setup
    s = solvers.make("ddim", pipe.schedule, STEPS)
    with pytest.raises(ValueError, match="noise_injection"):
        encoder_propagation(pipe.unet, s, x_T, cond=cond, key_steps=2, noise_injection=-1)
    with pytest.raises(ValueError, match="batch"):
        encoder_propagation(pipe.unet, s, x_T[:2], cond=cond, key_steps=2)
    with pytest.raises(ValueError, match="unknown conditioning keys"):
        encoder_propagation(pipe.unet, s, x_T, cond={**cond, "labels": 1}, key_steps=2)
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        encoder_propagation(lambda x, t: x, s, x_T, cond=cond, key_steps=2)


def test_pipelines_take_sampler_faster(setup):
    pipe = setup[0]
    kw = dict(labels=LABELS, num_inference_steps=STEPS, seed=2, guidance_scale=2.0)
    seq = pipe(**kw)
    exact = pipe(sampler="faster", sampler_options={"key_steps": "all", "noise_injection": 0},
                 **kw)
    np.testing.assert_allclose(exact, seq, atol=1e-5)
    fast, stats = pipe.generate(sampler=EncoderPropagation(key_steps=3), **kw)
    assert stats.encoder_calls == 2 and stats.decoder_evaluations == STEPS
    assert 1e-4 < np.abs(fast - seq).max() and np.sqrt(np.mean((fast - seq) ** 2)) < 0.25
    with pytest.raises(ValueError, match="strictly increasing"):
        pipe(sampler="faster", sampler_options={"key_steps": [0, 0]}, **kw)


def test_guidance_rescale_is_the_model_functions(setup):
    """Guidance (with guidance_rescale) comes from the model function: every step a key step
    equals sequential sampling with the same rescaled guidance."""
    pipe, cond, uncond, x_T = setup
    s = solvers.make("ddim", pipe.schedule, STEPS)
    fn = classifier_free(pipe.unet, cond["encoder_hidden_states"],
                         uncond["encoder_hidden_states"], 3.0, guidance_rescale=0.7,
                         class_labels=cond["class_labels"],
                         uncond_class_labels=uncond["class_labels"])
    ref = jaxdiff.sample(fn, s, x_T)
    got, _ = encoder_propagation(fn, s, x_T, key_steps="all", noise_injection=0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
    plain = jaxdiff.sample(dataclasses.replace(fn, guidance_rescale=jnp.float32(0)), s, x_T)
    assert np.abs(np.asarray(plain) - np.asarray(ref)).max() > 1e-3   # the rescale matters


@pytest.mark.parametrize("chunk, decoders", [(None, 3), (1, 1), (2, 2)])
def test_encoder_once_decoder_once_per_distinct_size(setup, monkeypatch, chunk, decoders):
    """Six groups of sizes 1, 1, 2, 2, 3, 3: the program traces the encoder once and the
    decoder once per distinct decoder batch (group sizes; or k and 1 with decode_chunk=k),
    not once per group."""
    pipe, cond, uncond, x_T = setup
    fn = pipe.model_fn(LABELS, 2.0)
    counts = {"encode": 0, "decode_many": 0}
    for name in counts:
        original = getattr(type(fn), name)

        def counted(self, *a, _original=original, _name=name, **k):
            counts[_name] += 1
            return _original(self, *a, **k)
        monkeypatch.setattr(type(fn), name, counted)
    s = solvers.make("ddim", pipe.schedule, 12)
    ks = [0, 1, 2, 4, 6, 9]
    out, st = encoder_propagation(fn, s, x_T, key_steps=ks, decode_chunk=chunk)
    assert st.groups == (1, 1, 2, 2, 3, 3)
    assert counts == {"encode": 1, "decode_many": decoders}
    monkeypatch.undo()
    ref, _ = encoder_propagation(fn, s, x_T, key_steps=ks, decode_chunk=None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
