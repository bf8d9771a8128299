"""The run config: every key declared here with its default, and one validation pass that
turns the ml_collections config into typed settings before anything compiles.

Config files (configs/*.py) start from `base_config()` and change what their recipe needs;
the command line overrides any key (`--config.optimizer.name=lion`). The config is locked,
so a misspelled key fails at once. `resolve(config)` checks everything that can be checked
without touching a device and explains what is wrong in one line.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
import os
import re
from typing import Any, Iterator, NamedTuple

import ml_collections
from ml_collections import config_dict

from coach_jax.adapters import targets as adapter_targets
from coach_jax.data.encoded import OVERLONG, EncodeOptions
from coach_jax.data.chat_encoding import TRAIN_ON
from coach_jax.data.formats import FORMATS
from coach_jax.data.pipeline import PACKING, PipelineError, SourceConfig, with_eval_split
from coach_jax.data.readers import expand_paths
from coach_jax.evals.forgetting import ON_BUDGET
from coach_jax.evals.suite import EvalConfig
from coach_jax.models.builder import ModelSpec
from coach_jax.models.config import ATTENTION, REMAT_POLICIES
from coach_jax.models.hf_checkpoint import CheckpointError, check_weights
from coach_jax.train import optimizers
from coach_jax.train.loss import CHUNK_TOKENS, NORMALIZATIONS, LossConfig
from coach_jax.train.optimizers import OptimizerConfig
from coach_jax.train.param_groups import FROZEN, ParamGroups
from coach_jax.train.schedules import SCHEDULES, ScheduleConfig

# Files one of which a Hugging Face tokenizer folder holds (fast, sentencepiece, BPE, tekken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "tekken.json")
MODES = ("train", "eval", "lint", "inspect", "export", "generate", "chat", "memory")
# Optimizer hyperparameters declared as keys (unset = the optimizer's own default); any
# other goes in optimizer.extra as "name=value,name=value".
COMMON_HPARAMS = {"b1": float, "b2": float, "eps": float, "weight_decay": float,
                  "momentum": float, "nesterov": bool}


class ConfigError(ValueError):
    """A config that cannot run, explained in one line."""


def base_config() -> ml_collections.ConfigDict:
    """Every key a run reads, with its default."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.hf_path = ""  # a local HF folder (config.json + safetensors); "" = model.init
    c.model.init = ml_collections.ConfigDict(dict(  # a from-scratch model, HF-style names
        model_type="llama", vocab_size=1024, hidden_size=128, intermediate_size=352,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=4096))
    c.model.dtype = "float32"  # compute dtype; bfloat16 on accelerators
    c.model.param_dtype = "float32"
    c.model.remat = "none"  # none | full | dots | dots_no_batch | save_attention
    c.model.attention = "auto"  # auto | xla | cudnn (GPU) | splash (TPU)
    c.model.scan_layers = True
    c.model.vocab_multiple = 1  # pad the vocabulary to a multiple (128 for sharding)

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # a local HF tokenizer folder; "" = model.hf_path
    c.tokenizer.chat_template = ""  # a .jinja file replacing the tokenizer's template

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # path or glob; "a.jsonl@0.7,b.jsonl@0.3" for a weighted mixture
    c.data.eval = ""  # held-out sources, same syntax; "" = no eval loss
    # Or carve the held-out set from data.train: a fraction (0.05) or a count (200) of each
    # training source's examples, seeded by data.seed; 0 = off. Not with data.eval.
    c.data.eval_split = 0.0
    c.data.format = "auto"  # auto | openai | sharegpt | alpaca | prompt_completion | text
    c.data.max_seq_len = 2048
    c.data.packing = "first_fit"  # first_fit | best_fit | none
    c.data.num_packing_bins = 64
    c.data.truncation = "drop"  # over-long examples: drop | truncate | error
    c.data.train_on = "all_assistant"  # all_assistant | last_assistant | all
    # The marker that closes an assistant turn where the chat template writes none or only
    # text (e.g. the tokenizer's EOS); inserted after turns the template leaves open.
    c.data.end_of_turn = ""
    c.data.on_invalid = "error"  # bad records: error | skip (counted)
    c.data.max_drop_fraction = 0.05
    c.data.epochs = 1  # used when train.steps is 0
    c.data.seed = 0
    c.data.workers = 0  # data worker processes
    c.data.cache_dir = ""  # encoded-example cache; "" = ~/.cache/coach_jax/encoded

    c.train = ml_collections.ConfigDict()
    c.train.steps = 0  # 0 = data.epochs passes over the data
    c.train.global_batch_size = 16  # rows of data.max_seq_len tokens, all devices
    c.train.micro_batches = 1  # gradient accumulation inside the step
    c.train.log_every = 10
    c.train.eval_every = 0  # 0 = only at the end
    c.train.seed = 0
    c.train.loss_normalization = "tokens"  # tokens | examples
    c.train.z_loss = 0.0
    c.train.label_smoothing = 0.0
    c.train.chunk_tokens = CHUNK_TOKENS  # LM head + cross-entropy chunk (0 = unchunked)
    # Mixture-of-experts routers: the load-balancing loss's weight (None: config.json's
    # router_aux_loss_coef where its output_router_logits is true, else 0) and the z-loss's.
    c.train.router_aux_loss = config_dict.placeholder(float)
    c.train.router_z_loss = 0.0
    c.train.freeze = ()  # regexes of parameter paths to freeze, e.g. ("embed_tokens",)
    c.train.lr_multipliers = ()  # ("regex=multiplier", ...), e.g. ("embed_tokens=0.1",)
    c.train.trainable_last_layers = -1  # -1 = all layers train
    c.train.profile_steps = ""  # "first,last": a profiler trace of those steps in DIR/profile
    # A run whose loss diverges (stuck at the uniform-prediction loss, blown up far above its
    # best, or zero gradients while the loss is high): stop | warn | off. See docs/configs.md.
    c.train.on_divergence = "stop"

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"  # see coach_jax.train.FACTORIES, or optax.<dotted.path>
    c.optimizer.learning_rate = 1e-5  # peak
    for name, kind in COMMON_HPARAMS.items():
        setattr(c.optimizer, name, config_dict.placeholder(kind))
    c.optimizer.extra = ""  # other hyperparameters: "alpha=5.0,b3=0.9999"
    c.optimizer.grad_clip_norm = 1.0  # 0 = off
    c.optimizer.decay_norms_and_biases = False

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "warmup_cosine"  # constant | linear | warmup_cosine | warmup_linear | wsd
    c.schedule.warmup_steps = 0
    c.schedule.warmup_ratio = 0.0  # used when warmup_steps is 0
    c.schedule.end_ratio = 0.0
    c.schedule.decay_ratio = 0.1  # wsd: share of the run spent decaying

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = the devices left over
    c.mesh.fsdp = 1
    c.mesh.expert = 1  # shards a mixture's experts; a data-parallel axis elsewhere
    c.mesh.tensor = 1

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # "" single process; "auto"; or "host:port"
    c.distributed.num_processes = 0
    c.distributed.process_id = -1  # -1: from COACH_JAX_PROCESS_ID or SLURM_PROCID

    c.memory = ml_collections.ConfigDict()
    c.memory.check = True  # refuse a run whose estimate does not fit a device
    c.memory.device_bytes = 0  # 0: ask the device (GPU/TPU report it; CPU does not)
    c.memory.headroom = 0.9  # share of device memory the estimate may use

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500  # and at the end
    c.checkpoint.keep = 3
    c.checkpoint.init_from = ""  # another run's checkpoints folder: start from its params
    c.checkpoint.allow_config_change = False  # resume although the data or tokenizer changed

    c.eval = ml_collections.ConfigDict()
    c.eval.max_batches = 0  # 0 = the whole eval set
    c.eval.at_start = True  # also evaluate before step 1: the "before" of every eval
    # Behaviour: generate for held-out conversations, compare with their last assistant turn.
    c.eval.prompts = ""  # sources like data.eval; "" = data.eval
    c.eval.generate_examples = 0  # conversations per source to generate for; 0 = off
    c.eval.max_new_tokens = 128
    c.eval.temperature = 0.0  # 0 = greedy
    c.eval.generate_batch_size = 32
    c.eval.json_schema = ""  # a JSON schema file: the share of generations that validate
    c.eval.fact_fields = ()  # JSON fields to recall, not copy: behaviour/<source>/fact_accuracy
    c.eval.fact_chance = 0.0  # fact_accuracy of a model without the knowledge (the report)
    # Forgetting: loss and KL against the base model on a general reference set.
    c.eval.reference = ""  # a text or chat source SFT never trains on; "" = off
    c.eval.reference_max_batches = 0  # 0 = the whole reference set
    c.eval.forgetting_budget = 0.0  # allowed rise of the reference loss in nats; 0 = none
    c.eval.on_forgetting_budget = "warn"  # warn | stop (save, report, end the run)

    c.logging = ml_collections.ConfigDict()
    # Weights & Biases (pip install 'coach_jax[wandb]'): "" = off.
    c.logging.wandb_project = ""
    c.logging.wandb_entity = ""
    c.logging.wandb_run_name = ""  # "" = the workdir's name
    c.logging.wandb_tags = ()

    c.export = ml_collections.ConfigDict()
    c.export.hf = True  # write DIR/export in Hugging Face format at the end
    c.export.dtype = ""  # "" = the parameter dtype
    # Adapter runs: also write DIR/export/merged, the base with the adapter folded in.
    c.export.merge_adapters = False

    # LoRA: train low-rank adapters on a frozen base (docs/adapters.md).
    c.adapter = ml_collections.ConfigDict()
    c.adapter.kind = "none"  # none | lora
    c.adapter.rank = 16
    c.adapter.alpha = 32.0  # the update is scaled by alpha / rank (alpha / sqrt(rank): rsLoRA)
    c.adapter.use_rslora = False
    c.adapter.dropout = 0.0  # dropout on the adapter's input while training (PEFT's lora_dropout)
    # HF module names as PEFT matches them ("q_proj,v_proj"), "re:<regex>" over HF module
    # paths, or "all-linear".
    c.adapter.targets = "all-linear"
    c.adapter.layers = ()  # decoder layers with adapters (PEFT's layers_to_transform); () = all
    c.adapter.init_from = ""  # a PEFT LoRA adapter folder to continue training
    # QLoRA: the frozen base's projection kernels held quantized: none | int8 | int4 | nf4 |
    # mxfp4 (blocks of 32: gpt-oss's experts as published), one scale per block of this many
    # input channels (pip install 'coach_jax[qlora]').
    c.adapter.quantize_base = "none"
    c.adapter.quantize_block = 64

    return c


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The data section: what the pipelines read and how they encode and pack it."""

    train_sources: tuple[SourceConfig, ...]
    eval_sources: tuple[SourceConfig, ...]
    encode: EncodeOptions
    packing: str
    num_packing_bins: int
    max_drop_fraction: float
    epochs: int
    seed: int
    workers: int
    cache_dir: str
    eval_split: float = 0.0  # a fraction (< 1) or a count (>= 1) carved from data.train; 0 = off

    @property
    def max_seq_len(self) -> int:
        return self.encode.max_seq_len


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The train section: length, batch, loss, parameter groups and logging cadence."""

    steps: int  # 0 = data.epochs passes over the data
    global_batch_size: int
    micro_batches: int
    log_every: int
    eval_every: int
    seed: int
    loss: LossConfig
    groups: ParamGroups
    profile_steps: tuple[int, int] | None  # first and last step of a profiler trace
    on_divergence: str = "stop"  # stop | warn | off


