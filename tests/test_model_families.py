"""Model families as data: the built-in entries round-trip their configs, and a family
with fused checkpoint tensors works through its registry entry alone."""

import json
import os

import numpy as np
import pytest
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import hf_reference
import toy_family
from coach_jax import models
from coach_jax.models import families
from coach_jax.models.config import SUPPORTED_MODEL_TYPES

BASE = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
TOKENS = np.random.RandomState(5).randint(0, 160, (2, 24)).astype(np.int32)
# The HF Llama modules a toyfused checkpoint stores as one tensor, in row order.
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


@pytest.fixture
def toyfused():
    with toy_family.registered() as family:
        yield family


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    """A tiny HF Llama with biases everywhere (so fused biases are exercised too)."""
    model = hf_reference.build("llama_biases")
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    return model, folder


def _fuse(llama_folder, out_folder) -> dict[str, np.ndarray]:
    """Rewrites a Llama checkpoint the toyfused way: `transformer.` instead of `model.`,
    q/k/v and gate/up concatenated along the output rows. Returns the tensors written."""
    config = json.loads((llama_folder / "config.json").read_text())
    tensors = {name.replace("model.", "transformer.", 1): t
               for name, t in load_file(llama_folder / "model.safetensors").items()}
    for i in range(config["num_hidden_layers"]):
        for fused, parts in FUSED.items():
            for leaf in ("weight", "bias"):
                tensors[f"transformer.layers.{i}.{fused}.{leaf}"] = np.concatenate(
                    [tensors.pop(f"transformer.layers.{i}.{p}.{leaf}") for p in parts])
    os.makedirs(out_folder, exist_ok=True)
    save_file(tensors, out_folder / "model.safetensors", metadata={"format": "pt"})
    config.update(model_type="toyfused", architectures=["ToyFusedForCausalLM"])
    (out_folder / "config.json").write_text(json.dumps(config))
    return tensors


def _read(folder) -> dict[str, tuple[str, bytes]]:
    with safe_open(folder / "model.safetensors", framework="numpy") as f:
        return {name: (f.get_slice(name).get_dtype(), f.get_tensor(name).tobytes())
                for name in f.keys()}


@pytest.mark.parametrize("scan_layers", [True, False])
def test_fused_family_loads_with_hf_logits_and_saves_bit_exactly(
        toyfused, llama_checkpoint, tmp_path, scan_layers):
    hf_model, llama_folder = llama_checkpoint
    written = _fuse(llama_folder, tmp_path / "toy")
    assert "transformer.layers.1.self_attn.qkv_proj.weight" in written
    cfg, params = models.load_hf(tmp_path / "toy", scan_layers=scan_layers)
    assert cfg.model_type == "toyfused" and cfg.qkv_bias and cfg.mlp_bias
    logits = np.asarray(models.apply(cfg, params, TOKENS))
    np.testing.assert_allclose(logits, hf_reference.logits(hf_model, TOKENS), atol=1e-5)

    models.save_hf(cfg, params, tmp_path / "out")
    assert _read(tmp_path / "out") == _read(tmp_path / "toy")  # names, dtypes and bytes
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["model_type"] == "toyfused"
    assert exported["architectures"] == ["ToyFusedForCausalLM"]


def test_fused_tensor_of_the_wrong_shape_is_reported(toyfused, llama_checkpoint, tmp_path):
    _, llama_folder = llama_checkpoint
    tensors = _fuse(llama_folder, tmp_path)
    tensors["transformer.layers.0.mlp.gate_up_proj.weight"] = np.zeros((5, 64), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(models.CheckpointError,
                       match=r"transformer\.layers\.0\.mlp\.gate_up_proj\.weight: \[5, 64\] "
                             r"in model\.safetensors, expected \[224, 64\]"):
        models.load_hf(tmp_path)


def test_fused_groups_come_from_the_entry(toyfused):
    cfg = models.ModelConfig.from_hf_dict({**BASE, "model_type": "toyfused"})
    assert [cfg.projection_group(m) for m in ("self_attn/q_proj", "self_attn/v_proj",
                                              "self_attn/o_proj", "mlp/up_proj")] == [
        "qkv", "qkv", None, "gate_up"]
    llama = models.ModelConfig.from_hf_dict({**BASE, "model_type": "llama"})
    assert llama.projection_group("self_attn/q_proj") is None


def test_supported_model_types_follow_the_registry():
    assert "toyfused" not in SUPPORTED_MODEL_TYPES
    with toy_family.registered():
        assert "toyfused" in SUPPORTED_MODEL_TYPES
        with pytest.raises(ValueError, match="already registered"):
            families.register(toy_family.TOYFUSED)
        with pytest.raises(models.UnsupportedModelError, match=r"gpt_oss, qwen3_5_text, qwen3_5_moe_text, gemma4_text, toyfused$"):
            models.ModelConfig.from_hf_dict({**BASE, "model_type": "gpt2"})
    assert "toyfused" not in SUPPORTED_MODEL_TYPES
    with pytest.raises(models.UnsupportedModelError, match="'toyfused' is not supported"):
        models.ModelConfig.from_hf_dict({**BASE, "model_type": "toyfused"})


def test_an_entry_naming_an_unknown_switch_is_refused():
    with pytest.raises(ValueError, match=r"unknown switches \['post_norm'\]"):
        families.Family("x", "XForCausalLM", switches=dict(post_norm=True))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_registry_entries_round_trip_their_configs(model_type):
    """Every key an entry reads switched on: parsed as the entry says, written back, and
    read again by transformers' own config class into the same ModelConfig."""
    family = families.FAMILIES[model_type]
    keys = {source: True for source in family.switches.values() if isinstance(source, str)}
    cfg = models.ModelConfig.from_hf_dict({**BASE, "model_type": model_type, **keys})
    for name in families.SWITCHES:
        source = family.switches.get(name, False)
        assert getattr(cfg, name) == (source if isinstance(source, bool) else True), name
    exported = cfg.to_hf_dict()
    assert exported["architectures"] == [family.architecture]
    assert hasattr(transformers, family.architecture)
    rebuilt = transformers.AutoConfig.for_model(**exported).to_dict()
    assert models.ModelConfig.from_hf_dict(rebuilt) == cfg


def test_checkpoints_of_earlier_versions_keep_their_identity():
    """A Llama-style model records exactly the fields checkpoints recorded before the
    family features of step 14 existed, so those checkpoints still resume; a Gemma 2
    model records its features."""
    from coach_jax.train.loop import LATER_MODEL_FIELDS, model_identity
    import dataclasses as dc
    defaults = {f.name: f.default for f in dc.fields(models.ModelConfig)}
    assert all(defaults[k] == v for k, v in LATER_MODEL_FIELDS.items())
    cfg = models.ModelConfig.from_hf_dict({**BASE, "model_type": "llama"})
    assert set(model_identity(cfg)) == {
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
        "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings", "rope_theta",
        "rope_scaling", "rms_norm_eps", "tie_word_embeddings", "qkv_bias", "o_bias",
        "mlp_bias", "qk_norm", "layer_windows", "initializer_range", "param_dtype",
        "real_vocab_size"}
    gemma = models.ModelConfig.from_hf_dict({**BASE, "model_type": "gemma2"})
    assert model_identity(gemma)["sandwich_norms"] is True
