"""Chat-template encoding with exact assistant-only loss masks, for any published template.

How the mask is found (no `{% generation %}` markers needed):

1. Once per template, probe its layout (`template_probe.py`, `template_layout.py`): the assistant header, what
   closes an assistant turn in each position (a special token, or text where no special
   token does), and what to append where a template leaves a turn open.
2. Render the conversation once and tokenize that one string with character offsets; ids
   are never stitched from separately tokenized pieces.
3. Find each message's text exactly (`content_spans.py`: a second rendering with marker
   words in place of the texts), so turns the template writes differently by position
   (reasoning dropped from history, an empty think block on the last turn only, gpt-oss's
   `<|return|>`) are supervised as they stand in the final text.
4. Each assistant turn is supervised from where the generation prompt ends (after its
   header: an empty think block, rendered reasoning, gpt-oss's channel are the model's to
   write) through the closer after its content or last tool call, plus the EOS token where
   the template writes it right after the closer. `data.end_of_turn` is inserted after a
   turn the template leaves open.
5. Token boundaries: a token holding the span's first character is supervised (`[/INST]
   Answer` where BPE merges the space into ` Answer`: the model must emit it); a token
   spanning the span's end and the text after it (the next header) is not.

Never supervised: the header that opens an assistant turn, anything of system, user and
tool turns. Anything the rules cannot establish raises `EncodingError`, never a wrong mask.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal, Sequence

import numpy as np
from absl import logging

from coach_jax.data.content_spans import render_conversation, render_located
from coach_jax.data.conversation import Conversation, Document, Example
from coach_jax.data.errors import Origin
from coach_jax.data.template_layout import END_OF_TURN_KEY, EncodingError, TemplateLayout, render
from coach_jax.data.template_probe import _probe, template_layout

TrainOn = Literal["all_assistant", "last_assistant", "all"]
TRAIN_ON = ("all_assistant", "last_assistant", "all")
_layout = _probe  # the per-template probe cache
__all__ = ["EncodingError", "TemplateLayout", "TrainOn", "TRAIN_ON", "assistant_spans",
           "encode_chat", "encode_example", "encode_prompt", "encode_text", "load_tokenizer",
           "render", "stop_token_ids", "template_layout"]


def load_tokenizer(path: str | os.PathLike, chat_template_file: str | None = None) -> Any:
    """A local HF tokenizer; `chat_template_file` replaces its chat template."""
    from transformers import AutoTokenizer
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such tokenizer folder")
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(path))
    if chat_template_file:
        with open(chat_template_file) as f:
            tokenizer.chat_template = f.read()
    return tokenizer


def stop_token_ids(tokenizer: Any, end_of_turn: str = "") -> list[int]:
    """The ids generation stops on: the template's end-of-turn tokens (the last turn's
    first), then EOS."""
    ids = []
    if tokenizer.chat_template:
        try:
            for token in template_layout(tokenizer, end_of_turn).stop_tokens:
                ids += tokenizer.encode(token, add_special_tokens=False)
        except EncodingError as e:
            logging.warning("no end-of-turn token from the chat template: %s", e)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _headers(text: str, lo: int, hi: int, layout: TemplateLayout
             ) -> tuple[list[re.Match], str]:
    """Every assistant header in text[lo:hi] by the longest pattern that finds one, and the
    whitespace the generation prompt writes after that much of it."""
    for pattern, space in layout.header_patterns:
        matches = list(pattern.finditer(text, lo, hi))
        if matches:
            return matches, space
    return [], ""


def _after_prompt(text: str, at: int, hi: int, space: str) -> int | None:
    """Where the model's own writing starts after a header ending at `at`: past the
    whitespace the generation prompt writes there too (Qwen's `\n`), not past whitespace
    only history writes (Mistral's space in `[/INST] The`: the model writes it). None if
    nothing but that whitespace comes before `hi`."""
    rest = text[at:hi]
    covered = len(os.path.commonprefix([rest[:len(rest) - len(rest.lstrip())], space]))
    return None if covered == len(rest) else at + covered


def _last_closer_end(text: str, lo: int, hi: int, closers: Sequence[str]) -> int | None:
    ends = [text.rfind(c, lo, hi) + len(c) for c in closers if text.rfind(c, lo, hi) >= 0]
    return max(ends) if ends else None


def _segments(text: str, headers: list[re.Match], space: str, layout: TemplateLayout
              ) -> list[tuple[int, int]]:
    """Closed stretches between successive headers of one turn (gpt-oss writes reasoning as
    `<|start|>assistant<|channel|>analysis<|message|>...<|end|>` before the final answer)."""
    spans = []
    for header, following in zip(headers, headers[1:]):
        start = _after_prompt(text, header.end(), following.start(), space)
        end = start is not None and _last_closer_end(text, start, following.start(),
                                                     layout.closers)
        if end:
            spans.append((start, end))
    return spans


def _first_closer(text: str, closers: Sequence[str], lo: int, hi: int
                  ) -> tuple[int, str] | None:
    best = None
    for closer in closers:
        at = text.find(closer, lo, hi)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, closer)
    return best


def _leaves(value: Any) -> list[str]:
    """An argument's values as a template writes them, in order."""
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [] if value is None or isinstance(value, bool) else [str(value)]


def _locate_calls(text: str, calls: Sequence[dict[str, Any]], lo: int, hi: int,
                  layout: TemplateLayout) -> tuple[int, int] | None:
    """(where the first call's syntax starts, where the last call's arguments end) in
    text[lo:hi], or None. Each call is found after the previous one's arguments, so a name
    inside an earlier call's arguments is not taken for the next call."""
    first, at = None, lo
    for call in calls:
        name = call["function"]["name"]
        opener = re.compile(r"\s*".join(map(re.escape, (*layout.call_opener, name))))
        found = opener.search(text, at, hi)
        name_at = text.find(name, found.start() if found else at, hi)
        if name_at < 0:
            return None
        first = first if first is not None else (found.start() if found else name_at)
        at = name_at + len(name)
        bound = (_first_closer(text, (*layout.tool_closers, *layout.closers), at, hi)
                 or (hi,))[0]
        for leaf in _leaves(call["function"].get("arguments")):
            leaf_at = text.find(leaf, at, bound)
            at = leaf_at + len(leaf) if leaf_at >= 0 else at
    return first, at


def assistant_spans(text: str, messages: list[dict[str, Any]],
                    located: dict[int, list[tuple[int, int]]], layout: TemplateLayout,
                    origin: Origin | None = None) -> list[tuple[int, int, int, str]]:
    """(message index, start, end, appended marker) of each supervised stretch of the
    assistant turns in `text`: text[start:end] followed by the marker ("" when the template
    closes the turn itself; else `data.end_of_turn`, to be inserted at `end`)."""
    slots = sorted((s, e) for spans in located.values() for s, e in spans)
    spans, cursor = [], 0
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            turn = _turn_spans(text, k, message, located, slots, cursor, layout, origin)
            spans += turn
            cursor = turn[-1][2]
    return spans


def _turn_spans(text: str, k: int, message: dict[str, Any],
                located: dict[int, list[tuple[int, int]]], slots: list[tuple[int, int]],
                cursor: int, layout: TemplateLayout, origin: Origin | None
                ) -> list[tuple[int, int, int, str]]:
    """The supervised stretches of assistant turn `k` (see `assistant_spans`)."""
    what = f"assistant turn (message {k})"
    own, calls = located.get(k, []), message.get("tool_calls") or ()
    if len(own) > 1:
        raise EncodingError(origin, f"{what}: the chat template writes its text {len(own)} "
                                    "times; the mask cannot tell which to train: set "
                                    "tokenizer.chat_template to a template that writes it "
                                    "once")
    if own:
        gap = max([cursor] + [e for _, e in slots if e <= own[0][0]])
    elif calls:
        earlier = next((located[i] for i in range(k - 1, -1, -1) if located.get(i)), [])
        gap = max([cursor] + [e for _, e in earlier])
    else:
        raise EncodingError(origin, f"{what}: the chat template does not render it; set "
                                    "tokenizer.chat_template to a template that renders "
                                    "every assistant turn")
    hi = next((s for s, _ in slots if s >= (own[0][1] if own else gap)), len(text))
    found_calls = None
    if calls:
        found_calls = ((own and _locate_calls(text, calls, own[0][1], hi, layout))
                       or _locate_calls(text, calls, gap, hi, layout))
        if found_calls is None:
            raise EncodingError(origin, f"{what}: its tool calls do not appear in the "
                                        "rendered conversation; does the chat template "
                                        "support tool calls? If not, set "
                                        "tokenizer.chat_template to one that renders "
                                        "tool_calls")
    # Where the assistant's own writing is first and last known to be.
    anchors = own[:1] + ([found_calls] if found_calls else [])
    first, own_end = min(a for a, _ in anchors), max(b for _, b in anchors)
    headers, space = _headers(text, gap, first, layout)
    spans = [(k, s, e, "") for s, e in _segments(text, headers, space, layout)]
    start = (_after_prompt(text, headers[-1].end(), first, space) if headers else None) or first
    if own and found_calls and found_calls[0] > own[0][1]:
        # Content and calls written as two assistant messages (gpt-oss, HyperCLOVA X).
        inner, inner_space = _headers(text, own[0][1], found_calls[0], layout)
        if inner:
            end = _last_closer_end(text, start, inner[0].start(), layout.closers) or own[0][1]
            spans.append((k, start, end, ""))
            spans += [(k, s, e, "") for s, e in _segments(text, inner, inner_space, layout)]
            start = (_after_prompt(text, inner[-1].end(), found_calls[0], inner_space)
                     or found_calls[0])
    closer = _first_closer(text, (*layout.tool_closers, *layout.closers) if calls
                           else layout.closers, own_end, hi)
    if closer is not None and _headers(text, own_end, closer[0], layout)[0]:
        closer = None  # that closer ends a later assistant turn
    if closer is not None:
        end = closer[0] + len(closer[1])
        if layout.eos and closer[1] != layout.eos and text.startswith(layout.eos, end):
            end += len(layout.eos)
        return spans + [(k, start, end, "")]
    if calls:  # the call's own closing text, then data.end_of_turn (GLM: `</tool_call>`)
        at = text.find(layout.call_end, own_end, hi) if layout.call_end else -1
        if at < 0 or not layout.append:
            raise EncodingError(origin, f"{what}: nothing closes its tool calls, so where they "
                                        f"end is unknown; set {END_OF_TURN_KEY}")
        own_end = at + len(layout.call_end)
    # Open: supervised through its own text; data.end_of_turn, if set, is appended.
    return spans + [(k, start, own_end, layout.append)]


def _insert(text: str, spans: list[tuple[int, int, int, str]]
            ) -> tuple[str, list[tuple[int, int, int]]]:
    """The text with appended markers in place, and the spans in its coordinates."""
    pieces, out, shift, at = [], [], 0, 0
    for k, start, end, marker in spans:
        if marker:
            pieces += [text[at:end], marker]
            at = end
        out.append((k, start + shift, end + shift + len(marker)))
        shift += len(marker)
    return "".join(pieces) + text[at:], out


def _tokenize(tokenizer: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if "offset_mapping" not in encoded:
        raise EncodingError(None, "the tokenizer gives no character offsets (a fast, "
                                  "tokenizers-backed tokenizer is required): set "
                                  "tokenizer.path to a folder with a tokenizer.json",
                            kind="chat_template")
    return (np.asarray(encoded["input_ids"], np.int32),
            np.asarray(encoded["offset_mapping"], np.int64).reshape(-1, 2))


def _with_reasoning_key(messages: list[dict[str, Any]], template: Any
                        ) -> list[dict[str, Any]]:
    """Reasoning under the key the template reads: `reasoning_content` (Qwen3, DeepSeek,
    GLM) or `thinking` (gpt-oss)."""
    if not isinstance(template, str) or "reasoning_content" in template or "thinking" not in \
            template or not any("reasoning_content" in m for m in messages):
        return messages
    return [{**{k: v for k, v in m.items() if k != "reasoning_content"},
             "thinking": m["reasoning_content"]} if "reasoning_content" in m else m
            for m in messages]


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: Any = None,
                train_on: TrainOn = "all_assistant", origin: Origin | None = None,
                end_of_turn: str = "") -> dict[str, np.ndarray]:
    """Renders and tokenizes a conversation; returns `input_ids` int32[L] and `loss_mask`
    int8[L] (1 where the token is supervised). See the module docstring for the policy;
    `end_of_turn` is `data.end_of_turn`."""
    return _encode_chat(tokenizer, messages, tools, train_on, origin, end_of_turn)[0]


def _encode_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: Any,
                 train_on: TrainOn, origin: Origin | None, end_of_turn: str
                 ) -> tuple[dict[str, np.ndarray], set[int]]:
    """`encode_chat`'s result, and the messages whose text the rendering holds (None when
    not looked for: train_on="all")."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"data.train_on={train_on!r}; expected one of {', '.join(TRAIN_ON)}")
    layout = template_layout(tokenizer, end_of_turn)
    messages = _with_reasoning_key(messages, tokenizer.chat_template)
    if train_on == "all":
        text = render_conversation(tokenizer, layout.for_template(messages), tools, origin)
        ids, _ = _tokenize(tokenizer, text)
        _check_bos(tokenizer, ids, origin)
        return {"input_ids": ids, "loss_mask": np.ones(len(ids), np.int8)}, None
    text, located = render_located(tokenizer, messages, tools, origin, layout.for_template)
    text, char_spans = _insert(text, assistant_spans(text, messages, located, layout, origin))
    if train_on == "last_assistant" and char_spans:
        char_spans = [span for span in char_spans if span[0] == char_spans[-1][0]]
    ids, offsets = _tokenize(tokenizer, text)
    _check_bos(tokenizer, ids, origin)
    mask = _mask(text, offsets, [(s, e) for _, s, e in char_spans], layout, origin)
    return {"input_ids": ids, "loss_mask": mask}, set(located)


def _mask(text: str, offsets: np.ndarray, spans: list[tuple[int, int]],
          layout: TemplateLayout, origin: Origin | None) -> np.ndarray:
    """int8 mask of the tokens in the character spans, by the token-boundary rule."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    empty = starts == ends  # whitespace tokens whose offsets were trimmed to their end
    mask = np.zeros(len(offsets), bool)
    for start, end in spans:
        turn = np.where(empty, (starts > start) & (starts <= end),
                        ((starts <= start) & (ends > start)) | ((starts >= start) & (ends <= end)))
        closed = any(text.endswith(t, 0, end) for t in layout.closers
                     if t in layout.special_tokens)
        if not turn.any() or (closed and ends[np.flatnonzero(turn)[-1]] != end):
            raise EncodingError(origin, "the tokens of an assistant turn do not end with its "
                                        "end-of-turn token")
        mask |= turn
    return mask.astype(np.int8)


def _check_bos(tokenizer: Any, ids: np.ndarray, origin: Origin | None) -> None:
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        raise EncodingError(origin, "the rendering starts with two BOS tokens; set "
                                    "tokenizer.chat_template to a template that writes "
                                    "bos_token once")


def encode_prompt(tokenizer: Any, messages: list[dict[str, Any]], tools: Any = None,
                  end_of_turn: str = "") -> np.ndarray:
    """The ids a model continues from to write the next assistant turn: the conversation
    rendered with the template's generation prompt (and the header history writes, for
    templates that ignore the prompt flag), tokenized as in training."""
    messages = _with_reasoning_key(messages, tokenizer.chat_template)
    try:
        layout = template_layout(tokenizer, end_of_turn)
        suffix, messages = layout.prompt_suffix, layout.for_template(messages)
    except EncodingError:  # generation needs no mask: a template nothing closes is fine here
        suffix = ""
    text = render_conversation(tokenizer, messages, tools, add_generation_prompt=True)
    if suffix and not text.endswith(suffix):
        text += suffix
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)