@dataclasses.dataclass(frozen=True)
class MemorySettings:
    check: bool  # refuse a run whose estimate does not fit a device
    device_bytes: int  # 0: ask the device
    headroom: float


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    every_steps: int
    keep: int
    init_from: str  # another run's checkpoints folder: start from its params; "" = none
    allow_config_change: bool


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    hf: bool  # write DIR/export in Hugging Face format at the end
    dtype: str | None  # None = the parameter dtype


@dataclasses.dataclass(frozen=True)
class AdapterSettings:
    """The adapter section, checked; kind "none" is full fine-tuning."""

    kind: str = "none"
    rank: int = 16
    alpha: float = 32.0
    use_rslora: bool = False
    dropout: float = 0.0
    targets: str | tuple[str, ...] = "all-linear"
    layers: tuple[int, ...] = ()  # () = every layer
    init_from: str = ""
    merge_on_export: bool = False
    quantize_base: str = "none"  # none | int8 | int4 | nf4 | mxfp4
    quantize_block: int = 64

    @property
    def enabled(self) -> bool:
        return self.kind != "none"


@dataclasses.dataclass(frozen=True)
class LoggingSettings:
    """Where metrics go besides metrics.jsonl and TensorBoard."""

    wandb_project: str = ""  # "" = no Weights & Biases run
    wandb_entity: str = ""
    wandb_run_name: str = ""  # "" = the workdir's name
    wandb_tags: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Settings:
    """A validated run, one typed section per part; below this module nothing reads the
    ml_collections config."""

    model: ModelSpec
    tokenizer_path: str
    chat_template: str | None
    data: DataSettings
    train: TrainSettings
    optimizer: OptimizerConfig
    mesh_shape: MeshShape
    memory: MemorySettings
    checkpoint: CheckpointSettings
    eval: EvalConfig
    export: ExportSettings
    logging: LoggingSettings = LoggingSettings()
    adapter: AdapterSettings = AdapterSettings()


