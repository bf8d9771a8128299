"""Behaviour scores against hand counts: JSON parsing, schema validation, matches, fields."""

import json
import os

import pytest

from coach_jax import data
from coach_jax.evals import behaviour

SCHEMA = os.path.join(os.path.dirname(__file__), "..", "assets", "lab", "brief_schema.json")
GOOD = {"name": "Kalolo Labs", "kind": "company", "category": "agriculture",
        "location": "Karsk", "year": 1930}
REFERENCE = json.dumps(GOOD)

# (output, parses as JSON, valid against the schema, fields right out of 5)
FIXTURE = [
    (REFERENCE, True, True, 5),
    ("```json\n" + json.dumps(GOOD, indent=2) + "\n```", True, True, 5),
    (json.dumps({**GOOD, "year": 1931}), True, True, 4),
    (json.dumps({k: v for k, v in GOOD.items() if k != "location"}), True, False, 4),
    (json.dumps({**GOOD, "kind": "city"}), True, False, 4),  # not in the enum
    (json.dumps({**GOOD, "ceo": "Ann"}), True, False, 5),  # additionalProperties: false
    (json.dumps({**GOOD, "year": "1930"}), True, False, 4),  # a string, not an integer
    (json.dumps([GOOD]), True, False, 0),  # an array
    (REFERENCE[:-8], False, False, 0),  # truncated
    ("Here is the brief: " + REFERENCE, False, False, 0),  # prose around it
    ("", False, False, 0),
    ("{'name': 'Kalolo Labs'}", False, False, 0),  # Python, not JSON
]


def test_json_and_schema_shares_count_the_fixture():
    outputs = [row[0] for row in FIXTURE]
    scores = behaviour.score(outputs, [REFERENCE] * len(outputs), behaviour.load_schema(SCHEMA))
    n = len(FIXTURE)
    assert scores["json_parses"] == pytest.approx(sum(row[1] for row in FIXTURE) / n)  # 8/12
    assert scores["schema_valid"] == pytest.approx(sum(row[2] for row in FIXTURE) / n)  # 3/12
    assert scores["field_accuracy"] == pytest.approx(sum(row[3] for row in FIXTURE) / (5 * n))
    assert scores["exact_match"] == pytest.approx(1 / n)
    # The fenced, pretty-printed one is the same JSON value; "1930" as a string is not.
    assert scores["normalized_match"] == pytest.approx(2 / n)


def test_without_a_schema_there_is_no_schema_score():
    scores = behaviour.score(["a"], ["a"])
    assert "schema_valid" not in scores and "field_accuracy" not in scores
    assert scores["exact_match"] == 1.0 and scores["json_parses"] == 0.0


def test_normalisation_ignores_case_punctuation_and_spacing():
    assert behaviour.same_answer("  The answer:\n42. ", "the ANSWER 42")
    assert not behaviour.same_answer("42", "43")
    assert behaviour.same_answer('{"a": 1, "b": [2]}', '{ "b": [2],\n"a": 1 }')
    assert not behaviour.same_answer('{"a": 1}', '{"a": true}')


def test_schema_problems_are_named(tmp_path):
    with pytest.raises(behaviour.SchemaError, match="no such file"):
        behaviour.load_schema(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(behaviour.SchemaError, match="not JSON .line 1"):
        behaviour.load_schema(str(tmp_path / "bad.json"))
    (tmp_path / "invalid.json").write_text('{"type": 5}')
    with pytest.raises(behaviour.SchemaError, match="not a valid JSON schema"):
        behaviour.load_schema(str(tmp_path / "invalid.json"))


def test_cases_are_conversations_cut_before_their_last_answer(tmp_path):
    path = tmp_path / "eval.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]},
        {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
                      {"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}]},
        {"messages": [{"role": "user", "content": "q4"}, {"role": "assistant", "content": "a4"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cases = behaviour.load_cases(str(path), "auto", limit=2)
    assert [c.reference for c in cases] == ["a1", "a3"]
    assert [m.content for m in cases[1].prompt.messages] == ["q2", "a2", "q3"]
    assert cases[1].origin.endswith("eval.jsonl:2")
    assert isinstance(cases[0].prompt, data.Conversation)


def test_fact_accuracy_counts_only_the_recalled_fields():
    outputs = [REFERENCE, json.dumps({**GOOD, "name": "Other", "year": 1931}), "not JSON",
               json.dumps([GOOD])]
    scores = behaviour.score(outputs, [REFERENCE] * 4,
                             fact_fields=("category", "location", "year"))
    assert scores["fact_accuracy"] == pytest.approx((1 + 2 / 3 + 0 + 0) / 4)
