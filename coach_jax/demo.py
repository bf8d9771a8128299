"""The forward-pass demo behind the default command until the trainer exists."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from coach_jax import models
from coach_jax.models.builder import build_model


def forward_demo(config: Any, workdir: str) -> dict[str, float]:
    """Builds the configured model, runs one forward pass, and reports the next-token loss
    on random tokens (a random model scores about log(vocab_size))."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    cfg, params = build_model(config.model, config.seed)
    logging.info("model: %s, %.2fM parameters", cfg.model_type, models.count_params(params) / 1e6)
    rng = np.random.default_rng(config.seed)
    tokens = rng.integers(0, cfg.vocab_size, (config.demo.batch_size, config.demo.seq_len),
                          dtype=np.int32)
    start = time.perf_counter()
    logits = models.apply(cfg, params, tokens)
    logits.block_until_ready()
    seconds = time.perf_counter() - start
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1).mean()
    result = {"next_token_nll": float(nll), "uniform_nll": float(np.log(cfg.vocab_size)),
              "parameters": models.count_params(params), "first_call_seconds": seconds}
    with open(os.path.join(workdir, "demo.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result
