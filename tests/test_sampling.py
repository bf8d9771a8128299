"""Generation: greedy decoding against transformers' `generate`, the KV cache against
full recomputation, stopping, and the sampling filters against hand computations."""

import os

import jax
import numpy as np
import pytest
import torch

import hf_reference
import coach_jax
from coach_jax import data, models, parallel, sampling
from coach_jax.data.chat_encoding import stop_token_ids
from coach_jax.models.config import ModelConfig

LAB_TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "assets", "lab", "tokenizer")
NEW_TOKENS = 40
# Lengths on both sides of the 32-token prompt bucket: the batch is padded to 64.
PROMPT_LENGTHS = (5, 11, 23, 40)


def _prompts(vocab: int, seed: int = 3) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [rng.randint(0, vocab, n).tolist() for n in PROMPT_LENGTHS]


def _separated(family: str, tmp_path, **config_changes) -> tuple:
    """An HF model whose final norm is scaled so the top two logits are far apart (greedy
    has no near ties), and the same weights loaded by coach_jax."""
    model = hf_reference.build(family, **config_changes)
    with torch.no_grad():
        model.model.norm.weight.mul_(10.0)
    model.generation_config.eos_token_id = None
    model.save_pretrained(tmp_path)
    cfg, params = models.load_hf(tmp_path)
    return model, cfg, params


def _hf_inputs(prompt: list[int]) -> dict:
    """An explicit attention mask: HF would otherwise guess padding from token ids."""
    return {"input_ids": torch.tensor([prompt]),
            "attention_mask": torch.ones(1, len(prompt), dtype=torch.long)}


