"""SFT record formats, detected from the whole record and normalised to a Conversation.

Formats: OpenAI `messages`, ShareGPT `conversations`, Alpaca, prompt/completion, plain
`text`. A record fits a format when it has the format's required keys and every other key
is either one the format reads or metadata. A key that would carry content but that the
format ignores makes the record fit nothing: silently dropping text is never an option.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

from coach_jax.data.conversation import ROLES, Conversation, Document, Example, Message
from coach_jax.data.errors import DataError, Origin

# Keys that describe a record rather than hold training text; ignored by every format.
METADATA_KEYS = frozenset({"id", "idx", "uuid", "source", "dataset", "category", "lang",
                           "language", "meta", "metadata", "task", "split", "tags", "license",
                           "url", "title", "score", "hash", "model", "timestamp"})

_FORMATS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # name: (required keys, optional keys)
    "openai": (frozenset({"messages"}), frozenset({"tools", "parallel_tool_calls"})),
    "sharegpt": (frozenset({"conversations"}), frozenset({"system", "tools"})),
    "alpaca": (frozenset({"instruction", "output"}), frozenset({"input", "system", "history"})),
    "prompt_completion": (frozenset({"prompt", "completion"}), frozenset({"system", "tools"})),
    "text": (frozenset({"text"}), frozenset()),
}
FORMATS = tuple(_FORMATS)


def _carries_content(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, (list, dict)) and bool(value)


def fits(record: dict[str, Any], name: str) -> bool:
    required, optional = _FORMATS[name]
    if not required <= record.keys():
        return False
    ignored = record.keys() - required - optional - METADATA_KEYS
    return not any(_carries_content(record[k]) for k in ignored)


def detect_format(record: Any, origin: Origin | None = None) -> str:
    """The one format that fits the record, or a DataError naming the keys seen."""
    if not isinstance(record, dict):
        raise DataError(origin, f"a record must be a JSON object, got {type(record).__name__}",
                        kind="unknown_format")
    matches = [name for name in _FORMATS if fits(record, name)]
    if len(matches) == 1:
        return matches[0]
    keys = ", ".join(sorted(record)) or "none"
    if not matches:
        raise DataError(origin, f"record fits no known format (keys seen: {keys}); expected "
                                "one of: messages (OpenAI), conversations (ShareGPT), "
                                "instruction+output (Alpaca), prompt+completion, text",
                        kind="unknown_format")
    raise DataError(origin, f"record fits several formats ({', '.join(matches)}; keys seen: "
                            f"{keys}); name the format with data.format", kind="unknown_format")


def normalize(record: Any, format: str, origin: Origin | None = None,
              require_answer: bool = True) -> Example:
    """The record as a Conversation (or a Document for `text`); DataError if it does not fit.
    `require_answer=False` accepts conversations with no assistant turn (prompts to
    generate for)."""
    if format not in _FORMATS:
        raise DataError(origin, f"unknown format {format!r}; known: {', '.join(FORMATS)}",
                        field="format", kind="unknown_format")
    if not isinstance(record, dict) or not fits(record, format):
        keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
        required, optional = _FORMATS[format]
        raise DataError(origin, f"record does not fit format {format!r} (keys seen: {keys}; "
                                f"required: {', '.join(sorted(required))}; optional: "
                                f"{', '.join(sorted(optional)) or 'none'})",
                        kind="unknown_format")
    example = _NORMALIZERS[format](record, origin)
    if (require_answer and isinstance(example, Conversation)
            and not any(m.role == "assistant" for m in example.messages)):
        raise DataError(origin, "no assistant turn: nothing to learn", kind="nothing_to_learn")
    return example


def _string(value: Any, origin: Origin | None, field: str, allow_empty: bool = False) -> str:
    if value is None and allow_empty:
        return ""
    if isinstance(value, list):  # OpenAI content parts
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise DataError(origin, f"content part of type {kind!r} is not supported "
                                        "(text only)", field=f"{field}[{i}]", kind="invalid")
            texts.append(_string(part.get("text"), origin, f"{field}[{i}].text"))
        value = "".join(texts)
    if not isinstance(value, str):
        kind = "missing" if value is None else type(value).__name__
        raise DataError(origin, f"expected a string, got {kind}", field=field,
                        kind="missing_field" if value is None else "invalid")
    if not value.strip() and not allow_empty:
        raise DataError(origin, "empty", field=field, kind="empty_field")
    return value


def _tools(value: Any, origin: Origin | None, field: str = "tools"
           ) -> tuple[dict[str, Any], ...] | None:
    """Tool schemas as `{"type": "function", "function": {...}}`; a JSON string is parsed."""
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(origin, f"not valid JSON ({e.msg})", field=field) from e
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataError(origin, "expected a list of tool schemas", field=field)
    out = []
    for i, tool in enumerate(value):
        schema = tool["function"] if tool.get("type") == "function" and "function" in tool else tool
        if not isinstance(schema.get("name"), str):
            raise DataError(origin, "tool has no name", field=f"{field}[{i}]")
        out.append({"type": "function", "function": schema})
    return tuple(out)


def _call_id(*parts: Any) -> str:
    """A deterministic 9-character id for tool calls that came without one."""
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:9]


def _tool_call(call: Any, origin: Origin | None, field: str, default_id: str) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise DataError(origin, "a tool call must be an object", field=field)
    function = call.get("function", call)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise DataError(origin, "tool call has no function name", field=field)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise DataError(origin, f"arguments are not valid JSON ({e.msg})",
                            field=f"{field}.arguments") from e
    return {"type": "function", "id": str(call.get("id") or default_id),
            "function": {"name": function["name"], "arguments": arguments}}


def _parse_messages(raw: Any, origin: Origin | None, key: str) -> tuple[Message, ...]:
    if not isinstance(raw, list) or not raw:
        raise DataError(origin, "expected a non-empty list of messages", field=key,
                        kind="empty_field")
    messages = []
    for i, m in enumerate(raw):
        field = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise DataError(origin, "a message must be an object", field=field)
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise DataError(origin, f"unknown role {role!r} (expected one of {', '.join(ROLES)})",
                            field=f"{field}.role", kind="invalid")
        calls = tuple(_tool_call(c, origin, f"{field}.tool_calls[{j}]", _call_id(origin, key, i, j))
                      for j, c in enumerate(m.get("tool_calls") or ()))
        content = _string(m.get("content"), origin, f"{field}.content",
                          allow_empty=bool(calls) or role == "assistant")
        if role == "assistant" and not content.strip() and not calls:
            raise DataError(origin, "empty assistant turn", field=f"{field}.content",
                            kind="empty_assistant")
        messages.append(Message(role, content, calls, m.get("tool_call_id"), m.get("name"),
                                _reasoning(m, origin, field)))
    return tuple(messages)


# Where records keep an assistant's reasoning: DeepSeek / Qwen3 / vLLM, OpenRouter, gpt-oss.
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


def _reasoning(message: dict[str, Any], origin: Origin | None, field: str) -> str | None:
    """The message's reasoning text, from the one key that holds it."""
    present = [k for k in REASONING_KEYS if _carries_content(message.get(k))]
    if not present:
        return None
    if len(present) > 1:
        raise DataError(origin, f"reasoning given twice ({', '.join(present)}); keep one",
                        field=field)
    if message.get("role") != "assistant":
        raise DataError(origin, "only assistant messages carry reasoning",
                        field=f"{field}.{present[0]}")
    return _string(message[present[0]], origin, f"{field}.{present[0]}")


