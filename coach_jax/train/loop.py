"""The training loop: `train_and_evaluate(config, workdir)`, meant to be read top to bottom.

`Trainer` builds what a run needs, each part by a function of its own name: the data
pipeline, the model's parameters, the train state with its shardings, the evals. The loop
then iterates: dispatch step N, read step N-1's metrics while N runs, log, evaluate,
checkpoint; at the end export to Hugging Face format. Whatever ends the loop (the last
step, a preemption, a non-finite loss, a divergence, any exception), `run_resources`
restores the signal handlers and closes the metric outputs and the checkpoint manager.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from coach_jax import data, memory, parallel, train
from coach_jax.checkpoint import Checkpointer, abstract, config_changes
from coach_jax.config import ConfigError, Settings, flat_config, resolve
from coach_jax.data.cache import tokenizer_fingerprint
from coach_jax.data.pipeline import Pipeline, PipelineConfig, SourceConfig
from coach_jax.errors import RunAborted
from coach_jax.evals.forgetting import compute_dtype_copy
from coach_jax.evals.report import write_report
from coach_jax.evals.suite import EvalSuite, global_batches
from coach_jax.export import export_hf
from coach_jax.models import attention
from coach_jax.models.builder import build_model, model_config_of
from coach_jax.models.config import ModelConfig
from coach_jax.models.decoder import Params
from coach_jax.models.lora import join_base
from coach_jax.train import adapter_run, param_groups
from coach_jax.train.divergence import PATIENCE, DivergedError, DivergenceGuard
from coach_jax.train.evaluation import compile_eval_step
from coach_jax.train.schedules import ScheduleConfig, make_schedule
from coach_jax.train.reporting import progress_line
from coach_jax.train.run_resources import RunOutputs, run_resources


# ---- building a run, part by part --------------------------------------------------------


def pipeline_config(settings: Settings, sources: tuple[SourceConfig, ...], *,
                    steps: int | None, epochs: int) -> PipelineConfig:
    """This process's share of a pipeline over `sources`."""
    d = settings.data
    return PipelineConfig(
        sources=sources, max_seq_len=d.max_seq_len,
        batch_size=settings.train.global_batch_size // jax.process_count(),
        cache_dir=d.cache_dir, seed=d.seed, packing=d.packing,
        num_packing_bins=d.num_packing_bins, epochs=epochs, steps=steps, workers=d.workers,
        process_index=jax.process_index(), process_count=jax.process_count(),
        encode=d.encode, max_drop_fraction=d.max_drop_fraction)


def build_pipeline(settings: Settings, tokenizer: Any) -> tuple[Pipeline, int]:
    """The training pipeline and the run's length in steps (train.steps, or what
    data.epochs passes over the data give: each host packs its own share, so all stop at
    the smallest count)."""
    steps = settings.train.steps
    pipeline = Pipeline(pipeline_config(settings, settings.data.train_sources,
                                        steps=steps or None, epochs=settings.data.epochs),
                        tokenizer=tokenizer)
    if not steps:
        counts = multihost_utils.process_allgather(np.asarray(pipeline.count_batches()))
        steps = int(np.min(counts))
    return pipeline, max(steps, 1)


def build_params(settings: Settings, tokenizer: Any, mesh: jax.sharding.Mesh
                 ) -> tuple[ModelConfig, Params]:
    """The starting parameters, created straight into their shards: checkpoint.init_from's
    when set (read once), else the HF folder's or fresh ones (models.builder). An
    attention kernel the run cannot use is refused first, before any weight is read."""
    planned = model_config_of(settings.model, len(tokenizer))
    try:
        attention.for_run(settings.model.attention, planned, settings.data.max_seq_len)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_expert_axis(planned, settings.mesh_shape.expert)
    model_cfg, params = build_model(settings.model, len(tokenizer), settings.train.seed, mesh,
                                    transform=adapter_run.base_transform(settings))
    if settings.checkpoint.init_from:
        params = init_params_from(settings.checkpoint.init_from, params)
    return model_cfg, params


def check_expert_axis(cfg: ModelConfig, expert: int) -> None:
    """mesh.expert shards a mixture's experts: it must divide them."""
    if expert == 1:
        return
    if cfg.moe is None:
        raise ConfigError(f"mesh.expert={expert} shards the experts of a mixture, and this "
                          "model has none: put those devices on mesh.data or mesh.fsdp")
    if cfg.moe.num_experts % expert:
        raise ConfigError(f"mesh.expert={expert} does not divide the model's "
                          f"{cfg.moe.num_experts} experts")


