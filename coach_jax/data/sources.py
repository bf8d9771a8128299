"""From files to normalised examples: read, detect the source's format once, normalise."""

from __future__ import annotations

from typing import Iterator, Sequence

from coach_jax.data.conversation import Example
from coach_jax.data.errors import DataError
from coach_jax.data.formats import FORMATS, detect_format, normalize
from coach_jax.data.readers import read_records


def iter_examples(paths: str | Sequence[str], format: str = "auto",
                  require_answer: bool = True) -> Iterator[Example | DataError]:
    """Every record of the source as an Example, or as the DataError that describes it.

    With format="auto" the first well-formed record decides the format for the whole source;
    a later record of another shape is an error naming its line and keys.
    """
    if format != "auto" and format not in FORMATS:
        raise DataError(None, f"unknown format {format!r}; known: auto, {', '.join(FORMATS)}",
                        field="format")
    chosen = None if format == "auto" else format
    for raw in read_records(paths):
        if raw.error is not None:
            yield raw.error
            continue
        try:
            if chosen is None:
                chosen = detect_format(raw.data, raw.origin)
            yield normalize(raw.data, chosen, raw.origin, require_answer)
        except DataError as e:
            yield e


def load_examples(paths: str | Sequence[str], format: str = "auto") -> list[Example]:
    """All examples of a source; the first bad record raises."""
    examples = []
    for item in iter_examples(paths, format):
        if isinstance(item, DataError):
            raise item
        examples.append(item)
    if not examples:
        raise DataError(None, f"{paths}: no records")
    return examples
