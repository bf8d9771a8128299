"""LoRA adapters: targets by Hugging Face module name, PEFT folders in and out, merging."""

from coach_jax.adapters.peft_io import (AdapterError, load_peft, merge, save_peft, split,
                                        union)
from coach_jax.adapters.targets import TargetError, parse, resolve

__all__ = ["AdapterError", "TargetError", "load_peft", "merge", "parse", "resolve",
           "save_peft", "split", "union"]
