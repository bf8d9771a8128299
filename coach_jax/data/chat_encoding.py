"""Chat-template encoding with exact assistant-only loss masks, for stock templates.

How the mask is found (templates without `{% generation %}` markers):

1. Once per tokenizer and template, probe the template's layout: the *assistant header*
   (what `add_generation_prompt=True` appends, e.g. `<|im_start|>assistant\\n`; empty for
   Mistral v0.3) and the *end-of-turn marker* (the first special token the template writes
   after an assistant's content, e.g. `<|im_end|>`, `<|eot_id|>`, `</s>`).
2. Render the whole conversation once, and tokenize that one string (with character
   offsets). Ids are never stitched from separately tokenized pieces.
3. Walk the rendering left to right. Each assistant turn starts right after its header
   (or, with no header, right after the special token that closes the turn before it), must
   contain the turn's content as the template rendered it, and ends after the first
   end-of-turn marker that follows the content. The rendering is searched directly, never
   diffed against renderings of prefixes, so templates that rewrite earlier turns (Qwen3
   drops reasoning from history) or move the system prompt (Mistral v0.3) are handled.
4. Verify: a span never contains another turn's end marker, and each span's last token
   is exactly the end-of-turn token. Anything else raises `EncodingError`.

Policy: supervised are the assistant's content, whatever the template puts inside the turn
(Qwen3's empty think block, rendered tool calls) and the end-of-turn marker, so the model
learns to stop. Not supervised: the header that opens an assistant turn, the text after the
marker (a newline), and everything of system, user and tool turns. A token that straddles a
span boundary is supervised: it is one the model must emit to produce the span.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Literal, Sequence

import numpy as np
from absl import logging

from coach_jax.data.conversation import Conversation, Document, Example
from coach_jax.data.errors import DataError, Origin

TrainOn = Literal["all_assistant", "last_assistant", "all"]
TRAIN_ON = ("all_assistant", "last_assistant", "all")
_PROBE_USER = "coach-probe-user-text"
_PROBE_ASSISTANT = "coach-probe-assistant-text"


class EncodingError(DataError):
    """The template or tokenizer cannot give an exact mask for this conversation."""

    def __init__(self, origin: Origin | None, problem: str, kind: str = "template"):
        super().__init__(origin, problem, kind=kind)


@dataclasses.dataclass(frozen=True)
class TemplateLayout:
    header: str  # opens an assistant turn; "" when the template writes none
    end_of_turn: str  # the special token that closes an assistant turn
    end_of_turn_id: int
    special_tokens: tuple[str, ...]  # longest first


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


def _special_tokens(tokenizer: Any) -> tuple[str, ...]:
    tokens = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    tokens |= set(tokenizer.all_special_tokens)
    return tuple(sorted((t for t in tokens if t), key=len, reverse=True))


def _first_special(text: str, start: int, specials: Sequence[str],
                   end: int | None = None) -> tuple[int, str] | None:
    """The leftmost special token in text[start:end] (longest at a tie)."""
    best = None
    for token in specials:
        i = text.find(token, start, end)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, token)
    return best


def render(tokenizer: Any, messages: list[dict[str, Any]], tools: Any = None,
           add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tools=list(tools) if tools else None,
                                         tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


@functools.lru_cache(maxsize=32)
def _layout(tokenizer: Any, template: str) -> TemplateLayout:
    del template  # part of the cache key only
    specials = _special_tokens(tokenizer)
    user = [{"role": "user", "content": _PROBE_USER}]
    plain = render(tokenizer, user)
    prompted = render(tokenizer, user, add_generation_prompt=True)
    header = prompted[_token_boundary(prompted, len(os.path.commonprefix([plain, prompted])),
                                      specials):]
    full = render(tokenizer, user + [{"role": "assistant", "content": _PROBE_ASSISTANT}])
    content_at = full.find(_PROBE_ASSISTANT)
    user_end = full.find(_PROBE_USER) + len(_PROBE_USER)
    if content_at < 0 or user_end < len(_PROBE_USER):
        raise EncodingError(None, "the chat template does not render message contents "
                                  "verbatim; cannot locate assistant turns")
    header = _header_in(full, header, user_end, content_at, specials)
    found = _first_special(full, content_at + len(_PROBE_ASSISTANT), specials)
    if found is None:
        raise EncodingError(None, "the chat template closes assistant turns with no special "
                                  f"token (after the content it writes "
                                  f"{full[content_at + len(_PROBE_ASSISTANT):]!r}); the model "
                                  "could not learn to stop")
    end_of_turn = found[1]
    ids = tokenizer.encode(end_of_turn, add_special_tokens=False)
    if len(ids) != 1:
        raise EncodingError(None, f"end-of-turn marker {end_of_turn!r} is not a single token")
    return TemplateLayout(header, end_of_turn, ids[0], specials)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids generation stops on: the chat template's end-of-turn token first, then EOS."""
    ids = []
    if tokenizer.chat_template:
        try:
            ids.append(template_layout(tokenizer).end_of_turn_id)
        except EncodingError as e:
            logging.warning("no end-of-turn token from the chat template: %s", e)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _token_boundary(text: str, cut: int, specials: Sequence[str]) -> int:
    """Moves `cut` back to the start of a special token it would split (Phi-3's generation
    prompt `<|assistant|>` shares `<|` with the `<|endoftext|>` it replaces)."""
    for token in specials:
        i = text.find(token, max(0, cut - len(token) + 1))
        if 0 <= i < cut:
            return i
    return cut