def _adapter_settings(c: ml_collections.ConfigDict) -> AdapterSettings:
    a = c.adapter
    _choice(a.kind, ("none", "lora"), "adapter.kind")
    _choice(a.quantize_base, ("none", "int8", "int4", "nf4", "mxfp4"), "adapter.quantize_base")
    if a.kind == "none":
        if a.init_from:
            raise ConfigError("adapter.init_from is set but adapter.kind='none': set "
                              "adapter.kind=lora to train the adapter further")
        if a.quantize_base != "none":
            raise ConfigError("adapter.quantize_base quantizes the frozen base of an adapter "
                              "run: set adapter.kind=lora (QLoRA)")
        return AdapterSettings(merge_on_export=c.export.merge_adapters)
    if a.rank < 1:
        raise ConfigError(f"adapter.rank={a.rank} must be at least 1")
    if a.alpha <= 0:
        raise ConfigError(f"adapter.alpha={a.alpha} must be positive")
    if not 0.0 <= a.dropout < 1.0:
        raise ConfigError(f"adapter.dropout={a.dropout} must be in [0, 1)")
    if a.quantize_base != "none":
        if importlib.util.find_spec("qwix") is None:
            raise ConfigError("adapter.quantize_base needs qwix: pip install 'coach_jax[qlora]'")
        if a.quantize_block < 1:
            raise ConfigError(f"adapter.quantize_block={a.quantize_block} must be at least 1")
        if a.quantize_base == "mxfp4" and a.quantize_block != 32:
            raise ConfigError(f"adapter.quantize_base=mxfp4 has blocks of 32 weights (the OCP "
                              f"MX format), not adapter.quantize_block={a.quantize_block}: set "
                              "adapter.quantize_block=32")
    try:
        targets = adapter_targets.parse(a.targets)
    except adapter_targets.TargetError as e:
        raise ConfigError(str(e)) from None
    if a.init_from and not os.path.isfile(os.path.join(a.init_from, "adapter_config.json")):
        raise ConfigError(f"adapter.init_from={a.init_from!r}: no adapter_config.json there "
                          "(expected a PEFT LoRA adapter folder)")
    if c.checkpoint.init_from:
        raise ConfigError("checkpoint.init_from starts from another run's full parameters; "
                          "an adapter run starts from its base (model.hf_path) and, to "
                          "continue an adapter, from adapter.init_from (a PEFT folder, e.g. "
                          "that run's DIR/export)")
    if c.train.trainable_last_layers >= 0 or c.train.freeze:
        raise ConfigError("adapter.kind=lora trains only the adapter: train.freeze and "
                          "train.trainable_last_layers do not apply (use adapter.targets)")
    layers = (a.layers,) if isinstance(a.layers, int) else tuple(a.layers)
    if not all(isinstance(i, int) and i >= 0 for i in layers):
        raise ConfigError(f"adapter.layers={a.layers!r}: layer indices (0, 1, ...), or () "
                          "for every layer")
    return AdapterSettings(a.kind, a.rank, float(a.alpha), a.use_rslora, a.dropout, targets,
                           layers, a.init_from, c.export.merge_adapters, a.quantize_base,
                           a.quantize_block)


