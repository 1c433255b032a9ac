"""LoRA merging (diffusers/PEFT and kohya files) and textual inversion, against diffusers on
tiny random SD and SDXL folders (float32, CPU).

References: diffusers' ``load_lora_weights`` + ``fuse_lora`` (its PEFT backend) and
``load_textual_inversion``. The LoRA files are written the way users get them: PEFT adapters
injected into the diffusers modules (random factors) and saved by ``save_lora_weights`` with
their adapter metadata; kohya files are written here from the same factors, with kohya's key
names and ``.alpha`` tensors (diffusers-named for SD 1.x, original-SD ``input_blocks`` names
for SDXL, as kohya's trainers write them).
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import conversion
from conversion import lora as L
from jaxdiff import lora as lora_runtime
from jaxdiff import solvers
from jaxdiff.sampling import sequential
from tiny import latents_and_images_error, nhwc, rel_l2, write_tiny_pipeline, write_tiny_sdxl

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2", "conv1", "conv2", "time_emb_proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture(autouse=True)
def _peft_for_transformers(monkeypatch):
    """transformers 5.24 asks for peft >= 0.22 before loading a text-encoder adapter; the
    newest peft on the test index is 0.21.2, whose LoRA layers are what it needs."""
    import transformers.integrations.peft as tp

    monkeypatch.setattr(tp, "check_peft_version", lambda *a, **k: None)


def _peft_layers(model, targets, r, alpha, seed, std=0.1):
    """A PEFT LoRA (random A and B) on a copy of ``model`` -> (state dict, LoraConfig)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    model = inject_adapter_in_model(cfg, copy.deepcopy(model))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return get_peft_model_state_dict(model), cfg


def _save_peft(pipe_cls, folder, layers):
    """layers: {component: (state dict, LoraConfig)} -> save_lora_weights(folder)."""
    kw = {}
    for c, (sd, cfg) in layers.items():
        kw[f"{c}_lora_layers"] = sd
        kw[f"{c}_lora_adapter_metadata"] = cfg.to_dict()
    pipe_cls.save_lora_weights(str(folder), **kw)
    return folder


def _kohya(layers, unet_name=lambda m: m, te_prefixes=("lora_te_",)):
    """The same factors with kohya names: lora_unet_<module>, lora_te(1|2)_text_model_<module>,
    lora_down / lora_up and an alpha tensor per layer."""
    out = {}
    prefixes = {"unet": "lora_unet_", "text_encoder": te_prefixes[0],
                "text_encoder_2": te_prefixes[-1]}
    for c, (sd, cfg) in layers.items():
        for k, v in sd.items():
            module, role = k.rsplit(".lora_", 1)
            if c != "unet":          # CLIPTextModelWithProjection keeps its text_model level
                module = module if module.startswith("text_model.") else "text_model." + module
            else:
                module = unet_name(module)
            name = prefixes[c] + module.replace(".", "_")
            out[f"{name}.lora_{'down' if role.startswith('A') else 'up'}.weight"] = v.numpy()
            out[f"{name}.alpha"] = np.asarray(cfg.lora_alpha, np.float32)
    return out


def _ids(tok, prompts):
    return tok(prompts, padding="max_length", max_length=tok.model_max_length,
               truncation=True, return_tensors="np").input_ids


_FORWARDS = {}


def _forward(module, *args):
    """module(*args[:-1], **args[-1]) jitted once per module structure (merged modules share
    their base's graph definition, so each tiny UNet compiles once)."""
    graphdef, state = nnx.split(module)
    if graphdef not in _FORWARDS:
        _FORWARDS[graphdef] = jax.jit(
            lambda st, *a: nnx.merge(graphdef, st)(*a[:-1], **a[-1]))
    return _FORWARDS[graphdef](state, *args)


def _unet_error(ref_unet, jax_unet, cfg_xl=False):
    from tiny import UNET_CONFIGS, torch_unet_forward, unet_inputs

    cfg = {**UNET_CONFIGS["sdxl" if cfg_xl else "sd1"],
           "cross_attention_dim": ref_unet.config.cross_attention_dim}
    x, t, ctx, kw = unet_inputs(cfg, np.random.default_rng(0))
    want = torch_unet_forward(ref_unet, x, t, ctx, kw)
    if isinstance(jax_unet, torch.nn.Module):        # a second diffusers UNet
        got = torch_unet_forward(jax_unet, x, t, ctx, kw)
    else:
        got = np.asarray(_forward(jax_unet, x, t, ctx, kw))
    return rel_l2(got, want)


