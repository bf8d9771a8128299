"""The one shape every SFT format is normalised to."""

from __future__ import annotations

import dataclasses
from typing import Any

from coach_jax.data.errors import Origin

ROLES = ("system", "user", "assistant", "tool")


@dataclasses.dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str
    tool_calls: tuple[dict[str, Any], ...] = ()  # {"type": "function", "id"?, "function": {...}}
    tool_call_id: str | None = None  # on tool messages: the call they answer
    name: str | None = None  # on tool messages: the function's name
    reasoning: str | None = None  # on assistant messages: reasoning before the answer

    def as_template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it (no keys a template might misread);
        reasoning as `reasoning_content` (the encoder renames it for templates that read
        `thinking`)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning:
            out["reasoning_content"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = [dict(call) for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


@dataclasses.dataclass(frozen=True)
class Conversation:
    """Messages plus the tools offered to the assistant; `origin` names the source record."""

    messages: tuple[Message, ...]
    tools: tuple[dict[str, Any], ...] | None = None
    origin: Origin | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.as_template_dict() for m in self.messages]

    def text_for_dedup(self) -> str:
        """Whitespace-normalised text of the whole conversation, for duplicate checks."""
        parts = [f"{m.role}:{' '.join(m.content.split())}:{m.tool_calls!r}"
                 + (f":{' '.join(m.reasoning.split())}" if m.reasoning else "")
                 for m in self.messages]
        return "\n".join(parts) + f"\ntools:{self.tools!r}"


@dataclasses.dataclass(frozen=True)
class Document:
    """Plain text for continued pretraining: every token is supervised."""

    text: str
    origin: Origin | None = None

    def text_for_dedup(self) -> str:
        return " ".join(self.text.split())


Example = Conversation | Document