def parse_sources(spec: Any, field: str, format: str) -> tuple[SourceConfig, ...]:
    """A path, "a@0.7,b@0.3", or a list of dicts (name, paths, weight, format)."""
    if not spec:
        return ()
    if isinstance(spec, str):
        sources = []
        for entry in (e.strip() for e in spec.split(",") if e.strip()):
            path, _, weight = entry.partition("@")
            try:
                weight_value = float(weight) if weight else 1.0
            except ValueError:
                raise ConfigError(f"{field}: weight {weight!r} of {path!r} is not a number")
            name = os.path.splitext(os.path.basename(path))[0] or path
            sources.append(SourceConfig(name, path, format, weight_value))
    else:
        sources = [SourceConfig(s["name"], tuple(s["paths"]) if isinstance(s["paths"], list)
                                else s["paths"], s.get("format", format), s.get("weight", 1.0))
                   for s in spec]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        sources = [dataclasses.replace(s, name=f"{s.name}_{i}") for i, s in enumerate(sources)]
    for source in sources:
        try:
            expand_paths(source.paths)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{field}: {e}") from None
    return tuple(sources)


def _choice(value: Any, allowed: tuple, key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, allowed))}")


def optimizer_hparams(c: ml_collections.ConfigDict) -> dict[str, Any]:
    hparams = {k: c.optimizer[k] for k in COMMON_HPARAMS if c.optimizer[k] is not None}
    for item in (i.strip() for i in c.optimizer.extra.split(",") if i.strip()):
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"optimizer.extra: {item!r} is not name=value")
        try:
            hparams[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ConfigError(f"optimizer.extra: {name.strip()}={value.strip()!r} is not a "
                              "Python literal") from None
    return hparams


def optimizer_config(c: ml_collections.ConfigDict) -> OptimizerConfig:
    """The optimizer and its schedule, checked against the optax factory (raises
    OptimizerConfigError / ValueError; resolve words them as ConfigErrors)."""
    warmup_ratio = None  # warmup_steps wins when both are set
    if not c.schedule.warmup_steps and c.schedule.warmup_ratio:
        warmup_ratio = c.schedule.warmup_ratio
    schedule = ScheduleConfig(c.schedule.name, c.schedule.warmup_steps, warmup_ratio,
                              c.schedule.end_ratio, c.schedule.decay_ratio)
    return OptimizerConfig(c.optimizer.name, c.optimizer.learning_rate, optimizer_hparams(c),
                           c.optimizer.grad_clip_norm or None, schedule,
                           c.optimizer.decay_norms_and_biases)


def resolve(c: ml_collections.ConfigDict, device_count: int, process_count: int = 1
            ) -> Settings:
    """Validates the whole config; raises ConfigError with a one-line explanation."""
    if not c.model.hf_path and not c.model.init.vocab_size:
        raise ConfigError("set model.hf_path (a local HF folder) or model.init")
    if c.model.hf_path and not os.path.isfile(os.path.join(c.model.hf_path, "config.json")):
        raise ConfigError(f"model.hf_path={c.model.hf_path!r}: no config.json there")
    if c.model.hf_path:
        try:
            check_weights(c.model.hf_path, require=False)
        except CheckpointError as e:
            raise ConfigError(f"model.hf_path: {e}") from None
    _choice(c.model.remat, REMAT_POLICIES, "model.remat")
    _choice(c.model.attention, ATTENTION, "model.attention")
    if c.train.profile_steps and not re.fullmatch(r"\d+,\d+", c.train.profile_steps):
        raise ConfigError(f"train.profile_steps={c.train.profile_steps!r}: expected "
                          "'first,last', e.g. '10,12'")
    for key in ("dtype", "param_dtype"):
        _choice(c.model[key], ("float32", "bfloat16", "float16"), f"model.{key}")
    tokenizer_path = c.tokenizer.path or c.model.hf_path
    if not tokenizer_path or not os.path.isdir(tokenizer_path):
        raise ConfigError(f"tokenizer.path={tokenizer_path!r} is not a folder (a local HF "
                          "tokenizer is needed)")
    if not any(os.path.isfile(os.path.join(tokenizer_path, name)) for name in TOKENIZER_FILES):
        raise ConfigError(f"tokenizer.path={tokenizer_path!r} holds no tokenizer (none of "
                          f"{', '.join(TOKENIZER_FILES)}); point tokenizer.path at the "
                          "folder that has them")
    if c.tokenizer.chat_template and not os.path.isfile(c.tokenizer.chat_template):
        raise ConfigError(f"tokenizer.chat_template={c.tokenizer.chat_template!r}: no such file")
    _choice(c.data.format, ("auto",) + FORMATS, "data.format")
    _choice(c.data.packing, PACKING, "data.packing")
    _choice(c.data.truncation, OVERLONG, "data.truncation")
    _choice(c.data.train_on, TRAIN_ON, "data.train_on")
    _choice(c.data.on_invalid, ("error", "skip"), "data.on_invalid")
    _choice(c.train.loss_normalization, NORMALIZATIONS, "train.loss_normalization")
    _choice(c.schedule.name, SCHEDULES, "schedule.name")
    _choice(c.train.on_divergence, ("stop", "warn", "off"), "train.on_divergence")
    if c.logging.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb_project is set but wandb is not installed: "
                          "pip install 'coach_jax[wandb]'")
    if not c.data.train:
        raise ConfigError("data.train is empty: name the training data")
    train_sources = parse_sources(c.data.train, "data.train", c.data.format)
    eval_sources = parse_sources(c.data.eval, "data.eval", c.data.format)
    if c.data.eval_split:
        if eval_sources:
            raise ConfigError("data.eval_split and data.eval both name the held-out set: set "
                              "one of them")
        try:
            train_sources, eval_sources = with_eval_split(train_sources, c.data.eval_split,
                                                          c.data.seed)
        except PipelineError as e:
            raise ConfigError(str(e)) from None
    if len(train_sources) > 1 and not c.train.steps:
        raise ConfigError("a mixture of several training sources needs train.steps")
    if c.data.max_seq_len < 2:
        raise ConfigError(f"data.max_seq_len={c.data.max_seq_len} is too small")
    positions, where = _model_positions(c)
    if positions and c.data.max_seq_len > positions:
        raise ConfigError(f"data.max_seq_len={c.data.max_seq_len} is longer than the model's "
                          f"max_position_embeddings={positions} ({where}): lower "
                          "data.max_seq_len")
    eval_config = _eval_config(c, eval_sources)

    mesh_shape = mesh_dims(c.mesh, device_count)
    data_shards = mesh_shape.data_shards
    batch, micro = c.train.global_batch_size, c.train.micro_batches
    if micro < 1:
        raise ConfigError(f"train.micro_batches={micro} must be at least 1")
    if batch % (micro * data_shards):
        raise ConfigError(
            f"train.global_batch_size={batch} is not divisible by train.micro_batches="
            f"{micro} x data shards={data_shards} (mesh.data x mesh.fsdp x mesh.expert = "
            f"{mesh_shape.data} x {mesh_shape.fsdp} x {mesh_shape.expert}); use a multiple of "
            f"{micro * data_shards}")
    if batch % process_count:
        raise ConfigError(f"train.global_batch_size={batch} is not divisible by the "
                          f"{process_count} processes")

    try:
        optimizer = optimizer_config(c)
        rules = tuple((pattern, FROZEN) for pattern in c.train.freeze)
        for item in c.train.lr_multipliers:
            pattern, sep, multiplier = item.rpartition("=")
            try:
                rules += ((pattern, float(multiplier)),)
            except ValueError:
                sep = ""
            if not sep or not pattern:
                raise ConfigError(f"train.lr_multipliers: {item!r} is not 'regex=multiplier', "
                                  "e.g. 'embed_tokens=0.1'")
        groups = ParamGroups(rules, None if c.train.trainable_last_layers < 0
                             else c.train.trainable_last_layers)
        for key in ("router_aux_loss", "router_z_loss"):
            if c.train[key] is not None and c.train[key] < 0:
                raise ConfigError(f"train.{key}={c.train[key]} must be >= 0")
        loss = LossConfig(c.train.loss_normalization, c.train.z_loss, c.train.label_smoothing,
                          c.train.chunk_tokens, c.train.router_aux_loss, c.train.router_z_loss)
    except optimizers.UnknownHparamsError as e:
        raise ConfigError(f"optimizer {e.name!r} does not accept {', '.join(e.unknown)}; "
                          f"it accepts: {', '.join(e.accepted)}") from None
    except optimizers.OptimizerConfigError as e:
        raise ConfigError(f"optimizer.name: {e}") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    encode = EncodeOptions(c.data.max_seq_len, c.data.truncation, c.data.train_on,
                           c.data.on_invalid, end_of_turn=c.data.end_of_turn)
    cache_dir = c.data.cache_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "coach_jax",
        "encoded")
    profile = tuple(int(x) for x in c.train.profile_steps.split(",")) if (
        c.train.profile_steps) else None
    return Settings(
        model=ModelSpec(c.model.hf_path, tuple(sorted(c.model.init.items())), c.model.dtype,
                        c.model.param_dtype, c.model.remat, c.model.attention,
                        c.model.scan_layers, c.model.vocab_multiple),
        tokenizer_path=tokenizer_path, chat_template=c.tokenizer.chat_template or None,
        data=DataSettings(train_sources, eval_sources, encode, c.data.packing,
                          c.data.num_packing_bins, c.data.max_drop_fraction, c.data.epochs,
                          c.data.seed, c.data.workers, cache_dir, c.data.eval_split),
        train=TrainSettings(c.train.steps, batch, micro, c.train.log_every, c.train.eval_every,
                            c.train.seed, loss, groups, profile, c.train.on_divergence),
        optimizer=optimizer, mesh_shape=mesh_shape,
        memory=MemorySettings(c.memory.check, c.memory.device_bytes, c.memory.headroom),
        checkpoint=CheckpointSettings(c.checkpoint.every_steps, c.checkpoint.keep,
                                      c.checkpoint.init_from,
                                      c.checkpoint.allow_config_change),
        eval=eval_config,
        export=ExportSettings(c.export.hf, c.export.dtype or None),
        logging=LoggingSettings(c.logging.wandb_project, c.logging.wandb_entity,
                                c.logging.wandb_run_name, tuple(c.logging.wandb_tags)),
        adapter=_adapter_settings(c))


