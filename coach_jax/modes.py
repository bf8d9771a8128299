"""--mode=eval|lint|inspect|export|generate|chat: the commands besides training."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import jax

from coach_jax import data, models, sampling
from coach_jax.config import ConfigError, Settings, resolve
from coach_jax.data.conversation import Conversation, Document, Message


def _sources(config) -> tuple[Settings, list]:
    """The validated settings and every data source they name (train, then eval)."""
    settings = resolve(config, jax.device_count(), jax.process_count())
    return settings, list(settings.data.train_sources + settings.data.eval_sources)


def lint(config, workdir, **_) -> int:
    """Every record of data.train and data.eval checked; exit 1 on errors."""
    settings, sources = _sources(config)
    tokenizer = data.load_tokenizer(settings.tokenizer_path, settings.chat_template)
    encode = settings.data.encode
    failed = False
    for source in sources:
        report = data.lint(source.paths, tokenizer, source.format, encode.max_seq_len,
                           encode.train_on, encode.end_of_turn)
        print(f"== {source.name} ({source.paths})\n{report.format()}")
        failed |= not report.ok()
    return 1 if failed else 0


def inspect(config, workdir, inspect_examples: int = 3, **_) -> int:
    """The first examples of each source as the model sees them, supervised text marked."""
    settings, sources = _sources(config)
    tokenizer = data.load_tokenizer(settings.tokenizer_path, settings.chat_template)
    encode = settings.data.encode
    print(data.template_report(tokenizer, encode.end_of_turn))
    for source in sources:
        print(f"== {source.name} ({source.paths})")
        print(data.inspect(source.paths, tokenizer, inspect_examples, source.format,
                           encode.train_on, end_of_turn=encode.end_of_turn))
    return 0


def memory(config, workdir, **_) -> int:
    """The run's per-device memory estimate from config.json alone (no weights loaded), and
    whether it fits the device (memory.device_bytes, or what the device reports); exit 1
    with suggestions when it does not."""
    from coach_jax import memory as memory_check, parallel
    from coach_jax.train import memory_plan
    settings = resolve(config, jax.device_count(), jax.process_count())
    tokenizer = data.load_tokenizer(settings.tokenizer_path, settings.chat_template)
    found = memory_plan.estimate(settings, len(tokenizer), parallel.make_mesh(settings.mesh_shape))
    budget = settings.memory.device_bytes or memory_check.device_bytes()
    print(f"memory estimate: {found.describe()} (device: "
          f"{memory_check.human(budget) if budget else 'unknown'})")
    cfg = memory_plan.model_config(settings, len(tokenizer), settings.mesh_shape.tensor)
    if cfg.moe is not None:
        total, active = memory_check.parameter_counts(cfg)
        print(f"parameters: {total / 1e9:.2f}B in all, {active / 1e9:.2f}B active per token "
              f"({cfg.moe.top_k} of {cfg.moe.num_experts} experts)")
        mesh = settings.mesh_shape
        tokens = settings.data.max_seq_len * max(1, settings.train.global_batch_size // (
            settings.train.micro_batches * mesh.data_shards))
        print(f"routed experts: {cfg.moe.num_experts // mesh.expert} per device "
              f"(mesh.expert={mesh.expert}); their gathered tokens and sorted rows take "
              f"{memory_check.human(memory_check.expert_exchange(cfg, mesh.expert) * tokens)} "
              "per MoE layer")
    try:
        memory_check.check(found, budget, settings.memory.headroom, settings.mesh_shape,
                           settings.train.micro_batches, settings.model.remat,
                           settings.adapter)
    except memory_check.DoesNotFitError as e:
        print(f"does not fit: {e}")
        return 1
    if budget:
        print(f"fits: {found.total / budget:.0%} of the device")
    return 0


def _restored_trainer(config, workdir, step=None):
    from coach_jax.train.loop import Trainer
    trainer = Trainer(config, workdir, with_data=False)
    if trainer.checkpoints.latest_step() is None:
        raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint to load")
    if step is not None and step not in trainer.checkpoints.steps():
        raise FileNotFoundError(f"{workdir}/checkpoints: no step {step}; saved steps: "
                                f"{trainer.checkpoints.steps()}")
    return trainer, trainer.restore(step=step)


def eval(config, workdir, step=None, **_) -> int:  # noqa: A001 - the mode's name
    trainer, step = _restored_trainer(config, workdir, step)
    print(json.dumps({"step": step, **trainer.evaluate()}))
    return 0


def export(config, workdir, step=None, **_) -> int:
    """DIR/export from the latest checkpoint, or from `--step`."""
    trainer, step = _restored_trainer(config, workdir, step)
    print(json.dumps({"step": step, "export": trainer.export()}))
    return 0


def _model(config, workdir, model_path, step) -> tuple[models.ModelConfig, Any, Any, str]:
    """(model config, params, tokenizer, data.end_of_turn) from an HF folder (`--model`,
    with the compute dtype and end-of-turn of `--config` when given), or from the workdir's
    latest checkpoint (or `--step`) of the run `--config` describes."""
    if model_path:
        settings = (resolve(config, jax.device_count(), jax.process_count())
                    if config is not None else None)
        cfg, params = models.load_hf(model_path, compute_dtype=settings.model.dtype
                                     if settings else "float32")
        end_of_turn = settings.data.encode.end_of_turn if settings else ""
        return cfg, params, data.load_tokenizer(model_path), end_of_turn
    if config is None or not workdir:
        raise ConfigError("name a model: --model=<HF folder>, or --config and --workdir of a "
                          "run with checkpoints")
    trainer, _ = _restored_trainer(config, workdir, step)
    return (trainer.model_cfg, trainer.eval_params(), trainer.tokenizer,
            trainer.settings.data.encode.end_of_turn)


def _sampling(flags: dict[str, Any]) -> sampling.SamplingConfig:
    try:
        return sampling.SamplingConfig(**{k: flags[k] for k in (
            "max_new_tokens", "temperature", "top_k", "top_p", "seed")})
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _generation_input(example: Any) -> tuple[Any, dict[str, Any]]:
    """(prompt, output row) of one input record: a text record's raw text, continued as is;
    a conversation without its last assistant turn (kept as `reference`), to be rendered
    with the chat template and its generation prompt."""
    row: dict[str, Any] = {"origin": str(example.origin)}
    if isinstance(example, Document):
        row["prompt"] = example.text
        return example.text, row
    messages = example.messages
    if messages[-1].role == "assistant":
        row["reference"] = messages[-1].content
        messages = messages[:-1]
    row["messages"] = [m.as_template_dict() for m in messages]
    return Conversation(messages, example.tools, example.origin), row


def generation_inputs(path: str) -> tuple[list[Any], list[dict[str, Any]]]:
    """The prompts and output rows of an input file, in its order. Each record's format is
    detected on its own, so one file may mix text records and conversations of any format;
    the first bad record raises, naming its line."""
    prompts, rows = [], []
    for raw in data.read_records(path):
        if raw.error is not None:
            raise raw.error
        example = data.normalize(raw.data, data.detect_format(raw.data, raw.origin),
                                 raw.origin, require_answer=False)
        prompt, row = _generation_input(example)
        prompts.append(prompt)
        rows.append(row)
    if not rows:
        raise data.DataError(None, f"{path}: no records to generate for")
    return prompts, rows


def generate(config, workdir, input=None, output=None, model=None, step=None,  # noqa: A002
             **flags) -> int:
    """One output line per input line, in order: the next assistant turn of each
    conversation (its last assistant turn, if any, is kept as `reference`), or the
    continuation of a text record's raw prompt."""
    if not input or not output:
        raise ConfigError("--mode=generate needs --input (a JSONL of conversations or text "
                          "records) and --output")
    settings = _sampling(flags)
    prompts, rows = generation_inputs(input)
    cfg, params, tokenizer, end_of_turn = _model(config, workdir, model, step)
    completions = sampling.generate_tokens(
        cfg, params, [sampling.prompt_ids(tokenizer, p, end_of_turn) for p in prompts],
        sampling.stop_token_ids(tokenizer, end_of_turn), settings, flags["generate_batch_size"])
    with open(output, "w") as f:
        for row, completion in zip(rows, completions):
            row["output"] = sampling.completion_text(tokenizer, completion)
            row["finish_reason"] = completion.finish_reason
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(json.dumps({"generated": len(rows), "output": output}))
    return 0


