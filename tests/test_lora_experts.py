"""LoRA on a mixture's experts against Hugging Face PEFT: adapters on transformers'
stacked parameters (`target_parameters`) both ways, per-expert adapters as PEFT converts
them, the merged export, gradients, target names and an expert-parallel mesh."""

import dataclasses
import json
import os

import jax
import numpy as np
import peft
import pytest
from safetensors.numpy import save_file

import hf_reference
from coach_jax import adapters, models, parallel
from coach_jax.adapters import peft_io, targets
from coach_jax.models.lora import LoraSpec
import test_lora
from test_lora import TOKENS, _batch, _logits, adapter_loss, exports_give_our_logits

TOLERANCE = 1e-4
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _peft_model(family, folder):
    """A PEFT LoRA (rank 2) on q, v and the stacked experts, B random."""
    return test_lora._peft_model(family, folder, target_modules=("q_proj", "v_proj"),
                                 rank=2, target_parameters=EXPERT_PARAMETERS)


def _load(tmp_path, folder, scan_layers=True):
    cfg, base = models.load_hf(tmp_path / "base", scan_layers=scan_layers)
    spec, adapter = adapters.load_peft(folder, cfg)
    return dataclasses.replace(cfg, projection="lora", lora=spec), base, adapter


@pytest.mark.parametrize("family, scan_layers", [
    ("mixtral", True),     # gate rows then up rows in gate_up_proj [E, 2F, D]
    ("gpt_oss", True),     # [E, D, 2F], gate and up columns interleaved, biases
    ("qwen2_moe", False),  # a dense layer among sparse ones
])
def test_expert_adapters_go_both_ways_and_merge(tmp_path, family, scan_layers):
    """PEFT's adapter loads with PEFT's logits; ours (gate and up at rank 2r, block
    diagonal) loads in PEFT with ours; the merged model loads in transformers with ours."""
    model = _peft_model(family, tmp_path / "base")
    model.save_pretrained(tmp_path / "peft")
    cfg, base, adapter = _load(tmp_path, tmp_path / "peft", scan_layers)
    assert cfg.lora.modules == ("self_attn/q_proj", "self_attn/v_proj",
                                "mlp/experts/gate_proj", "mlp/experts/up_proj",
                                "mlp/experts/down_proj")
    params = adapters.union(base, adapter)
    logits = np.asarray(models.apply(cfg, params, TOKENS))
    assert np.abs(logits - _logits(model)).max() <= TOLERANCE
    attention_only = dataclasses.replace(cfg, lora=dataclasses.replace(
        cfg.lora, modules=cfg.lora.modules[:2]))
    assert np.abs(logits - np.asarray(models.apply(
        attention_only, adapters.union(base, _attention_part(adapter)), TOKENS))).max() > 1e-2

    exports_give_our_logits(cfg, base, adapter, family, tmp_path, logits)
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["target_parameters"] == sorted(EXPERT_PARAMETERS)
    assert written["rank_pattern"] == {"mlp\\.experts\\.gate_up_proj": 4}


def _attention_part(adapter):
    """The adapter without its expert leaves."""
    if isinstance(adapter, dict):
        return {k: _attention_part(v) for k, v in adapter.items()
                if not k.endswith("_proj_lora")}
    return adapter


def test_a_per_expert_adapter_loads_as_peft_converts_it(tmp_path):
    """An adapter on Mixtral's per-expert modules (w1, w2, w3 of each expert, as PEFT
    saved them before transformers stacked the experts): PEFT converts it onto the stacked
    parameters (rank 2r for gate_up); ours holds it as it is and writes it back exactly."""
    base = hf_reference.build("mixtral")
    base.save_pretrained(tmp_path / "base")
    config = base.config
    d, f, rank = config.hidden_size, config.intermediate_size, 2
    rng = np.random.RandomState(0)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        prefix = f"base_model.model.model.layers.{layer}"
        shapes = {"self_attn.q_proj": (d, d)}
        for e in range(config.num_local_experts):
            experts = f"block_sparse_moe.experts.{e}"
            shapes.update({f"{experts}.w1": (d, f), f"{experts}.w3": (d, f),
                           f"{experts}.w2": (f, d)})
        for module, (width_in, width_out) in shapes.items():
            tensors[f"{prefix}.{module}.lora_A.weight"] = 0.3 * rng.randn(rank, width_in)
            tensors[f"{prefix}.{module}.lora_B.weight"] = 0.3 * rng.randn(width_out, rank)
    tensors = {k: v.astype(np.float32) for k, v in tensors.items()}
    folder = tmp_path / "per_expert"
    os.makedirs(folder)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 8,
        "target_modules": ["q_proj", "w1", "w2", "w3"], "lora_dropout": 0.0, "bias": "none"}))
    converted = peft.PeftModel.from_pretrained(hf_reference.build("mixtral"), folder)

    cfg, base_params, adapter = _load(tmp_path, folder)
    logits = np.asarray(models.apply(cfg, adapters.union(base_params, adapter), TOKENS))
    assert np.abs(logits - _logits(converted)).max() <= TOLERANCE
    back = peft_io.to_peft(cfg, adapter, per_expert=True)
    assert back.keys() == tensors.keys()
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value)


