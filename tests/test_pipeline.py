"""The Grain pipeline: packing, shift, host shards, mixtures, cache, resume."""

import collections
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import tokenizer_fixtures
from coach_jax import data, models
from coach_jax.data.pipeline import (Pipeline, PipelineConfig, PipelineError, SourceConfig,
                                     packing_efficiency)
from coach_jax.models.attention import attention_mask

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, realworld):
    tokenizer = tokenizer_fixtures.bpe_tokenizer(
        os.path.join(realworld, "templates", "qwen2.5.jinja"))
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return data.load_tokenizer(tokenizer_dir)


def write_chats(path, n, prefix="q", seed=0):
    """n distinct conversations of varied length."""
    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over lazy dog cat sat on computer mouse".split()
    with open(path, "w") as f:
        for i in range(n):
            answer = " ".join(rng.choice(words, rng.integers(2, 40)))
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"{prefix} {i}: " + " ".join(rng.choice(words, 3))},
                {"role": "assistant", "content": answer}]}) + "\n")
    return str(path)


def config(tmp_path, sources, **overrides):
    defaults = dict(max_seq_len=256, batch_size=4, cache_dir=str(tmp_path / "cache"),
                    num_packing_bins=8)
    return PipelineConfig(sources=tuple(sources), **{**defaults, **overrides})


def segments(batches):
    """Every packed example as (source id, inputs tuple, targets tuple, loss mask tuple)."""
    out = []
    for batch in batches:
        for b in range(batch["inputs"].shape[0]):
            seg = batch["segment_ids"][b]
            for s in np.unique(seg[seg > 0]):
                where = seg == s
                out.append((int(batch["source_ids"][b][where][0]),
                            tuple(batch["inputs"][b][where]), tuple(batch["targets"][b][where]),
                            tuple(batch["loss_mask"][b][where])))
    return out


def test_packed_rows_are_exact_shifted_examples(tmp_path, tokenizer):
    path = write_chats(tmp_path / "a.jsonl", 60)
    pipeline = Pipeline(config(tmp_path, [SourceConfig("a", path)]), tokenizer)
    batches = list(pipeline)
    for batch in batches:
        assert set(batch) == {"inputs", "targets", "loss_mask", "segment_ids", "positions",
                              "source_ids"}
        assert all(v.shape == (4, 256) and v.dtype == np.int32 for v in batch.values())
        padding = batch["segment_ids"] == 0
        assert not batch["loss_mask"][padding].any()
        for b in range(4):
            seg, pos = batch["segment_ids"][b], batch["positions"][b]
            for s in np.unique(seg[seg > 0]):
                idx = np.flatnonzero(seg == s)
                assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))  # contiguous
                np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # restart at 0
        # Attention built from segment ids never crosses examples.
        mask = np.asarray(attention_mask(batch["positions"], batch["positions"],
                                         batch["segment_ids"], batch["segment_ids"], None))[:, 0]
        same = batch["segment_ids"][:, :, None] == batch["segment_ids"][:, None, :]
        assert not (mask & ~same).any()
    # Each packed example is exactly one encoded example, shifted by one, whole.
    encoded = {}
    for e in data.encode_all(data.iter_examples(path), tokenizer,
                             data.EncodeOptions(max_seq_len=256)):
        encoded[tuple(e.input_ids[:-1])] = e
    found = segments(batches)
    assert len(found) == len(encoded) == 60
    for _, inputs, targets, loss in found:
        e = encoded[inputs]
        assert targets == tuple(e.input_ids[1:])
        assert loss == tuple(e.loss_mask[1:])


