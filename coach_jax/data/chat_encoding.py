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
from coach_jax.data.template_layout import EncodingError, TemplateLayout, render
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


def _headers(text: str, lo: int, hi: int, layout: TemplateLayout) -> list[re.Match]:
    """Every assistant header in text[lo:hi], by the longest pattern that finds one."""
    for pattern in layout.header_patterns:
        matches = list(pattern.finditer(text, lo, hi))
        if matches:
            return matches
    return []


def _after_prompt(text: str, at: int, hi: int, layout: TemplateLayout) -> int | None:
    """Where the model's own writing starts after a header ending at `at`: past the
    whitespace the generation prompt ends with too (Qwen's `\n`), not past whitespace only
    history writes (Mistral's space in `[/INST] The`: the model writes it). None if nothing
    but that whitespace comes before `hi`."""
    rest = text[at:hi]
    space = rest[:len(rest) - len(rest.lstrip())]
    covered = len(os.path.commonprefix([space, layout.prompt_space]))
    return None if covered == len(rest) else at + covered


def _segments(text: str, headers: list[re.Match], layout: TemplateLayout
              ) -> list[tuple[int, int, str]]:
    """Closed segments between successive headers of one turn (gpt-oss writes reasoning as
    `<|start|>assistant<|channel|>analysis<|message|>...<|end|>` before the final answer)."""
    spans = []
    for header, following in zip(headers, headers[1:]):
        start = _after_prompt(text, header.end(), following.start(), layout)
        ends = [text.rfind(c, start, following.start()) + len(c) for c in layout.closers
                if start is not None and text.rfind(c, start, following.start()) >= 0]
        if ends:
            spans.append((start, max(ends), ""))
    return spans


def _first_closer(text: str, closers: Sequence[str], lo: int, hi: int
                  ) -> tuple[int, str] | None:
    best = None
    for closer in closers:
        at = text.find(closer, lo, hi)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, closer)
    return best


def assistant_spans(text: str, messages: list[dict[str, Any]],
                    located: dict[int, list[tuple[int, int]]], layout: TemplateLayout,
                    origin: Origin | None = None) -> list[tuple[int, int, int, str]]:
    """(message index, start, end, appended marker) of each supervised stretch of the
    assistant turns in `text`: text[start:end] followed by the marker ("" when the template
    closes the turn itself; else `data.end_of_turn`, to be inserted at `end`)."""
    slots = sorted((s, e) for spans in located.values() for s, e in spans)
    spans, cursor = [], 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        what = f"assistant turn (message {k})"
        own, calls = located.get(k, []), message.get("tool_calls") or ()
        if len(own) > 1:
            raise EncodingError(origin, f"{what}: the chat template writes its text "
                                        f"{len(own)} times; the mask cannot tell which to train")
        if own:
            content_start, own_end = own[0]
            gap = max([cursor] + [e for _, e in slots if e <= content_start])
            headers = _headers(text, gap, content_start, layout)
            spans += [(k, *segment) for segment in _segments(text, headers, layout)]
            start = (_after_prompt(text, headers[-1].end(), content_start, layout) if headers
                     else None) or content_start
        elif calls:
            earlier = next((located[i] for i in range(k - 1, -1, -1) if located.get(i)), [])
            gap = max([cursor] + [e for _, e in earlier])
            hi = next((s for s, _ in slots if s >= gap), len(text))
            headers = _headers(text, gap, hi, layout)
            start = _after_prompt(text, headers[0].end(), hi, layout) if headers else None
            if start is None:
                raise EncodingError(origin, f"{what}: no assistant header found before its "
                                            "tool calls; cannot tell where the turn starts")
            own_end = start
        else:
            raise EncodingError(origin, f"{what}: the chat template does not render it")
        region_end = next((s for s, _ in slots if s >= own_end), len(text))
        for call in calls:
            name = call["function"]["name"]
            at = text.find(name, own_end, region_end)
            if at < 0:
                raise EncodingError(origin, f"{what}: its tool calls do not appear in the "
                                            "rendered conversation; does the chat template "
                                            "support tool calls?")
            own_end = at + len(name)
        closer = _first_closer(text, (*layout.tool_closers, *layout.closers) if calls
                               else layout.closers, own_end, region_end)
        if closer is not None and _headers(text, own_end, closer[0], layout):
            closer = None  # that closer ends a later assistant turn
        if closer is not None:
            end = closer[0] + len(closer[1])
            if layout.eos and closer[1] != layout.eos and text.startswith(layout.eos, end):
                end += len(layout.eos)
            spans.append((k, start, end, ""))
        elif calls:
            raise EncodingError(origin, f"{what}: nothing closes its tool calls, so where they "
                                        "end is unknown")
        else:  # open: supervised through its content (data.end_of_turn appends a closer)
            spans.append((k, start, own_end, layout.append))
            end = own_end
        cursor = end
    return spans


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
                                  "tokenizers-backed tokenizer is required)")
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
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on={train_on!r}; expected one of {', '.join(TRAIN_ON)}")
    layout = template_layout(tokenizer, end_of_turn)
    messages = _with_reasoning_key(messages, tokenizer.chat_template)
    if train_on == "all":
        text = render_conversation(tokenizer, layout.for_template(messages), tools, origin)
        ids, _ = _tokenize(tokenizer, text)
        _check_bos(tokenizer, ids, origin)
        return {"input_ids": ids, "loss_mask": np.ones(len(ids), np.int8)}
    text, located = render_located(tokenizer, messages, tools, origin, layout.for_template)
    text, char_spans = _insert(text, assistant_spans(text, messages, located, layout, origin))
    if train_on == "last_assistant" and char_spans:
        char_spans = [span for span in char_spans if span[0] == char_spans[-1][0]]
    ids, offsets = _tokenize(tokenizer, text)
    _check_bos(tokenizer, ids, origin)
    mask = _mask(text, offsets, [(s, e) for _, s, e in char_spans], layout, origin)
    return {"input_ids": ids, "loss_mask": mask}


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
        raise EncodingError(origin, "the rendering starts with two BOS tokens")


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
    message gets its text merged into the first user turn instead (documented in README)."""
    if isinstance(example, Document):
        return encode_text(tokenizer, example.text)
    assert isinstance(example, Conversation)
    messages = example.template_messages()
    try:
        return encode_chat(tokenizer, messages, example.tools, train_on, example.origin,
                           end_of_turn)
    except EncodingError as e:
        if not (system_fallback and messages[0]["role"] == "system"
                and "rejected" in e.problem and "system" in e.problem.lower()):
            raise
    return encode_chat(tokenizer, merge_system_into_first_user(messages), example.tools,
                       train_on, example.origin, end_of_turn)


def merge_system_into_first_user(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    system, rest = messages[0], [dict(m) for m in messages[1:]]
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{system['content']}\n\n{m['content']}"
            break
    return rest
