"""`load_hf` / `save_hf`: round trips, sharded checkpoints, placement, and bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn
from safetensors import safe_open
from safetensors.numpy import save_file

import hf_reference
from coach_jax import models


def _tensors(folder):
    """name -> (dtype string, raw bytes) for every tensor of a saved checkpoint."""
    index = os.path.join(folder, "model.safetensors.index.json")
    files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index)
             else ["model.safetensors"])
    out = {}
    for file in files:
        with safe_open(os.path.join(folder, file), framework="numpy") as f:
            for name in f.keys():
                out[name] = (f.get_slice(name).get_dtype(), f.get_tensor(name).tobytes())
    return out


def _saved(family, folder, dtype=torch.float32, **save_kwargs):
    model = hf_reference.build(family, dtype=dtype)
    model.save_pretrained(folder, **save_kwargs)
    return model


TOKENS = np.random.RandomState(5).randint(0, 160, (2, 24)).astype(np.int32)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "mistral", "smollm3_window",
                                    "olmo2", "olmo3", "phi3", "phi4_mini", "gemma2",
                                    "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe",
                                    "olmoe", "gpt_oss", "qwen3_5", "qwen3_5_moe",
                                    "gemma4_text"])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_round_trip_is_bit_exact_and_loads_in_transformers(tmp_path, family, scan_layers):
    hf_model = _saved(family, tmp_path / "hf")
    cfg, params = models.load_hf(tmp_path / "hf", scan_layers=scan_layers)
    models.save_hf(cfg, params, tmp_path / "ours")
    original, ours = _tensors(tmp_path / "hf"), _tensors(tmp_path / "ours")
    assert ours.keys() == original.keys()
    assert all(ours[k] == original[k] for k in ours)  # dtype and bytes
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours", attn_implementation="eager")
    assert type(reloaded) is type(hf_model)
    np.testing.assert_array_equal(hf_reference.logits(reloaded, TOKENS),
                                  hf_reference.logits(hf_model, TOKENS))


@pytest.mark.parametrize("load_dtype", [jnp.bfloat16, jnp.float32])
def test_bf16_round_trip_is_bit_exact(tmp_path, load_dtype):
    _saved("llama3", tmp_path / "hf", dtype=torch.bfloat16)
    cfg, params = models.load_hf(tmp_path / "hf", dtype=load_dtype)
    assert all(x.dtype == load_dtype for x in jax.tree_util.tree_leaves(params))
    models.save_hf(cfg, params, tmp_path / "ours", dtype=jnp.bfloat16)
    original, ours = _tensors(tmp_path / "hf"), _tensors(tmp_path / "ours")
    assert {dtype for dtype, _ in ours.values()} == {"BF16"}
    assert ours == original
    assert json.load(open(tmp_path / "ours" / "config.json"))["dtype"] == "bfloat16"


def test_sharded_checkpoint_loads(tmp_path):
    hf_model = _saved("qwen3", tmp_path / "hf", max_shard_size="100KB")
    index = json.load(open(tmp_path / "hf" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) >= 2
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    cfg, params = models.load_hf(tmp_path / "hf")
    assert np.abs(np.asarray(models.apply(cfg, params, TOKENS))
                  - hf_reference.logits(hf_model, TOKENS)).max() <= 1e-4


def test_save_shards_above_threshold(tmp_path):
    hf_model = _saved("llama3", tmp_path / "hf")
    cfg, params = models.load_hf(tmp_path / "hf")
    models.save_hf(cfg, params, tmp_path / "ours", max_shard_bytes=100_000)
    shards = sorted(p.name for p in (tmp_path / "ours").glob("model-*.safetensors"))
    assert len(shards) >= 2 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    assert _tensors(tmp_path / "ours") == _tensors(tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    np.testing.assert_allclose(hf_reference.logits(reloaded, TOKENS),
                               hf_reference.logits(hf_model, TOKENS), atol=1e-5)
    # Saving again unsharded replaces the shards instead of leaving stale files around.
    models.save_hf(cfg, params, tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").glob("*.safetensors")) == [
        "model.safetensors"]
    assert not (tmp_path / "ours" / "model.safetensors.index.json").exists()


def test_random_init_exports_to_transformers(tmp_path):
    cfg = models.ModelConfig(model_type="llama", vocab_size=96, hidden_size=32,
                             intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=1,
                             head_dim=8, rope_theta=5000.0, tie_word_embeddings=True)
    params = models.init(cfg, seed=3)
    models.save_hf(cfg, params, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    tokens = TOKENS % 96
    np.testing.assert_allclose(hf_reference.logits(reloaded, tokens),
                               np.asarray(models.apply(cfg, params, tokens)), atol=1e-5)


# Maps logical axes onto a 4 x 2 ('fsdp', 'tensor') mesh of the 8 virtual CPU devices.
RULES = (("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
         ("vocab", "tensor"))


def _sharding_fn(cfg):
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    specs = {models.decoder.path_str(p): spec for p, spec in
             jax.tree_util.tree_flatten_with_path(
                 models.logical_axes(cfg), is_leaf=lambda x: isinstance(x, jax.P))[0]}
    return lambda path: nn.logical_to_mesh_sharding(specs[path], mesh, RULES)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
def test_load_and_init_place_params_with_the_given_sharding(tmp_path):
    hf_model = _saved("llama3", tmp_path / "hf")
    cfg, plain = models.load_hf(tmp_path / "hf")
    sharding = _sharding_fn(cfg)
    _, sharded = models.load_hf(tmp_path / "hf", sharding=sharding)
    initialised = models.init(cfg, seed=0, sharding=sharding)
    for params in (sharded, initialised):
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            assert leaf.sharding == sharding(models.decoder.path_str(key_path))
    q_kernel = sharded["layers"]["self_attn"]["q_proj"]["kernel"]  # [layers, embed, heads, hd]
    assert q_kernel.addressable_shards[0].data.shape == (2, 16, 2, 16)
    assert np.abs(np.asarray(models.apply(cfg, sharded, TOKENS))
                  - hf_reference.logits(hf_model, TOKENS)).max() <= 1e-4
    jax.tree_util.tree_map(np.testing.assert_array_equal, plain, sharded)


def test_init_is_seeded():
    cfg = models.ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32,
                             intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                             head_dim=16, qk_norm=True)
    a, b, c = models.init(cfg, 0), models.init(cfg, 0), models.init(cfg, 1)
    shapes = models.param_shapes(cfg)
    assert jax.tree_util.tree_map(lambda x: x.shape, a) == jax.tree_util.tree_map(
        lambda x: x.shape, shapes)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["embed_tokens"], c["embed_tokens"])
    assert models.count_params(a) == sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(a))


# ---- bad input -------------------------------------------------------------------------


def test_folder_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        models.load_hf(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        models.load_hf(tmp_path / "nope")


def test_folder_without_weights(tmp_path):
    _saved("llama3", tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(models.CheckpointError, match=r"neither model\.safetensors nor"):
        models.load_hf(tmp_path)


LAB_BASE_CONFIG = os.path.join(os.path.dirname(__file__), "..", "assets", "lab", "base",
                               "config.json")


@pytest.fixture
def pickles_never_opened(monkeypatch):
    """Any open() of a PyTorch pickle fails the test."""
    import builtins
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        assert not str(file).endswith((".bin", ".pt", ".pth")), f"opened {file}"
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", guarded)


def test_pickle_weights_get_the_conversion_command(tmp_path, pickles_never_opened):
    (tmp_path / "config.json").write_bytes(open(LAB_BASE_CONFIG, "rb").read())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle: never read")
    with pytest.raises(models.CheckpointError) as err:
        models.load_hf(tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{tmp_path}: PyTorch pickle weights "
                                                      "(pytorch_model.bin)")
    assert (f"M.from_pretrained({str(tmp_path)!r}).save_pretrained({str(tmp_path)!r}, "
            "safe_serialization=True)") in message


def test_sharded_pickles_are_refused_before_the_model_is_built(tmp_path, pickles_never_opened):
    from coach_jax.models.builder import ModelSpec, build_model
    (tmp_path / "config.json").write_bytes(open(LAB_BASE_CONFIG, "rb").read())
    for i in (1, 2):
        (tmp_path / f"pytorch_model-0000{i}-of-00002.bin").write_bytes(b"fake")
    (tmp_path / "pytorch_model.bin.index.json").write_text('{"weight_map": {}}')
    (tmp_path / "training_args.bin").write_bytes(b"fake")
    spec = ModelSpec(str(tmp_path), (), "float32", "float32", "none", "auto", True, 1)
    with pytest.raises(models.CheckpointError, match=r"pytorch_model-00001-of-00002\.bin, "
                                                     r"pytorch_model-00002-of-00002\.bin\) and "
                                                     r"no model\.safetensors.*save_pretrained"):
        build_model(spec, tokenizer_size=1024, seed=0)


def test_the_conversion_command_gives_a_loadable_folder(tmp_path):
    """The command the refusal prints, run as printed, turns a pickle into safetensors."""
    import subprocess
    import sys
    from coach_jax.models.hf_checkpoint import convert_command
    model = hf_reference.build("llama3")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    command = convert_command(str(tmp_path)).replace("python", sys.executable, 1)
    subprocess.run(command, shell=True, check=True, capture_output=True, timeout=300)
    cfg, params = models.load_hf(tmp_path)
    np.testing.assert_array_equal(np.asarray(params["embed_tokens"]),
                                  model.model.embed_tokens.weight.detach().numpy())


def test_truncated_safetensors(tmp_path):
    _saved("llama3", tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(models.CheckpointError, match=r"model\.safetensors.*truncated"):
        models.load_hf(tmp_path)


def _rewrite(folder, edit):
    """Applies `edit(dict of numpy tensors)` to a single-file checkpoint in place."""
    path = os.path.join(folder, "model.safetensors")
    with safe_open(path, framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_wrong_shape_missing_and_unexpected_tensors_listed_together(tmp_path):
    _saved("llama3", tmp_path)

    def edit(t):
        t["model.layers.1.self_attn.k_proj.weight"] = np.zeros((33, 64), np.float32)
        del t["model.layers.0.mlp.up_proj.weight"]
        t["model.layers.0.mlp.extra.weight"] = np.zeros((2,), np.float32)

    _rewrite(tmp_path, edit)
    with pytest.raises(models.CheckpointError) as err:
        models.load_hf(tmp_path)
    message = str(err.value)
    assert "model.layers.1.self_attn.k_proj.weight: [33, 64]" in message
    assert "expected [32, 64]" in message
    assert "missing (1):\n  model.layers.0.mlp.up_proj.weight" in message
    assert "unexpected (1):\n  model.layers.0.mlp.extra.weight" in message


def test_index_naming_a_missing_shard(tmp_path):
    _saved("qwen2", tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    os.remove(shard)
    with pytest.raises(models.CheckpointError, match=f"{shard.name}: listed in the checkpoint"):
        models.load_hf(tmp_path)


def test_tied_checkpoint_with_redundant_lm_head_loads(tmp_path):
    hf_model = _saved("qwen2", tmp_path)
    _rewrite(tmp_path, lambda t: t.update(
        {"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    cfg, params = models.load_hf(tmp_path)
    assert "lm_head" not in params
    assert np.abs(np.asarray(models.apply(cfg, params, TOKENS))
                  - hf_reference.logits(hf_model, TOKENS)).max() <= 1e-4


def test_params_not_matching_config_are_refused_on_save(tmp_path):
    cfg = models.ModelConfig(model_type="llama", vocab_size=32, hidden_size=16,
                             intermediate_size=24, num_layers=1, num_heads=2, num_kv_heads=2,
                             head_dim=8)
    params = models.init(cfg, 0)
    params["embed_tokens"] = params["embed_tokens"][:8]
    with pytest.raises(models.CheckpointError, match=r"embed_tokens: \(8, 16\) vs expected"):
        models.save_hf(cfg, params, tmp_path)


@pytest.mark.parametrize("tied, original_format", [(True, True), (False, False)])
def test_a_gemma3_multimodal_checkpoint_loads_its_text_decoder(tmp_path, tied,
                                                               original_format):
    """Gemma 3 4B and up are Gemma3ForConditionalGeneration: text weights under a
    language-model prefix (as transformers writes them by default, or in its in-memory
    names), a vision tower beside them. coach_jax loads the text decoder, which gives the
    wrapper's logits on text."""
    text = hf_reference.FAMILIES["gemma3_text"]()
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             image_size=8, patch_size=4)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision,
                                       mm_tokens_per_image=4, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.08 * torch.randn_like(p))
    model.eval().save_pretrained(tmp_path, save_original_format=original_format)
    names = _tensors(tmp_path).keys()
    assert any(n.startswith("vision_tower.") or n.startswith("model.vision_tower.")
               for n in names)
    cfg, params = models.load_hf(tmp_path)
    assert cfg.model_type == "gemma3_text" and cfg.tie_word_embeddings is tied
    ours = np.asarray(models.apply(cfg, params, TOKENS))
    np.testing.assert_allclose(ours, hf_reference.logits(model, TOKENS), atol=1e-4)


