"""INT8 after pruning: a quantization recipe composed with a pruning recipe, `<backend>/<pruning>+<quantization>`.

The prune stage runs the quantization recipe (e.g. `recipes/sparseml/int8.yaml`) last, after pruning and
recovery: post-training quantization calibrated on the training corpus (the quantization recipe's
`calibration`, read through `prune.calibration_batches`, never evaluation data). Weights are quantized
symmetrically (zero point 0), so a pruned zero stays a zero; the step checks that every zero survives.
The run then holds:

    model/                             the checkpoint with each quantized weight replaced by its INT8 value
                                       times its scale (FP32, exact) and each bias put on the int32 grid the
                                       INT8 graph adds it on, so every PyTorch stage reads the quantized
                                       weights and `sparsity.json` is recounted from them
    quantization/recipe.yaml           the backend's quantization recipe as applied (QUANTIZATION_SUBDIR)
    quantization/qparams.safetensors   the calibrated quantization state (scales, zero points, observers)
    quantization/int8.safetensors      the INT8 checkpoint: each quantized weight as int8 plus `<name>.scale`,
                                       every other tensor as saved in model/ (what `sizes` reports)
    quantization/quantization.json     what was quantized (`int8_attention`: the attention's matmuls too),
                                       calibration, zeros before and after

INC's quantization recipe (`recipes/inc/int8.yaml`) quantizes the exported ONNX graph instead and keeps it in
`quantization/` (harness.quantize_inc); both backends write the weights, the INT8 checkpoint and the summary
through `write_weights`, `summarize` and `write_state` here.

`restore` turns the run's PyTorch model back into the fake-quantized model the recipe made: the export stage
writes its graph (SparseML's QAT export, `export._sparseml_int8`, or INC's graph) and checks the graph against it.

With `qat_tokens` > 0 (and a `+distil` step for its training settings), the calibrated fake-quantized model
is trained before its weights are read: quantization-aware training, the same distillation as recovery.

SparseML 1.8 was written for torch <= 2.1: with torch 2.x's slotted `QConfig` it cannot attach its
scheme to a QConfig, so `_sparseml_qconfig` hands it a subclass that can (nothing else changes).
"""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from harness import timing
from harness.errors import HarnessError
from harness.layout import INT8_FILE, INT8_GRAPH_FILE, MODEL_SUBDIR, QUANTIZATION_SUBDIR, to_json
from harness.recipes import Recipe

RECIPE_FILE = "recipe.yaml"
QPARAMS_FILE = "qparams.safetensors"
SUMMARY_FILE = "quantization.json"
# Model types whose INT8 graph the backend's export cannot build: why, in one line.
UNSUPPORTED_MODEL_TYPES = {
    "sparseml": {"deberta-v2": "SparseML 1.8's INT8 ONNX conversion of its graph fails (a clean-up step removes "
                               "one node twice: ValueError list.remove)"},
}
# The parity of the INT8 graph with the fake-quantized PyTorch model (whose biases sit on the graph's int32
# grid): the same integer arithmetic, so they agree to float rounding (MiniLM 90 %: max abs diff 2.4e-6),
# except where float rounding moves an activation across an INT8 rounding boundary: that element is one
# step off and the step spreads through the next layers; in a decoder, to every later position. A tiny
# random GPT-2's logits match to 1e-7 up to a sequence's first flip and by 1.7 % of their mean in all;
# SmolLM2 50 %'s match exactly up to position 7 of 18 and by 3.2 % in all, against 28 % between the
# fake-quantized model and the same weights with FP32 activations (per-tensor INT8 steps are coarse next
# to Llama's activation outliers, so one flip moves much). The bound is the larger of the two below.
INT8_MEAN_RTOL = 3e-2  # mean |ONNX - fake-quantized| <= this x mean |fake-quantized|, or
INT8_FLIP_SHARE = 0.25  # <= this x mean |fake-quantized - FP32 activations| (the quantization's own effect)
# ONNX Runtime's u8s8 integer kernels on CPUs without VNNI (AVX2, AVX-512F alone) add pairs of products in
# int16 with saturation (vpmaddubsw), so an INT8 graph strays further there: INC's tiny DeBERTa 3.1 % of the
# mean output on an AVX2-only EPYC. Both bounds are relaxed by this factor on such CPUs.
NO_VNNI_FACTOR = 2.0