def _header_in(full: str, header: str, lo: int, hi: int, specials: Sequence[str]) -> str:
    """The generation prompt as it appears before assistant content in a full rendering.

    Some templates add more at generation time than they write in history (DeepSeek R1's
    `<think>` after `<｜Assistant｜>`); then the longest prefix of the prompt that is present
    and ends on a special token is the header.
    """
    if not header or full.find(header, lo, hi) >= 0:
        return header
    for cut in range(len(header) - 1, 0, -1):
        prefix = header[:cut]
        if any(prefix.endswith(t) for t in specials) and full.find(prefix, lo, hi) >= 0:
            return prefix
    raise EncodingError(None, f"the generation prompt {header!r} does not appear before "
                              "assistant turns in the rendered conversation")


def template_layout(tokenizer: Any) -> TemplateLayout:
    """The probed header and end-of-turn marker of the tokenizer's chat template."""
    if not tokenizer.chat_template:
        raise EncodingError(None, "the tokenizer has no chat template (set one from a file "
                                  "with chat_template_file=)")
    template = tokenizer.chat_template
    return _layout(tokenizer, template if isinstance(template, str) else repr(template))


def _anchors(message: dict[str, Any]) -> list[str]:
    """Texts a template may render for this message's content, most faithful first."""
    content = message.get("content") or ""
    candidates = [content, content.strip()]
    if "</think>" in content:
        candidates.append(content.split("</think>")[-1].strip())
    for call in message.get("tool_calls") or ():
        candidates.append(call["function"]["name"])
    return [c for i, c in enumerate(candidates) if c and c not in candidates[:i]]


def _find_anchor(text: str, message: dict[str, Any], start: int, what: str,
                 origin: Origin | None) -> tuple[int, int]:
    for anchor in _anchors(message):
        i = text.find(anchor, start)
        if i >= 0:
            return i, i + len(anchor)
    if message.get("tool_calls") and not (message.get("content") or "").strip():
        raise EncodingError(origin, f"{what}: its tool calls do not appear in the rendered "
                                    "conversation; does the chat template support tool calls?")
    raise EncodingError(origin, f"{what} does not appear in the rendered conversation where "
                                "expected; the template rewrites it in a way the mask cannot "
                                "follow")


def assistant_spans(text: str, messages: list[dict[str, Any]], layout: TemplateLayout,
                    origin: Origin | None = None) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant turn's supervised text."""
    spans = []
    cursor = 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        what = f"assistant turn (message {k})"
        if layout.header:
            at = text.find(layout.header, cursor)
            if at < 0:
                raise EncodingError(origin, f"{what}: no assistant header "
                                            f"{layout.header!r} found in the rendering")
            start = at + len(layout.header)
        else:
            previous = messages[k - 1] if k > 0 else None
            if previous is None or previous["role"] == "system":
                raise EncodingError(origin, f"{what} follows no user or tool turn; without an "
                                            "assistant header its start is unknown")
            _, prev_end = _find_anchor(text, previous, cursor, f"message {k - 1}", origin)
            closer = _first_special(text, prev_end, layout.special_tokens)
            if closer is None:
                raise EncodingError(origin, f"{what}: the turn before it is not closed by a "
                                            "special token")
            start = closer[0] + len(closer[1])
        _, content_end = _find_anchor(text, message, start, what, origin)
        marker = text.find(layout.end_of_turn, content_end)
        if marker < 0:
            raise EncodingError(origin, f"{what}: no end-of-turn marker "
                                        f"{layout.end_of_turn!r} after its content")
        end = marker + len(layout.end_of_turn)
        if text.find(layout.end_of_turn, start, marker) >= 0:
            raise EncodingError(origin, f"{what}: its span would cross another turn's "
                                        f"{layout.end_of_turn!r}; the template does not render "
                                        "it where expected")
        spans.append((start, end))
        cursor = end
    return spans


