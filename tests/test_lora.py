"""LoRA against Hugging Face PEFT: logits, loss, gradients, AdamW steps, adapter folders
both ways and the merged export; target selection as PEFT matches names."""

import dataclasses

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

import hf_reference
from coach_jax import adapters, models, train
from coach_jax.adapters import peft_io, targets
from coach_jax.models.lora import LoraSpec

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENS = np.random.RandomState(1).randint(0, 160, (2, 24)).astype(np.int32)
RELATIVE = 1e-4


def _peft_model(family, folder, rslora=False, target_modules=ALL, rank=4,
                target_parameters=None):
    """A PEFT LoRA model on the family's test model (saved to `folder`), with random B so
    that every adapter changes the output."""
    base = hf_reference.build(family)
    base.save_pretrained(folder)
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=rank, lora_alpha=8, target_modules=list(target_modules), use_rslora=rslora,
        target_parameters=target_parameters, lora_dropout=0.0, task_type="CAUSAL_LM"))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def _ours(model, tmp_path, scan_layers=True):
    """coach_jax's LoRA model from the same base folder and the PEFT adapter's values."""
    model.save_pretrained(tmp_path / "adapter")
    cfg, base = models.load_hf(tmp_path / "base", scan_layers=scan_layers)
    spec, adapter = adapters.load_peft(tmp_path / "adapter", cfg)
    return dataclasses.replace(cfg, projection="lora", lora=spec), base, adapter


def _logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def _batch(seed=0):
    rng = np.random.RandomState(seed)
    inputs = rng.randint(0, 160, (2, 24)).astype(np.int32)
    mask = (rng.rand(2, 24) < 0.6).astype(np.int32)
    mask[:, :4] = 0  # a prompt without loss
    return {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1), "loss_mask": mask,
            "segment_ids": np.ones_like(inputs), "positions": np.tile(np.arange(24), (2, 1)),
            "source_ids": np.zeros_like(inputs)}


def _peft_loss(model, batch):
    logits = model(torch.as_tensor(batch["inputs"], dtype=torch.long)).logits
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        torch.as_tensor(batch["targets"], dtype=torch.long).reshape(-1), reduction="none")
    mask = torch.as_tensor(batch["loss_mask"], dtype=torch.float32).reshape(-1)
    return (nll * mask).sum() / mask.sum()