def _hf_greedy(model, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """transformers' greedy continuation of one unpadded prompt, and the smallest gap
    between its top two logits over the steps."""
    with torch.no_grad():
        out = model.generate(**_hf_inputs(prompt), max_new_tokens=new_tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    top2 = [torch.topk(s[0], 2).values for s in out.scores]
    return out.sequences[0, len(prompt):].tolist(), min(float(a - b) for a, b in top2)


@pytest.mark.parametrize("family, changes", [
    ("llama3", {}), ("qwen2", {}), ("smollm3_window", {}), ("olmo2", {}), ("olmo3", {}),
    ("phi3", {}),
    ("gemma2", {"final_logit_softcapping": 30.0}),  # the parity fixture's cap 4 makes ties
    ("gemma3_text", {}),
    ("phi4_mini", {}),  # LongRoPE: three prompts grow past its switch at 32, one starts past
    ("mixtral", {}), ("qwen3_moe", {}), ("olmoe", {}), ("gpt_oss", {}),
    ("qwen3_5", {}), ("qwen3_5_moe", {}),  # prompts cross the DeltaNet chunk (64)
    ("gemma4_text", {"final_logit_softcapping": 30.0}),  # KV sharing, PLE, two geometries
    ("qwen2_moe", {"num_experts_per_tok": 3}),  # the parity fixture's top 2 makes a near tie
])
def test_greedy_equals_transformers_generate(family, changes, tmp_path):
    model, cfg, params = _separated(family, tmp_path, **changes)
    prompts = _prompts(cfg.vocab_size)
    ours = sampling.generate_tokens(cfg, params, prompts,
                                    config=sampling.SamplingConfig(max_new_tokens=NEW_TOKENS))
    for prompt, completion in zip(prompts, ours):
        expected, gap = _hf_greedy(model, prompt, NEW_TOKENS)
        assert gap > 1e-3, "fixture: near tie between the top two logits"
        assert completion.finish_reason == "length"
        assert completion.token_ids == expected, f"prompt of {len(prompt)} tokens"


def test_stop_token_ends_each_row_where_transformers_stops(tmp_path):
    model, cfg, params = _separated("llama3", tmp_path)
    prompts = _prompts(cfg.vocab_size)
    free = sampling.generate_tokens(cfg, params, prompts,
                                    config=sampling.SamplingConfig(max_new_tokens=NEW_TOKENS))
    # A token the first prompt's continuation emits for the first time at step 6.
    stop = free[0].token_ids[6]
    assert stop not in free[0].token_ids[:6]
    ours = sampling.generate_tokens(cfg, params, prompts, stop_ids=[stop],
                                    config=sampling.SamplingConfig(max_new_tokens=NEW_TOKENS))
    assert ours[0] == sampling.Completion(free[0].token_ids[:6], "stop")
    for prompt, completion in zip(prompts, ours):
        with torch.no_grad():
            hf = model.generate(**_hf_inputs(prompt), max_new_tokens=NEW_TOKENS,
                                do_sample=False, eos_token_id=stop)[0, len(prompt):].tolist()
        if hf[-1] == stop:
            assert completion == sampling.Completion(hf[:-1], "stop")
        else:
            assert completion == sampling.Completion(hf, "length")


def _recompute_greedy(cfg, params, prompt, new_tokens):
    """The reference without a cache: the whole sequence through the model at every step
    (right-padded to one width, so it compiles once; the padding is segment 0)."""
    sequence = list(prompt)
    width = len(prompt) + new_tokens
    positions = np.arange(width, dtype=np.int32)[None]
    for _ in range(new_tokens):
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(sequence)] = sequence
        segments = (positions < len(sequence)).astype(np.int32)
        logits = models.apply(cfg, params, tokens, positions, segments)
        sequence.append(int(np.argmax(np.asarray(logits)[0, len(sequence) - 1])))
    return sequence[len(prompt):]


@pytest.mark.parametrize("scan_layers", [True, False])
def test_kv_cache_decoding_equals_full_recompute(scan_layers):
    """Mistral-style sliding window of 8: the window moves through the cache."""
    cfg = ModelConfig.from_hf_dict(dict(
        model_type="mistral", vocab_size=96, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
        max_position_embeddings=256), scan_layers=scan_layers)
    params = jax.tree.map(lambda x: 4 * x, models.init(cfg, 1))
    prompts = [p[:n] for p, n in zip(_prompts(96, seed=5), (3, 9, 17, 33))]
    ours = sampling.generate_tokens(cfg, params, prompts,
                                    config=sampling.SamplingConfig(max_new_tokens=20))
    for prompt, completion in zip(prompts, ours):
        assert completion.token_ids == _recompute_greedy(cfg, params, prompt, 20)


def test_longrope_generation_recomputes_the_cache_at_the_switch(monkeypatch):
    """Rows cross LongRoPE's switch (16 tokens) at different steps; each decodes as the
    whole sequence through the model would. Keeping the cached short-factor keys instead
    (no recompute at the switch) gives other tokens."""
    cfg = ModelConfig.from_hf_dict(dict(
        model_type="phi3", vocab_size=96, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, original_max_position_embeddings=16,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 8,
                      "long_factor": [2.0 ** i for i in range(8)]}))
    params = jax.tree.map(lambda x: 4 * x, models.init(cfg, 1))
    prompts = [p[:n] for p, n in zip(_prompts(96, seed=5), (3, 9, 17, 33))]
    expected = [_recompute_greedy(cfg, params, prompt, 20) for prompt in prompts]
    config = sampling.SamplingConfig(max_new_tokens=20)
    ours = sampling.generate_tokens(cfg, params, prompts, config=config)
    assert [c.token_ids for c in ours] == expected
    monkeypatch.setattr(ModelConfig, "rope_switch_length", property(lambda self: None))
    sampling._generate.clear_cache()
    stale = sampling.generate_tokens(cfg, params, prompts, config=config)
    crossing = [c.token_ids == e for c, e in zip(stale, expected)][:2]
    assert crossing == [False, False]


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_sharded_generation_equals_one_device(lab_model, mesh_shape):
    """Parameters sharded as in training (FSDP / tensor parallel) and prompt rows split over
    the data axes (3 prompts padded to the data shards)."""
    _, cfg, params = lab_model
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], list(range(20, 60))]
    config = sampling.SamplingConfig(max_new_tokens=10)
    expected = sampling.generate_tokens(cfg, params, prompts, config=config)
    mesh = parallel.make_mesh(mesh_shape)
    sharded = parallel.place(params, parallel.tree_shardings(params, cfg, mesh))
    spec = sharded["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec
    assert any(axis is not None for axis in spec) == (mesh_shape != (8, 1, 1))
    assert sampling.generate_tokens(cfg, sharded, prompts, config=config, mesh=mesh) == expected


def test_cached_logits_equal_one_forward_pass():
    cfg = ModelConfig.from_hf_dict(dict(
        model_type="qwen3", vocab_size=96, hidden_size=64, intermediate_size=96, head_dim=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256))
    params = models.init(cfg, 2)
    tokens = np.random.RandomState(0).randint(0, 96, (2, 20)).astype(np.int32)
    positions = np.broadcast_to(np.arange(20, dtype=np.int32), (2, 20))
    segments = np.ones((2, 20), np.int32)
    cache = models.init_cache(cfg, 2, 24)
    hidden, cache = models.decode(cfg, params, tokens[:, :12], positions[:, :12],
                                  segments[:, :12], cache)
    pieces = [models.logits_from_hidden(cfg, params, hidden)]
    for t in range(12, 20):
        hidden, cache = models.decode(cfg, params, tokens[:, t:t + 1], positions[:, t:t + 1],
                                      segments[:, t:t + 1], cache)
        pieces.append(models.logits_from_hidden(cfg, params, hidden))
    assert int(cache.index) == 20
    np.testing.assert_allclose(np.concatenate([np.asarray(p) for p in pieces], axis=1),
                               np.asarray(models.apply(cfg, params, tokens)), atol=2e-5)


@pytest.fixture(scope="module")
def lab_model():
    """A tiny untied model with the lab's ChatML tokenizer."""
    tokenizer = data.load_tokenizer(LAB_TOKENIZER)
    cfg = ModelConfig.from_hf_dict(dict(
        model_type="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=False, max_position_embeddings=512))
    params = jax.tree.map(lambda x: 4 * x, models.init(cfg, 0))
    return tokenizer, cfg, params


def test_generate_stops_on_the_end_of_turn_token(lab_model):
    """The LM head's columns of the 4th new token and <|im_end|> are swapped: the model
    now says <|im_end|> where it said that token, and generation ends there."""
    tokenizer, cfg, params = lab_model
    chat = [[{"role": "user", "content": "Give me a brief on Kalolo Labs."}]]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tokenizer)[0] == end_of_turn
    prompt = sampling.prompt_ids(tokenizer, chat[0])
    free = sampling.generate_tokens(cfg, params, [prompt],
                                    config=sampling.SamplingConfig(max_new_tokens=12))[0]
    step = next(i for i in range(3, 12) if free.token_ids[i] not in free.token_ids[:i])
    assert end_of_turn not in free.token_ids[:step + 1]
    head = np.asarray(params["lm_head"]).copy()
    head[:, [free.token_ids[step], end_of_turn]] = head[:, [end_of_turn, free.token_ids[step]]]
    swapped = {**params, "lm_head": head}
    text = coach_jax.generate(cfg, swapped, tokenizer, chat, max_new_tokens=12)
    assert text == [tokenizer.decode(free.token_ids[:step])]
    completion = sampling.generate_tokens(cfg, swapped, [prompt], stop_token_ids(tokenizer),
                                          sampling.SamplingConfig(max_new_tokens=12))[0]
    assert completion == sampling.Completion(free.token_ids[:step], "stop")


def test_chat_prompt_is_the_template_with_its_generation_prompt(lab_model):
    tokenizer, _, _ = lab_model
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = sampling.prompt_ids(tokenizer, chat)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_filters_keep_what_a_hand_computation_keeps():
    logits = np.log(np.asarray([[0.5, 0.05, 0.3, 0.15]], np.float32))
    kept = lambda k, p: np.isfinite(np.asarray(sampling.filter_logits(logits, k, p)))[0]
    assert kept(2, 1.0).tolist() == [True, False, True, False]
    assert kept(0, 0.5).tolist() == [True, False, False, False]  # 0.5 already reaches 0.5
    assert kept(0, 0.8).tolist() == [True, False, True, False]  # 0.5 + 0.3 >= 0.8
    assert kept(0, 0.81).tolist() == [True, False, True, True]
    assert kept(0, 1e-6).tolist() == [True, False, False, False]  # the top one survives


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = np.log(np.asarray([[0.5, 0.05, 0.3, 0.15]], np.float32))
    config = sampling.SamplingConfig(temperature=1.0, top_p=0.81)
    draws = jax.vmap(lambda key: sampling.next_tokens(logits, key, config))(
        jax.random.split(jax.random.key(0), 20000))
    frequencies = np.bincount(np.asarray(draws).ravel(), minlength=4) / 20000
    np.testing.assert_allclose(frequencies, [0.5 / 0.95, 0, 0.3 / 0.95, 0.15 / 0.95], atol=0.015)


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(lab_model):
    _, cfg, params = lab_model
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    run = lambda **kw: [c.token_ids for c in sampling.generate_tokens(
        cfg, params, prompts, config=sampling.SamplingConfig(max_new_tokens=8, **kw))]
    greedy = run()
    assert run(temperature=0.7, top_k=1, seed=3) == greedy
    assert run(temperature=1.5, seed=3) == run(temperature=1.5, seed=3)
    assert run(temperature=1.5, seed=3) != run(temperature=1.5, seed=4)


def test_bad_settings_are_refused():
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2)):
        with pytest.raises(ValueError):
            sampling.SamplingConfig(**bad)
