"""Finding a chat template's layout (what it writes around an assistant turn), once per
template.

A template is rendered on small probe conversations whose contents are unique marker words,
and the layout is read off the text between them:

- **header**: what opens an assistant turn. Taken from the generation prompt
  (`add_generation_prompt=True`) where the template honours it and history writes it too;
  otherwise from the conversation itself (the text between a user turn and the assistant
  content, less the closer of the user turn). It is matched with whitespace ignored, as a
  sequence of pieces (special tokens and words), so indentation a template writes around
  turns does not matter.
- **closers**: what closes an assistant turn: the first special token the template writes
  after the content, after earlier turns and after the last one (they may differ: gpt-oss
  writes `<|end|>` and `<|return|>`), and after a tool call (`<|call|>`, `<tool_call|>`).
  Where no special token closes a turn, the text every assistant turn ends with (the common
  start of what follows an earlier and the last turn, e.g. `<_end>` or `\\n\\n`) closes it.
  Where the last turn is followed by nothing, the blank line that ends earlier turns does.

The token ids trained on are exactly those of the real rendering, unless `data.end_of_turn`
names a marker to insert where a template writes none (vLLM's inference ChatML writes
`<|im_end|>` after every turn but the last). A template whose turns nothing closes is
refused with that config key.
"""


from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Sequence

from absl import logging

from coach_jax.data.template_layout import (CONTROL_SHAPED, END_OF_TURN_KEY, EncodingError,
                                            TemplateLayout, as_content_parts, render)

_USER = ("coachprobeuserone", "coachprobeusertwo")
_ANSWER = ("coachprobeanswerone", "coachprobeanswertwo")
_SYSTEM = "coachprobesystem"
_TOOL_NAME, _TOOL_ARG, _TOOL_RESULT = "coach_probe_lookup", "coachprobeargument", "coachproberesult"
_PROBE_TOOLS = ({"type": "function", "function": {
    "name": _TOOL_NAME, "description": "probe", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}}}}},)


def _refused(problem: str) -> EncodingError:
    return EncodingError(None, problem, kind="chat_template")


def _add_token_fix(*markers: str) -> str:
    """How to give a tokenizer the special tokens a template writes literally."""
    names = ", ".join(map(repr, markers))
    return (f"add {names} to the tokenizer as special token{'s' if len(markers) > 1 else ''} "
            f"(tokenizer.add_special_tokens({{'additional_special_tokens': [{names}]}}), "
            "save_pretrained it and point tokenizer.path there) or set tokenizer.path to the "
            "model's own tokenizer")


def _split_markers(tokenizer: Any, text: str) -> list[str]:
    """The control-shaped markers in `text` that this tokenizer splits into pieces."""
    found = dict.fromkeys(m.group() for m in CONTROL_SHAPED.finditer(text))
    return [m for m in found if len(tokenizer.encode(m, add_special_tokens=False)) != 1]


def _own_marker(tokenizer: Any, special_list: Sequence[str]) -> str | None:
    """A special token this tokenizer has that could end assistant turns: its EOS, else one
    named like an end (`<|endoftext|>`)."""
    if tokenizer.eos_token and tokenizer.eos_token in special_list:
        return tokenizer.eos_token
    return next((t for t in special_list if "end" in t.lower()), None)


def _split_marker_fix(tokenizer: Any, marker: str, rendered: str,
                      special_list: Sequence[str]) -> str:
    """The fixes for a closing marker this tokenizer splits into pieces (and the template's
    other split markers, named with it)."""
    own = _own_marker(tokenizer, special_list)
    markers = dict.fromkeys([marker, *_split_markers(tokenizer, rendered)])
    return _add_token_fix(*markers) + (
        f"; or set {END_OF_TURN_KEY}={own!r} to end assistant turns with a token it has"
        if own and own != marker else "")