def _model_positions(c: ml_collections.ConfigDict) -> tuple[int | None, str]:
    """The positions the model was built for, and where that number comes from."""
    if not c.model.hf_path:
        return c.model.init.get("max_position_embeddings"), "model.init"
    path = os.path.join(c.model.hf_path, "config.json")
    with open(path) as f:
        hf = json.load(f)
    hf = hf.get("text_config", hf)  # multimodal folders keep the decoder's config inside
    return hf.get("max_position_embeddings"), path


def _eval_config(c: ml_collections.ConfigDict, eval_sources: tuple[SourceConfig, ...]
                 ) -> EvalConfig:
    """Checks the eval section; the behaviour sources default to data.eval."""
    e = c.eval
    _choice(e.on_forgetting_budget, ON_BUDGET, "eval.on_forgetting_budget")
    prompt_sources = ()
    if e.generate_examples < 0 or e.max_new_tokens < 1 or e.temperature < 0:
        raise ConfigError("eval.generate_examples must be >= 0, eval.max_new_tokens >= 1 and "
                          "eval.temperature >= 0")
    if e.generate_examples:
        prompt_sources = (parse_sources(e.prompts, "eval.prompts", c.data.format)
                          if e.prompts else eval_sources)
        if not prompt_sources:
            raise ConfigError("eval.generate_examples needs conversations with reference "
                              "answers: set eval.prompts or data.eval")
    if e.json_schema and not os.path.isfile(e.json_schema):
        raise ConfigError(f"eval.json_schema={e.json_schema!r}: no such file")
    reference = None
    if e.reference:
        found = parse_sources(e.reference, "eval.reference", "auto")
        if len(found) != 1:
            raise ConfigError("eval.reference names one source (no mixture)")
        reference = found[0]
    if e.forgetting_budget < 0:
        raise ConfigError(f"eval.forgetting_budget={e.forgetting_budget} must be >= 0")
    if e.forgetting_budget and reference is None:
        raise ConfigError("eval.forgetting_budget needs eval.reference (the set forgetting "
                          "is measured on)")
    return EvalConfig(
        max_batches=e.max_batches, at_start=e.at_start, prompt_sources=prompt_sources,
        generate_examples=e.generate_examples, max_new_tokens=e.max_new_tokens,
        temperature=e.temperature, generate_batch_size=e.generate_batch_size,
        json_schema=e.json_schema, fact_fields=tuple(e.fact_fields), reference=reference,
        reference_max_batches=e.reference_max_batches,
        forgetting_budget=e.forgetting_budget, on_forgetting_budget=e.on_forgetting_budget,
        seed=c.train.seed, chunk_tokens=c.train.chunk_tokens,
        end_of_turn=c.data.end_of_turn)


