"""Masks on every real chat template in ../shared/realworld (templates and templates-more),
checked by rules that do not come from the encoder (template_survey.violations): the ids are
those of the real rendering, each assistant turn is one supervised run holding its content
whole, nothing of system, user or tool text is supervised, no role header is, and what is
supervised besides the content is the template's end-of-turn marker or text the template
writes inside the turn (listed per template in tests/data/template_masks.json, reviewed by
hand: an empty think block, gpt-oss's channel, a recipient).

The expected status of every template is data (tests/data/template_masks.json), so a change
of status is a visible diff; regenerate with `python tests/template_survey.py --write`.
"""

import json
import os

import pytest

import template_survey
from coach_jax import config as config_lib

with open(template_survey.EXPECTED) as f:
    EXPECTED = json.load(f)
CONVERSATIONS = {"plain": (template_survey.PLAIN, None),
                 "tools": (template_survey.WITH_TOOLS, template_survey.TOOLS)}


def _path(realworld: str, name: str) -> str:
    folder = "templates-more" if "__" in name else "templates"
    return os.path.join(realworld, folder, f"{name}.jinja")


def test_every_template_has_an_expected_status(realworld):
    names = {template_survey.name_of(p) for p in template_survey.template_files(realworld)}
    assert names == set(EXPECTED)


@pytest.mark.parametrize("base", ["neox", "mistral"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_masks(realworld, name, base):
    expected = EXPECTED[name]
    for kind, (messages, tools) in CONVERSATIONS.items():
        if base == "mistral" and kind == "tools":
            continue  # one conversation is enough for the second vocabulary
        result = template_survey.survey_one(_path(realworld, name), base, messages, tools)
        status = result["status"] + (f": {result['reason']}" if "reason" in result else "")
        assert status == expected[kind], (kind, status)
        if status == "ok":
            assert template_survey.violations(
                result["tokenizer"], result["encoded"], result["messages"], result["rendered"],
                expected["inserted"], expected["ends"]) == [], kind


def test_targets_are_met():
    """0 silently wrong (above), at least 90% of renderable templates ok, and every refusal
    one line that names a config key that exists."""
    plain = [e["plain"] for e in EXPECTED.values() if e["plain"] != "unrenderable"]
    assert sum(s == "ok" for s in plain) >= 0.9 * len(plain)
    keys = config_lib.base_config()
    for entry in EXPECTED.values():
        for status in (entry["plain"], entry["tools"]):
            if status.startswith("refused"):
                assert "\n" not in status
                named = [k for k in ("data.end_of_turn", "tokenizer.chat_template",
                                     "tokenizer.path") if k in status]
                assert named, status
                for key in named:
                    section, field = key.split(".")
                    assert field in keys[section]


def test_tool_calls_are_covered(realworld):
    """Templates that render OpenAI tool calls: the call is supervised, the result is not
    (checked in test_template_masks); nearly all of them give a mask."""
    tools = [e["tools"] for e in EXPECTED.values()
             if e["tools"] not in ("unrenderable", "no tool calls")]
    assert len(tools) >= 50 and sum(s == "ok" for s in tools) >= 0.9 * len(tools)


def test_the_rules_catch_a_supervised_header(realworld):
    """Negative control: the mask the encoder gave before step 11 for a template that ignores
    add_generation_prompt (the header trained) breaks the rules."""
    name = "vllm__tool_chat_template_toolace"
    result = template_survey.survey_one(_path(realworld, name), "neox", template_survey.PLAIN)
    tokenizer, encoded = result["tokenizer"], dict(result["encoded"])
    ids, mask = encoded["input_ids"], encoded["loss_mask"].copy()
    first = int(mask.nonzero()[0][0])
    opener = tokenizer.convert_tokens_to_ids("<|start_header_id|>")
    header_at = max(i for i in range(first) if ids[i] == opener)
    assert tokenizer.decode(ids[header_at:first].tolist()) == \
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    mask[header_at:first] = 1
    problems = template_survey.violations(
        tokenizer, {"input_ids": ids, "loss_mask": mask}, result["messages"],
        result["rendered"], EXPECTED[name]["inserted"], EXPECTED[name]["ends"])
    assert any("supervised before the content" in p for p in problems), problems


def test_the_rules_catch_a_trained_prompt_newline(realworld):
    """Negative control: Gemma 4's generation prompt ends `<|turn>model\\n...`; training the
    newline after `model` breaks the rules (the mask the encoder gave before review)."""
    name = "vllm__tool_chat_template_gemma4"
    result = template_survey.survey_one(_path(realworld, name), "neox", template_survey.PLAIN)
    tokenizer, ids = result["tokenizer"], result["encoded"]["input_ids"]
    mask = result["encoded"]["loss_mask"].copy()
    starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]
    assert tokenizer.decode(ids[starts[-1] - 1:starts[-1]].tolist()) == "\n"
    mask[starts[-1] - 1] = 1
    problems = template_survey.violations(
        tokenizer, {"input_ids": ids, "loss_mask": mask}, result["messages"],
        result["rendered"], EXPECTED[name]["inserted"], EXPECTED[name]["ends"])
    assert any("generation prompt is trained" in p for p in problems), problems