def _peft_tensors(model, what="weight"):
    """PEFT's adapter tensors (or their gradients) under the names its folders use."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            key = name.replace(".default", "")
            out[key] = (p.grad if what == "grad" else p).detach().numpy().copy()
    return out


def adapter_loss(cfg, batch):
    """loss(adapter, base): the masked mean loss of base + adapter on `batch`, as the train
    step sums it."""
    def loss(adapter_params, base_params):
        sums = train.loss.batch_sums(cfg, adapters.union(base_params, adapter_params), batch,
                                     train.LossConfig())
        return sums["numerator"] / sums["denominator"]
    return loss


def gradients_against_peft(model, cfg, base, adapter):
    """(our adapter gradients, PEFT model's), both under PEFT's tensor names, after the
    masked loss is checked to equal PEFT's."""
    batch = _batch()
    reference = _peft_loss(model, batch)
    reference.backward()
    value, grads = jax.value_and_grad(adapter_loss(cfg, batch))(adapter, base)
    assert abs(float(value) - reference.item()) <= 1e-5
    ours, expected = peft_io.to_peft(cfg, grads), _peft_tensors(model, "grad")
    assert ours.keys() == expected.keys()
    return ours, expected


def exports_give_our_logits(cfg, base, adapter, family, tmp_path, logits):
    """Our adapter folder in PEFT and the merged export in transformers give `logits`."""
    adapters.save_peft(cfg, adapter, tmp_path / "ours", base_model=str(tmp_path / "base"))
    reloaded = peft.PeftModel.from_pretrained(hf_reference.build(family), tmp_path / "ours")
    assert np.abs(_logits(reloaded) - logits).max() <= RELATIVE
    merged_cfg, merged = adapters.merge(cfg, adapters.union(base, adapter))
    models.save_hf(merged_cfg, merged, tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged",
                                                           attn_implementation="eager")
    assert np.abs(hf_reference.logits(hf, TOKENS) - logits).max() <= RELATIVE


def _relative(ours, reference):
    return np.abs(ours - reference).max() / np.abs(reference).max()


@pytest.mark.parametrize("scan_layers", [True, False])
def test_zero_b_computes_the_base_model_exactly(tmp_path, scan_layers):
    hf_reference.build("llama3").save_pretrained(tmp_path)
    cfg, base = models.load_hf(tmp_path, scan_layers=scan_layers)
    lora_cfg = dataclasses.replace(cfg, projection="lora", lora=LoraSpec(
        4, 8.0, targets.resolve(cfg, "all-linear")[0]))
    adapter = peft_io.split(models.init(lora_cfg, 0))[1]
    a = adapter["layers" if scan_layers else "layers_0"]["self_attn"]["q_proj"]["lora_a"]
    assert np.abs(np.asarray(a)).max() > 0  # A is random, B zero
    np.testing.assert_array_equal(
        np.asarray(models.apply(lora_cfg, adapters.union(base, adapter), TOKENS)),
        np.asarray(models.apply(cfg, base, TOKENS)))


@pytest.mark.parametrize("family, rslora", [("llama3", False), ("llama3", True),
                                            ("phi3", False), ("phi3", True)])
def test_loss_and_gradients_equal_peft(tmp_path, family, rslora):
    model = _peft_model(family, tmp_path / "base", rslora)
    cfg, base, adapter = _ours(model, tmp_path)
    assert cfg.lora.scale == (8 / 2 if rslora else 8 / 4)
    ours, expected = gradients_against_peft(model, cfg, base, adapter)
    for name in ours:
        assert _relative(ours[name], expected[name]) <= RELATIVE, name


def test_three_adamw_steps_equal_peft(tmp_path):
    """Only the adapter trains (the base has no optimizer state) and after three AdamW
    steps on the fused Phi-3 model its values agree with PEFT + torch.optim.AdamW."""
    model = _peft_model("phi3", tmp_path / "base")
    cfg, base, adapter = _ours(model, tmp_path)
    params = adapters.union(base, adapter)
    embeddings = np.asarray(base["embed_tokens"])  # the step donates the state's arrays
    optimizer = train.OptimizerConfig("adamw", learning_rate=1e-2,
                                      hparams={"weight_decay": 0.01}, grad_clip_norm=None,
                                      schedule=train.ScheduleConfig("constant"))
    groups = train.ParamGroups(rules=(("lora_[ab]$", 1.0), (".", "frozen")))
    state, step_config, parts = train.setup(cfg, params, optimizer, groups, 10)
    trainable = jax.tree.leaves(train.param_groups.split(params, parts.label_tree)[0])
    assert len(trainable) == len(jax.tree.leaves(adapter))
    step = train.compile_train_step(step_config, parts)
    torch_opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_" in n],
                                  lr=1e-2, weight_decay=0.01, eps=1e-8)
    for i in range(3):
        state, _ = step(state, _batch(i))
        torch_opt.zero_grad()
        _peft_loss(model, _batch(i)).backward()
        torch_opt.step()
    ours = peft_io.to_peft(cfg, peft_io.split(state.params)[1])
    expected = _peft_tensors(model)
    for name in ours:
        np.testing.assert_allclose(ours[name], expected[name], atol=1e-4, err_msg=name)
    np.testing.assert_array_equal(  # the base never moved
        np.asarray(peft_io.split(state.params)[0]["embed_tokens"]), embeddings)


@pytest.mark.parametrize("family, scan_layers", [("llama3", True), ("phi3", False),
                                                 ("gemma4_text", False)])
def test_adapter_folders_go_both_ways_and_merge(tmp_path, family, scan_layers):
    """A PEFT-made adapter loads with PEFT's logits; ours loads in PEFT with ours; the
    merged export loads in transformers with the same logits, fused tensors fused."""
    model = _peft_model(family, tmp_path / "base")
    cfg, base, adapter = _ours(model, tmp_path, scan_layers)
    params = adapters.union(base, adapter)
    logits = np.asarray(models.apply(cfg, params, TOKENS))
    assert np.abs(logits - _logits(model)).max() <= RELATIVE
    assert np.abs(logits - np.asarray(models.apply(
        dataclasses.replace(cfg, projection="dense", lora=None), base, TOKENS))).max() > 1e-2

    exports_give_our_logits(cfg, base, adapter, family, tmp_path, logits)


def _cfg(family):
    return models.ModelConfig.from_hf_dict(hf_reference.FAMILIES[family]().to_dict())


