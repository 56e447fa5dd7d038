"""Which weights a recipe may prune, and how sparse a saved checkpoint really is (read from its files)."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch

from harness.errors import HarnessError
from harness.layout import Sparsity

# Parameters that are never pruned by default: embeddings, LM heads, norms, biases, positions.
NEVER_BY_DEFAULT = re.compile(r"(embed|wte|wpe|lm_head|shared|norm|\.bias$|position|rel_embeddings|classifier|pooler)")
BLOCK_INDEX = re.compile(r"\.(\d+)\.")


def _linear_like(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def prunable_names(model: torch.nn.Module, targets="default") -> list[str]:
    """Parameter names a recipe prunes.

    `default`: the weight of every Linear/Conv1D inside a numbered transformer block, excluding
    embeddings, LM head, norms and biases. Otherwise `targets` is a list of regexes over parameter
    names (re.search).
    """
    if targets == "default":
        names = [f"{module_name}.weight" for module_name, module in model.named_modules()
                 if _linear_like(module) and BLOCK_INDEX.search(f".{module_name}.")
                 and not NEVER_BY_DEFAULT.search(f"{module_name}.weight")]
    else:
        patterns = [re.compile(t) for t in targets]
        names = [name for name, _ in model.named_parameters() if any(p.search(name) for p in patterns)]
    if not names:
        raise HarnessError(f"the recipe's targets {targets!r} match no parameter of this model")
    return names


def zero_fraction(tensors) -> float:
    """Fraction of exact zeros over all elements of `tensors` taken together."""
    tensors = list(tensors)
    return sum(int((t == 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)


def layer_of(name: str) -> str:
    """`model.decoder.layers.3.fc1.weight` -> `decoder.3`; names outside numbered blocks -> `other`."""
    match = BLOCK_INDEX.search(name)
    if not match:
        return "other"
    stack = "decoder" if ".decoder." in f".{name}" else "encoder" if ".encoder." in f".{name}" else ""
    return f"{stack}.{match.group(1)}" if stack else match.group(1)


def saved_tensors(model_dir: Path):
    """Yield (name, tensor) for each tensor in a checkpoint's safetensors files (or in one such file), one at a
    time (mmap).

    The file is reopened for each tensor: closing the handle releases the mapped pages, so resident
    memory stays near one tensor instead of growing to the size of the whole file.
    """
    from safetensors import safe_open

    files = [Path(model_dir)] if Path(model_dir).is_file() else sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise HarnessError(f"{model_dir} has no .safetensors weights")
    for file in files:
        with safe_open(file, framework="pt") as handle:
            names = list(handle.keys())
        for name in names:
            with safe_open(file, framework="pt") as handle:
                tensor = handle.get_tensor(name)
            yield name, tensor


def match_saved_name(saved_name: str, wanted: set[str]) -> str | None:
    """Saved names may lack the wrapper prefix of the in-memory names (e.g. `bert.`, `transformer.`)."""
    if saved_name in wanted:
        return saved_name
    for name in wanted:
        if name.endswith("." + saved_name) or saved_name.endswith("." + name):
            return name
    return None


def measure(model_dir: Path, prunable: list[str], target_percent: float) -> Sparsity:
    """Sparsity measured from the saved weights: achieved over the prunable set, overall, per layer."""
    wanted = set(prunable)
    totals = defaultdict(lambda: [0, 0])  # key -> [zeros, numel]
    found = set()
    for name, tensor in saved_tensors(model_dir):
        zeros, numel = int((tensor == 0).sum()), tensor.numel()
        totals["overall"][0] += zeros
        totals["overall"][1] += numel
        match = match_saved_name(name, wanted)
        if match:
            found.add(match)
            for key in ("prunable", f"layer:{layer_of(name)}"):
                totals[key][0] += zeros
                totals[key][1] += numel
    missing = wanted - found
    if missing:
        raise HarnessError(f"{len(missing)} prunable tensors are not in {model_dir}, e.g. {sorted(missing)[0]}")

    def percent(key: str) -> float:
        zeros, numel = totals[key]
        return round(100.0 * zeros / numel, 4) if numel else 0.0

    return Sparsity(
        target_percent=target_percent,
        achieved_percent=percent("prunable"),
        overall_percent=percent("overall"),
        prunable_params=totals["prunable"][1],
        total_params=totals["overall"][1],
        per_layer_percent={key.split(":", 1)[1]: percent(key) for key in sorted(totals) if key.startswith("layer:")},
        prunable_tensors=sorted(prunable),
    )