# ------------------------------------------------------------------------------ SD 1.x
@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("lora_sd")
    ref = write_tiny_pipeline(root / "sd")
    a = {"unet": _peft_layers(ref.unet, UNET_TARGETS, 4, 8, seed=1),
         "text_encoder": _peft_layers(ref.text_encoder, TE_TARGETS, 2, 3, seed=2)}
    b = {"unet": _peft_layers(ref.unet, ["to_k", "to_v", "conv2", "proj_out"], 3, 1.5, seed=3)}
    files = dict(a=_save_peft(StableDiffusionPipeline, root / "a", a),
                 b=_save_peft(StableDiffusionPipeline, root / "b", b))
    files["a_kohya"] = root / "a_kohya.safetensors"
    conversion.write_safetensors(_kohya(a), files["a_kohya"])
    return dict(root=root, folder=root / "sd", ref=ref, files=files, layers=dict(a=a, b=b),
                pipe=conversion.load_pipeline(root / "sd"))


def _diffusers_sd(sd, adapters, fuse=True):
    """A fresh diffusers pipeline with ``adapters`` [(name, scale)] loaded (and fused)."""
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(sd["folder"], safety_checker=None,
                                                  requires_safety_checker=False)
    for name, _ in adapters:
        ref.load_lora_weights(str(sd["files"][name]), adapter_name=name)
    ref.set_adapters([n for n, _ in adapters], [s for _, s in adapters])
    if fuse:
        ref.fuse_lora(adapter_names=[n for n, _ in adapters])
    return ref


@pytest.fixture(scope="module")
def ref_a(sd):
    return _diffusers_sd(sd, [("a", 1.0)])


def test_merge_lora_unet_and_text_encoder_match_diffusers(sd, ref_a):
    pipe = sd["pipe"]
    errs = {}
    for name in ("a", "a_kohya"):
        unet = conversion.merge_lora(pipe.unet, sd["files"][name])
        errs[f"unet {name}"] = _unet_error(ref_a.unet, unet)
        te = conversion.merge_lora(pipe.text_encoder, sd["files"][name])
        ids = _ids(ref_a.tokenizer, ["the cat", "a dog on the mat"])
        with torch.no_grad():
            want = ref_a.text_encoder(torch.from_numpy(ids)).last_hidden_state.numpy()
        errs[f"text encoder {name}"] = rel_l2(np.asarray(te(ids).last_hidden_state), want)
    base = _unet_error(ref_a.unet, pipe.unet)
    print("SD LoRA rel L2 vs diffusers fuse_lora:", {k: f"{v:.1e}" for k, v in errs.items()},
          f"(unmerged UNet: {base:.1e})")
    assert base > 1e-2, "the LoRA should change the UNet's output"
    assert all(v <= 1e-4 for v in errs.values()), errs


def test_kohya_file_is_read_by_diffusers_as_the_same_lora(sd, ref_a):
    """The hand-written kohya file is what diffusers' own converter reads as LoRA a."""
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(sd["folder"], safety_checker=None,
                                                  requires_safety_checker=False)
    ref.load_lora_weights(str(sd["files"]["a_kohya"]))
    ref.fuse_lora()
    unet = conversion.merge_lora(sd["pipe"].unet, sd["files"]["a_kohya"])
    assert _unet_error(ref.unet, unet) <= 1e-4