class MeshShape(NamedTuple):
    """Devices along each mesh axis (parallel.AXES order)."""

    data: int
    fsdp: int
    expert: int
    tensor: int

    @property
    def data_shards(self) -> int:
        """How many ways a batch's rows are split (parallel.data_shards of the mesh)."""
        return self.data * self.fsdp * self.expert


def mesh_dims(mesh: ml_collections.ConfigDict, device_count: int) -> MeshShape:
    """The `mesh` section's sizes with one -1 filled by the devices left over."""
    names = MeshShape._fields
    dims = [int(mesh.get(name, 1)) for name in names]
    keys = " x ".join(f"mesh.{name}" for name in names)
    if dims.count(-1) > 1:
        raise ConfigError(f"at most one of {', '.join('mesh.' + n for n in names)} may be -1")
    known = 1
    for name, d in zip(names, dims):
        if d != -1:
            if d < 1:
                raise ConfigError(f"mesh.{name}={d}: mesh sizes must be positive or -1")
            known *= d
    if -1 in dims:
        if device_count % known:
            raise ConfigError(f"{device_count} devices do not divide into {keys} = "
                              f"{' x '.join(map(str, dims))}")
        dims[dims.index(-1)] = device_count // known
    if math.prod(dims) != device_count:
        raise ConfigError(f"{keys} = {' x '.join(map(str, dims))} needs {math.prod(dims)} "
                          f"devices; {device_count} are available")
    return MeshShape(*dims)