def _openai(record: dict[str, Any], origin: Origin | None) -> Conversation:
    messages = _parse_messages(record["messages"], origin, "messages")
    return _checked(Conversation(messages, _tools(record.get("tools"), origin), origin))


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "chatgpt": "assistant", "bing": "assistant",
                   "bard": "assistant", "system": "system", "function_call": "assistant",
                   "observation": "tool", "tool": "tool", "function": "tool"}


def _sharegpt(record: dict[str, Any], origin: Origin | None) -> Conversation:
    raw = record["conversations"]
    if not isinstance(raw, list) or not raw:
        raise DataError(origin, "expected a non-empty list of turns", field="conversations",
                        kind="empty_field")
    messages = []
    if _carries_content(record.get("system")):
        messages.append(Message("system", _string(record["system"], origin, "system")))
    last_call: dict[str, Any] | None = None
    for i, turn in enumerate(raw):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise DataError(origin, "a turn must be an object", field=field)
        source = turn.get("from")
        if source not in _SHAREGPT_ROLES:
            raise DataError(origin, f"unknown speaker {source!r} (expected one of "
                                    f"{', '.join(_SHAREGPT_ROLES)})", field=f"{field}.from")
        role = _SHAREGPT_ROLES[source]
        value = _string(turn.get("value"), origin, f"{field}.value", allow_empty=True)
        if not value.strip():
            raise DataError(origin, f"empty {role} turn", field=f"{field}.value",
                            kind="empty_assistant" if role == "assistant" else "empty_field")
        if source == "function_call":
            try:
                call = json.loads(value)
            except json.JSONDecodeError as e:
                raise DataError(origin, f"function call is not valid JSON ({e.msg})",
                                field=f"{field}.value") from e
            last_call = _tool_call(call, origin, f"{field}.value", _call_id(origin, i))
            messages.append(Message("assistant", "", (last_call,)))
        elif role == "tool":
            call_id = last_call["id"] if last_call else None
            name = last_call["function"]["name"] if last_call else None
            messages.append(Message("tool", value, tool_call_id=call_id, name=name))
        else:
            messages.append(Message(role, value))
    return _checked(Conversation(tuple(messages), _tools(record.get("tools"), origin), origin))