def test_pipeline_lora_matches_diffusers_end_to_end(sd, ref_a):
    pipe = copy.copy(sd["pipe"])
    pipe.__post_init__()
    pipe.load_lora_weights(sd["files"]["a"], adapter_name="a")
    assert pipe.lora_adapters == {"a": 1.0}
    from diffusers import DDIMScheduler

    ref_a.scheduler = DDIMScheduler.from_config(ref_a.scheduler.config)
    cfg = {**dict(ref_a.scheduler.config), "_class_name": "DDIMScheduler"}
    lat = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(prompt=["the cat", "a dog"], negative_prompt=["a dog", ""], guidance_scale=6.0,
              num_inference_steps=5)
    with torch.no_grad():
        want = ref_a(**kw, latents=lat, output_type="latent").images
    got = pipe(**kw, latents=nhwc(lat.numpy()), solver=solvers.from_diffusers(cfg, 5),
               output_type="latent")
    lat_err, err, inside = latents_and_images_error(ref_a, pipe, want, got)
    plain = sd["pipe"](**kw, latents=nhwc(lat.numpy()), solver=solvers.from_diffusers(cfg, 5),
                       output_type="latent")
    print(f"SD + LoRA pipeline: latents rel L2 {lat_err:.1e}, max abs image difference "
          f"{err:.2e} ({inside:.0%} unsaturated); without LoRA the latents differ by "
          f"{rel_l2(plain, got):.1e}")
    assert lat_err <= 1e-4 and err <= 2e-3 and rel_l2(plain, got) > 1e-2
    pipe.unload_lora_weights()
    assert pipe.unet is sd["pipe"].unet and pipe.text_encoder is sd["pipe"].text_encoder


def test_two_adapters_merged_unmerged_and_no_recompile(sd):
    scales = [("a", 0.7), ("b", -0.4)]
    ref = _diffusers_sd(sd, scales)
    pipe = copy.copy(sd["pipe"])
    pipe.__post_init__()
    for name, s in scales:
        pipe.load_lora_weights(sd["files"][name], adapter_name=name, scale=s)
    merged_unet, merged_te = pipe.unet, pipe.text_encoder
    err = _unet_error(ref.unet, merged_unet)
    # merge_lora with a list and per-adapter scales is the same merge
    listed = conversion.merge_lora(sd["pipe"].unet, [sd["files"]["a"], sd["files"]["b"]],
                                   [0.7, -0.4])
    list_err = _unet_error(ref.unet, listed)

    # unmerged: base weights in the pipeline, factors merged in the jitted call
    pipe.unfuse_lora()
    assert pipe.unet is sd["pipe"].unet
    unmerged = pipe.lora_module("unet")
    ids = _ids(pipe.tokenizer, ["the cat"])
    gap_unet = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(nnx.state(unmerged)), jax.tree.leaves(nnx.state(merged_unet))))
    gap_te = rel_l2(pipe.lora_module("text_encoder")(ids).last_hidden_state,
                    merged_te(ids).last_hidden_state)
    print(f"two adapters: UNet rel L2 vs diffusers {err:.1e} (merge_lora list {list_err:.1e}); "
          f"unmerged vs merged: max weight difference {gap_unet:.1e}, text encoder {gap_te:.1e}")
    assert err <= 1e-4 and list_err <= 1e-4 and gap_unet <= 1e-6 and gap_te <= 1e-6

    kw = dict(prompt=["the cat"], guidance_scale=5.0, num_inference_steps=3, solver="ddim",
              output_type="latent", seed=0)
    first = pipe(**kw)
    caches = (sequential._run._cache_size(), lora_runtime._lora_leaves._cache_size(),
              pipe._jitted["text"]._cache_size())
    pipe.set_adapters(["a", "b"], [0.2, 0.9])
    second = pipe(**kw)
    after = (sequential._run._cache_size(), lora_runtime._lora_leaves._cache_size(),
             pipe._jitted["text"]._cache_size())
    assert after == caches, f"recompiled: {caches} -> {after}"
    assert rel_l2(first, second) > 1e-3
    # the same scales fused give the same sample
    pipe.fuse_lora()
    fused = pipe(**kw)
    assert rel_l2(fused, second) <= 1e-5
    pipe.set_adapters("b", 0.5)
    assert pipe.lora_adapters == {"b": 0.5}
    pipe.unload_lora_weights()
    assert pipe.unet is sd["pipe"].unet


