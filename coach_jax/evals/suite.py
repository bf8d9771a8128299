"""Every eval a run asks for, on given parameters: held-out loss (token-exact, per source),
behaviour on held-out prompts, and forgetting against the base model.

Built once by the Trainer; `run(params)` returns the metrics for metrics.jsonl and the
generations, which the Trainer writes to DIR/generations/step_<N>.jsonl for the report.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import jax
import ml_collections

from coach_jax import parallel, sampling
from coach_jax.data.errors import DataError
from coach_jax.data.pipeline import SourceConfig
from coach_jax.evals import behaviour
from coach_jax.evals.forgetting import ForgettingMonitor
from coach_jax.models.config import ModelConfig
from coach_jax.models.decoder import Params
from coach_jax.train.evaluation import eval_totals, summarize

Batches = Callable[[], Iterable[dict[str, jax.Array]]]


class EvalSuite:
    """The evals of one run; see the module docstring."""

    def __init__(self, eval_config: ml_collections.ConfigDict, seed: int, model_cfg: ModelConfig,
                 tokenizer: Any, eval_step: Callable, held_out: dict[str, Batches],
                 prompt_sources: tuple[SourceConfig, ...] = (),
                 reference: Batches | None = None, base_params: Params | None = None,
                 chunk_tokens: int = 256, mesh: jax.sharding.Mesh | None = None,
                 end_of_turn: str = ""):
        e = eval_config
        self.model_cfg, self.tokenizer, self.eval_step = model_cfg, tokenizer, eval_step
        self.held_out = held_out
        self.cases = {}
        for source in prompt_sources:
            cases = behaviour.load_cases(source.paths, source.format, e.generate_examples)
            if not cases:
                raise DataError(None, f"eval prompts {source.paths}: no conversation ends with "
                                      "an assistant turn to compare generations with")
            self.cases[source.name] = cases
        self.validator = behaviour.load_schema(e.json_schema) if e.json_schema else None
        self.sampling = sampling.SamplingConfig(max_new_tokens=e.max_new_tokens,
                                                temperature=e.temperature, seed=seed)
        self.batch_size, self.mesh = e.generate_batch_size, mesh
        # Encoded once: the same prompts are generated for at every eval.
        self.prompts = {name: [sampling.prompt_ids(tokenizer, c.prompt, end_of_turn)
                               for c in cases] for name, cases in self.cases.items()}
        self.stop_ids = sampling.stop_token_ids(tokenizer, end_of_turn)
        self.fact_fields = tuple(e.fact_fields)
        self.forgetting = None
        if reference is not None:
            self.forgetting = ForgettingMonitor(model_cfg, base_params, reference,
                                                chunk_tokens, e.forgetting_budget)

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
                                                   self.batch_size, self.mesh)
            outputs = [sampling.completion_text(self.tokenizer, c) for c in completions]
            scores = behaviour.score(outputs, [c.reference for c in cases], self.validator,
                                     self.fact_fields)
            metrics.update({f"behaviour/{name}/{k}": v for k, v in scores.items()})
            for case, output, completion in zip(cases, outputs, completions):
                generations.append({"source": name, "origin": case.origin,
                                    "prompt": case.prompt.messages[-1].content,
                                    "reference": case.reference, "output": output,
                                    "finish_reason": completion.finish_reason})
        return metrics, generations

    def run(self, params: Params) -> tuple[dict[str, float], list[dict[str, Any]]]:
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