def init_params_from(directory: str, like: Params) -> Params:
    """Parameters from another run's latest checkpoint, placed like `like`."""
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state",))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"checkpoint.init_from={directory}: no checkpoint there")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    params = restored["state"]["params"]
    expected = jax.tree.map(lambda x: x.shape, like)
    got = jax.tree.map(lambda x: x.shape, params)
    if expected != got:
        raise ValueError(f"checkpoint.init_from={directory}: its parameters have other shapes")
    logging.info("initialised parameters from %s step %d", directory, step)
    return jax.tree.map(lambda x, ref: jax.device_put(x, ref.sharding), params, like)


def build_evals(settings: Settings, model_cfg: ModelConfig, tokenizer: Any, eval_step: Any,
                batch_sharding: Any, base_params: Params | None,
                mesh: jax.sharding.Mesh) -> EvalSuite:
    """One pass over each held-out source per eval (reported together and per source),
    generations for behaviour, the forgetting monitor on the reference set."""
    def batches(source: SourceConfig, limit: int):
        pipeline = Pipeline(pipeline_config(settings, (source,), steps=None, epochs=1),
                            tokenizer)
        return global_batches(pipeline, batch_sharding, limit)

    e = settings.eval
    held_out = {s.name: batches(s, e.max_batches) for s in settings.data.eval_sources}
    reference = (batches(e.reference, e.reference_max_batches)
                 if e.reference is not None else None)
    return EvalSuite(e, model_cfg, tokenizer, eval_step, held_out, reference, base_params, mesh)


# ModelConfig fields newer than checkpoint metadata, with their defaults (see _identity).
LATER_MODEL_FIELDS = {
    "projection": "dense", "rope_layers": (), "partial_rotary_factor": 1.0,
    "qk_norm_all_heads": False, "post_norms": False, "norm_unit_offset": False,
    "sandwich_norms": False, "scale_embeddings": False, "activation": "silu",
    "query_pre_attn_scalar": None, "attn_logit_softcapping": None,
    "final_logit_softcapping": None, "local_rope_theta": None, "lora": None,
    "feed_forward": (), "moe": None, "attention_sinks": False, "mixers": (),
    "deltanet": None, "attention_output_gate": False, "global_head_dim": None,
    "global_kv_heads": None, "attention_k_eq_v": False, "v_norm": False, "kv_sources": (),
    "per_layer_input_size": 0, "per_layer_vocab_size": 0, "layer_scalar": False}


def model_identity(model_cfg: ModelConfig) -> dict[str, Any]:
    """The architecture a checkpoint records, as JSON values. Fields added after
    checkpoints began to carry it are left out at their default, as those checkpoints say
    (so they still resume)."""
    model = {k: v for k, v in dataclasses.asdict(model_cfg).items()
             if k not in ("hf_source", "compute_dtype", "scan_layers", "remat", "attention")}
    for name, default in LATER_MODEL_FIELDS.items():
        if model[name] == default or (name == "rope_layers" and all(model[name])) or (
                name == "feed_forward" and set(model[name]) == {"mlp"}) or (
                name == "mixers" and set(model[name]) == {"attention"}) or (
                name == "kv_sources" and set(model[name]) == {-1}):
            del model[name]
    model["rope_scaling"] = str(model["rope_scaling"])
    for name in ("lora", "moe", "deltanet"):
        if name in model:
            model[name] = str(getattr(model_cfg, name))
    for name in ("feed_forward", "mixers", "kv_sources"):
        if name in model:
            model[name] = list(model[name])
    model["layer_windows"] = list(model["layer_windows"])
    if "rope_layers" in model:
        model["rope_layers"] = list(model["rope_layers"])
    return model