def encode_text(tokenizer: Any, text: str) -> dict[str, np.ndarray]:
    """Plain text for continued pretraining: the tokenizer's own BOS handling, an EOS at the
    end so documents are told apart, every token supervised."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return {"input_ids": np.asarray(ids, np.int32), "loss_mask": np.ones(len(ids), np.int8)}


def encode_example(tokenizer: Any, example: Example, train_on: TrainOn = "all_assistant",
                   system_fallback: bool = True, end_of_turn: str = "") -> dict[str, np.ndarray]:
    """Encodes a normalised example. With `system_fallback`, a template that rejects a system
    message (Gemma 2), or drops its text (Mistral v0.3 keeps it only when the conversation
    ends with a user turn), gets the text merged into the first user turn instead."""
    if isinstance(example, Document):
        return encode_text(tokenizer, example.text)
    assert isinstance(example, Conversation)
    messages = example.template_messages()
    system = messages[0]["role"] == "system"
    try:
        encoded, rendered = _encode_chat(tokenizer, messages, example.tools, train_on,
                                         example.origin, end_of_turn)
    except EncodingError as e:
        if not (system_fallback and system and "rejected" in e.problem
                and "system" in e.problem.lower()):
            raise
    else:
        if not system or rendered is None or 0 in rendered:
            return encoded
        if not system_fallback:
            raise EncodingError(example.origin, "the chat template drops the system message's "
                                                "text (system_fallback merges it into the "
                                                "first user turn)")
    return encode_chat(tokenizer, merge_system_into_first_user(messages), example.tools,
                       train_on, example.origin, end_of_turn)


def merge_system_into_first_user(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    system, rest = messages[0], [dict(m) for m in messages[1:]]
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{system['content']}\n\n{m['content']}"
            break
    return rest