CHAT_HELP = "commands: /reset (new conversation), /exit (or Ctrl-D)"


def chat(config, workdir, model=None, step=None, system=None, **flags) -> int:
    """An interactive chat in the terminal; one line per user turn."""
    settings = _sampling(flags)
    cfg, params, tokenizer, end_of_turn = _model(config, workdir, model, step)
    stop_ids = sampling.stop_token_ids(tokenizer, end_of_turn)
    opening = [Message("system", system)] if system else []
    history = list(opening)
    interactive = sys.stdin.isatty()
    print(f"coach_jax chat · {CHAT_HELP}", flush=True)
    turn = 0
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            history = list(opening)
            print("(new conversation)", flush=True)
            continue
        history.append(Message("user", line))
        conversation = Conversation(tuple(history))
        completion = sampling.generate_tokens(
            cfg, params, [sampling.prompt_ids(tokenizer, conversation, end_of_turn)], stop_ids,
            dataclasses.replace(settings, seed=settings.seed + turn))[0]
        turn += 1
        answer = sampling.completion_text(tokenizer, completion)
        history.append(Message("assistant", answer))
        suffix = "" if completion.finish_reason == "stop" else " [max_new_tokens reached]"
        print(f"assistant> {answer}{suffix}", flush=True)
    return 0
