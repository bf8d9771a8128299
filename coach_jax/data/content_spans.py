"""Where each message's text lies in a rendered conversation, found exactly.

The conversation is rendered a second time with every message's text replaced by a unique
marker word (reasoning before `</think>` and the whitespace around the text kept, so the
template takes the same branches and trims the same way). Between the markers is the text
the template writes; the real rendering must hold exactly that text, with each message's
text in place of its marker. Searching the real rendering for the content instead would
find a one-letter answer ("A") inside a header ("ASSISTANT:").
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from coach_jax.data.errors import Origin
from coach_jax.data.template_layout import EncodingError, render

_THINK_END = "</think>"
_MARK = "Zqcoachmark{}Q"


def _split(content: str) -> tuple[str, str, str, str]:
    """(reasoning kept as written, leading space, text, trailing space) of a content."""
    reasoning = ""
    if _THINK_END in content:
        cut = content.rindex(_THINK_END) + len(_THINK_END)
        reasoning, content = content[:cut], content[cut:]
    text = content.strip()
    if not text:
        return reasoning, content, "", ""
    lead = content[:len(content) - len(content.lstrip())]
    return reasoning, lead, text, content[len(lead) + len(text):]


def _renderings(text: str) -> list[str]:
    """How a template may write a text: as is, or escaped by `tojson` (plain and HTML-safe)."""
    plain = json.dumps(text, ensure_ascii=False)[1:-1]
    ascii_ = json.dumps(text)[1:-1]
    html = (ascii_.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("'", "\\u0027"))
    return list(dict.fromkeys([text, plain, ascii_, html]))


def render_conversation(tokenizer: Any, messages: list[dict[str, Any]], tools: Any = None,
                        origin: Origin | None = None, add_generation_prompt: bool = False
                        ) -> str:
    """The rendering; a template's own error (raise_exception) becomes an EncodingError."""
    try:
        return render(tokenizer, messages, tools, add_generation_prompt)
    except Exception as e:  # jinja2 TemplateError, or raise_exception() in the template
        raise EncodingError(origin, f"the chat template rejected the conversation: {e}; fix "
                                    "the record, or set tokenizer.chat_template to a template "
                                    "that accepts it") from e


def render_located(tokenizer: Any, messages: list[dict[str, Any]], tools: Any,
                   origin: Origin | None = None,
                   prepare: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] = list
                   ) -> tuple[str, dict[int, list[tuple[int, int]]]]:
    """The real rendering of `prepare(messages)`, and for each message index the [start, end)
    character spans of its text in it, in rendering order (none for messages the template
    leaves out). Templates that write the time (`strftime_now`) get one retry should the
    clock tick between the two renderings."""
    for attempt in range(2):
        text = render_conversation(tokenizer, prepare(messages), tools, origin)
        try:
            return text, _content_spans(tokenizer, messages, tools, text, origin, prepare)
        except EncodingError:
            if attempt or "strftime_now" not in str(tokenizer.chat_template):
                raise
    raise AssertionError("unreachable")


def _content_spans(tokenizer: Any, messages: list[dict[str, Any]], tools: Any, text: str,
                   origin: Origin | None,
                   prepare: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
                   ) -> dict[int, list[tuple[int, int]]]:
    base = _MARK
    head, tail = base.split("{}")
    while any(head in m["content"] for m in messages if isinstance(m.get("content"), str)):
        head = "Z" + head
    base = head + "{}" + tail
    marked, texts = [], {}
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str):
            reasoning, lead, core, trail = _split(content)
            if core:
                texts[i] = core
                message = {**message, "content": reasoning + lead + base.format(i) + trail}
        marked.append(message)
    try:
        template_text = render(tokenizer, prepare(marked), tools)
    except Exception as e:  # noqa: BLE001 - the real rendering succeeded; this one must too
        raise EncodingError(origin, f"the chat template renders this conversation only with "
                                    f"its own text in place ({e})") from e
    pattern = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))
    found = [(m.start(), m.end(), int(m.group(1))) for m in pattern.finditer(template_text)]
    spans: dict[int, list[tuple[int, int]]] = {}
    at_real = at_template = 0
    for n, (start, end, i) in enumerate(found):
        between = template_text[at_template:start]
        following = template_text[end:found[n + 1][0] if n + 1 < len(found) else None]
        if not text.startswith(between, at_real) or i not in texts:
            raise _diverged(origin, i)
        at_real += len(between)
        for written in _renderings(texts[i]):
            if (text.startswith(written, at_real)
                    and text.startswith(following, at_real + len(written))):
                break
        else:
            raise _diverged(origin, i)
        spans.setdefault(i, []).append((at_real, at_real + len(written)))
        at_real += len(written)
        at_template = end
    if text[at_real:] != template_text[at_template:]:
        raise _diverged(origin, found[-1][2] if found else 0)
    return spans


def _diverged(origin: Origin | None, i: int) -> EncodingError:
    return EncodingError(origin, f"the chat template writes the text around message {i} "
                                 "differently depending on what the message says; the mask "
                                 "cannot follow it: set tokenizer.chat_template to a "
                                 "template that does not")