class Trainer:
    """Everything a run builds before its first step; also used by --mode=eval/export."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, with_data: bool = True):
        self.workdir = workdir
        self.settings = s = resolve(config, jax.device_count(), jax.process_count())
        self.config_values = flat_config(config)
        self.is_main = jax.process_index() == 0
        self.mesh = parallel.make_mesh(s.mesh_shape)
        self.tokenizer = data.load_tokenizer(s.tokenizer_path, s.chat_template)
        self.source_names = tuple(source.name for source in s.data.train_sources)
        self.pipeline, self.total_steps = None, max(s.train.steps, 1)
        if with_data:
            self.pipeline, self.total_steps = build_pipeline(s, self.tokenizer)
        self.model_cfg, params = build_params(s, self.tokenizer, self.mesh)
        # An adapter run trains an adapter on this frozen base, kept outside the state.
        self.base = base_sharding = None
        if s.adapter.enabled:
            self.base = params
            base_sharding = jax.tree.map(lambda x: x.sharding, params)
            self.model_cfg, params = adapter_run.build_adapter(s, self.model_cfg,
                                                               len(self.tokenizer), self.mesh)
        # The forgetting monitor's reference point: the parameters before any step (an
        # adapter run's base itself, joined with a zero adapter).
        base_params = None
        if s.eval.reference is not None:
            base_params = (compute_dtype_copy(params, self.model_cfg.compute_dtype)
                           if self.base is None else
                           join_base(self.base, adapter_run.zero_adapter(params)))

        groups = s.train.groups
        if self.base is not None and self.model_cfg.lora.layers is not None:
            groups = dataclasses.replace(groups, trainable_layers=self.model_cfg.lora.layers)
        step_config, self.parts = train.prepare(
            self.model_cfg, params, s.optimizer, groups, self.total_steps,
            loss=s.train.loss, micro_batches=s.train.micro_batches,
            num_sources=len(s.data.train_sources))
        create = functools.partial(train.create_state, parts=self.parts, seed=s.train.seed)
        abstract_state, self.state_sharding = parallel.state_shardings(
            create, params, self.model_cfg, self.mesh)
        self.batch_sharding = parallel.batch_sharding(self.mesh)
        self.check_memory(abstract_state)
        # Created straight into its shards: never whole on one device.
        self.state = jax.jit(create, out_shardings=self.state_sharding, donate_argnums=0)(params)
        self.train_step = train.compile_train_step(step_config, self.parts, self.state_sharding,
                                                   self.batch_sharding, base_sharding)
        params_sharding = self.state_sharding.params
        if self.base is not None:
            params_sharding = join_base(base_sharding, params_sharding)
        eval_step = compile_eval_step(train.StepConfig(self.model_cfg, s.train.loss),
                                      params_sharding, self.batch_sharding)
        self.checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"),
                                        s.checkpoint.every_steps, s.checkpoint.keep)
        self.evals = build_evals(s, self.model_cfg, self.tokenizer, eval_step,
                                 self.batch_sharding, base_params, self.mesh)

    def check_memory(self, abstract_state: Any) -> None:
        """Stops before compiling when the run will not fit a device."""
        s = self.settings
        trainable, _ = param_groups.split(abstract_state.params, self.parts.label_tree)
        rows = s.train.global_batch_size // (
            s.train.micro_batches * parallel.data_shards(self.mesh))
        self.memory = memory.estimate(abstract_state, self.state_sharding, trainable,
                                      self.model_cfg, max(rows, 1), s.data.max_seq_len,
                                      s.train.loss.chunk_tokens, self.base,
                                      quantized=s.adapter.quantize_base != "none")
        budget = s.memory.device_bytes or memory.device_bytes()
        logging.info("memory estimate: %s (device: %s)", self.memory.describe(),
                     memory.human(budget) if budget else "unknown")
        if s.memory.check:
            memory.check(self.memory, budget, s.memory.headroom, s.mesh_shape,
                         s.train.micro_batches, s.model.remat, s.adapter)

    @functools.cached_property
    def _identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: architecture, tokenizer, data.
        Computed once: fingerprinting a large tokenizer is not free."""
        model = model_identity(self.model_cfg)
        if self.base is not None:  # an adapter only resumes on the base it was trained on
            model["base"] = adapter_run.base_fingerprint(self.settings)
        data_ids = ([s.fingerprint for s in self.pipeline.sources] if self.pipeline else None)
        return {"model": model, "tokenizer": tokenizer_fingerprint(self.tokenizer),
                "data": data_ids}

    def meta(self) -> dict[str, Any]:
        """The identity, plus what a resume compares to warn or explain: the config and the
        learning-rate schedule."""
        o = self.settings.optimizer
        return {**self._identity, "config": self.config_values,
                "schedule": {"total_steps": self.total_steps, "peak": o.learning_rate,
                             **dataclasses.asdict(o.schedule)}}

    @property
    def uniform_vocab_size(self) -> int:
        """The vocabulary a uniform prediction spreads over (the divergence guard's ln V)."""
        return min(len(self.tokenizer), self.model_cfg.vocab_size)

    def start_notes(self) -> list[str]:
        """What the run prints before its first step: parameter counts, schedule warnings."""
        counts = param_groups.describe(self.parts.label_tree, self.state.params)
        frozen = counts.pop(param_groups.FROZEN, 0)
        if self.base is not None:
            frozen += adapter_run.count_base_params(self.base)
        groups = (" (" + ", ".join(f"{n:,} at lr x{param_groups.multiplier(l):g}"
                                   for l, n in sorted(counts.items())) + ")"
                  if len(counts) > 1 else "")
        notes = [f"parameters: {sum(counts.values()):,} trainable{groups}, {frozen:,} frozen"
                 + adapter_run.base_note(self.settings)]
        warmup = self.settings.optimizer.schedule.warmup(self.total_steps)
        if warmup >= self.total_steps and self.settings.optimizer.schedule.name != "constant":
            notes.append(f"warning: the schedule's warmup ({warmup} steps) is not shorter than "
                         f"the run ({self.total_steps} steps): the learning rate never reaches "
                         "its peak (schedule.warmup_steps / schedule.warmup_ratio)")
        return notes

    def save(self, step: int, iterator: Any) -> None:
        """Saves this step unless it is already saved (a periodic save just before)."""
        if self.checkpoints.latest_step() != step:
            self.checkpoints.save(step, self.state, iterator.get_state(), self.meta())

    def restore(self, iterator: Any = None, step: int | None = None) -> int:
        """Resume order: this workdir's newest valid checkpoint (or `step`), else the
        starting parameters (checkpoint.init_from's, the HF folder's or fresh ones, see
        `build_params`). Returns the step the state is at."""
        meta = self.meta()
        if iterator is None:
            meta["data"] = None  # eval/export: the data need not match
        found = self.checkpoints.restore_newest_valid(
            abstract(self.state), meta, self.settings.checkpoint.allow_config_change, step)
        if found is None:
            return 0
        step, self.state, data_state = found
        if iterator is not None:
            iterator.set_state(data_state)
            if self.is_main:
                print(f"resumed from step {step} in {self.checkpoints.directory}", flush=True)
                change = schedule_change(self.checkpoints.meta(step), meta, step)
                if change:
                    print(f"warning: {change}", flush=True)
        logging.info("restored step %d from %s", step, self.checkpoints.directory)
        return step

    def eval_params(self) -> Params:
        """What to evaluate and export (schedule-free optimizers keep an average)."""
        trainable, frozen = param_groups.split(self.state.params, self.parts.label_tree)
        averaged = train.eval_params(self.settings.optimizer, self.state.opt_state, trainable)
        params = param_groups.merge(averaged, frozen)
        return params if self.base is None else join_base(self.base, params)

    def evaluate(self, step: int | None = None) -> dict[str, float]:
        """Every eval the config asks for; with `step`, the generations are written to
        DIR/generations/step_<step>.jsonl."""
        metrics, generations = self.evals.measure(self.eval_params())
        if generations and step is not None and self.is_main:
            folder = os.path.join(self.workdir, "generations")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"step_{step:06d}.jsonl"), "w") as f:
                f.writelines(json.dumps(g) + "\n" for g in generations)
        return metrics

    def export(self) -> str | None:
        """Every process takes part in gathering the parameters; process 0 writes."""
        params = multihost_utils.process_allgather(self.eval_params(), tiled=True)
        if not self.is_main:
            return None
        if self.base is not None:
            return adapter_run.export_adapter(self.workdir, self.model_cfg, params,
                                              self.tokenizer, self.settings)
        out = os.path.join(self.workdir, "export")
        return export_hf(out, self.model_cfg, params, self.tokenizer,
                         self.settings.export.dtype, self.settings.data.encode.end_of_turn)