def test_expert_gradients_equal_peft(tmp_path):
    """Loss and gradients of our expert factors equal PEFT's on the adapter we export
    (B's off-diagonal blocks, not parameters of ours, left out)."""
    model = _peft_model("mixtral", tmp_path / "base")
    model.save_pretrained(tmp_path / "peft")
    cfg, base, adapter = _load(tmp_path, tmp_path / "peft")
    adapters.save_peft(cfg, adapter, tmp_path / "ours", base_model=str(tmp_path / "base"))
    reference_model = peft.PeftModel.from_pretrained(
        hf_reference.build("mixtral"), tmp_path / "ours", is_trainable=True)
    ours, expected = test_lora.gradients_against_peft(reference_model, cfg, base, adapter)
    structure = peft_io.to_peft(cfg, jax.tree.map(np.ones_like, adapter))
    for name in ours:
        mine, theirs = ours[name], np.where(structure[name] != 0, expected[name], 0)
        assert np.abs(mine - theirs).max() <= 1e-4 * np.abs(theirs).max(), name


def _cfg(family):
    return models.ModelConfig.from_hf_dict(hf_reference.FAMILIES[family]().to_dict())


EXPERTS = ("mlp/experts/gate_proj", "mlp/experts/up_proj", "mlp/experts/down_proj")
ATTENTION = targets.PROJECTIONS[:4]


@pytest.mark.parametrize("family, wanted, expected", [
    ("mixtral", "all-linear", ATTENTION + EXPERTS),
    ("mixtral", ("w1", "w3"), EXPERTS[:2]),  # per-expert modules
    ("mixtral", ("gate_up_proj",), EXPERTS[:2]),  # the stacked parameter
    ("mixtral", ("mlp.experts.down_proj", "q_proj"), ATTENTION[:1] + EXPERTS[2:]),
    ("gpt_oss", ("gate_up_proj", "down_proj"), EXPERTS),
    ("qwen3_moe", "re:.*experts\\.\\d+\\.(gate|up)_proj", EXPERTS[:2]),
])
def test_expert_targets_match_as_peft_names_them(family, wanted, expected):
    assert targets.resolve(_cfg(family), wanted) == (expected, None)


def test_expert_targets_that_split_a_parameter_or_its_experts_are_refused():
    cfg = _cfg("mixtral")
    with pytest.raises(targets.TargetError, match="w1 without the other half|gate_proj "
                                                  "without the other half"):
        targets.resolve(cfg, ("w1",))
    with pytest.raises(targets.TargetError, match="some experts of layer 0"):
        targets.resolve(cfg, "re:.*experts\\.[01]\\.w\\d")
    with pytest.raises(ValueError, match="adapter.dropout=0.1 cannot act on the experts"):
        LoraSpec(4, 8.0, EXPERTS, dropout=0.1)


def test_expert_adapters_on_an_expert_parallel_mesh_equal_one_device(tmp_path):
    """Expert factors split over the expert axis as their weights are (fsdp 2 x expert 4):
    loss and gradients equal one device's."""
    model = _peft_model("mixtral", tmp_path / "base")
    model.save_pretrained(tmp_path / "peft")
    cfg, base, adapter = _load(tmp_path, tmp_path / "peft")
    loss = adapter_loss(cfg, _batch())
    expected = jax.value_and_grad(loss)(adapter, base)
    mesh = parallel.make_mesh((1, 2, 4, 1))
    params = adapters.union(base, adapter)
    placed = parallel.place(params, parallel.tree_shardings(params, cfg, mesh))
    sharded_base, sharded_adapter = peft_io.split(placed)
    spec = sharded_adapter["layers"]["mlp"]["experts"]["up_proj_lora"]["lora_a"].sharding.spec
    assert spec[1] == "expert"  # [layers, experts, in, rank]
    got = jax.jit(parallel.traced_on_mesh(jax.value_and_grad(loss), mesh))(
        sharded_adapter, sharded_base)
    assert abs(float(got[0]) - float(expected[0])) <= 1e-5
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(expected[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_experts_of_some_layers_only_go_both_ways(tmp_path):
    """adapter.layers with the experts targeted: PEFT's layers_to_transform does not reach
    target_parameters, so each layer's parameter is named in full; PEFT adapts exactly
    those and gives our logits, and the folder loads back to the same adapter."""
    hf_reference.build("mixtral").save_pretrained(tmp_path / "base")
    cfg, base = models.load_hf(tmp_path / "base")
    modules, layers = targets.resolve(cfg, ("q_proj", "gate_up_proj", "down_proj"), (1,))
    cfg = dataclasses.replace(cfg, projection="lora",
                              lora=LoraSpec(2, 8.0, modules, layers=layers))
    adapter = jax.tree.map(lambda x: x + 0.05, peft_io.split(models.init(cfg, 0))[1])
    adapter = jax.tree_util.tree_map_with_path(  # as training leaves it: layer 0's B zero
        lambda path, x: x.at[0].set(0) if "lora_b" in jax.tree_util.keystr(path) else x,
        adapter)
    logits = np.asarray(models.apply(cfg, adapters.union(base, adapter), TOKENS))
    adapters.save_peft(cfg, adapter, tmp_path / "ours", base_model=str(tmp_path / "base"))
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["target_parameters"] == ["model.layers.1.mlp.experts.down_proj",
                                            "model.layers.1.mlp.experts.gate_up_proj"]
    reloaded = peft.PeftModel.from_pretrained(hf_reference.build("mixtral"), tmp_path / "ours")
    assert not any("layers.0.mlp" in name for name, _ in reloaded.named_parameters()
                   if "lora_" in name)
    assert np.abs(_logits(reloaded) - logits).max() <= TOLERANCE
    spec, again = adapters.load_peft(tmp_path / "ours", models.load_hf(tmp_path / "base")[0])
    assert spec == cfg.lora
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(adapter)):
        np.testing.assert_allclose(np.asarray(a)[1], np.asarray(b)[1], atol=1e-7)