def test_strict_keys_and_component_selection(sd):
    pipe = sd["pipe"]
    sd_a = {k: v for k, v in conversion.read_safetensors(
        sd["files"]["a"] / "pytorch_lora_weights.safetensors").items()}
    bad = dict(sd_a)
    bad["unet.down_blocks.7.attentions.0.proj_in.lora_A.weight"] = np.zeros((4, 32), np.float32)
    bad["unet.down_blocks.7.attentions.0.proj_in.lora_B.weight"] = np.zeros((32, 4), np.float32)
    k = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    bad[k] = np.zeros((4, 5), np.float32)
    with pytest.raises(ValueError) as e:
        conversion.merge_lora(pipe.unet, bad)
    msg = str(e.value)
    assert "down_blocks.7.attentions.0.proj_in" in msg and "mis-shaped" in msg and k in msg
    with pytest.raises(ValueError, match="down_blocks.7"):
        copy.copy(pipe).load_lora_weights(bad)
    with pytest.raises(ValueError, match="not LoRA weights"):
        conversion.merge_lora(pipe.unet, {**sd_a, "unet.conv_in.weight": np.zeros(3)})
    with pytest.raises(ValueError, match="DoRA"):
        conversion.merge_lora(pipe.unet, {"lora_unet_conv_in.dora_scale": np.zeros(3),
                                          **sd_a})
    # text-encoder keys are ignored for a UNet (prefix "unet"), and the other way round
    only_unet = conversion.merge_lora(pipe.unet, sd["files"]["b"])
    assert only_unet is not pipe.unet
    with pytest.raises(ValueError, match="no LoRA weights for 'text_encoder'"):
        conversion.merge_lora(pipe.text_encoder, sd["files"]["b"])
    # a bare PEFT state dict (no component prefix) is the module's own
    bare = {k[len("unet."):]: v for k, v in sd_a.items() if k.startswith("unet.")}
    alpha_meta = conversion.merge_lora(pipe.unet, sd["files"]["a"])
    no_meta = conversion.merge_lora(pipe.unet, bare, scale=2.0)  # alpha/r = 8/4 from metadata
    x = np.random.default_rng(0).standard_normal((1, 16, 16, 4)).astype(np.float32)
    ctx = np.random.default_rng(1).standard_normal((1, 7, 24)).astype(np.float32)
    t = np.array([10.0], np.float32)
    assert rel_l2(_forward(no_meta, x, t, ctx, {}), _forward(alpha_meta, x, t, ctx, {})) <= 1e-5
    with pytest.raises(ValueError, match="text_encoder_2"):
        copy.copy(pipe).load_lora_weights(_kohya(sd["layers"]["a"], te_prefixes=("lora_te2_",)))


# ------------------------------------------------------------------------------ SDXL
_LDM_TINY_XL = {"down_blocks.0.resnets.0": "input_blocks.1.0",
                "down_blocks.1.resnets.0": "input_blocks.3.0",
                "down_blocks.1.attentions.0": "input_blocks.3.1",
                "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                "mid_block.resnets.1": "middle_block.2",
                "up_blocks.0.resnets.0": "output_blocks.0.0",
                "up_blocks.0.attentions.0": "output_blocks.0.1",
                "up_blocks.0.resnets.1": "output_blocks.1.0",
                "up_blocks.0.attentions.1": "output_blocks.1.1",
                "up_blocks.1.resnets.0": "output_blocks.2.0",
                "up_blocks.1.resnets.1": "output_blocks.3.0"}
_LDM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}


def _ldm_tiny_xl(module):
    """Original-SD names for the tiny SDXL UNet (lpb 1; written out by hand)."""
    for d, s in _LDM_TINY_XL.items():
        if module.startswith(d + "."):
            rest = module[len(d) + 1:]
            if ".resnets." in d:
                rest = _LDM_RESNET[rest]
            return f"{s}.{rest}"
    raise KeyError(module)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    root = tmp_path_factory.mktemp("lora_xl")
    base, _ = write_tiny_sdxl(root / "xl")
    layers = {"unet": _peft_layers(base.unet, UNET_TARGETS, 4, 6, seed=5),
              "text_encoder": _peft_layers(base.text_encoder, TE_TARGETS, 2, 2, seed=6),
              "text_encoder_2": _peft_layers(base.text_encoder_2, TE_TARGETS, 3, 5, seed=7)}
    peft_dir = _save_peft(StableDiffusionXLPipeline, root / "peft", layers)
    kohya = root / "kohya_xl.safetensors"
    conversion.write_safetensors(_kohya(layers, _ldm_tiny_xl, ("lora_te1_", "lora_te2_")), kohya)
    ref = StableDiffusionXLPipeline.from_pretrained(root / "xl" / "base")
    ref.load_lora_weights(str(peft_dir))
    ref.fuse_lora()
    return dict(root=root, ref=ref, peft=peft_dir, kohya=kohya,
                pipe=conversion.load_pipeline(root / "xl" / "base"))


