"""QLoRA: a quantized frozen base (qwix) under LoRA. Dequantization error per block,
NF4 codes against bitsandbytes, the loss against LoRA on the dequantized base, memory."""

import dataclasses
import functools

import bitsandbytes.functional as bnb
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_reference
from coach_jax import adapters, models, train
from coach_jax.adapters import targets
from coach_jax.models import quantize
from coach_jax.models.lora import LoraSpec

# NF4's 16 values (QLoRA paper, appendix E; bitsandbytes' table).
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
# The largest error of one weight, as a share of its block's absmax: half a step of the
# symmetric integer grid (qwix's int4 grid is +-7.5), half NF4's widest gap (-1 -> -0.696).
BOUNDS = {"int8": 0.5 / 127, "int4": 0.5 / 7.5, "nf4": float(np.max(np.diff(NF4))) / 2}
BLOCK = 16


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    hf_reference.build("llama3").save_pretrained(folder)
    return models.load_hf(folder)


def _blocks(kernel, axis):
    """[..., blocks, BLOCK, ...] view of a per-layer kernel along its block axis."""
    shape = kernel.shape
    return kernel.reshape(*shape[:axis], shape[axis] // BLOCK, BLOCK, *shape[axis + 1:])


@pytest.mark.parametrize("qtype", ["int8", "int4", "nf4"])
def test_dequantized_kernels_are_within_the_stated_error(llama, qtype):
    cfg, base = llama
    quantized = quantize.quantize_base(base, qtype, BLOCK)
    assert not quantize.is_quantized(quantized["embed_tokens"])  # embeddings stay
    for module in targets.PROJECTIONS:
        path = f"layers/{module}/kernel"
        kernel = np.asarray(base["layers"][module.split("/")[0]][module.split("/")[1]]["kernel"])
        q = quantized["layers"][module.split("/")[0]][module.split("/")[1]]["kernel"]
        assert quantize.is_quantized(q)
        axis = models.decoder.kernel_input_dims(path) - 1
        for layer in range(cfg.num_layers):
            one = jax.tree.map(lambda x: x[layer], q)
            error = np.abs(np.asarray(quantize.dequantize(one, jnp.float32)) - kernel[layer])
            absmax = np.abs(_blocks(kernel[layer], axis)).max(axis=axis + 1, keepdims=True)
            limit = np.broadcast_to(absmax, _blocks(error, axis).shape).reshape(error.shape)
            assert (error <= BOUNDS[qtype] * limit + 1e-7).all(), (module, layer)
            assert error.max() > 0


def test_nf4_codes_equal_bitsandbytes():
    """bitsandbytes' NF4 of a [out, in] weight in blocks of 64 along `in` (its flattened
    order) against ours of the same weight as a kernel [in, out] in blocks along in."""
    weight = np.random.RandomState(0).randn(48, 128).astype(np.float32)
    packed, state = bnb.quantize_4bit(torch.from_numpy(weight), blocksize=64,
                                      quant_type="nf4")
    packed = packed.numpy().reshape(-1)
    codes = np.stack([packed >> 4, packed & 15], axis=-1).reshape(48, 128)
    ours = quantize.quantize_kernel(jnp.asarray(weight.T), "layers_0/mlp/up_proj/kernel",
                                    "nf4", 64)
    np.testing.assert_array_equal(np.asarray(ours.qvalue).astype(np.uint8).T, codes)
    np.testing.assert_allclose(np.asarray(ours.scale).T.reshape(-1),
                               state.absmax.numpy(), rtol=1e-6)
    np.testing.assert_allclose(state.code.numpy(), NF4, atol=1e-7)  # the published values
    np.testing.assert_allclose(
        np.asarray(quantize.dequantize(ours, jnp.float32)).T,
        bnb.dequantize_4bit(torch.from_numpy(packed.reshape(-1, 1)), state).numpy(),
        atol=1e-6)


def _dequantized(base):
    """Every quantized kernel (stacked per layer) as plain float32 weights."""
    return jax.tree.map(
        lambda x: jax.vmap(lambda q: quantize.dequantize(q, jnp.float32))(x)
        if quantize.is_quantized(x) else x, base, is_leaf=quantize.is_quantized)


def _lora_loss(lora_cfg, adapter_params, base_params):
    """The masked loss of one fixed batch with `adapter_params` on `base_params`."""
    batch = {"inputs": np.tile(np.arange(3, 27, dtype=np.int32), (2, 1)),
             "targets": np.tile(np.arange(4, 28, dtype=np.int32), (2, 1)),
             "loss_mask": np.ones((2, 24), np.int32), "segment_ids": np.ones((2, 24), np.int32),
             "positions": np.tile(np.arange(24, dtype=np.int32), (2, 1)),
             "source_ids": np.zeros((2, 24), np.int32)}
    sums = train.loss.batch_sums(lora_cfg, adapters.union(base_params, adapter_params),
                                 batch, train.LossConfig())
    return sums["numerator"] / sums["denominator"]


@pytest.mark.parametrize("qtype", ["int8", "nf4"])
def test_a_qlora_step_is_lora_on_the_dequantized_base(llama, qtype):
    """The same adapter and batch: the loss and adapter gradients of the quantized base
    equal LoRA's on dequant(quant(W)) as plain float weights."""
    cfg, base = llama
    lora_cfg = dataclasses.replace(cfg, projection="lora", lora=LoraSpec(
        4, 8.0, targets.resolve(cfg, "all-linear")[0]))
    adapter = jax.tree.map(lambda x: x + 0.05, adapters.split(models.init(lora_cfg, 0))[1])
    quantized = quantize.quantize_base(base, qtype, BLOCK)
    loss = functools.partial(_lora_loss, lora_cfg)
    q_loss, q_grads = jax.value_and_grad(loss)(adapter, quantized)
    d_loss, d_grads = jax.value_and_grad(loss)(adapter, _dequantized(quantized))
    f_loss = loss(adapter, base)
    assert abs(float(q_loss) - float(d_loss)) <= 1e-5
    assert abs(float(q_loss) - float(f_loss)) > 1e-5  # quantization did change the model
    for a, b in zip(jax.tree.leaves(q_grads), jax.tree.leaves(d_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_a_mixtures_experts_are_held_quantized_and_train_lora_on_their_dequantized_values(
        tmp_path):
    """Mixtral under QLoRA: the stacked experts are NF4 codes per block of their input
    axis (within the stated error), the router is not, and the loss and adapter gradients
    equal LoRA's on the dequantized experts."""
    hf_reference.build("mixtral").save_pretrained(tmp_path)
    cfg, base = models.load_hf(tmp_path)
    quantized = quantize.quantize_base(base, "nf4", BLOCK)
    mlp, q_mlp = base["layers"]["mlp"], quantized["layers"]["mlp"]
    assert not quantize.is_quantized(q_mlp["gate"]["kernel"])
    for name in ("gate_proj", "up_proj", "down_proj"):
        codes = q_mlp["experts"][name]
        assert quantize.is_quantized(codes)
        experts = np.asarray(mlp["experts"][name])  # [layers, experts, in, out]
        for layer in range(cfg.num_layers):
            one = jax.tree.map(lambda x: x[layer], codes)
            error = np.abs(np.asarray(quantize.dequantize(one, jnp.float32)) - experts[layer])
            absmax = np.abs(_blocks(experts[layer], 1)).max(axis=2, keepdims=True)
            limit = np.broadcast_to(absmax, _blocks(error, 1).shape).reshape(error.shape)
            assert (error <= BOUNDS["nf4"] * limit + 1e-7).all() and error.max() > 0, name
    lora_cfg = dataclasses.replace(cfg, projection="lora", lora=LoraSpec(
        4, 8.0, targets.resolve(cfg, "all-linear")[0]))
    adapter = jax.tree.map(lambda x: x + 0.05, adapters.split(models.init(lora_cfg, 0))[1])
    loss = functools.partial(_lora_loss, lora_cfg)
    q_loss, q_grads = jax.value_and_grad(loss)(adapter, quantized)
    d_loss, d_grads = jax.value_and_grad(loss)(adapter, _dequantized(quantized))
    assert abs(float(q_loss) - float(d_loss)) <= 1e-5
    assert abs(float(q_loss) - float(loss(adapter, base))) > 1e-5
    for a, b in zip(jax.tree.leaves(q_grads), jax.tree.leaves(d_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_a_4_bit_base_is_under_0_3_of_bf16():
    """The quantized projections (codes at 4 bits, one bf16 scale per block of 64) against
    the same kernels in bf16, at a Llama-shaped layer; the whole model also counts its
    embeddings and LM head, which stay in bf16."""
    cfg = models.ModelConfig(model_type="llama", vocab_size=512, hidden_size=256,
                             intermediate_size=768, num_layers=2, num_heads=4, num_kv_heads=2,
                             head_dim=64, param_dtype="bfloat16")
    base = models.init(cfg, 0)
    layers = {"layers": base["layers"]}
    for qtype in ("int4", "nf4"):
        quantized = quantize.quantize_base(layers, qtype, 64)
        kernels = jax.tree.leaves(quantized, is_leaf=quantize.is_quantized)
        packed = quantize.packed_bytes([k for k in kernels if quantize.is_quantized(k)])
        bf16 = sum(k.qvalue.size * 2 for k in kernels if quantize.is_quantized(k))
        assert packed / bf16 <= 0.3, (qtype, packed / bf16)


LLAMA_3_1_8B = {  # Llama-3.1-8B's config.json, less what does not change the shapes
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}


def test_the_8b_qlora_recipe_fits_a_16_gb_gpu_by_the_memory_check(tmp_path):
    """--mode=memory on configs/llama3_1_8b_qlora.py with Llama-3.1-8B's config.json (no
    weights): NF4, rank 16, 2048 tokens, one row per micro-batch, full remat, against a
    16 GB device; the figure counts 4-bit codes at a byte each, as CPU jax stores them."""
    import json
    import os
    import subprocess
    import sys
    from test_trainer import LAB, ROOT
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_1_8B))
    result = subprocess.run(
        [sys.executable, "-m", "coach_jax.main", "--mode=memory", "--config",
         f"configs/llama3_1_8b_qlora.py:{tmp_path}",
         f"--config.tokenizer.path={os.path.join(LAB, 'tokenizer')}",
         f"--config.data.train={os.path.join(LAB, 'train.jsonl')}",
         "--config.memory.device_bytes=17179869184"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "XLA_FLAGS": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("memory estimate:"))
    total = float(line.split()[2])
    assert line.split()[3] == "GiB" and 8 < total <= 14, line
    assert "fits:" in result.stdout
    # The same model without quantization or an adapter does not fit, and the check says
    # what would.
    full = subprocess.run(
        [sys.executable, "-m", "coach_jax.main", "--mode=memory", "--config",
         f"configs/llama3_1_8b_qlora.py:{tmp_path}",
         f"--config.tokenizer.path={os.path.join(LAB, 'tokenizer')}",
         f"--config.data.train={os.path.join(LAB, 'train.jsonl')}",
         "--config.memory.device_bytes=17179869184", "--config.adapter.kind=none",
         "--config.adapter.quantize_base=none"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "XLA_FLAGS": ""})
    assert full.returncode == 1 and "adapter.kind=lora" in full.stdout, full.stdout[-2000:]
