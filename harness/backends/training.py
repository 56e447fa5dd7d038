"""The fine-tuning loop gradual recipes share: a few optimizer steps on calibration batches.

The loss is the model's own language-modelling loss when it has one (decoders, encoder-decoders),
and otherwise distillation: mean squared error to the dense model's outputs on the same batch,
so headless encoders such as MiniLM can be fine-tuned without labels.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable

import torch
from tqdm import tqdm


def _primary_output(outputs) -> torch.Tensor:
    return outputs.logits if getattr(outputs, "logits", None) is not None else outputs[0]


@contextmanager
def only_trainable(model: torch.nn.Module, names: list[str]):
    """Freeze every parameter but `names` (restoring the flags after), so fine-tuning changes nothing else."""
    wanted = set(names)
    flags = {name: param.requires_grad for name, param in model.named_parameters()}
    for name, param in model.named_parameters():
        param.requires_grad_(name in wanted)
    try:
        yield
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])


def fine_tune(model: torch.nn.Module, batches: list[dict], steps: int, lr: float,
              before_step: Callable[[int], None] = lambda step: None,
              after_step: Callable[[int], None] = lambda step: None, desc: str = "fine-tune",
              before_optimizer_step: Callable[[int], None] = lambda step: None) -> None:
    """Run `steps` AdamW steps cycling over `batches`; the callbacks let a pruner act around each step.

    `before_optimizer_step` runs between backward and the optimizer step (gradients are available).
    """
    if not batches:
        raise ValueError("gradual pruning needs calibration batches")
    has_labels = "labels" in batches[0]
    teacher = None if has_labels else copy.deepcopy(model).eval()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in tqdm(range(steps), desc=desc, unit="step"):
        batch = batches[step % len(batches)]
        before_step(step)
        outputs = model(**batch)
        if has_labels:
            loss = outputs.loss
        else:
            with torch.no_grad():
                target = _primary_output(teacher(**batch))
            loss = torch.nn.functional.mse_loss(_primary_output(outputs), target)
        loss.backward()
        before_optimizer_step(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after_step(step)
    model.eval()
