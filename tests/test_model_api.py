"""The functional model API takes the keyword names docs/models.md documents."""

import numpy as np

from coach_jax import models

CFG = models.ModelConfig(model_type="llama", vocab_size=64, hidden_size=32,
                         intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=8)


def test_documented_keywords():
    params = models.init(CFG, seed=0)
    tokens = np.random.RandomState(0).randint(0, 64, (2, 12)).astype(np.int32)
    positions = np.asarray([list(range(12)), list(range(5)) + list(range(7))], np.int32)
    segment_ids = np.asarray([[1] * 12, [1] * 5 + [2] * 7], np.int32)
    logits = models.apply(CFG, params, tokens, positions=positions, segment_ids=segment_ids)
    np.testing.assert_array_equal(logits, models.apply(CFG, params, tokens, positions,
                                                       segment_ids))
    hidden = models.hidden_states(CFG, params, tokens=tokens, positions=positions,
                                  segment_ids=segment_ids)
    np.testing.assert_allclose(models.logits_from_hidden(CFG, params, hidden=hidden), logits,
                               atol=1e-6)
    decoded, cache = models.decode(CFG, params, tokens=tokens, positions=positions,
                                   segment_ids=segment_ids,
                                   cache=models.init_cache(CFG, batch=2, length=16))
    assert int(cache.index) == 12
    np.testing.assert_allclose(decoded, hidden, atol=1e-6)
