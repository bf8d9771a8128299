"""Data: reading SFT records, normalising formats, chat encoding with exact loss masks."""

from coach_jax.data.chat_encoding import (EncodingError, TemplateLayout, encode_chat,
                                          encode_example, encode_text, load_tokenizer,
                                          template_layout)
from coach_jax.data.conversation import Conversation, Document, Example, Message
from coach_jax.data.encoded import EncodedExample, EncodeOptions, EncodeReport, encode_all
from coach_jax.data.errors import DataError, Origin
from coach_jax.data.formats import FORMATS, detect_format, normalize
from coach_jax.data.lint import LintReport, inspect, lint, template_report
from coach_jax.data.readers import read_records
from coach_jax.data.sources import iter_examples, load_examples
from coach_jax.data.splits import EvalSplit, overlap, split_eval

__all__ = [
    "Conversation", "DataError", "Document", "EncodeOptions", "EncodeReport", "EncodedExample",
    "EncodingError", "EvalSplit", "Example", "FORMATS", "LintReport", "Message", "Origin",
    "TemplateLayout",
    "detect_format", "encode_all", "encode_chat", "encode_example", "encode_text", "inspect",
    "iter_examples", "lint", "load_examples", "load_tokenizer", "normalize", "overlap",
    "read_records", "split_eval", "template_layout", "template_report",
]