def test_sdxl_lora_matches_diffusers(xl):
    from diffusers import DDIMScheduler

    ref, pipe = xl["ref"], xl["pipe"]
    errs = {}
    for name in ("peft", "kohya"):
        unet = conversion.merge_lora(pipe.unet, xl[name])
        errs[f"unet {name}"] = _unet_error(ref.unet, unet, cfg_xl=True)
        for c in ("text_encoder", "text_encoder_2"):
            te = conversion.merge_lora(getattr(pipe, c), xl[name], prefix=c)
            ids = _ids(getattr(ref, "tokenizer" + c[12:]), ["the cat", "a dog"])
            with torch.no_grad():
                want = getattr(ref, c)(torch.from_numpy(ids), output_hidden_states=True)
            errs[f"{c} {name}"] = rel_l2(te(ids).hidden_states[-2],
                                         want.hidden_states[-2].numpy())
    p = copy.copy(pipe)
    p.__post_init__()
    p.load_lora_weights(xl["kohya"])
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    cfg = {**dict(ref.scheduler.config), "_class_name": "DDIMScheduler"}
    lat = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    kw = dict(prompt=["the cat", "a dog"], negative_prompt=["a dog", ""], guidance_scale=5.0,
              num_inference_steps=4)
    with torch.no_grad():
        want = ref(**kw, latents=lat, output_type="latent").images
    got = p(**kw, latents=nhwc(lat.numpy()), solver=solvers.from_diffusers(cfg, 4),
            output_type="latent")
    lat_err, err, inside = latents_and_images_error(ref, p, want, got)
    print("SDXL LoRA rel L2 vs diffusers:", {k: f"{v:.1e}" for k, v in errs.items()},
          f"pipeline (kohya file): latents {lat_err:.1e}, max abs image difference {err:.2e} "
          f"({inside:.0%} unsaturated)")
    assert all(v <= 1e-4 for v in errs.values()), errs
    assert lat_err <= 1e-4 and err <= 2e-3


def test_kohya_sdxl_names_read_by_diffusers_alike(xl):
    """diffusers' own converter reads the hand-written original-SD names as the same LoRA."""
    from diffusers import StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline.from_pretrained(xl["root"] / "xl" / "base")
    ref.load_lora_weights(str(xl["kohya"]))
    ref.fuse_lora()
    assert _unet_error(ref.unet, xl["ref"].unet, cfg_xl=True) <= 1e-5
    assert _unet_error(ref.unet, conversion.merge_lora(xl["pipe"].unet, xl["kohya"]),
                       cfg_xl=True) <= 1e-4


# ------------------------------------------------------------------------------ textual inversion
def _sd_embeds(ref, prompt):
    with torch.no_grad():
        return ref.encode_prompt(prompt, "cpu", 1, False)[0].numpy()