def schedule_change(saved: dict[str, Any] | None, now: dict[str, Any], step: int
                    ) -> str | None:
    """Says how the learning rate at the resume step moves when the schedule's settings
    (train.steps, optimizer.learning_rate, schedule.*) changed since the checkpoint."""
    if not saved or "schedule" not in saved:
        return None

    def rate(meta: dict[str, Any]) -> float:
        fields = dict(meta["schedule"])
        total, peak = fields.pop("total_steps"), fields.pop("peak")
        return float(make_schedule(ScheduleConfig(**fields), peak, total)(step))

    old, new = rate(saved), rate(now)
    if abs(old - new) <= 1e-9 * max(abs(old), abs(new), 1e-30):
        return None
    keys = ("train.", "optimizer.learning_rate", "schedule.", "data.epochs")
    fields = config_changes(saved.get("config"), now.get("config"), keys)
    fields = [f for f in fields if not f.startswith(("train.log_every", "train.eval_every"))]
    return (f"the learning-rate schedule changed since the checkpoint ("
            f"{'; '.join(fields) or 'run length'}): the learning rate at step {step} moves "
            f"from {old:.3e} to {new:.3e}")


def count_examples(segment_ids: np.ndarray) -> int:
    """Packed examples in a batch: distinct non-zero segment ids per row."""
    return sum(len(np.unique(row[row > 0])) for row in segment_ids)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


