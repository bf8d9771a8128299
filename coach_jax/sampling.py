"""Batched autoregressive generation with a KV cache: `coach_jax.generate`.

Prompts of different lengths are left-padded into one batch. Padding carries segment id 0
and every real token its true position, so the attention mask (the same one training uses)
hides the padding and each row decodes exactly as it would alone. One jitted function runs
the prefill and a `while_loop` of decode steps that ends when every row has emitted a
stop token (the chat template's end-of-turn or EOS) or `max_new_tokens` is reached.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax.experimental import multihost_utils

from coach_jax import models, parallel
from coach_jax.data.chat_encoding import encode_prompt, stop_token_ids
from coach_jax.data.conversation import Conversation
from coach_jax.models.config import ModelConfig
from coach_jax.models.decoder import Params

PROMPT_BUCKET = 32  # prompt lengths are padded to a multiple: fewer recompilations


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")


@dataclasses.dataclass(frozen=True)
class Completion:
    token_ids: list[int]  # without the stop token
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens)


def filter_logits(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """float32 logits with everything outside the top-k and the top-p nucleus at -inf.
    The most likely token always survives."""
    logits = logits_BxV.astype(jnp.float32)
    if top_k:
        kth_B1 = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth_B1, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_BxV = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_BxV, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        kept = jnp.where(before < top_p, sorted_BxV, jnp.inf)
        threshold_B1 = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold_B1, -jnp.inf, logits)
    return logits


def next_tokens(logits_BxV: jax.Array, rng: jax.Array, config: SamplingConfig) -> jax.Array:
    if config.temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits_BxV.astype(jnp.float32) / config.temperature, config.top_k,
                           config.top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "config"))
def _generate(params: Params, tokens_BxP: jax.Array, lengths_B: jax.Array,
              stop_ids: jax.Array, rng: jax.Array, *, cfg: ModelConfig,
              config: SamplingConfig) -> jax.Array:
    """Left-padded prompts -> new tokens [B, N]. What follows a row's first stop token is
    meaningless (the loop ends when every row has stopped)."""
    batch, prompt_len = tokens_BxP.shape
    steps = config.max_new_tokens
    pad_B = prompt_len - lengths_B
    slot = jnp.arange(prompt_len)[None, :]
    segment_ids_BxP = (slot >= pad_B[:, None]).astype(jnp.int32)
    positions_BxP = jnp.maximum(slot - pad_B[:, None], 0).astype(jnp.int32)

    def forward(tokens_BxT, positions_BxT, segment_ids_BxT, cache):
        hidden, cache = models.decode(cfg, params, tokens_BxT, positions_BxT, segment_ids_BxT,
                                      cache)
        return models.logits_from_hidden(cfg, params, hidden[:, -1:])[:, 0], cache

    def recompute(step, out_BxN):
        """Logits of the newest token from every row run again from its first token, into
        a new cache: a row that just grew past LongRoPE's switch needs its earlier keys
        rotated the long way (transformers' Phi-3 generate also starts over there).
        Generated slots not yet written are padding until the loop reaches them."""
        slot_N = jnp.arange(steps, dtype=jnp.int32)
        tokens = jnp.concatenate([tokens_BxP, out_BxN], axis=1)
        positions = jnp.concatenate([positions_BxP, lengths_B[:, None] + slot_N], axis=1)
        written = jnp.broadcast_to(slot_N < step, (batch, steps)).astype(jnp.int32)
        segments = jnp.concatenate([segment_ids_BxP, written], axis=1)
        hidden, cache = models.decode(cfg, params, tokens, positions, segments,
                                      models.init_cache(cfg, batch, prompt_len + steps))
        newest = jax.lax.dynamic_slice_in_dim(hidden, prompt_len + step - 1, 1, axis=1)
        return (models.logits_from_hidden(cfg, params, newest)[:, 0],
                cache.replace(index=prompt_len + step))

    cache = models.init_cache(cfg, batch, prompt_len + steps)
    logits_BxV, cache = forward(tokens_BxP, positions_BxP, segment_ids_BxP, cache)
    first = next_tokens(logits_BxV, jax.random.fold_in(rng, 0), config)
    out_BxN = jnp.zeros((batch, steps), jnp.int32).at[:, 0].set(first)
    done_B = jnp.isin(first, stop_ids)

    def keep_going(carry):
        step, _, _, _, done_B = carry
        return (step < steps) & ~jnp.all(done_B)

    def one_step(carry):
        step, previous_B, cache, out_BxN, done_B = carry
        positions = (lengths_B + step - 1)[:, None]
        one_token = lambda: forward(previous_B[:, None], positions, jnp.ones_like(positions),
                                    cache)
        if cfg.rope_switch_length is None:
            logits_BxV, cache = one_token()
        else:
            crossing = jnp.any(positions == cfg.rope_switch_length)
            logits_BxV, cache = jax.lax.cond(crossing, lambda: recompute(step, out_BxN),
                                             one_token)
        token_B = next_tokens(logits_BxV, jax.random.fold_in(rng, step), config)
        token_B = jnp.where(done_B, previous_B, token_B)  # a finished row repeats its stop
        out_BxN = jax.lax.dynamic_update_slice(out_BxN, token_B[:, None], (0, step))
        return step + 1, token_B, cache, out_BxN, done_B | jnp.isin(token_B, stop_ids)

    return jax.lax.while_loop(
        keep_going, one_step, (jnp.int32(1), first, cache, out_BxN, done_B))[3]


def generate_tokens(cfg: ModelConfig, params: Params, prompts: Sequence[Sequence[int]],
                    stop_ids: Sequence[int] = (), config: SamplingConfig = SamplingConfig(),
                    batch_size: int = 32, mesh: jax.sharding.Mesh | None = None
                    ) -> list[Completion]:
    """Completions of token-id prompts, `batch_size` prompts per compiled batch.

    `params` may be sharded (FSDP, tensor parallel) as in training; with the run's `mesh`
    the prompt rows are also split over its data axes, as training batches are (a batch is
    padded with copies of its last prompt to a multiple of the data shards)."""
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt: every prompt needs at least one token")
    stop = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    rng = jax.random.key(config.seed)
    completions: list[Completion] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        real_rows = len(chunk)
        shards = parallel.data_shards(mesh)
        chunk += [chunk[-1]] * (-len(chunk) % shards)
        longest = max(len(p) for p in chunk)
        width = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
        tokens = np.zeros((len(chunk), width), np.int32)
        for row, prompt in enumerate(chunk):
            tokens[row, width - len(prompt):] = prompt
        lengths = np.asarray([len(p) for p in chunk], np.int32)
        if mesh is not None:
            rows = parallel.batch_sharding(mesh)
            tokens = jax.device_put(tokens, rows)
            lengths = jax.device_put(lengths, rows)
        out = _generate(params, tokens, lengths, stop, jax.random.fold_in(rng, start), cfg=cfg,
                        config=config)
        if jax.process_count() > 1:  # every process holds the same prompts and wants all rows
            out = multihost_utils.process_allgather(out, tiled=True)
        for row in np.asarray(out)[:real_rows]:
            stops = np.flatnonzero(np.isin(row, list(stop_ids)))
            if stops.size:
                completions.append(Completion(row[:stops[0]].tolist(), "stop"))
            else:
                completions.append(Completion(row.tolist(), "length"))
    return completions


def completion_text(tokenizer: Any, completion: Completion) -> str:
    """The generated text, special tokens kept as written (the stop token is not in it)."""
    return tokenizer.decode(completion.token_ids, skip_special_tokens=False)


def prompt_ids(tokenizer: Any, conversation: Any, end_of_turn: str = "") -> np.ndarray:
    """A chat (list of {role, content} messages or a Conversation) through the chat
    template with its generation prompt; a plain string as raw text (base models).
    `end_of_turn` is the run's `data.end_of_turn`."""
    if isinstance(conversation, str):
        return np.asarray(tokenizer(conversation, add_special_tokens=True)["input_ids"],
                          np.int32)
    if isinstance(conversation, Conversation):
        return encode_prompt(tokenizer, conversation.template_messages(), conversation.tools,
                             end_of_turn)
    return encode_prompt(tokenizer, list(conversation), end_of_turn=end_of_turn)


def generate(cfg: ModelConfig, params: Params, tokenizer: Any, conversations: Sequence[Any],
             batch_size: int = 32, end_of_turn: str = "", **sampling: Any) -> list[str]:
    """The model's next assistant turn for each conversation, as text.

    `sampling`: max_new_tokens, temperature (0 = greedy), top_k, top_p, seed. Generation
    stops at the chat template's end-of-turn token (or `end_of_turn`, the run's
    `data.end_of_turn`) or EOS, which are not part of the text.
    """
    config = SamplingConfig(**sampling)
    completions = generate_tokens(
        cfg, params, [prompt_ids(tokenizer, c, end_of_turn) for c in conversations],
        stop_token_ids(tokenizer, end_of_turn), config, batch_size)
    return [completion_text(tokenizer, c) for c in completions]
