"""The machine a benchmark row was measured on: architecture, processor model, cores.

XLA's CPU code and PyTorch's kernels rank differently from one processor to the next (an
AMD EPYC and an Intel Xeon of the same core count give other ratios), so every CPU row
names its processor."""

from __future__ import annotations

import os
import platform


def processor() -> str:
    """The model name /proc/cpuinfo gives (with family and model numbers where the name
    is generic), else what `platform` knows."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown processor"
    name = fields.get("model name") or platform.processor() or "unknown processor"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def describe() -> str:
    """"x86_64, Intel(R) Xeon(R) Processor (family 6 model 167), 2 cores"."""
    return f"{platform.machine()}, {processor()}, {os.cpu_count()} cores"