# ---- the loop ----------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains as the config says; returns the last logged record (with the final eval)."""
    os.makedirs(workdir, exist_ok=True)
    t = Trainer(config, workdir)
    s = t.settings
    data_stats = {"sources": t.pipeline.stats()}
    if t.is_main:
        write_config(config, workdir)
        for name, stats in data_stats["sources"].items():
            logging.info("data %s: %s", name, json.dumps(stats))
        for line in t.start_notes():
            print(line, flush=True)
    iterator = iter(t.pipeline)
    step = t.restore(iterator)
    guard = DivergenceGuard(t.uniform_vocab_size, s.optimizer.schedule.warmup(t.total_steps),
                            start_step=step)

    pending = None  # (step, device metrics) of the step dispatched last
    read = {"examples": 0, "tokens": 0, "slots": 0, "batches": 0}  # this process's share
    window = {"tokens": 0, "since": time.perf_counter()}
    steady: tuple[float, int] | None = None  # (time, step) once the first step is done
    record: dict[str, Any] = {}
    evaluated_at, stopped, diverged = None, None, None

    with run_resources(t, step) as (outputs, preemption):

        def report(done_step: int, metrics: Any) -> None:
            """Reads a finished step's metrics: the only host sync outside eval and saves."""
            nonlocal record, steady
            metrics = jax.device_get(metrics)
            train.check_finite(metrics, done_step)
            watch_divergence(guard, s.train.on_divergence, done_step, metrics, t.is_main)
            now = time.perf_counter()
            if steady is None:  # the first step compiles: time the rest from here
                steady = (now, done_step)
            if done_step % s.train.log_every and done_step not in (1, t.total_steps):
                return
            metrics["tokens_per_s"] = window["tokens"] / max(now - window["since"], 1e-9)
            window.update(tokens=0, since=now)
            if done_step == 1:
                peak = (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
                if peak:
                    metrics["peak_memory_gib"] = peak / memory.GIB
            record = outputs.write(done_step, metrics)
            seconds_left = None
            if done_step > steady[1]:
                rate = (now - steady[0]) / (done_step - steady[1])
                seconds_left = rate * (t.total_steps - done_step)
            if t.is_main:
                print(progress_line(done_step, t.total_steps, record, seconds_left), flush=True)

        def evaluate(at_step: int) -> str | None:
            """Runs the evals; returns why the run must stop (the forgetting budget), if so."""
            nonlocal record, evaluated_at
            metrics = t.evaluate(at_step)
            record = {**record, **outputs.write(at_step, metrics)}
            evaluated_at = at_step
            if t.is_main:
                print(progress_line(at_step, t.total_steps, metrics, 0).rsplit(" | ETA", 1)[0],
                      flush=True)
            if not t.evals.over_budget(metrics):
                return None
            why = (f"forgetting budget exceeded at step {at_step}: the reference loss rose by "
                   f"{metrics['forgetting/reference_loss_delta']:.4f} nats (budget "
                   f"{s.eval.forgetting_budget})")
            if s.eval.on_forgetting_budget == "stop":
                return why
            logging.warning("%s; going on (eval.on_forgetting_budget=warn)", why)
            if t.is_main:
                print(f"warning: {why}", flush=True)
            return None

        def save(at_step: int) -> None:
            """A save, unless the newest steps look diverged (their state is not kept)."""
            if guard.suspect and s.train.on_divergence == "stop":
                logging.warning("not saving step %d: the loss looks diverged since step %d",
                                at_step, guard.last_healthy)
                return
            t.save(at_step, iterator)

        eval_every, profile = s.train.eval_every, s.train.profile_steps
        try:
            if step == 0 and s.eval.at_start and t.evals.enabled:
                stopped = evaluate(0)  # the "before" of every eval
            # The step count and a forgetting-budget stop are checked before a batch is
            # read, so the saved iterator state never runs ahead of the saved step.
            while step < t.total_steps and not stopped:
                batch = next(iterator, None)
                if batch is None:  # the data ran out (epoch mode)
                    break
                if profile and step + 1 == profile[0]:
                    jax.profiler.start_trace(os.path.join(workdir, "profile"))
                t.state, metrics = t.train_step(
                    t.state, parallel.global_batch(batch, t.batch_sharding), t.base)
                step += 1
                local_tokens = int((batch["segment_ids"] > 0).sum())
                read["tokens"] += local_tokens
                read["slots"] += batch["segment_ids"].size
                read["batches"] += 1
                read["examples"] += count_examples(batch["segment_ids"])
                if pending is not None:
                    report(*pending)
                # Counted after the previous step's report: its tokens/s is its own steps'.
                window["tokens"] += local_tokens * jax.process_count()
                pending = (step, metrics)
                if profile and step == profile[1]:
                    jax.block_until_ready(metrics)
                    jax.profiler.stop_trace()
                if (eval_every and step % eval_every == 0) or t.checkpoints.due(step):
                    report(*pending)  # never evaluate or save a state with a non-finite step
                    pending = None
                    if eval_every and step % eval_every == 0:
                        stopped = evaluate(step)
                    if t.checkpoints.due(step):
                        save(step)
                if preemption.requested(step):
                    if pending is not None:
                        report(*pending)
                    t.save(step, iterator)
                    if t.is_main:
                        print(f"preempted: saved step {step} to {t.checkpoints.directory}; run "
                              "the same command again to continue", flush=True)
                    return {**record, "preempted_at": step}
            if pending is not None:
                report(*pending)
            if evaluated_at != step and t.evals.enabled:
                evaluate(step)
            t.save(step, iterator)
        except DivergedError as e:
            diverged = e
            stopped = e.divergence.message()
            t.checkpoints.delete_after(guard.last_healthy)
        except RunAborted:
            t.checkpoints.close()  # a save already under way completes; nothing new starts
            latest = t.checkpoints.latest_step()
            raise RunAborted(
                f"aborted at step {step} without saving; " + (
                    f"the last checkpoint is step {latest} in {t.checkpoints.directory}"
                    if latest is not None else "no checkpoint was saved")) from None

        return finish_run(t, outputs, step, read, data_stats, record, stopped, diverged)


def finish_run(t: Trainer, outputs: RunOutputs, step: int, read: dict[str, int],
               data_stats: dict[str, Any], record: dict[str, Any], stopped: str | None,
               diverged: DivergedError | None) -> dict[str, Any]:
    """After the last step: this process's data counts, the export (never of a diverged
    run), data_stats.json and the report (also to W&B); a divergence is raised last."""
    with open(os.path.join(t.workdir, f"data_process_{jax.process_index()}.json"), "w") as f:
        json.dump({"process_index": jax.process_index(), "steps": step, **read}, f)
    if stopped:
        record["stopped"] = stopped
        if t.is_main and not diverged:
            print(f"stopped: {stopped} (eval.on_forgetting_budget=stop); saved step {step}",
                  flush=True)
    if t.settings.export.hf and not diverged:
        record["export"] = t.export()
    if t.is_main:
        data_stats.update(packing_efficiency=read["tokens"] / max(read["slots"], 1),
                          batches=read["batches"], stopped=stopped)
        with open(os.path.join(t.workdir, "data_stats.json"), "w") as f:
            json.dump(data_stats, f, indent=2)
        record["report"] = write_report(t.workdir)
        if outputs.wandb is not None:
            outputs.wandb.log_report(t.workdir)
    if diverged:
        raise diverged
    return record


def watch_divergence(guard: DivergenceGuard, mode: str, step: int, metrics: dict[str, Any],
                     is_main: bool) -> None:
    """Feeds one step to the guard; raises DivergedError (train.on_divergence=stop) or
    warns once per diverged stretch (warn)."""
    if mode == "off":
        return
    found = guard.observe(step, float(metrics["loss"]), float(metrics["grad_norm"]),
                          float(metrics["learning_rate"]))
    if found is None:
        return
    if mode == "stop":
        raise DivergedError(found)
    if len(guard.streak) == PATIENCE:
        logging.warning("%s; going on (train.on_divergence=warn)", found.message())
        if is_main:
            print(f"warning: {found.message()}; going on (train.on_divergence=warn)",
                  flush=True)