def _qwen3_5_multimodal(text):
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                  out_hidden_size=64, patch_size=4, spatial_merge_size=1,
                  temporal_patch_size=1, num_position_embeddings=16)
    return transformers.Qwen3_5ForConditionalGeneration(
        transformers.Qwen3_5Config(text_config=text.to_dict(), vision_config=vision))


def _gemma4_multimodal(text):
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=8, patch_size=4,
                  position_embedding_size=64)
    config = transformers.Gemma4Config(text_config=text.to_dict(), vision_config=vision,
                                       audio_config=None)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


@pytest.mark.parametrize("family, build, vision", [
    ("qwen3_5", _qwen3_5_multimodal, "model.visual."),
    ("gemma4_text", _gemma4_multimodal, "model.vision_tower.")])
def test_a_2026_multimodal_checkpoint_loads_its_text_decoder(tmp_path, family, build, vision):
    """The published Qwen3.5 and Gemma 4 checkpoints are ForConditionalGeneration: the text
    decoder under model.language_model., a vision tower beside it. coach_jax loads the text
    decoder (Gemma 4's final soft-cap kept, as its wrapper applies it) and gives the
    wrapper's logits on text."""
    torch.manual_seed(0)
    model = build(hf_reference.FAMILIES[family]())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.08 * torch.randn_like(p))
    model.eval().save_pretrained(tmp_path)
    assert any(n.startswith(vision) for n in _tensors(tmp_path))
    cfg, params = models.load_hf(tmp_path)
    assert cfg.model_type == hf_reference.FAMILIES[family]().model_type
    if family == "gemma4_text":
        assert cfg.final_logit_softcapping == 20.0
    ours = np.asarray(models.apply(cfg, params, TOKENS))
    np.testing.assert_allclose(ours, hf_reference.logits(model, TOKENS), atol=1e-4)