# SmoothQuant (the quantization recipe's `smoothing` strength > 0) per model type: SparseML's SmoothQuantModifier
# mappings, [the layers sharing an input, the norm whose output is that input]; it divides the norm's output
# per channel by a scale and multiplies the layers' input columns by it (the same function, flatter
# activations; pruned zeros stay zero).
SMOOTHING_MAPPINGS = {
    "llama": [[["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"],
              [["re:.*gate_proj", "re:.*up_proj"], "re:.*post_attention_layernorm"]],
}

# Model types whose attention matmuls the INT8 step can quantize (`fp32_attention=false`): SparseML's model
# modification swaps their self-attention for one computing QK^T and scores x V in quantizable matmul modules,
# which its modifier quantizes and its export turns into MatMulInteger (checked here for these two).
INT8_ATTENTION = ("bert", "llama")


def int8_parity_factor() -> float:
    """How much looser the INT8 parity bounds are on this CPU (`NO_VNNI_FACTOR` without VNNI, else 1)."""
    return 1.0 if timing.cpu_has_vnni() else NO_VNNI_FACTOR


def check_available(recipe: Recipe, checkpoint: Path) -> None:
    """Fail in one line on a composed recipe whose backend cannot quantize this model (its `checkpoint`
    directory) to a DeepSparse INT8 graph here."""
    if recipe.quantization is None:
        return
    model_type = json.loads((Path(checkpoint) / "config.json").read_text()).get("model_type")
    reason = UNSUPPORTED_MODEL_TYPES.get(recipe.backend, {}).get(model_type)
    if reason:
        raise HarnessError(f"recipe {recipe.name} cannot quantize {model_type} models: {reason}")
    if not recipe.quantization.params.get("fp32_attention", True) and model_type not in INT8_ATTENTION:
        raise HarnessError(f"recipe {recipe.name}: fp32_attention=false has no quantizable-matmul modification for "
                           f"{model_type} models here (known: {', '.join(INT8_ATTENTION)}); use fp32_attention=true")
    if recipe.quantization.params.get("smoothing", 0.0) and model_type not in SMOOTHING_MAPPINGS:
        raise HarnessError(f"recipe {recipe.name}: smoothing has no mappings for {model_type} models "
                           f"(known: {', '.join(SMOOTHING_MAPPINGS)}); use smoothing=0")


def quantization_dir(run_path: Path) -> Path:
    return Path(run_path) / QUANTIZATION_SUBDIR


def int8_checkpoint(run_path: Path) -> Path:
    return quantization_dir(run_path) / INT8_FILE


def quantized_graph(run_path: Path) -> Path | None:
    """The INT8 graph of a run whose quantization recipe quantized its ONNX graph (INC), else None."""
    graph = quantization_dir(run_path) / INT8_GRAPH_FILE
    return graph if graph.exists() else None


def is_quantized(run_path: Path) -> bool:
    """Was this run (or a run's model/ directory) quantized by a composed recipe?"""
    path = Path(run_path)
    path = path.parent if path.name == MODEL_SUBDIR else path
    return (quantization_dir(path) / SUMMARY_FILE).exists()


# --- SparseML --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _sparseml_qconfig():
    """SparseML sets `qconfig.quantization_scheme`; torch 2.x's QConfig has __slots__, a subclass does not."""
    import torch.ao.quantization as torch_quantization
    from sparseml.pytorch.sparsification.quantization import quantization_scheme

    class QConfig(torch_quantization.QConfig):
        pass

    original = quantization_scheme.torch_quantization
    quantization_scheme.torch_quantization = _Namespace(torch_quantization, QConfig=QConfig)
    try:
        yield
    finally:
        quantization_scheme.torch_quantization = original


class _Namespace:
    """A module's attributes, some replaced."""

    def __init__(self, module, **replaced):
        self._module, self._replaced = module, replaced

    def __getattr__(self, name):
        return self._replaced[name] if name in self._replaced else getattr(self._module, name)


def _manager(text: str, model):
    """SparseML's manager for `text`, each `ignore` list with the layers named by their last part expanded."""
    from sparseml.pytorch.optim import ScheduledModifierManager

    try:
        manager = ScheduledModifierManager.from_yaml(text)
    except (ValueError, TypeError) as exc:
        raise HarnessError(f"SparseML cannot load the quantization recipe: {exc}") from None
    for modifier in manager.modifiers:
        if getattr(modifier, "ignore", None):
            modifier.ignore = _every_block(modifier.ignore, model)
    return manager


def _every_block(entries: list[str], model) -> list[str]:
    """SparseML matches an `ignore` entry as a module name prefix or a type name; here an entry that is
    neither but ends module names (`down_proj`, `mlp.c_proj`) stands for those modules, in every block."""
    return [name for entry in entries for name in _matching(entry, model) or [entry]]


def _matching(entry: str, model) -> list[str]:
    """`entry` itself if SparseML matches it to a module (by name prefix or type name), else the names of
    the modules it ends; [] if none."""
    names = [name for name, _ in model.named_modules()]
    if any(name.startswith(entry) for name in names) or any(type(module).__name__ == entry for module in model.modules()):
        return [entry]
    return [name for name in names if name.endswith(f".{entry}")]


def _smooth(model, strength: float, calibration: list[dict]) -> int:
    """SparseML's SmoothQuant on `model` in place at `strength`, calibrated on `calibration`; returns the
    number of norms smoothed."""
    from sparseml import core as logger_module
    from sparseml.core.framework import Framework
    from sparseml.core.recipe import Recipe as SessionRecipe
    from sparseml.core.session import create_session

    from harness.backends.sparseml import _loggers, _quiet_sparseml

    mappings = SMOOTHING_MAPPINGS[model.config.model_type]
    stage = {"smoothing_modifiers": {"SmoothQuantModifier": {"smoothing_strength": strength, "mappings": mappings}}}
    norms = {name: module.weight.detach().clone() for name, module in model.named_modules()
             if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 1}
    with _quiet_sparseml(), create_session() as session:
        session.initialize(framework=Framework.pytorch, recipe=SessionRecipe.model_validate({"smoothing_stage": stage}),
                           model=model, calib_data=calibration, start=-1, loggers=_loggers(logger_module))
        session.finalize()
    return sum(not torch.equal(module.weight, norms[name]) for name, module in model.named_modules() if name in norms)


def _forward(batch: dict, module) -> None:
    module(**{name: value for name, value in batch.items() if name != "labels"})


def conv1d_modules(model) -> dict[str, torch.nn.Module]:
    """The model's transformers `Conv1D` layers (GPT-2's: y = x W + b, W stored [in, out]) by name."""
    from transformers.pytorch_utils import Conv1D

    return {name: module for name, module in model.named_modules() if isinstance(module, Conv1D)}


def conv1d_weights(model) -> set[str]:
    """The names of the model's Conv1D weights: stored [in, out], where a Linear's are [out, in]."""
    return {f"{name}.weight" for name in conv1d_modules(model)}


def _as_linear(model):
    """`model` with each `Conv1D` replaced by the equal `torch.nn.Linear` (W stored [out, in]), the layer type
    SparseML's modifier quantizes."""
    for name, module in conv1d_modules(model).items():
        linear = torch.nn.Linear(*module.weight.shape, dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.t())
            linear.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return model


def _quantizable(model, int8_attention: bool):
    """`model` ready for SparseML's modifier: Conv1D as Linear and, with `int8_attention`, SparseML's own
    modification of its attention into quantizable matmuls."""
    model = _as_linear(model)
    if int8_attention:  # (sparseml.transformers is a slow import: only for the runs that need it)
        import sparseml.transformers.sparsification.modification  # noqa: F401  (registers the modifications)
        from sparseml.modifiers.quantization_legacy.modification import modify_model

        model = modify_model(model)
    return model.eval()


def _sparseml_quantize(model, text: str, calibration: list[dict], int8_attention: bool):
    """`model` with SparseML's QAT modules, observers calibrated on `calibration` and then frozen."""
    from harness.backends.sparseml import _loggers, _quiet_sparseml
    from sparseml.pytorch import utils as logger_module

    model = _quantizable(model, int8_attention)
    with _quiet_sparseml(), _sparseml_qconfig(), \
            tqdm(calibration, desc="INT8 calibration", unit="batch") as batches:  # minutes on a 1.5B model
        _manager(text, model).apply(model, loggers=_loggers(logger_module), calibration_dataloader=batches,
                                    calibration_function=_forward)
    model.apply(torch.ao.quantization.disable_observer)
    return model


def _sparseml_restore(model, text: str, int8_attention: bool):
    """The QAT structure of `text` on `model`, observers off (their state comes from qparams)."""
    from harness.backends.sparseml import _loggers, _quiet_sparseml
    from sparseml.pytorch import utils as logger_module

    model = _quantizable(model, int8_attention)
    with _quiet_sparseml(), _sparseml_qconfig():
        _manager(text, model).apply_structure(model, loggers=_loggers(logger_module))
    model.apply(torch.ao.quantization.disable_observer)
    return model


# --- the step --------------------------------------------------------------------------------------

def _quantized_weights(qat_model) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{weight parameter name: (int8 values, scale, zero point)} of every weight the QAT model quantizes."""
    quantized = {}
    for name, module in qat_model.named_modules():
        fake_quant = getattr(module, "weight_fake_quant", None)
        if not isinstance(fake_quant, torch.ao.quantization.FakeQuantizeBase):  # Identity: weights kept FP32
            continue
        scale, zero_point = fake_quant.scale, fake_quant.zero_point  # what its forward and the export use
        if fake_quant.is_per_channel:
            shape = [-1] + [1] * (module.weight.dim() - 1)
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        values = torch.clamp(torch.round(module.weight.detach() / scale) + zero_point,
                             fake_quant.quant_min, fake_quant.quant_max)
        quantized[name] = (values.to(torch.int8), scale.float(), zero_point)
    return quantized


def _bias_scales(qat_model) -> dict[str, torch.Tensor]:
    """{bias parameter name: input scale x weight scale} of every quantized layer with a bias and INT8 inputs:
    the INT8 graph adds its bias as int32 on that grid (SparseML's export quantizes it so)."""
    scales = {}
    for name, wrapper in qat_model.named_modules():
        inner, quant = getattr(wrapper, "module", None), getattr(wrapper, "quant", None)
        input_fake_quant = getattr(quant, "activation_post_process", None)
        weight_fake_quant = getattr(inner, "weight_fake_quant", None)
        if all(isinstance(q, torch.ao.quantization.FakeQuantizeBase) for q in (input_fake_quant, weight_fake_quant)) \
                and getattr(inner, "bias", None) is not None:
            scales[_hf_name(f"{name}.module", "bias")] = (input_fake_quant.scale * weight_fake_quant.scale).float()
    return scales


def _hf_name(qat_name: str, parameter: str = "weight") -> str:
    """`...query.module` (SparseML's QuantWrapper child) -> `...query.weight` of the original model."""
    parts = [part for part in qat_name.split(".") if part != "module"]
    return ".".join(parts + [parameter])


def check_layers(recipe: Recipe, model) -> None:
    """Fail in one line, before pruning, on a composed recipe whose `fp32_layers` names no layer of `model`."""
    fp32_layers = recipe.quantization.params.get("fp32_layers", "none")
    if fp32_layers != "none" and not _matching(fp32_layers, model):
        raise HarnessError(f"recipe {recipe.name}: fp32_layers={fp32_layers} names no layer of the model "
                           f"(a module name, or its last part such as down_proj)")


def quantize(loaded, recipe: Recipe, calibration: list[dict], targets: list[str], output: Path,
             train: Callable | None = None) -> dict:
    """Quantize a pruned `loaded.model` with SparseML's `recipe.quantization`, calibrated on `calibration`; write
    the run's `quantization/` into `output` (the staging run directory) and put the quantized weights into the
    model (FP32 values INT8 x scale), ready for save_pretrained. Returns the summary.

    With `train` (the recipe's `qat_tokens`: quantization-aware training), the calibrated fake-quantized model is
    trained before its weights are read: `train(qat_model, its names of the targets)` -> a `layout.Recovery`."""
    from safetensors.torch import save_file

    model = loaded.model
    quantization = recipe.quantization
    text = quantization.render_text(0.0, targets)
    strength = quantization.params.get("smoothing", 0.0)
    smoothed = _smooth(model, strength, calibration) if strength else 0
    int8_attention = not quantization.params.get("fp32_attention", True)
    qat = _sparseml_quantize(copy.deepcopy(model), text, calibration, int8_attention)  # the original keeps HF's names
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied LM head under its own name too
    transposed = conv1d_weights(model)  # quantized as Linear [out, in], stored [in, out]
    trained = _train(qat, params, transposed, targets, train) if train else None
    quantized = {_hf_name(name): parts for name, parts in _quantized_weights(qat).items()}
    missing = sorted(set(quantized) - set(params))
    if missing:
        raise HarnessError(f"quantization recipe {quantization.name} quantized {missing[0]}, which the model does not have")
    if not set(quantized) & set(targets):
        raise HarnessError(f"quantization recipe {quantization.name} quantized none of the pruned target weights "
                           f"(e.g. {targets[0]}): its modifier does not cover their layer type")
    asymmetric = sorted(name for name, (_, _, zero_point) in quantized.items() if bool((zero_point != 0).any()))
    if asymmetric:
        raise HarnessError(f"quantization recipe {quantization.name} gives {asymmetric[0]} a zero point other than 0: "
                           f"quantize weights symmetrically (weights: {{symmetric: true}}) so pruned zeros stay zero")
    quantized = {name: (values.t(), scale.t()) if name in transposed else (values, scale)
                 for name, (values, scale, _) in quantized.items()}
    zeros = write_weights(params, quantized, quantization.name)
    bias_scales = _bias_scales(qat)
    with torch.no_grad():  # the biases as the INT8 graph holds them, so PyTorch and the graph compute the same
        for name, scale in bias_scales.items():
            params[name].copy_(torch.round(params[name] / scale) * scale)
    target = quantization_dir(output)
    target.mkdir()
    qparams = {key: value.detach().clone().contiguous() for key, value in qat.state_dict().items()
               if "fake_quant" in key or "activation_post_process" in key}
    save_file(qparams, target / QPARAMS_FILE, metadata={"format": "pt"})
    summary = dict(summarize(quantization, calibration, quantized, targets, zeros), int32_biases=len(bias_scales),
                   smoothing={"strength": strength, "norms": smoothed}, int8_attention=int8_attention)
    if trained:
        summary["qat"] = to_json(trained)
    write_state(target, text, model, quantized, summary)
    return summary


def _train(qat, params: dict, transposed: set[str], targets: list[str], train: Callable):
    """Quantization-aware training of the calibrated `qat` model by `train`, then its trained weights (norms and
    biases too, if they trained) copied into `params`, the original model's (`transposed`: its Conv1D weights).
    The observers stay off: the calibrated scales are fixed, so what trains is the weights under them (and a
    resumed run needs only the weights)."""
    names = {_hf_name(name.rpartition(".")[0], name.rpartition(".")[2]): name for name, _ in qat.named_parameters()}
    unknown = sorted(set(names) - set(params))
    if unknown:
        raise HarnessError(f"the quantization-aware model has a parameter the model does not have ({unknown[0]})")
    trained = train(qat, [names[name] for name in targets])
    qat_params = dict(qat.named_parameters())
    with torch.no_grad():
        for name, qat_name in names.items():
            params[name].copy_(qat_params[qat_name].t() if name in transposed else qat_params[qat_name])
    return trained


def write_weights(params: dict, quantized: dict[str, tuple[torch.Tensor, torch.Tensor]], recipe_name: str) -> tuple[int, int]:
    """Put each quantized weight (INT8 values, scale) into `params` as values x scale; (zeros before, after).
    Fails if a pruned zero became non-zero."""
    zeros_before = zeros_after = lost = 0
    with torch.no_grad():
        for name, (values, scale) in quantized.items():
            weight = params[name]
            was_zero = weight == 0
            weight.copy_(values.float() * scale)
            zeros_before += int(was_zero.sum())
            zeros_after += int((weight == 0).sum())
            lost += int((was_zero & (weight != 0)).sum())
    if lost:
        raise HarnessError(f"quantization recipe {recipe_name} turned {lost} pruned zeros into non-zeros")
    return zeros_before, zeros_after


def summarize(quantization: Recipe, calibration: list[dict], quantized: dict, targets: list[str],
              zeros: tuple[int, int]) -> dict:
    """The part of `quantization.json` every backend writes."""
    target_set = set(targets)
    return {
        "recipe": quantization.name, "backend": quantization.backend,
        "calibration": {"corpus": quantization.calibration.corpus, "sequences": len(calibration),
                        "tokens": int(sum(batch["input_ids"].numel() for batch in calibration))},
        "quantized_weights": len(quantized),
        "quantized_targets": len(target_set & set(quantized)),
        "unquantized_targets": sorted(target_set - set(quantized)),
        "zeros_before": zeros[0], "zeros_after": zeros[1], "zeros_preserved": True,
    }


def write_state(target: Path, text: str, model, quantized: dict, summary: dict) -> None:
    """The recipe as applied, the INT8 checkpoint (int8 values plus `<name>.scale`) and the summary, in `target`."""
    from safetensors.torch import save_file

    target.mkdir(exist_ok=True)
    (target / RECIPE_FILE).write_text(text)
    int8 = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items() if name not in quantized}
    for name, (values, scale) in quantized.items():
        int8[name], int8[f"{name}.scale"] = values.contiguous(), scale.reshape(-1).contiguous()
    save_file(_untied(int8), target / INT8_FILE, metadata={"format": "pt"})
    (target / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def _untied(tensors: dict) -> dict:
    """safetensors refuses tensors sharing memory (tied embeddings): keep one copy of each storage."""
    seen, result = set(), {}
    for name, tensor in tensors.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            result[name] = tensor
    return result


def restore(model, run_path: Path):
    """The run's model (loaded from its model/) as the fake-quantized PyTorch model its recipe made: SparseML's,
    or for a graph INC quantized, the model rounding its activations like that graph."""
    from safetensors.torch import load_file

    graph = quantized_graph(run_path)
    if graph:
        from harness import quantize_inc  # it imports this module

        return quantize_inc.with_int8_activations(model, graph)
    directory = quantization_dir(run_path)
    int8_attention = json.loads((directory / SUMMARY_FILE).read_text()).get("int8_attention", False)
    model = _sparseml_restore(model, (directory / RECIPE_FILE).read_text(), int8_attention)
    qparams = load_file(directory / QPARAMS_FILE)
    state = model.state_dict()
    unknown = sorted(set(qparams) - set(state))
    if unknown:
        raise HarnessError(f"{directory}: the quantization state names {unknown[0]}, which the restored model lacks")
    for key, value in qparams.items():
        if state[key].shape != value.shape:  # per-channel observers start with empty buffers
            state[key].resize_(value.shape)
        state[key].copy_(value)
    return model
