"""The layout of a chat template: what it writes around an assistant turn.

`template_probe.py` finds it (once per template); `chat_encoding.py` builds masks from it;
`describe()` shows it (`--mode=inspect`). docs/data.md states the masking policy.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from coach_jax.data.errors import DataError, Origin

# Markers shaped like control tokens: a tokenizer that splits one into pieces is broken for
# this template (the model's own tokenizer has it as one special token).
CONTROL_SHAPED = re.compile(r"<\|[^<>\s]*\|>|<｜[^<>]*｜>|<\|[^<>\s|]+>|<[^<>\s|]+\|>"
                            r"|</?s>|<eos>|<bos>|<(?:start|end)_of_turn>")
END_OF_TURN_KEY = "data.end_of_turn"


class EncodingError(DataError):
    """The template or tokenizer cannot give an exact mask for this conversation (kind
    "template"), or for any conversation (kind "chat_template": never a skip)."""

    def __init__(self, origin: Origin | None, problem: str, kind: str = "template"):
        super().__init__(origin, problem, kind=kind)


@dataclasses.dataclass(frozen=True)
class TemplateLayout:
    header: str  # the assistant header as history writes it; "" when none is found
    header_source: str  # "generation prompt" | "conversation" | "none"
    # Whitespace-tolerant matches, longest first, each with the whitespace the generation
    # prompt writes after that much of the header (context, never trained).
    header_patterns: tuple[tuple[re.Pattern, str], ...]
    end_of_turn: str  # what closes the last assistant turn (special token or text)
    end_of_turn_id: int | None  # its id when it is one token
    closers: tuple[str, ...]  # what closes an assistant turn in any position
    tool_closers: tuple[str, ...]  # what closes a turn that ends with a tool call
    call_opener: tuple[str, ...]  # pieces written before a call's name (`<tool_call>`, `{"name":`)
    call_end: str  # text that ends a call where no token closes it (GLM's `</tool_call>`)
    append: str  # data.end_of_turn: inserted after a turn the template leaves open
    last_open: bool  # nothing closes the last assistant turn (and nothing is appended)
    prompt_suffix: str  # added to generation prompts of templates that ignore the flag
    eos: str | None  # supervised when the template writes it right after a closer
    content_parts: bool  # the template reads contents as lists of text parts
    special_tokens: tuple[str, ...]  # longest first

    @property
    def stop_tokens(self) -> tuple[str, ...]:
        """Single-token closers, the last turn's first: where generation stops."""
        ordered = (self.end_of_turn, *self.tool_closers, *self.closers)
        return tuple(dict.fromkeys(t for t in ordered if t in self.special_tokens))

    def describe(self) -> str:
        """The layout in a few lines, for `--mode=inspect`."""
        def kind(marker: str) -> str:
            return "special token" if marker in self.special_tokens else "text"
        lines = [f"assistant header: {self.header!r} (from the {self.header_source})"
                 if self.header else "assistant header: none found; supervision starts at "
                                     "the content"]
        if self.prompt_suffix:
            lines.append(f"generation prompts get {self.prompt_suffix!r} appended (the "
                         "template ignores add_generation_prompt)")
        lines.append("end of turn: " + ", ".join(f"{c!r} ({kind(c)})" for c in self.closers))
        if self.tool_closers and set(self.tool_closers) - set(self.closers):
            lines.append("tool-call turns end with: "
                         + ", ".join(repr(c) for c in self.tool_closers))
        if self.append:
            lines.append(f"appended: {self.append!r} after any assistant turn the template "
                         f"leaves open ({END_OF_TURN_KEY})")
        if self.last_open:
            fix = self.end_of_turn if self.end_of_turn_id is not None else self.eos or "</s>"
            lines.append("the template writes no end-of-turn marker after the last assistant "
                         "turn: the model learns to stop only from earlier turns (set "
                         f"{END_OF_TURN_KEY}={fix!r} to append it)")
        lines.append("supervised: text the template writes inside the turn after the header "
                     "(e.g. an empty think block), the content, the end-of-turn marker"
                     + (f" and {self.eos!r} right after it" if self.eos
                        and self.eos not in self.closers else "")
                     + "; a token holding the content's first character is supervised, one "
                       "spanning the end of the turn and what follows is not")
        return "\n".join(lines)

    def for_template(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Messages in the form the template reads."""
        return as_content_parts(messages) if self.content_parts else messages


def render(tokenizer: Any, messages: list[dict[str, Any]], tools: Any = None,
           add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tools=list(tools) if tools else None,
                                         tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def as_content_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """String contents as one text part each, for templates that read content as a list of
    parts (multimodal templates: LLaVA-OneVision)."""
    return [{**m, "content": [{"type": "text", "text": m["content"]}]}
            if isinstance(m.get("content"), str) else m for m in messages]