def test_packed_loss_equals_examples_one_by_one(tmp_path, tokenizer):
    path = write_chats(tmp_path / "a.jsonl", 12)
    batch = next(iter(Pipeline(config(tmp_path, [SourceConfig("a", path)]), tokenizer)))
    assert (batch["segment_ids"].max(axis=1) >= 2).any(), "nothing was packed"
    cfg = models.ModelConfig(model_type="llama", vocab_size=512, hidden_size=32,
                             intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                             head_dim=8)
    params = models.init(cfg, seed=0)

    def token_nll(inputs, targets, positions=None, segment_ids=None):
        logits = models.apply(cfg, params, inputs, positions, segment_ids)
        logp = jax.nn.log_softmax(logits.astype(np.float32))
        return -np.take_along_axis(np.asarray(logp), targets[..., None], -1)[..., 0]

    packed = token_nll(batch["inputs"], batch["targets"], batch["positions"],
                       batch["segment_ids"])
    packed_sum = float((packed * batch["loss_mask"]).sum())
    alone_sum = 0.0
    for _, inputs, targets, loss in segments([batch]):
        nll = token_nll(np.asarray([inputs]), np.asarray([targets]))
        alone_sum += float((nll[0] * np.asarray(loss)).sum())
    assert packed_sum == pytest.approx(alone_sum, rel=1e-5)


def test_epochs_cover_every_example_reshuffled(tmp_path, tokenizer):
    path = write_chats(tmp_path / "a.jsonl", 40)
    batches = list(Pipeline(config(tmp_path, [SourceConfig("a", path)], epochs=2,
                                   packing="none"), tokenizer))
    order = [s[1] for s in segments(batches)]
    assert len(order) == 80
    first, second = order[:40], order[40:]
    assert sorted(first) == sorted(second) and len(set(first)) == 40
    assert first != second  # reshuffled every epoch


def test_two_processes_get_disjoint_shares_covering_the_epoch(tmp_path, tokenizer):
    path = write_chats(tmp_path / "a.jsonl", 50)
    shares = [collections.Counter(s[1] for s in segments(Pipeline(config(
        tmp_path, [SourceConfig("a", path)], process_index=i, process_count=2), tokenizer)))
        for i in range(2)]
    assert not set(shares[0]) & set(shares[1])
    assert sum(shares[0].values()) == sum(shares[1].values()) == 25
    assert len(set(shares[0]) | set(shares[1])) == 50


def test_mixture_weights_and_source_ids(tmp_path, tokenizer):
    task = write_chats(tmp_path / "task.jsonl", 300, prefix="task")
    replay = write_chats(tmp_path / "replay.jsonl", 200, prefix="replay", seed=1)
    cfg = config(tmp_path, [SourceConfig("task", task, weight=0.7),
                            SourceConfig("replay", replay, weight=0.3)],
                 steps=10_000, batch_size=8, max_seq_len=512)
    counts = collections.Counter()
    iterator = iter(Pipeline(cfg, tokenizer))
    while sum(counts.values()) < 10_000:
        for source_id, inputs, _, _ in segments([next(iterator)]):
            counts[source_id] += 1
            text = tokenizer.decode(list(inputs))
            assert ("task" if source_id == 0 else "replay") in text  # ids survive packing
    share = counts[0] / sum(counts.values())
    assert abs(share - 0.7) < 4 * np.sqrt(0.7 * 0.3 / sum(counts.values()))


def test_cache_is_reused_and_invalidated(tmp_path, tokenizer, tokenizer_dir, monkeypatch,
                                         realworld, encode_calls):
    path = write_chats(tmp_path / "a.jsonl", 20)
    calls = encode_calls
    cfg = config(tmp_path, [SourceConfig("a", path)])
    first = Pipeline(cfg, tokenizer)
    assert calls["encode"] == 20 and not first.sources[0].from_cache
    second = Pipeline(cfg, data.load_tokenizer(tokenizer_dir))  # a later run
    assert calls["encode"] == 20 and second.sources[0].from_cache
    assert first.sources[0].directory == second.sources[0].directory
    other_template = data.load_tokenizer(tokenizer_dir, os.path.join(realworld, "templates",
                                                                     "chatml.jinja"))
    third = Pipeline(cfg, other_template)
    assert calls["encode"] == 40 and third.sources[0].directory != first.sources[0].directory
    other_tokenizer = tokenizer_fixtures.bpe_tokenizer.__wrapped__(
        os.path.join(realworld, "templates", "qwen2.5.jinja"))
    other_tokenizer.add_tokens(["brandnewtoken"])
    Pipeline(cfg, other_tokenizer)
    assert calls["encode"] == 60


