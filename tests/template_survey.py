"""Every real chat template through `encode_chat`, checked against rules that do not come
from the encoder: the survey behind tests/test_template_masks.py and the table in
docs/data.md. Beyond those rules, the text the last turn's generation prompt shares with the
training rendering is never trained (training and generation agree).

Set-up (as in the step-11 trial): per template, the tokenizer a model with that template
would have (tokenizer_fixtures.template_tokenizer); a conversation of system, user,
assistant, user, assistant (no system where the template rejects one); and, where the
template renders OpenAI `tool_calls`, user, assistant tool call, tool result, assistant.

Regenerate the expected statuses after a deliberate change (then review the diff):

    python tests/template_survey.py --write
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

import numpy as np

import tokenizer_fixtures
from coach_jax import data
from coach_jax.data.template_layout import as_content_parts

REALWORLD = os.environ.get("COACH_JAX_REALWORLD") or os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "realworld")
EXPECTED = os.path.join(os.path.dirname(__file__), "data", "template_masks.json")
SYSTEM = "Answer like a pirate captain."
USERS = ("What is the capital of France?", "Tell me a joke about cats.")
ANSWERS = ("The capital of France is Paris.", "Why did the cat sit on the computer?")
PLAIN = [{"role": "system", "content": SYSTEM},
         {"role": "user", "content": USERS[0]}, {"role": "assistant", "content": ANSWERS[0]},
         {"role": "user", "content": USERS[1]}, {"role": "assistant", "content": ANSWERS[1]}]
CALL = {"type": "function", "id": "call0001",
        "function": {"name": "get_weather", "arguments": {"city": "Lyon"}}}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_RESULT = "Rain and 12 degrees."
TOOL_ANSWER = "It rains in Lyon at 12 degrees."
WITH_TOOLS = [{"role": "user", "content": "How is the weather in Lyon right now?"},
              {"role": "assistant", "content": "", "tool_calls": [CALL]},
              {"role": "tool", "content": TOOL_RESULT, "tool_call_id": "call0001",
               "name": "get_weather"},
              {"role": "assistant", "content": TOOL_ANSWER}]
# Words of role headers; none may be supervised outside assistant text.
ROLE_WORDS = re.compile(r"user|assistant|system|model|human|bot|gpt|助手|用户|问|答",
                        re.IGNORECASE)


def template_files(realworld: str = REALWORLD) -> list[str]:
    return sorted(glob.glob(os.path.join(realworld, "templates", "*.jinja"))
                  + glob.glob(os.path.join(realworld, "templates-more", "*.jinja")))


def name_of(path: str) -> str:
    return os.path.basename(path).removesuffix(".jinja")


def supervised_runs(tokenizer, ids: np.ndarray, mask: np.ndarray
                    ) -> list[tuple[str, str]]:
    """(decoded run, decoded run plus the token after it) of each maximal supervised run."""
    return [(tokenizer.decode(ids[a:b].tolist()), tokenizer.decode(ids[a:b + 1].tolist()))
            for a, b in _run_bounds(mask)]


def _run_bounds(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def _renders(tokenizer, messages, tools=None) -> str | None:
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    except Exception:  # noqa: BLE001 - any template error means "not renderable"
        return None
    return text


def renderable(tokenizer, messages, tools=None, parts=False):
    """The messages (without a system message if the template rejects one), or None where
    the template cannot render the conversation's text."""
    for candidate in (messages, [m for m in messages if m["role"] != "system"]):
        form = as_content_parts(candidate) if parts else candidate
        text = _renders(tokenizer, form, tools)
        if text is not None and all(m["content"] in text for m in candidate
                                    if m["content"] and m["role"] != "system"):
            return candidate
    return None