@pytest.mark.parametrize("family, wanted, expected", [
    ("llama3", ("q_proj", "v_proj"), ("self_attn/q_proj", "self_attn/v_proj")),
    ("llama3", ("self_attn.o_proj",), ("self_attn/o_proj",)),  # a dotted suffix
    ("llama3", ("proj",), None),  # not a whole name: PEFT matches none
    ("llama3", "re:.*\\.mlp\\..*_proj", ("mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")),
    ("llama3", "all-linear", targets.PROJECTIONS),
    ("phi3", ("qkv_proj",), ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj")),
    ("phi3", ("q_proj",), None),  # Phi-3 has no q_proj module
])
def test_targets_match_as_peft_matches(family, wanted, expected):
    cfg = _cfg(family)
    if expected is None:
        with pytest.raises(targets.TargetError, match="match no projection.*its modules are"):
            targets.resolve(cfg, wanted)
    else:
        assert targets.resolve(cfg, wanted) == (expected, None)


def test_targets_select_layers_and_must_agree_between_them():
    cfg = _cfg("llama3")
    assert targets.resolve(cfg, "re:model\\.layers\\.1\\.self_attn\\.q_proj") == (
        ("self_attn/q_proj",), (1,))
    assert targets.resolve(cfg, ("q_proj",), (0,)) == (("self_attn/q_proj",), (0,))
    with pytest.raises(targets.TargetError, match=r"other projections in layers \[1\]"):
        targets.resolve(cfg, "re:model\\.layers\\.0\\.self_attn\\.q_proj|"
                             "model\\.layers\\.1\\.self_attn\\.v_proj")
    with pytest.raises(targets.TargetError, match="this model has layers 0 to 1"):
        targets.resolve(cfg, "all-linear", (2,))


def test_comma_separated_targets_and_bad_regex():
    assert targets.parse("q_proj, v_proj") == ("q_proj", "v_proj")
    with pytest.raises(targets.TargetError, match="not a valid regular expression"):
        targets.parse("re:(")


def test_adapter_of_another_shape_is_refused_with_the_tensors_named(tmp_path):
    model = _peft_model("llama3", tmp_path / "base", target_modules=("q_proj",), rank=2)
    model.save_pretrained(tmp_path / "adapter")
    cfg, _ = models.load_hf(tmp_path / "base")
    small = dataclasses.replace(cfg, intermediate_size=cfg.intermediate_size, hidden_size=32,
                                num_heads=2, num_kv_heads=1)
    with pytest.raises(adapters.AdapterError, match="wrong shape"):
        adapters.load_peft(tmp_path / "adapter", small)
    config = (tmp_path / "adapter" / "adapter_config.json")
    config.write_text(config.read_text().replace('"use_dora": false', '"use_dora": true'))
    with pytest.raises(adapters.AdapterError, match="use_dora=True is not supported"):
        adapters.load_peft(tmp_path / "adapter", cfg)


def test_a_data_fsdp_tensor_mesh_gives_one_devices_loss_and_gradients(tmp_path):
    """Adapters placed by their logical axes (A like the kernel's input, B like its
    output, rank replicated) on a (2, 2, 2) mesh, the base sharded as in training."""
    from coach_jax import parallel
    cfg, base, adapter = _ours(_peft_model("llama3", tmp_path / "base"), tmp_path)
    batch = _batch()

    loss = adapter_loss(cfg, batch)
    expected = jax.value_and_grad(loss)(adapter, base)
    mesh = parallel.make_mesh((2, 2, 2))
    placed = parallel.place(adapters.union(base, adapter), parallel.tree_shardings(
        adapters.union(base, adapter), cfg, mesh))
    sharded_base, sharded_adapter = peft_io.split(placed)
    spec = sharded_adapter["layers"]["self_attn"]["q_proj"]["lora_b"].sharding.spec
    assert "tensor" in spec and "tensor" not in (spec[1] or ())  # heads split, rank not
    got = jax.value_and_grad(loss)(sharded_adapter, sharded_base)
    assert abs(float(got[0]) - float(expected[0])) <= 1e-6
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(expected[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_dropout_acts_in_training_only(tmp_path):
    """With a dropout rng (the train step's) the adapter's input is dropped, a new mask per
    rng, inverted so the mean over masks is the undropped adapter; without one (eval,
    generation) the model is exactly the dropout-free one."""
    model = _peft_model("phi3", tmp_path / "base")
    cfg, base, adapter = _ours(model, tmp_path)
    params = adapters.union(base, adapter)
    dropped = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, dropout=0.5))
    clean = np.asarray(models.hidden_states(cfg, params, TOKENS))
    np.testing.assert_array_equal(np.asarray(models.hidden_states(dropped, params, TOKENS)),
                                  clean)
    draws = [np.asarray(models.hidden_states(dropped, params, TOKENS, None, None,
                                             jax.random.key(i))) for i in range(64)]
    assert np.abs(draws[0] - clean).max() > 1e-3 and np.abs(draws[0] - draws[1]).max() > 1e-3
    np.testing.assert_array_equal(draws[0], np.asarray(models.hidden_states(
        dropped, params, TOKENS, None, None, jax.random.key(0))))
    base_only = np.asarray(models.hidden_states(
        dataclasses.replace(cfg, projection="dense", lora=None), base, TOKENS))
    # Averaged over masks the model sits near the undropped adapter, not halfway to the
    # base (what dropping without rescaling would give).
    mean = np.mean(draws, axis=0)
    assert np.abs(mean - clean).mean() < 0.5 * np.abs(mean - base_only).mean()


def test_an_adapter_on_some_layers_only(tmp_path):
    """PEFT's layers_to_transform=[1]: loaded with PEFT's logits, exported back with the
    same, and under scan the other layer's adapter stays exactly zero while training."""
    base = hf_reference.build("llama3")
    base.save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], layers_to_transform=[1],
        task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    cfg, base_params, adapter = _ours(model, tmp_path)
    assert cfg.lora.layers == (1,) and cfg.lora.modules == ("self_attn/q_proj", "mlp/down_proj")
    params = adapters.union(base_params, adapter)
    logits = np.asarray(models.apply(cfg, params, TOKENS))
    assert np.abs(logits - _logits(model)).max() <= RELATIVE
    adapters.save_peft(cfg, adapter, tmp_path / "ours", base_model="")
    reloaded = peft.PeftModel.from_pretrained(hf_reference.build("llama3"), tmp_path / "ours")
    assert np.abs(_logits(reloaded) - logits).max() <= RELATIVE

    optimizer = train.OptimizerConfig("adamw", learning_rate=1e-2, grad_clip_norm=None,
                                      schedule=train.ScheduleConfig("constant"))
    groups = train.ParamGroups(trainable_layers=(1,))
    state, step_config, parts = train.setup(cfg, adapter, optimizer, groups, 10)
    step = train.compile_train_step(step_config, parts)
    for i in range(2):
        state, _ = step(state, _batch(i), base_params)
    b = state.params["layers"]["mlp"]["down_proj"]["lora_b"]
    assert np.abs(np.asarray(b[0])).max() == 0 and np.abs(np.asarray(b[1])).max() > 0