def test_gpt_oss_mxfp4_experts_load_as_their_dequantized_weights(tmp_path):
    """gpt-oss's published layout: each layer's gate_up_proj and down_proj as MXFP4
    `*_blocks` (two FP4 codes a byte) and `*_scales` (a power of two per 32 weights),
    quantization_config in config.json. Loaded, the experts equal transformers' own
    dequantization of those codes (exactly: FP4 x 2^k is exact in fp32) and the model gives
    the logits transformers gives with those weights; saved again, it is a plain checkpoint
    transformers loads."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    model = hf_reference.build("gpt_oss", intermediate_size=64)  # in dims: multiples of 32
    rng = np.random.default_rng(0)
    packed = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for name in ("gate_up_proj", "down_proj"):
                weight = getattr(layer.mlp.experts, name)  # [E, in, out]
                experts, width_in, width_out = weight.shape
                blocks = rng.integers(0, 256, (experts, width_out, width_in // 32, 16), np.uint8)
                scales = rng.integers(122, 128, (experts, width_out, width_in // 32), np.uint8)
                weight.copy_(convert_moe_packed_tensors(torch.tensor(blocks),
                                                        torch.tensor(scales),
                                                        dtype=torch.float32))
                prefix = f"model.layers.{i}.mlp.experts.{name}"
                packed.update({f"{prefix}_blocks": blocks, f"{prefix}_scales": scales})
    model.save_pretrained(tmp_path / "dense")
    dense = _tensors(tmp_path / "dense")
    with safe_open(str(tmp_path / "dense" / "model.safetensors"), framework="numpy") as f:
        quantized = {k: f.get_tensor(k) for k in f.keys()
                     if not k.endswith(("gate_up_proj", "down_proj"))}
    (tmp_path / "mxfp4").mkdir()
    save_file({**quantized, **packed}, str(tmp_path / "mxfp4" / "model.safetensors"))
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4",
                                     "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (tmp_path / "mxfp4" / "config.json").write_text(json.dumps(config))

    cfg, params = models.load_hf(tmp_path / "mxfp4", scan_layers=False)
    _, reference = models.load_hf(tmp_path / "dense", scan_layers=False)
    from coach_jax.models import quantize
    for name in ("gate_proj", "up_proj", "down_proj"):
        experts = params["layers_1"]["mlp"]["experts"][name]
        np.testing.assert_array_equal(experts, reference["layers_1"]["mlp"]["experts"][name])
        # QLoRA with adapter.quantize_base=mxfp4 holds exactly the checkpoint's codes.
        held = quantize.quantize_kernel(experts, f"layers_1/mlp/experts/{name}", "mxfp4", 32)
        assert held.qvalue.dtype == jnp.float4_e2m1fn
        np.testing.assert_array_equal(quantize.dequantize(held, jnp.float32), experts)
        nf4 = quantize.quantize_kernel(experts, f"layers_1/mlp/experts/{name}", "nf4", 32)
        assert np.abs(quantize.dequantize(nf4, jnp.float32) - experts).max() > 1e-3
    np.testing.assert_allclose(np.asarray(models.apply(cfg, params, TOKENS)),
                               hf_reference.logits(model, TOKENS), atol=1e-4)
    models.save_hf(cfg, params, tmp_path / "ours")
    assert "quantization_config" not in json.loads((tmp_path / "ours" / "config.json").read_text())
    assert _tensors(tmp_path / "ours").keys() == dense.keys()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours",
                                                                 attn_implementation="eager")
    np.testing.assert_array_equal(hf_reference.logits(reloaded, TOKENS),
                                  hf_reference.logits(model, TOKENS))