def _alpaca(record: dict[str, Any], origin: Origin | None) -> Conversation:
    messages = []
    if _carries_content(record.get("system")):
        messages.append(Message("system", _string(record["system"], origin, "system")))
    for i, pair in enumerate(record.get("history") or ()):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise DataError(origin, "expected [instruction, response]", field=f"history[{i}]")
        messages.append(Message("user", _string(pair[0], origin, f"history[{i}][0]")))
        messages.append(Message("assistant", _string(pair[1], origin, f"history[{i}][1]")))
    instruction = _string(record["instruction"], origin, "instruction")
    extra = _string(record.get("input"), origin, "input", allow_empty=True)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages.append(Message("user", prompt))
    output = _string(record["output"], origin, "output", allow_empty=True)
    if not output.strip():
        raise DataError(origin, "empty assistant turn", field="output", kind="empty_assistant")
    messages.append(Message("assistant", output))
    return _checked(Conversation(tuple(messages), None, origin))


def _prompt_completion(record: dict[str, Any], origin: Origin | None) -> Conversation:
    def as_messages(value: Any, field: str, role: str) -> list[Message]:
        if isinstance(value, list):
            return list(_parse_messages(value, origin, field))
        return [Message(role, _string(value, origin, field))]

    messages = []
    if _carries_content(record.get("system")):
        messages.append(Message("system", _string(record["system"], origin, "system")))
    messages += as_messages(record["prompt"], "prompt", "user")
    completion = as_messages(record["completion"], "completion", "assistant")
    if any(m.role != "assistant" for m in completion):
        raise DataError(origin, "completion messages must all be from the assistant",
                        field="completion")
    messages += completion
    return _checked(Conversation(tuple(messages), _tools(record.get("tools"), origin), origin))


def _text(record: dict[str, Any], origin: Origin | None) -> Document:
    return Document(_string(record["text"], origin, "text"), origin)


def _checked(conversation: Conversation) -> Conversation:
    """Rejects empty assistant turns (a conversation with none is `normalize`'s call)."""
    origin = conversation.origin
    for i, m in enumerate(conversation.messages):
        if m.role == "assistant" and not m.content.strip() and not m.tool_calls:
            raise DataError(origin, "empty assistant turn", field=f"message {i}",
                            kind="empty_assistant")
    return conversation


_NORMALIZERS: dict[str, Callable[[dict[str, Any], Origin | None], Example]] = {
    "openai": _openai, "sharegpt": _sharegpt, "alpaca": _alpaca,
    "prompt_completion": _prompt_completion, "text": _text,
}


def role_order_problems(conversation: Conversation) -> list[str]:
    """Lint-level warnings about turn order that many templates reject or mis-render."""
    roles = [m.role for m in conversation.messages]
    problems = []
    if "system" in roles[1:]:
        problems.append("system message after the first turn")
    body = [r for r in roles if r != "system"]
    if body and body[0] != "user":
        problems.append(f"conversation starts with {body[0]!r}, not 'user'")
    if "user" not in body:
        problems.append("no user turn")
    for a, b in zip(body, body[1:]):
        if a == b and a in ("user", "assistant") and not (
                a == "assistant" and any(m.tool_calls for m in conversation.messages)):
            problems.append(f"two {a!r} turns in a row")
            break
    if body and body[-1] != "assistant":
        problems.append(f"conversation ends with {body[-1]!r}: its last turn teaches nothing")
    return problems