def _render_error(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    """Why the template cannot render `messages`, with the fix for a tokenizer that lacks a
    token the template writes (`bos_token` undefined)."""
    try:
        render(tokenizer, messages)
    except Exception as e:  # noqa: BLE001 - a template may raise anything
        missing = re.search(r"'(\w+_token)' is undefined", str(e))
        if missing:
            return (f"it writes {missing.group(1)}, which this tokenizer does not define; set "
                    f"tokenizer.path to the model's own tokenizer or give it one (tokenizer."
                    f"add_special_tokens({{{missing.group(1)!r}: ...}}), save_pretrained it and "
                    "point tokenizer.path there)")
        return f"{type(e).__name__}: {e}; set tokenizer.chat_template to a .jinja file that can"
    return "set tokenizer.chat_template to a .jinja file that can"


def special_tokens(tokenizer: Any) -> tuple[str, ...]:
    tokens = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    tokens |= set(tokenizer.all_special_tokens)
    return tuple(sorted((t for t in tokens if t), key=len, reverse=True))


def _specials_regex(specials: Sequence[str]) -> re.Pattern | None:
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def _first_special(text: str, specials: re.Pattern | None) -> tuple[int, str] | None:
    found = specials.search(text) if specials else None
    return (found.start(), found.group()) if found else None


def _pieces(text: str, specials: re.Pattern | None) -> list[str]:
    """Special tokens and whitespace-separated words, in order."""
    pieces, at = [], 0
    for found in (specials.finditer(text) if specials else ()):
        pieces += text[at:found.start()].split() + [found.group()]
        at = found.end()
    return pieces + text[at:].split()


def _pattern(pieces: Sequence[str]) -> re.Pattern:
    return re.compile(r"\s*".join(map(re.escape, pieces)))


def _token_boundary(text: str, cut: int, specials: Sequence[str]) -> int:
    """Moves `cut` back to the start of a special token it would split (Phi-3's generation
    prompt `<|assistant|>` shares `<|` with the `<|endoftext|>` it replaces)."""
    for token in specials:
        i = text.find(token, max(0, cut - len(token) + 1))
        if 0 <= i < cut:
            return i
    return cut


def _try_render(tokenizer: Any, messages: list[dict[str, Any]], tools: Any = None,
                add_generation_prompt: bool = False, parts: bool = False) -> str | None:
    """The rendering, or None; a template that needs tools (Hermes 2 Pro) gets the probe's."""
    messages = as_content_parts(messages) if parts else messages
    for offered in ((tools,) if tools else (None, _PROBE_TOOLS)):
        try:
            return render(tokenizer, messages, offered, add_generation_prompt)
        except Exception:  # noqa: BLE001 - a template may raise anything; None = cannot render
            continue
    return None


def _conversation(with_system: bool, turns: int) -> list[dict[str, Any]]:
    messages = [{"role": "system", "content": _SYSTEM}] if with_system else []
    for k in range(turns):
        messages += [{"role": "user", "content": _USER[k]},
                     {"role": "assistant", "content": _ANSWER[k]}]
    return messages


def _after(text: str, marker: str) -> int:
    return text.index(marker) + len(marker)


def _closers(full: str, specials: re.Pattern | None, special_list: Sequence[str]
             ) -> tuple[list[str], bool, str]:
    """(special closers, whether the last turn is left open, the text closer) from a
    two-round rendering."""
    mid = full[_after(full, _ANSWER[0]):full.index(_USER[1])]
    last = full[_after(full, _ANSWER[1]):]
    user_to_answer = full[_after(full, _USER[1]):full.index(_ANSWER[1])]
    before_user = full[_after(full, _SYSTEM) if _SYSTEM in full else 0:full.index(_USER[0])]
    first_mid, first_last = _first_special(mid, specials), _first_special(last, specials)
    closes_both = _first_special(os.path.commonprefix([mid, user_to_answer]), specials)
    # The first special token after an earlier turn closes it when it also closes user turns
    # (`<|im_end|>`), ends the last turn too, or comes before the user header that opens
    # the conversation (Apertus' `<|assistant_end|>`); otherwise it opens the next header
    # (GLM's `<|user|>`).
    mid_closer = first_mid[1] if first_mid and (
        (closes_both and closes_both[1] == first_mid[1])
        or (first_last and first_last[1] == first_mid[1])
        or not before_user.endswith(mid[first_mid[0]:])) else None
    last_closer = None
    if first_last and (first_last[1] in mid or (mid_closer and first_last[1] not in
                                                user_to_answer)):
        last_closer = first_last[1]
    closers = list(dict.fromkeys(c for c in (last_closer, mid_closer) if c))
    if closers:
        return closers, last_closer is None, ""
    text = os.path.commonprefix([mid, last])
    for token in special_list:  # never end inside a special token
        for side in (mid, last):
            i = side.find(token, max(0, len(text) - len(token) + 1))
            if 0 <= i < len(text) < i + len(token):
                text = text[:i]
    if text:
        return [], False, text.strip() or text
    if not last.strip():  # nothing after the last turn: the blank that ends earlier ones
        return [], True, mid[:len(mid) - len(mid.lstrip())]
    return [], True, ""


@dataclasses.dataclass(frozen=True)
class _Calls:
    closers: tuple[str, ...] = ()
    opener: tuple[str, ...] = ()
    end: str = ""


def _tool_calls(tokenizer: Any, base: list[dict[str, Any]], specials: re.Pattern | None,
                closers: Sequence[str], eos: str | None, parts: bool,
                header: tuple[tuple[re.Pattern, str], ...]) -> _Calls:
    """How the template writes a turn that ends with a tool call, where it renders calls:
    what closes it, what comes before the call's name, the text that ends the call."""
    call = {"type": "function", "id": "call0probe", "function": {
        "name": _TOOL_NAME, "arguments": {"query": _TOOL_ARG}}}
    calling = base + [{"role": "user", "content": _USER[0]},
                      {"role": "assistant", "content": "", "tool_calls": [call]}]
    answered = calling + [{"role": "tool", "content": _TOOL_RESULT, "tool_call_id": "call0probe",
                           "name": _TOOL_NAME}]
    short = _try_render(tokenizer, calling, _PROBE_TOOLS, parts=parts)
    long = _try_render(tokenizer, answered, _PROBE_TOOLS, parts=parts)
    if (not short or not long or _TOOL_ARG not in short or _TOOL_RESULT not in long
            or _TOOL_NAME not in short[_after(short, _USER[0]):]):
        return _Calls()
    shared = os.path.commonprefix([short[_after(short, _TOOL_ARG):],
                                   long[_after(long, _TOOL_ARG):long.index(_TOOL_RESULT)]])
    # The run of special tokens that ends the call (`<｜tool▁call▁end｜><｜tool▁calls▁end｜>
    # <｜end▁of▁sentence｜>`, `<tool_call|><|tool_response>`): a turn closer or EOS in it, else
    # its first token (what follows opens the tool's turn).
    run: list[tuple[str, int]] = []
    for found in (specials.finditer(shared) if specials else ()):
        if run and shared[run[-1][1]:found.start()].strip():
            run = []
        run.append((found.group(), found.end()))
    tokens = [token for token, _ in run]
    tool_closers = (next((t for t in tokens if t in closers or t == eos), tokens[0]),) \
        if tokens else ()
    first_special = _first_special(shared, specials)
    call_end = "" if tokens else shared[:first_special[0] if first_special else None].rstrip()
    # Before the name: what the template writes after the header (for calls with no header
    # before them: a second call straight after a tool result).
    gap = short[_after(short, _USER[0]):short.index(_TOOL_NAME, _after(short, _USER[0]))]
    after = next((m[-1].end() for m in (list(p.finditer(gap)) for p, _ in header) if m), 0)
    return _Calls(tool_closers, tuple(_pieces(gap[after:], specials)), call_end)


def _probe_conversation(tokenizer: Any) -> tuple[str, list[dict[str, Any]], bool]:
    """(two-round rendering, the system message it needed if any, whether contents go as
    text parts): the first form that renders every text, else the first that renders."""
    forms = [(parts, system) for parts in (False, True) for system in (False, True)]
    rendered = {f: _try_render(tokenizer, _conversation(f[1], 2), parts=f[0]) for f in forms}
    parts, system = next((f for f in forms if rendered[f] and all(
        m in rendered[f] for m in _USER + _ANSWER)),
        next((f for f in forms if rendered[f]), forms[0]))
    full = rendered[parts, system]
    if full is None:
        raise _refused("the chat template cannot render a plain user/assistant conversation: "
                       + _render_error(tokenizer, _conversation(False, 2)))
    if not all(m in full for m in _USER + _ANSWER):
        raise _refused("the chat template does not render the messages' text, so assistant "
                       "turns cannot be located; set tokenizer.chat_template to a .jinja file "
                       "that does")
    return full, _conversation(system, 0), parts


def _resolved_closers(tokenizer: Any, full: str, specials: re.Pattern | None,
                      special_list: Sequence[str], end_of_turn: str) -> tuple[list[str], bool]:
    """(closers, whether the last turn stays open), `data.end_of_turn` applied."""
    closers, last_open, text_closer = _closers(full, specials, special_list)
    if end_of_turn:
        _check_configured(tokenizer, end_of_turn, closers)
        return closers or [end_of_turn], False
    marker = CONTROL_SHAPED.search(text_closer)
    if marker:
        raise _refused(f"the chat template closes assistant turns with no special token: "
                       f"{marker.group()!r} looks like a control token but this tokenizer "
                       "splits it into pieces; "
                       + _split_marker_fix(tokenizer, marker.group(), full, special_list))
    if text_closer:
        closers = [text_closer]
    if not closers:
        written = full[_after(full, _ANSWER[1]):]
        raise _refused(f"the chat template closes assistant turns with no special token and "
                       f"writes nothing that ends them (after the last content it writes "
                       f"{written!r}); the model could not learn to stop: set "
                       f"{END_OF_TURN_KEY} to the marker it should end its turns with (e.g. "
                       f"{tokenizer.eos_token or '</s>'!r})")
    if last_open:
        fix = closers[0] if closers[0] in special_list else tokenizer.eos_token or "</s>"
        logging.warning("the chat template writes no end-of-turn marker after the last "
                        "assistant turn, so the model learns to stop only from earlier turns; "
                        "set %s=%r to append it", END_OF_TURN_KEY, fix)
    return closers, last_open


@functools.lru_cache(maxsize=64)
def _probe(tokenizer: Any, template: str, end_of_turn: str) -> TemplateLayout | str:
    """The layout, or the refusal's text: a refused template is probed once too, not once
    per record."""
    del template  # part of the cache key only
    try:
        return _probed(tokenizer, end_of_turn)
    except EncodingError as e:
        return e.problem


def _probed(tokenizer: Any, end_of_turn: str) -> TemplateLayout:
    special_list = special_tokens(tokenizer)
    specials = _specials_regex(special_list)
    eos = tokenizer.eos_token if tokenizer.eos_token in special_list else None
    full, base, parts = _probe_conversation(tokenizer)
    closers, last_open = _resolved_closers(tokenizer, full, specials, special_list, end_of_turn)
    one_round = _try_render(tokenizer, base + _conversation(False, 1), parts=parts) or full
    user_only = base + [{"role": "user", "content": _USER[0]}]
    header = _header(tokenizer, one_round,
                     _try_render(tokenizer, user_only, add_generation_prompt=True, parts=parts),
                     _try_render(tokenizer, user_only, parts=parts), specials, special_list,
                     closers)
    calls = _tool_calls(tokenizer, base, specials, closers, eos, parts, header.patterns)
    ids = tokenizer.encode(closers[0], add_special_tokens=False)
    return TemplateLayout(
        header.text, header.source, header.patterns, closers[0],
        ids[0] if len(ids) == 1 and closers[0] in special_list else None, tuple(closers),
        calls.closers, calls.opener, calls.end, end_of_turn, last_open, header.suffix, eos,
        parts, special_list)


@dataclasses.dataclass(frozen=True)
class _Header:
    text: str  # as history writes it, with the whitespace after it
    source: str  # "generation prompt" | "conversation" | "none"
    patterns: tuple[tuple[re.Pattern, str], ...]  # (pattern, the prompt's whitespace after)
    suffix: str  # what generation prompts lack of it (templates that ignore the flag)


def _header(tokenizer: Any, one_round: str, prompted: str | None, plain: str | None,
            specials: re.Pattern | None, special_list: Sequence[str], closers: Sequence[str]
            ) -> _Header:
    """The assistant header: from the generation prompt where history writes it too, else
    from the conversation."""
    history_gap = one_round[_after(one_round, _USER[0]):one_round.index(_ANSWER[0])]
    tail_prompted = (prompted[_after(prompted, _USER[0]):]
                     if prompted is not None and _USER[0] in prompted else "")
    suffix = ""
    if tail_prompted and plain is not None and _USER[0] in plain:
        tail_plain = plain[_after(plain, _USER[0]):]
        cut = _token_boundary(tail_prompted, len(os.path.commonprefix([tail_plain,
                                                                       tail_prompted])),
                              special_list)
        prompt = tail_prompted[cut:]
        pieces = _pieces(prompt, specials)
        while pieces and pieces[0] in closers:  # the user turn's closer
            pieces = pieces[1:]
        # The longest start of the generation prompt that history writes too (DeepSeek R1's
        # prompt adds `<think>` that history lacks); shorter starts too (a prompt's
        # `<think>` may be in the last turn only), never shorter than its first word:
        # `<|turn>` alone could open any role.
        for n in range(len(pieces), 0, -1):
            found = _pattern(pieces[:n]).search(history_gap)
            if found:
                words = [i for i, piece in enumerate(pieces)
                         if not (specials and specials.fullmatch(piece))]
                shortest = min(n, words[0] + 1 if words else len(pieces))
                patterns = tuple((_pattern(pieces[:k]), _space_after(prompt, pieces[:k]))
                                 for k in range(len(pieces), shortest - 1, -1))
                return _Header(_with_space(history_gap, found), "generation prompt", patterns,
                               "")
        if history_gap.startswith(tail_prompted):
            suffix = _unmerged(tokenizer, one_round, history_gap[len(tail_prompted):])
    pieces = _pieces(history_gap, specials)
    while pieces and pieces[0] in closers:  # the user turn's closer
        pieces = pieces[1:]
    if not pieces:
        return _Header("", "none", (), suffix)
    found = _pattern(pieces).search(history_gap)
    prompt = tail_prompted + suffix
    return _Header(_with_space(history_gap, found), "conversation",
                   ((_pattern(pieces), prompt[len(prompt.rstrip()):]),), suffix)


def _space_after(prompt: str, pieces: Sequence[str]) -> str:
    """The whitespace the prompt writes right after these pieces of it."""
    rest = prompt[_pattern(pieces).search(prompt).end():]
    return rest[:len(rest) - len(rest.lstrip())]


def _unmerged(tokenizer: Any, one_round: str, suffix: str) -> str:
    """The prompt suffix less the trailing characters the tokenizer merges into the answer's
    first token (Mistral's `[/INST] The` is `[/INST]`, ` The`): the model writes those."""
    answer_at = one_round.index(_ANSWER[0])
    full = tokenizer.encode(one_round, add_special_tokens=False)
    for cut in range(answer_at, answer_at - len(suffix) - 1, -1):
        head = tokenizer.encode(one_round[:cut], add_special_tokens=False)
        if full[:len(head)] == head:
            return suffix[:len(suffix) - (answer_at - cut)]
    return ""


def _with_space(text: str, found: re.Match) -> str:
    """The matched header and the whitespace after it (`<|im_start|>assistant\n`)."""
    rest = text[found.end():]
    return found.group() + rest[:len(rest) - len(rest.lstrip())]


def _check_configured(tokenizer: Any, marker: str, closers: Sequence[str]) -> None:
    if closers and marker not in closers:
        raise _refused(f"{END_OF_TURN_KEY}={marker!r}, but the chat template closes assistant "
                       f"turns with the special token {closers[0]!r}; leave "
                       f"{END_OF_TURN_KEY} empty")
    if CONTROL_SHAPED.fullmatch(marker) and len(tokenizer.encode(
            marker, add_special_tokens=False)) != 1:
        own = _own_marker(tokenizer, special_tokens(tokenizer))
        raise _refused(f"{END_OF_TURN_KEY}={marker!r} looks like a control token but this "
                       f"tokenizer splits it into pieces; {_add_token_fix(marker)}, or set "
                       f"{END_OF_TURN_KEY} to one of its special tokens"
                       + (f" (e.g. {own!r})" if own else ""))


def template_layout(tokenizer: Any, end_of_turn: str = "") -> TemplateLayout:
    """The probed layout of the tokenizer's chat template, or its refusal (both cached per
    tokenizer, template and end_of_turn)."""
    if not tokenizer.chat_template:
        raise _refused("the tokenizer has no chat template; set tokenizer.chat_template to a "
                       ".jinja file")
    template = tokenizer.chat_template
    found = _probe(tokenizer, template if isinstance(template, str) else repr(template),
                   end_of_turn)
    if isinstance(found, str):
        raise _refused(found)
    return found