def test_textual_inversion_matches_diffusers(sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    rng = np.random.default_rng(0)
    single = tmp_path / "single"
    single.mkdir()
    conversion.write_safetensors({"<cat-toy>": rng.standard_normal(24).astype(np.float32)},
                                 single / "learned_embeds.safetensors")
    multi = tmp_path / "multi.safetensors"
    conversion.write_safetensors({"<style>": rng.standard_normal((3, 24)).astype(np.float32)},
                                 multi)
    a1111_pt = tmp_path / "a1111.pt"
    torch.save({"string_to_token": {"*": 265}, "name": "a1111tok", "step": 100,
                "string_to_param": {"*": torch.from_numpy(
                    rng.standard_normal((2, 24)).astype(np.float32))}}, a1111_pt)
    a1111_st = tmp_path / "myemb.safetensors"
    conversion.write_safetensors({"emb_params": rng.standard_normal((2, 24)).astype(np.float32)},
                                 a1111_st)
    ref = StableDiffusionPipeline.from_pretrained(sd["folder"], safety_checker=None,
                                                  requires_safety_checker=False)
    pipe = copy.copy(sd["pipe"])
    pipe.__post_init__()
    pipe.tokenizer = copy.deepcopy(pipe.tokenizer)
    ref.load_textual_inversion(str(single))
    ref.load_textual_inversion(str(multi))
    ref.load_textual_inversion(str(a1111_pt))
    ref.load_textual_inversion(str(a1111_st), token="myemb")
    pipe.load_textual_inversion(single)
    pipe.load_textual_inversion(multi)
    pipe.load_textual_inversion(a1111_pt)
    pipe.load_textual_inversion(a1111_st)             # named after the file, as A1111
    errs = {}
    for tok in ("<cat-toy>", "<style>", "a1111tok", "myemb"):
        prompt = [f"a {tok} cat", f"the {tok}"]
        errs[tok] = rel_l2(pipe.encode_prompt(prompt), _sd_embeds(ref, prompt))
    assert rel_l2(pipe.encode_prompt(["a <style> cat"]),
                  sd["pipe"].encode_prompt(["a <style> cat"])) > 1e-2
    print("textual inversion rel L2 vs diffusers:", {k: f"{v:.1e}" for k, v in errs.items()})
    assert all(v <= 1e-5 for v in errs.values()), errs
    assert "<style>_2" in pipe.tokenizer.get_vocab()
    assert pipe.text_encoder.config.vocab_size >= len(pipe.tokenizer)
    with pytest.raises(ValueError, match="already in the tokenizer"):
        pipe.load_textual_inversion(single)
    with pytest.raises(ValueError, match="already in the tokenizer"):
        pipe.load_textual_inversion({"<style>": np.zeros((2, 24), np.float32)})
    with pytest.raises(ValueError, match="width 7"):
        pipe.load_textual_inversion({"<narrow>": np.zeros(7, np.float32)})
    with pytest.raises(ValueError, match="not a textual inversion"):
        pipe.load_textual_inversion({"a": np.zeros(24), "b": np.zeros(24)})
    assert "<narrow>" not in pipe.tokenizer.get_vocab()


def test_textual_inversion_sdxl(xl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    rng = np.random.default_rng(1)
    path = tmp_path / "xl_emb.safetensors"
    conversion.write_safetensors({"clip_l": rng.standard_normal((2, 8)).astype(np.float32),
                                  "clip_g": rng.standard_normal((2, 16)).astype(np.float32)},
                                 path)
    ref = StableDiffusionXLPipeline.from_pretrained(xl["root"] / "xl" / "base")
    emb = conversion.read_safetensors(path)
    ref.load_textual_inversion(torch.from_numpy(np.array(emb["clip_l"])), token="<xl>",
                               text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(torch.from_numpy(np.array(emb["clip_g"])), token="<xl>",
                               text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    pipe = conversion.load_pipeline(xl["root"] / "xl" / "base")
    pipe.load_textual_inversion(path, token="<xl>")
    prompt = ["a <xl> cat", "<xl>"]
    with torch.no_grad():
        want, _, pooled, _ = ref.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
    got, got_pooled = pipe.encode_prompt_xl(prompt)
    e, p = rel_l2(got, want.numpy()), rel_l2(got_pooled, pooled.numpy())
    print(f"SDXL textual inversion: prompt embeds rel L2 {e:.1e}, pooled {p:.1e}")
    assert e <= 1e-5 and p <= 1e-5
    with pytest.raises(ValueError, match="width"):
        pipe.load_textual_inversion({"clip_l": np.zeros((1, 16)), "clip_g": np.zeros((1, 16))},
                                    token="<other>")


def test_textual_inversion_file_formats(tmp_path):
    with pytest.raises(ValueError, match="token="):
        L.read_textual_inversion(np.zeros(4))
    tok, tables = L.read_textual_inversion(np.zeros((2, 4)), token="<t>")
    assert tok == "<t>" and tables[None].shape == (2, 4)
    tok, tables = L.read_textual_inversion({"clip_l": np.zeros(3), "clip_g": np.zeros(5)})
    assert tok is None and tables["text_encoder_2"].shape == (1, 5)


def test_the_core_reads_no_lora_file_itself(monkeypatch):
    """Reading LoRA / embedding files is conversion's (a foreign format); without its readers
    the core says so by name, and a parsed value needs none."""
    monkeypatch.setattr(lora_runtime, "_READERS", {})
    with pytest.raises(ValueError, match="import conversion"):
        lora_runtime.read("adapter.safetensors")
    with pytest.raises(ValueError, match="import conversion"):
        lora_runtime.read_embedding("learned_embeds.safetensors")
    weights = L.LoraWeights(())
    assert lora_runtime.read(weights) is weights
    rows = {None: np.zeros((1, 4), np.float32)}
    assert lora_runtime.read_embedding(("tok", rows), None) == ("tok", rows)
