"""The FLOP-ideal speedup: what pruning would gain if every weight's multiply-accumulates scaled with its density.

The multiply-accumulates of one forward pass are counted from the model's own modules: Linear/Conv1D
weights scale with their measured density, everything else (attention score and context matmuls,
the LM head and any unpruned layer) stays dense. The bench divides measured speedups by it
(`efficiency`), which shows where Amdahl's law bites.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from harness.engines import synthetic_inputs
from harness.layout import FlopIdeal


class LinearCost(NamedTuple):
    macs: float  # multiply-accumulates of this Linear/Conv1D in the pass
    density: float  # non-zero fraction of its weight
    target: bool  # among the recipe's prunable weights


def linear_macs(model, call: Callable[[], object], targets: set[str]) -> tuple[float, dict[str, LinearCost]]:
    """Multiply-accumulates of one `call()`: the total over all matmuls, and the cost of each Linear/Conv1D
    (`targets`: parameter names the recipe prunes)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from harness.sparsity import _linear_like

    macs: dict[str, float] = {}
    hooks = []
    for name, module in model.named_modules():
        if _linear_like(module):
            def hook(mod, inputs, output, name=name):
                rows = inputs[0].numel() // inputs[0].shape[-1]
                macs[name] = macs.get(name, 0.0) + rows * mod.weight.numel()

            hooks.append(module.register_forward_hook(hook))
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            call()
    finally:
        for handle in hooks:
            handle.remove()
    modules = dict(model.named_modules())
    costs = {name: LinearCost(value, float((modules[name].weight != 0).sum()) / modules[name].weight.numel(),
                              f"{name}.weight" in targets)
             for name, value in macs.items()}
    return counter.get_total_flops() / 2, costs


def flop_ideal(total_macs: float, costs: dict[str, LinearCost]) -> FlopIdeal:
    """Ideal speedup when each weight's MACs scale with its density and every other matmul stays dense.

    The shares split the dense MACs into the recipe's prunable weights, other weights (LM head,
    task heads, anything the recipe leaves alone) and other matmuls (attention scores and context);
    `max_speedup` is Amdahl's limit with every prunable weight at 100 % sparsity.
    """
    prunable = sum(c.macs for c in costs.values() if c.target)
    other_linear = sum(c.macs for c in costs.values() if not c.target)
    sparse_macs = total_macs - sum(c.macs * (1 - c.density) for c in costs.values())
    return FlopIdeal(
        speedup=round(total_macs / sparse_macs, 4),
        macs_dense=total_macs,
        macs_sparse=sparse_macs,
        prunable_share=round(prunable / total_macs, 4),
        other_linear_share=round(other_linear / total_macs, 4),
        other_matmul_share=round(1 - (prunable + other_linear) / total_macs, 4),
        max_speedup=round(total_macs / (total_macs - prunable), 4) if prunable < total_macs else None,
    )


def flop_ideal_for(model, architecture: str, seq_len: int, targets: set[str]) -> FlopIdeal:
    """The FLOP-ideal speedup of one sequence (batch size cancels out); encoder-decoders per part and combined."""
    import torch

    values = synthetic_inputs(model.config, architecture, 1, seq_len)
    inputs = {k: torch.from_numpy(v) for k, v in values.items() if k in ("input_ids", "attention_mask")}
    if architecture != "encoder-decoder":
        return flop_ideal(*linear_macs(model, lambda: model(**inputs), targets))
    encoder_total, encoder_costs = linear_macs(model, lambda: model.get_encoder()(**inputs), targets)
    with torch.no_grad():
        hidden = model.get_encoder()(**inputs).last_hidden_state
    decoder_ids = torch.from_numpy(values["decoder_input_ids"])
    decoder_total, decoder_costs = linear_macs(model, lambda: model(
        encoder_outputs=(hidden,), attention_mask=inputs["attention_mask"], decoder_input_ids=decoder_ids), targets)
    combined = {f"encoder:{k}": v for k, v in encoder_costs.items()} | {f"decoder:{k}": v for k, v in decoder_costs.items()}
    ideal = flop_ideal(encoder_total + decoder_total, combined)
    ideal.parts = {"encoder": flop_ideal(encoder_total, encoder_costs), "decoder": flop_ideal(decoder_total, decoder_costs)}
    return ideal