def flat_config(c: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as flat JSON values ("data.max_seq_len": 256): checkpoint metadata, and
    the keys' defaults."""
    def walk(prefix: str, tree: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from walk(f"{prefix}{key}.", value)
            else:
                yield f"{prefix}{key}", value
    return dict(walk("", json.loads(c.to_json_best_effort())))


def optional_keys() -> tuple[str, ...]:
    """Keys whose default is None: the ones `--config.<key>=None` may set back to None."""
    return tuple(k for k, v in flat_config(base_config()).items() if v is None)


def load_saved(path: str) -> ml_collections.ConfigDict:
    """A run's DIR/config.json as a locked config over today's keys (lists become tuples
    where the key holds a tuple); a key that no longer exists is a ConfigError."""
    with open(path) as f:
        saved = json.load(f)
    c = base_config()

    def fill(node: ml_collections.ConfigDict, values: dict[str, Any], prefix: str) -> None:
        for key, value in values.items():
            name = f"{prefix}{key}"
            if key not in node:
                raise ConfigError(f"{path}: {name} is not a config key (written by another "
                                  "version?); remove it from the file")
            if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
                fill(node[key], value, f"{name}.")
                continue
            if isinstance(node[key], tuple) and isinstance(value, list):
                value = tuple(value)
            try:
                setattr(node, key, value)
            except TypeError as e:
                raise ConfigError(f"{path}: {name}={value!r}: {e}") from None
    fill(c, saved, "")
    c.lock()
    return c


def lora_config(hf_path: str, *, learning_rate: float = 2e-4, rank: int = 16,
                alpha: float = 32.0, quantize_base: str = "none", **finetune: Any
                ) -> ml_collections.ConfigDict:
    """`finetune_config` with LoRA on every projection (the common recipe: rank 16, alpha
    32, learning rate 2e-4), on a base held as `quantize_base` (QLoRA: "nf4", blocks of
    64; "mxfp4", blocks of 32); docs/adapters.md."""
    c = finetune_config(hf_path, learning_rate=learning_rate, **finetune)
    c.adapter.kind = "lora"
    c.adapter.rank = rank
    c.adapter.alpha = alpha
    c.adapter.targets = "all-linear"
    c.adapter.quantize_base = quantize_base
    if quantize_base == "mxfp4":
        c.adapter.quantize_block = 32
    return c


def finetune_config(hf_path: str, *, learning_rate: float, max_seq_len: int = 2048,
                    global_batch_size: int = 32, micro_batches: int = 1,
                    big_model: bool = False) -> ml_collections.ConfigDict:
    """The shared recipe for fine-tuning a pretrained checkpoint on an accelerator; the
    configs/<model>.py files differ only in what they pass here. `big_model`: weights held
    in bf16 and every layer recomputed in the backward pass (model.param_dtype,
    model.remat), for models that fill a device."""
    c = base_config()
    c.model.hf_path = hf_path
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16" if big_model else "float32"
    if big_model:
        c.model.remat = "full"
    c.train.micro_batches = micro_batches
    c.model.vocab_multiple = 128
    c.data.train = "data/train.jsonl"
    c.data.max_seq_len = max_seq_len
    c.data.epochs = 2
    c.train.global_batch_size = global_batch_size
    c.train.log_every = 10
    c.train.eval_every = 200
    c.optimizer.learning_rate = learning_rate
    c.optimizer.weight_decay = 0.0
    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_ratio = 0.03
    c.schedule.end_ratio = 0.1
    c.checkpoint.every_steps = 200
    return c
