"""Behaviour checks on generations: exact and normalised match with reference answers, the
share that parse as JSON, the share that validate against a JSON schema, and (for JSON
object answers) the share of reference fields the generation got right.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Iterable, Sequence

from coach_jax.data.conversation import Conversation, Example
from coach_jax.data.sources import iter_examples
from coach_jax.data.splits import EvalSplit


class SchemaError(ValueError):
    """The eval.json_schema file is missing, not JSON, or not a valid schema."""


@dataclasses.dataclass(frozen=True)
class BehaviourCase:
    """A held-out conversation cut before its last assistant turn, which is the reference."""

    prompt: Conversation
    reference: str
    origin: str


def cases_from(examples: Iterable[Example | Any], limit: int) -> list[BehaviourCase]:
    """The first `limit` conversations that end with an assistant turn (other items, such
    as documents or bad records, are passed over: the held-out loss reports those)."""
    cases = []
    for example in examples:
        if len(cases) >= limit:
            break
        if not isinstance(example, Conversation) or example.messages[-1].role != "assistant":
            continue
        prompt = dataclasses.replace(example, messages=example.messages[:-1])
        cases.append(BehaviourCase(prompt, example.messages[-1].content, str(example.origin)))
    return cases


def load_cases(paths: Any, format: str, limit: int, split: EvalSplit | None = None
               ) -> list[BehaviourCase]:
    """The first `limit` cases of a source, or of its held-out part under data.eval_split."""
    if split is None:
        return cases_from(iter_examples(paths, format), limit)
    records = list(iter_examples(paths, format))  # one item per record, as the split counts
    return cases_from((records[i] for i in split.indices(len(records))), limit)


def normalize(text: str) -> str:
    """Case, punctuation and whitespace ignored: "The answer: 42." == "the answer 42"."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


_FENCE = re.compile(r"^```(?:json)?\s*\n(.*)\n```$", re.DOTALL)


def _canonical(value: Any) -> str:
    """JSON text with sorted keys: equal for equal JSON values (1 and true differ)."""
    return json.dumps(value, sort_keys=True)


def same_answer(output: str, reference: str) -> bool:
    """Normalised match: equal JSON values when both parse as JSON (formatting and key
    order ignored), else equal text after `normalize`."""
    (output_ok, output_value), (ref_ok, ref_value) = parse_json(output), parse_json(reference)
    if output_ok and ref_ok:
        return _canonical(output_value) == _canonical(ref_value)
    return normalize(output) == normalize(reference)


def parse_json(text: str) -> tuple[bool, Any]:
    """(parsed, value) for a whole output that is one JSON value (a ```json fence around
    it is allowed); anything before or after it means it does not parse."""
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1).strip()
    try:
        return True, json.loads(stripped)
    except (json.JSONDecodeError, RecursionError):
        return False, None


def load_schema(path: str) -> Any:
    """A Draft 2020-12 validator for the schema file (jsonschema: the `evals` extra)."""
    try:
        import jsonschema
    except ImportError:
        raise SchemaError("eval.json_schema needs jsonschema: pip install "
                          "'coach_jax[evals]'") from None
    try:
        with open(path) as f:
            schema = json.load(f)
    except FileNotFoundError:
        raise SchemaError(f"eval.json_schema={path!r}: no such file") from None
    except json.JSONDecodeError as e:
        raise SchemaError(f"eval.json_schema={path!r}: not JSON (line {e.lineno}: "
                          f"{e.msg})") from None
    validator_class = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
    try:
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise SchemaError(f"eval.json_schema={path!r}: not a valid JSON schema: "
                          f"{e.message}") from None
    return validator_class(schema)


def field_accuracy(output: Any, reference: Any) -> float | None:
    """The share of a JSON-object reference's fields the output has with the same value;
    None when the reference is not a JSON object."""
    if not isinstance(reference, dict) or not reference:
        return None
    if not isinstance(output, dict):
        return 0.0
    return sum(k in output and _canonical(output[k]) == _canonical(v)
               for k, v in reference.items()) / len(reference)


def score(outputs: Sequence[str], references: Sequence[str], validator: Any = None,
          fact_fields: Sequence[str] = ()) -> dict[str, float]:
    """Shares over all outputs, each in [0, 1]; `validator` from `load_schema`.
    `fact_fields`: the JSON fields that must be recalled rather than copied from the
    prompt; `fact_accuracy` is the share of them right over every output (an output that is
    not a JSON object gets none right)."""
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs for {len(references)} references")
    if not outputs:
        return {}
    n = len(outputs)
    parsed = [parse_json(o) for o in outputs]
    result = {
        "exact_match": sum(o.strip() == r.strip() for o, r in zip(outputs, references)) / n,
        "normalized_match": sum(same_answer(o, r) for o, r in zip(outputs, references)) / n,
        "json_parses": sum(ok for ok, _ in parsed) / n,
    }
    if validator is not None:
        result["schema_valid"] = sum(ok and validator.is_valid(value)
                                     for ok, value in parsed) / n
    output_values = [value if ok else None for ok, value in parsed]
    reference_values = [parse_json(r)[1] for r in references]
    fields = [field_accuracy(o, r) for o, r in zip(output_values, reference_values)]
    fields = [f for f in fields if f is not None]
    if fields:
        result["field_accuracy"] = sum(fields) / len(fields)
    if fact_fields:
        facts = [field_accuracy(o, {k: r[k] for k in fact_fields if k in r}) or 0.0
                 if isinstance(r, dict) else 0.0
                 for o, r in zip(output_values, reference_values)]
        result["fact_accuracy"] = sum(facts) / n
    return result