def _generation_prompt(tokenizer, messages) -> str | None:
    for form in (messages, as_content_parts(messages)):
        try:
            return tokenizer.apply_chat_template(form, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001
            continue
    return None


def _prompt_is_trained(tokenizer, encoded, messages, rendered: str) -> list[str]:
    """Training and generation agree: what the last turn's generation prompt shares with the
    training rendering after the previous message is context, never trained (a token that
    also holds the first character after it may be)."""
    k = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = _generation_prompt(tokenizer, messages[:k])
    previous = messages[k - 1]["content"]
    if prompt is None or not previous or previous not in rendered:
        return []
    lo, hi = rendered.rindex(previous) + len(previous), len(os.path.commonprefix([prompt,
                                                                                   rendered]))
    offsets = tokenizer(rendered, add_special_tokens=False,
                        return_offsets_mapping=True)["offset_mapping"]
    trained = [rendered[a:b] or "(space)" for (a, b), on in zip(offsets, encoded["loss_mask"])
               if on and lo <= a and (b <= hi if b > a else lo < b <= hi)]
    return [f"the generation prompt is trained: {trained!r}"] if trained else []


def violations(tokenizer, encoded, messages, rendered: str, inserted: list[str],
               ends: list[str]) -> list[str]:
    """What is wrong with a mask, by rules independent of the encoder."""
    problems = []
    ids, mask = encoded["input_ids"], encoded["loss_mask"]
    # As decoding shows them (SentencePiece-style vocabularies show `▁` as a space).
    inserted, ends = ([tokenizer.decode(tokenizer.encode(t, add_special_tokens=False))
                       for t in texts] for texts in (inserted, ends))
    if ids.tolist() != tokenizer(rendered, add_special_tokens=False)["input_ids"]:
        problems.append("ids are not the tokenization of the rendering")
    runs = supervised_runs(tokenizer, ids, mask)
    turns = [m for m in messages if m["role"] == "assistant"]
    if len(runs) != len(turns):
        return problems + [f"{len(runs)} supervised runs for {len(turns)} assistant turns: "
                           f"{[r for r, _ in runs]}"]
    turn_at = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    for (a, _), k in zip(_run_bounds(mask), turn_at):
        # Whitespace the generation prompt ends with is context: no token of only that
        # whitespace is trained.
        prompt = _generation_prompt(tokenizer, messages[:k])
        space = prompt[len(prompt.rstrip()):] if prompt is not None else ""
        # Decoded in context: a lone SentencePiece token decodes without its space.
        before = tokenizer.decode(ids[:a].tolist())
        run = tokenizer.decode(ids.tolist())[len(before):]
        first = tokenizer.decode(ids[:a + 1].tolist())[len(before):]
        context = before[len(before.rstrip()):]
        junction = context + run[:len(run) - len(run.lstrip())]
        # (A token holding the content's first character is trained whatever it holds.)
        if (not first.strip()
                and len(context) < len(os.path.commonprefix([junction, space]))):
            problems.append("whitespace of the generation prompt is supervised: "
                            f"{tokenizer.decode(ids[a:a + 3].tolist())!r}")
    problems += _prompt_is_trained(tokenizer, encoded, messages, rendered)
    others = [m["content"] for m in messages if m["role"] != "assistant" and m["content"]]
    for (run, run_plus_one), turn in zip(runs, turns):
        if any(text in run for text in others):
            problems.append(f"system/user/tool text supervised: {run!r}")
        own = turn["content"] or turn["tool_calls"][0]["function"]["arguments"]["city"]
        # The one token that spans the content's end and the next header may be left out.
        whole = run if own in run else run_plus_one
        if own not in whole:
            problems.append(f"content not supervised whole: {run!r}")
            continue
        if not turn["content"]:  # a tool call: its syntax is the assistant's own text
            rest = run.replace(turn["tool_calls"][0]["function"]["name"], "")
            if re.search(r"user|assistant|system|model|human", rest, re.IGNORECASE):
                problems.append(f"a header is supervised with the tool call: {run!r}")
            continue
        before, after = whole.split(own, 1)
        if before.strip() and before.strip() not in {i.strip() for i in inserted}:
            problems.append(f"supervised before the content: {before!r}")
        for text in inserted:
            before = before.replace(text, "")
        if ROLE_WORDS.search(before):
            problems.append(f"a role header is supervised: {before!r}")
        if after.strip() and after.strip() not in {e.strip() for e in ends}:
            # A text marker may lose its last token to the next header (`<_end` of `<_end>
            # <_user>`, where `><` is one token): the one token spanning the span's end.
            after_plus = run_plus_one.split(own, 1)[1].strip()
            if not any(e.strip().startswith(after.strip()) and after_plus.startswith(e.strip())
                       for e in ends):
                problems.append(f"supervised after the content: {after!r}")
        for text in ends:
            after = after.replace(text, "")
        if ROLE_WORDS.search(after):
            problems.append(f"a role header is supervised after the content: {after!r}")
    return problems


def survey_one(path: str, base: str, messages, tools=None) -> dict:
    tokenizer = tokenizer_fixtures.template_tokenizer(path, base)
    usable = renderable(tokenizer, messages, tools) or renderable(tokenizer, messages, tools,
                                                                  parts=True)
    if usable is None:
        return {"status": "unrenderable"}
    if tools and not ("get_weather" in _renders(tokenizer, usable, tools).split(
            usable[0]["content"])[-1]):
        return {"status": "no tool calls"}
    try:
        encoded = data.encode_chat(tokenizer, usable, tools)
    except data.EncodingError as e:
        return {"status": "refused", "reason": e.problem}
    layout = data.template_layout(tokenizer)
    rendered = tokenizer.apply_chat_template(layout.for_template(usable), tools=tools,
                                             tokenize=False)
    runs = [r for r, _ in supervised_runs(tokenizer, encoded["input_ids"],
                                          encoded["loss_mask"])]
    return {"status": "ok", "runs": runs, "encoded": encoded, "messages": usable,
            "rendered": rendered, "tokenizer": tokenizer, "layout": layout}


def _inserted(runs: list[str], messages) -> list[str]:
    """What each run holds before its content (for review when writing the expectations)."""
    texts = [m["content"] for m in messages if m["role"] == "assistant" and m["content"]]
    out = []
    for run in runs:
        for text in texts:
            if text in run and run.split(text, 1)[0].strip():
                out.append(run.split(text, 1)[0])
    return sorted(set(out))


def markdown(table: dict) -> str:
    """The table for docs/data.md."""
    def cell(status: str) -> str:
        if status.startswith("refused: "):
            key = re.search(r"(data\.end_of_turn|tokenizer\.chat_template|tokenizer\.path)",
                            status)
            status = (f"refused: {status[9:].split(';')[0]}"
                      + (f" (fix: `{key.group()}`)" if key else ""))
        return status.replace("|", "\\|").replace("\n", "\\n")
    plain = [e["plain"] for e in table.values()]
    renderable = [s for s in plain if s != "unrenderable"]
    ok = sum(s == "ok" for s in renderable)
    calls = [e["tools"] for e in table.values() if e["tools"] not in ("unrenderable",
                                                                       "no tool calls")]
    more = [e["plain"] for name, e in table.items() if "__" in name
            and e["plain"] != "unrenderable"]
    lines = [f"{len(table)} templates; {len(renderable)} render the plain conversation: "
             f"{ok} ok ({100 * ok / len(renderable):.0f}%), {len(renderable) - ok} refused, "
             "0 silently wrong. With tool calls: "
             f"{len(calls)} render them, {sum(s == 'ok' for s in calls)} ok. Of templates-more "
             f"alone: {len(more)} renderable, {sum(s == 'ok' for s in more)} ok "
             f"({100 * sum(s == 'ok' for s in more) / len(more):.0f}%).", "",
             "| template | plain conversation | with a tool call | trained besides content "
             "and end of turn |", "|---|---|---|---|"]
    for name, entry in sorted(table.items()):
        inserted = ", ".join(f"`{i!r}`" for i in entry.get("inserted", [])) or ""
        lines.append(f"| {name} | {cell(entry['plain'])} | {cell(entry['tools'])} | "
                     f"{inserted} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite " + EXPECTED)
    parser.add_argument("--markdown", action="store_true", help="print the docs/data.md table "
                                                                "of the expected statuses")
    parser.add_argument("--base", default="neox", choices=sorted(tokenizer_fixtures.BASES))
    args = parser.parse_args()
    if args.markdown:
        with open(EXPECTED) as f:
            print(markdown(json.load(f)))
        return
    table = {}
    for path in template_files():
        entry = {}
        for kind, messages, tools in (("plain", PLAIN, None), ("tools", WITH_TOOLS, TOOLS)):
            result = survey_one(path, args.base, messages, tools)
            if result["status"] == "ok":
                entry[kind] = "ok"
                entry.setdefault("inserted", [])
                entry["inserted"] = sorted(set(entry["inserted"]) | set(
                    _inserted(result["runs"], result["messages"])))
                entry.setdefault("ends", [])
                entry["ends"] = sorted(set(entry["ends"]) | set(result["layout"].closers))
            elif result["status"] == "refused":
                entry[kind] = "refused: " + result["reason"]
            else:
                entry[kind] = result["status"]
        table[name_of(path)] = entry
        print(name_of(path), json.dumps(entry, ensure_ascii=False))
    if args.write:
        os.makedirs(os.path.dirname(EXPECTED), exist_ok=True)
        with open(EXPECTED, "w") as f:
            json.dump(table, f, indent=1, ensure_ascii=False, sort_keys=True)
            f.write("\n")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main()
