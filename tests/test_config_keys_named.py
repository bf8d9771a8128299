"""Every config key that a message, hint or doc names exists: a hint that names a key the
user cannot set is worse than none."""

import ast
import glob
import os
import re

from coach_jax.config import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = tuple(base_config().keys())
# section.key[.key], as a whole word; the negative lookahead leaves file names alone.
KEY = re.compile(r"(?<![\w./-])(?:--config\.)?((?:%s)(?:\.[a-z_][a-z0-9_]*)+)(?![\w/(-])"
                 % "|".join(SECTIONS))
# Hugging Face tensor names ("model.layers.0.mlp...") share the "model." prefix.
HF_TENSORS = ("model.layers", "model.norm", "model.embed_tokens", "model.language_model",
              "model.visual", "model.audio_tower", "model.embed_vision", "model.embed_audio",
              "model.vision_tower", "model.multi_modal_projector")
FILE_SUFFIXES = ("json", "jsonl", "py", "md", "png", "txt", "parquet", "safetensors", "bin",
                 "jinja", "csv", "yaml", "log", "model")  # .model: a sentencepiece file


def existing_keys() -> set[str]:
    keys = set()

    def walk(prefix, tree):
        for key, value in tree.items():
            keys.add(prefix + key)
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
    walk("", base_config().to_dict())
    return keys


def named_keys(text: str) -> set[str]:
    return {m for m in KEY.findall(text) if m.rsplit(".", 1)[-1] not in FILE_SUFFIXES
            and not m.startswith(HF_TENSORS)}


def message_strings(path: str) -> list[str]:
    """The string literals of a module (f-string parts included), docstrings too."""
    tree = ast.parse(open(path).read())
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_the_pattern_finds_keys_and_skips_file_names():
    found = named_keys("set data.truncation='truncate' or --config.optimizer.name=lion; "
                       "see data/train.jsonl and eval.json and `schedule.name`; "
                       "model.layers.0.mlp.up_proj.weight is a tensor, data.overlong is not "
                       "a key")
    assert found == {"data.truncation", "optimizer.name", "schedule.name", "data.overlong"}
    assert "data.overlong" not in existing_keys()


def test_every_key_named_in_the_code_exists():
    keys, wrong = existing_keys(), []
    for path in sorted(glob.glob(os.path.join(ROOT, "coach_jax", "**", "*.py"),
                                 recursive=True)):
        for text in message_strings(path):
            wrong += [f"{os.path.relpath(path, ROOT)}: {k}" for k in named_keys(text)
                      if k not in keys]
    assert not wrong, "\n".join(wrong)


def test_every_key_named_in_the_docs_and_configs_exists():
    keys, wrong = existing_keys(), []
    paths = glob.glob(os.path.join(ROOT, "docs", "*.md")) + [os.path.join(ROOT, "README.md")]
    paths += glob.glob(os.path.join(ROOT, "configs", "*.py"))
    for path in sorted(paths):
        text = open(path).read()
        wrong += [f"{os.path.relpath(path, ROOT)}: {k}" for k in named_keys(text)
                  if k not in keys]
    assert not wrong, "\n".join(wrong)