def test_micro_batches_and_remat_give_the_same_adapter_step(tmp_path):
    """Two micro-batches equal one batch, and full remat equals none, for a LoRA step
    (the base passed beside the state)."""
    cfg, base, adapter = _ours(_peft_model("llama3", tmp_path / "base"), tmp_path)
    batch = {k: np.concatenate([v, _batch(1)[k]]) for k, v in _batch(0).items()}
    optimizer = train.OptimizerConfig("adamw", learning_rate=1e-2, grad_clip_norm=None,
                                      schedule=train.ScheduleConfig("constant"))
    results = []
    for changes, micro in (({}, 1), ({}, 2), ({"remat": "full"}, 1)):
        model_cfg = dataclasses.replace(cfg, **changes)
        fresh = jax.tree.map(lambda x: x.copy(), adapter)  # the step donates its state
        state, step_config, parts = train.setup(model_cfg, fresh, optimizer,
                                                train.ParamGroups(), 10, micro_batches=micro)
        state, metrics = train.compile_train_step(step_config, parts)(state, batch, base)
        results.append((float(metrics["loss"]), jax.tree.leaves(state.params)))
    for loss, leaves in results[1:]:
        assert abs(loss - results[0][0]) <= 1e-6
        for a, b in zip(leaves, results[0][1]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


# Qwen3.5's Gated DeltaNet projections besides attention's and the MLP's.
QWEN3_5_LINEAR = ALL + ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")


def test_deltanet_adapters_equal_peft_both_ways(tmp_path):
    """all-linear on Qwen3.5 adapts the DeltaNet layers' five projections as PEFT does:
    PEFT's adapter gives PEFT's logits and gradients here, ours and the merged export give
    ours there."""
    model = _peft_model("qwen3_5", tmp_path / "base", target_modules=QWEN3_5_LINEAR)
    cfg, base, adapter = _ours(model, tmp_path)
    assert set(cfg.lora.modules) == set(targets.resolve(cfg, "all-linear")[0])
    assert "linear_attn/in_proj_qkv" in cfg.lora.modules
    logits = np.asarray(models.apply(cfg, adapters.union(base, adapter), TOKENS))
    assert _relative(logits, _logits(model)) <= RELATIVE
    ours, expected = gradients_against_peft(model, cfg, base, adapter)
    assert any("in_proj_qkv" in name for name in ours)
    for name in ours:
        assert _relative(ours[name], expected[name]) <= RELATIVE, name
    exports_give_our_logits(cfg, base, adapter, "qwen3_5", tmp_path, logits)
