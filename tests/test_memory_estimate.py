"""The memory check's estimate against XLA's own plan of the compiled train step (CPU has
no memory counter: arguments + outputs + temporaries, less what is donated)."""

import sys

import pytest

from coach_jax import parallel
from coach_jax.train.loop import Trainer
from test_trainer import ROOT

sys.path.insert(0, ROOT)
from configs import default  # noqa: E402


@pytest.mark.parametrize("adapter", [
    {}, {"kind": "lora"}, {"kind": "lora", "quantize_base": "nf4", "quantize_block": 32},
    {"kind": "lora", "rank": 4, "targets": "q_proj,v_proj"}])
@pytest.mark.parametrize("remat", ["none", "full"])
def test_the_estimate_is_within_15_percent_of_the_compiled_step(tmp_path, adapter, remat):
    c = default.get_config()
    c.data.eval, c.eval.reference, c.eval.generate_examples = "", "", 0
    c.data.cache_dir = str(tmp_path / "cache")
    c.model.remat = remat
    for key, value in adapter.items():
        c.adapter[key] = value
    trainer = Trainer(c, str(tmp_path / "run"))
    batch = parallel.global_batch(next(iter(trainer.pipeline)), trainer.batch_sharding)
    analysis = trainer.train_step.lower(trainer.state, batch, trainer.base).compile() \
        .memory_analysis()
    measured = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
    assert abs(trainer.memory.total / measured - 1) <= 0.15, (trainer.memory.describe(),
                                                               measured / 2**20)
