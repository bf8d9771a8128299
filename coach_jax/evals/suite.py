"""Every eval a run asks for, on given parameters: held-out loss (token-exact, per source),
behaviour on held-out prompts, and forgetting against the base model.

Built once by the Trainer; `measure(params)` returns the metrics for metrics.jsonl and the
generations, which the Trainer writes to DIR/generations/step_<N>.jsonl for the report.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterable

import jax

from coach_jax import parallel, sampling
from coach_jax.data.errors import DataError
from coach_jax.data.pipeline import SourceConfig
from coach_jax.evals import behaviour
from coach_jax.evals.forgetting import ForgettingMonitor
from coach_jax.models.config import ModelConfig
from coach_jax.models.decoder import Params
from coach_jax.train.evaluation import eval_totals, summarize
from coach_jax.train.loss import CHUNK_TOKENS

Batches = Callable[[], Iterable[dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The eval section of a run (see config.base_config for each key)."""

    max_batches: int = 0  # held-out batches per source per eval; 0 = all
    at_start: bool = True
    prompt_sources: tuple[SourceConfig, ...] = ()  # behaviour: conversations to answer
    generate_examples: int = 0
    max_new_tokens: int = 128
    temperature: float = 0.0
    generate_batch_size: int = 32
    json_schema: str = ""
    fact_fields: tuple[str, ...] = ()
    reference: SourceConfig | None = None  # forgetting: the general reference set
    reference_max_batches: int = 0
    forgetting_budget: float = 0.0
    on_forgetting_budget: str = "warn"
    seed: int = 0  # sampling seed
    chunk_tokens: int = CHUNK_TOKENS  # the forgetting monitor's LM head chunk
    end_of_turn: str = ""  # the run's data.end_of_turn


class EvalSuite:
    """The evals of one run; see the module docstring. `held_out` and `reference` give a
    fresh pass over their batches (global arrays) each time they are called."""

    def __init__(self, config: EvalConfig, model_cfg: ModelConfig, tokenizer: Any,
                 eval_step: Callable, held_out: dict[str, Batches],
                 reference: Batches | None = None, base_params: Params | None = None,
                 mesh: jax.sharding.Mesh | None = None):
        self.config = config
        self.model_cfg, self.tokenizer, self.eval_step = model_cfg, tokenizer, eval_step
        self.held_out = held_out
        self.cases = {}
        for source in config.prompt_sources:
            cases = behaviour.load_cases(source.paths, source.format, config.generate_examples,
                                         source.split)
            if not cases:
                raise DataError(None, f"eval prompts {source.paths}: no conversation ends with "
                                      "an assistant turn to compare generations with")
            self.cases[source.name] = cases
        self.validator = behaviour.load_schema(config.json_schema) if config.json_schema else None
        self.sampling = sampling.SamplingConfig(max_new_tokens=config.max_new_tokens,
                                                temperature=config.temperature, seed=config.seed)
        self.mesh = mesh
        # Encoded once: the same prompts are generated for at every eval.
        self.prompts = {name: [sampling.prompt_ids(tokenizer, c.prompt, config.end_of_turn)
                               for c in cases] for name, cases in self.cases.items()}
        self.stop_ids = sampling.stop_token_ids(tokenizer, config.end_of_turn)
        self.forgetting = None
        if reference is not None:
            self.forgetting = ForgettingMonitor(model_cfg, base_params, reference,
                                                config.chunk_tokens, config.forgetting_budget)

    @property
    def enabled(self) -> bool:
        return bool(self.held_out or self.cases or self.forgetting)

    def held_out_loss(self, params: Params) -> dict[str, float]:
        totals = {name: eval_totals(self.eval_step, params, batches())
                  for name, batches in self.held_out.items()}
        return summarize({k: v for k, v in totals.items() if v is not None})

    def behaviour(self, params: Params) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """`behaviour/<source>/<metric>` and one record per generation."""
        metrics, generations = {}, []
        for name, cases in self.cases.items():
            completions = sampling.generate_tokens(self.model_cfg, params, self.prompts[name],
                                                   self.stop_ids, self.sampling,
                                                   self.config.generate_batch_size, self.mesh)
            outputs = [sampling.completion_text(self.tokenizer, c) for c in completions]
            scores = behaviour.score(outputs, [c.reference for c in cases], self.validator,
                                     self.config.fact_fields)
            metrics.update({f"behaviour/{name}/{k}": v for k, v in scores.items()})
            for case, output, completion in zip(cases, outputs, completions):
                generations.append({"source": name, "origin": case.origin,
                                    "prompt": case.prompt.messages[-1].content,
                                    "reference": case.reference, "output": output,
                                    "finish_reason": completion.finish_reason})
        return metrics, generations

    def measure(self, params: Params) -> tuple[dict[str, float], list[dict[str, Any]]]:
        metrics = self.held_out_loss(params)
        generations = []
        if self.cases:
            found, generations = self.behaviour(params)
            metrics.update(found)
        if self.forgetting is not None:
            metrics.update({f"forgetting/{k}": v
                            for k, v in self.forgetting.measure(params).items()})
        return metrics, generations

    def over_budget(self, metrics: dict[str, float]) -> bool:
        return self.forgetting is not None and self.forgetting.over_budget(
            metrics["forgetting/reference_loss_delta"])


def global_batches(pipeline: Iterable[dict], sharding: Any, limit: int) -> Batches:
    """A fresh pass over `pipeline` (at most `limit` batches; 0 = all) as global arrays."""
    def batches():
        for batch in itertools.islice(pipeline, limit or None):
            yield parallel.global_batch(batch, sharding)
    return batches

