"""Tiny byte-level BPE tokenizers built in-process, one per chat template family.

Each keeps its template's special tokens as single tokens, as the real tokenizers do.
"""

from __future__ import annotations

import functools
import os
import re

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

TEMPLATES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "realworld", "templates")

# bos, eos per template family (None where the family has none).
_BOS_EOS = {
    "chatml": (None, "<|im_end|>"),
    "deepseek-v3_r1": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "gemma2": ("<bos>", "<eos>"),
    "gemma3": ("<bos>", "<eos>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama3.1": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama3.2": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral-v0.3": ("<s>", "</s>"),
    "phi3": ("<s>", "<|endoftext|>"),
    "qwen2": (None, "<|im_end|>"),
    "qwen2.5": (None, "<|im_end|>"),
    "qwen3": (None, "<|im_end|>"),
    "zephyr": ("<s>", "</s>"),
}
_SPECIAL = re.compile(r"<\|[a-z_]+\|>|<｜[^｜]+｜>|<(?:start|end)_of_turn>|\[/?[A-Z_]+\]")

_CORPUS = [
    "You are a helpful assistant. Answer briefly and politely.",
    "What is the capital of France? The capital of France is Paris.",
    "Tell me a joke about cats. Why did the cat sit on the computer? To keep an eye on the mouse.",
    "The quick brown fox jumps over the lazy dog 0123456789 times.",
    "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}",
] * 20


def family(template_file: str) -> str:
    return os.path.basename(template_file).removesuffix(".jinja")


@functools.lru_cache(maxsize=None)
def bpe_tokenizer(template_file: str, register_specials: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the template's special tokens and chat template; without
    `register_specials` the markers are plain text split into byte pieces (a broken set-up)."""
    with open(template_file) as f:
        template = f.read()
    bos, eos = _BOS_EOS[family(template_file)]
    specials = sorted({*_SPECIAL.findall(template), *(t for t in (bos, eos) if t)})
    if not register_specials:
        specials, bos, eos = [], None, None
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos,
                                   additional_special_tokens=specials)
    fast.chat_template = template
    return fast


# Control markers a published template writes literally; a model with that template has each
# as one special token.
CONTROL_MARKER = re.compile(
    r"<\|[^<>|\s]+\|>|<｜[^｜]+｜>|<\|[a-z_]+>|<[a-z_]+\|>|<(?:start|end)_of_turn>"
    r"|\[/?[A-Z_]+\]|</?s>|<eos>|<bos>")
# bos, eos by the markers a template writes, first match wins (the set-up).
_FAMILY_BOS_EOS = (
    (("<|eot_id|>", "<|start_header_id|>"), "<|begin_of_text|>", "<|eot_id|>"),
    (("<|im_end|>",), None, "<|im_end|>"),
    (("<start_of_turn>", "<end_of_turn>", "<|turn>", "<turn|>"), "<bos>", "<eos>"),
    (("<｜end▁of▁sentence｜>", "<｜Assistant｜>"), "<｜begin▁of▁sentence｜>",
     "<｜end▁of▁sentence｜>"),
)
BASES = {"neox": "gpt-neox-20b", "mistral": "mistral-7b-instruct-v0.3"}


def bos_eos_for(template: str) -> tuple[str | None, str]:
    for markers, bos, eos in _FAMILY_BOS_EOS:
        if any(m in template for m in markers):
            return bos, eos
    return "<s>", "</s>"


@functools.lru_cache(maxsize=None)
def template_tokenizer(template_file: str, base: str = "neox") -> PreTrainedTokenizerFast:
    """The tokenizer a model with this published template would have: a real BPE (NeoX's
    byte-level or Mistral's SentencePiece-style vocabulary) whose special tokens are the
    template's literal control markers, with bos/eos chosen from the markers it writes."""
    with open(template_file, newline="") as f:
        template = f.read()
    bos, eos = bos_eos_for(template)
    realworld = os.path.dirname(os.path.abspath(template_file))
    while not os.path.isdir(os.path.join(realworld, "tokenizers")):  # templates/[trl-training/]
        realworld = os.path.dirname(realworld)
    tokenizer_json = os.path.join(realworld, "tokenizers", BASES[base], "tokenizer.json")
    tokenizer = Tokenizer.from_file(tokenizer_json)
    specials = sorted({*CONTROL_MARKER.findall(template), *(t for t in (bos, eos) if t)})
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos,
                                   additional_special_tokens=specials)
    fast.chat_template = template
    return fast