def _tokenize(tokenizer: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if "offset_mapping" not in encoded:
        raise EncodingError(None, "the tokenizer gives no character offsets (a fast, "
                                  "tokenizers-backed tokenizer is required)")
    return (np.asarray(encoded["input_ids"], np.int32),
            np.asarray(encoded["offset_mapping"], np.int64).reshape(-1, 2))


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: Any = None,
                train_on: TrainOn = "all_assistant",
                origin: Origin | None = None) -> dict[str, np.ndarray]:
    """Renders and tokenizes a conversation; returns `input_ids` int32[L] and `loss_mask`
    int8[L] (1 where the token is supervised). See the module docstring for the policy."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on={train_on!r}; expected one of {', '.join(TRAIN_ON)}")
    layout = template_layout(tokenizer)
    try:
        text = render(tokenizer, messages, tools)
    except Exception as e:  # jinja2 TemplateError, or raise_exception() inside the template
        raise EncodingError(origin, f"the chat template rejected the conversation: {e}") from e
    ids, offsets = _tokenize(tokenizer, text)
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        raise EncodingError(origin, "the rendering starts with two BOS tokens")
    if train_on == "all":
        return {"input_ids": ids, "loss_mask": np.ones(len(ids), np.int8)}
    spans = assistant_spans(text, messages, layout, origin)
    if train_on == "last_assistant":
        spans = spans[-1:]
    starts = offsets[:, 0]
    ends = np.maximum(offsets[:, 1], starts + 1)
    mask = np.zeros(len(ids), bool)
    for start, end in spans:
        in_span = (ends > start) & (starts < end)
        last = np.flatnonzero(in_span)[-1] if in_span.any() else None
        if last is None or ends[last] != end or ids[last] != layout.end_of_turn_id:
            raise EncodingError(origin, f"the tokens of an assistant turn do not end with the "
                                        f"end-of-turn token {layout.end_of_turn!r}")
        mask |= in_span
    return {"input_ids": ids, "loss_mask": mask.astype(np.int8)}


def encode_prompt(tokenizer: Any, messages: list[dict[str, Any]], tools: Any = None
                  ) -> np.ndarray:
    """The ids a model continues from to write the next assistant turn: the conversation
    rendered with the template's generation prompt, tokenized as in training."""
    try:
        text = render(tokenizer, messages, tools, add_generation_prompt=True)
    except Exception as e:  # jinja2 TemplateError, or raise_exception() inside the template
        raise EncodingError(None, f"the chat template rejected the conversation: {e}") from e
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)


def encode_text(tokenizer: Any, text: str) -> dict[str, np.ndarray]:
    """Plain text for continued pretraining: the tokenizer's own BOS handling, an EOS at the
    end so documents are told apart, every token supervised."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return {"input_ids": np.asarray(ids, np.int32), "loss_mask": np.ones(len(ids), np.int8)}


def encode_example(tokenizer: Any, example: Example, train_on: TrainOn = "all_assistant",
                   system_fallback: bool = True) -> dict[str, np.ndarray]:
    """Encodes a normalised example. With `system_fallback`, a template that rejects a system
    message gets its text merged into the first user turn instead (documented in README)."""
    if isinstance(example, Document):
        return encode_text(tokenizer, example.text)
    assert isinstance(example, Conversation)
    messages = example.template_messages()
    try:
        return encode_chat(tokenizer, messages, example.tools, train_on, example.origin)
    except EncodingError as e:
        if not (system_fallback and messages[0]["role"] == "system"
                and "rejected" in e.problem and "system" in e.problem.lower()):
            raise
    return encode_chat(tokenizer, merge_system_into_first_user(messages), example.tools,
                       train_on, example.origin)


def merge_system_into_first_user(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    system, rest = messages[0], [dict(m) for m in messages[1:]]
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{system['content']}\n\n{m['content']}"
            break
    return rest