def test_too_many_dropped_examples_stop_before_training(tmp_path, tokenizer):
    path = write_chats(tmp_path / "a.jsonl", 30)
    with pytest.raises(PipelineError, match=r"23 of 30 records left out \(76.7% > "
                                            r"data.max_drop_fraction=0.05\)") as error:
        Pipeline(config(tmp_path, [SourceConfig("a", path)], max_seq_len=100), tokenizer)
    hint = str(error.value).splitlines()[-1]
    assert hint == ("To fix: raise data.max_seq_len (now 100) or set data.truncation='truncate'; "
                    "or raise data.max_drop_fraction.")
    lenient = Pipeline(config(tmp_path, [SourceConfig("a", path)], max_seq_len=100,
                              max_drop_fraction=1.0), tokenizer)
    assert lenient.stats()["a"]["left_out"]["dropped_overlong"] > 0


def test_configuration_errors(tmp_path):
    source = SourceConfig("a", "x.jsonl")
    with pytest.raises(PipelineError, match="set train.steps"):
        config(tmp_path, [source, SourceConfig("b", "y.jsonl")])
    with pytest.raises(PipelineError, match="packing='tight'"):
        config(tmp_path, [source], packing="tight")


def test_a_source_with_nothing_to_train_on_is_an_error(tmp_path, tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "only asks"}]}) + "\n")
    with pytest.raises(data.DataError, match="nothing to train on"):
        Pipeline(config(tmp_path, [SourceConfig("a", str(path))]), tokenizer)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_a_new_process_continues_exactly(tmp_path, tokenizer_dir, workers):
    path = write_chats(tmp_path / "a.jsonl", 120)
    spec = {"tokenizer": tokenizer_dir, "sources": [{"name": "a", "paths": path}],
            "max_seq_len": 256, "batch_size": 2, "cache_dir": str(tmp_path / "cache"),
            "num_packing_bins": 4, "epochs": 3, "workers": workers}
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(spec))
    run = lambda *args: subprocess.run(
        [sys.executable, os.path.join(HERE, "pipeline_process.py"), str(config_file), *args],
        check=True, capture_output=True, text=True, timeout=300)
    run(str(tmp_path / "full.npz"), "--take", "12")
    run(str(tmp_path / "first.npz"), "--skip", "7", "--save", str(tmp_path / "state.json"),
        "--take", "1")
    run(str(tmp_path / "resumed.npz"), "--restore", str(tmp_path / "state.json"), "--take", "5")
    full, resumed = np.load(tmp_path / "full.npz"), np.load(tmp_path / "resumed.npz")
    for i in range(5):
        for key in ("inputs", "targets", "loss_mask", "segment_ids", "positions", "source_ids"):
            np.testing.assert_array_equal(resumed[f"{i}/{key}"], full[f"{7 + i}/{key}"])


def test_steps_bound_the_run_and_resume(tmp_path, tokenizer):
    path = write_chats(tmp_path / "a.jsonl", 10)
    pipeline = Pipeline(config(tmp_path, [SourceConfig("a", path)], steps=9), tokenizer)
    everything = list(pipeline)
    assert len(everything) == 9  # repeats the 10 examples as often as needed
    iterator = iter(pipeline)
    for _ in range(4):
        next(iterator)
    state = iterator.get_state()
    restored = iter(pipeline)
    restored.set_state(json.loads(json.dumps(state)))
    rest = list(restored)
    assert len(rest) == 5
    for a, b in zip(rest, everything[4:]):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert np.mean([packing_efficiency(b) for b in everything]) > 0.5
