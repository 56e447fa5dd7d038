"""Intel Neural Compressor's post-training static INT8, composed after an INC pruning recipe (`inc/<pruning>+int8`).

INC exports its PyTorch INT8 models to ONNX through `onnxruntime.quantization`, which does not import with the
pinned onnx==1.14.1. Its ONNX Runtime adaptor quantizes an ONNX graph with INC's own quantizer instead, so this
step exports the pruned model to ONNX (FP32, parity-checked as every export is), quantizes that graph with
`neural_compressor.quantization.fit` calibrated on the training corpus, and writes into `quantization/`:

    model.onnx          the INT8 graph (INT8_GRAPH_FILE): QLinearMatMul on every Linear, weights int8, symmetric,
                        per tensor (zero point 0: a pruned zero stays a zero); the export stage copies it to onnx/
    recipe.yaml, quantization.json, int8.safetensors   as for SparseML (harness.quantize)

and puts each quantized weight's INT8 value times its scale into the run's PyTorch model, so `sparsity.json` and
the sizes read the quantized weights (PyTorch computes them with FP32 activations; the graph is the INT8 model).
`with_int8_activations` makes that model round like the graph: the export's parity reference.
The attention's two matmuls, the adds and the embeddings stay FP32: DeepSparse 1.8 failed to compile INC's graph
with INT8 adds (ONNX Runtime's contrib op QLinearAdd) and INT8 attention matmuls (an assertion in its planner).
So do the recipe's `fp32_layers` and a tied LM head (INC leaves it). Encoders and decoders (GPT-2's Conv1D
included): DeepSparse compiles all of GPT-2's INT8 graph and most of a Llama's (rotary Cos / Sin included,
unlike SparseML's export, which needs them as tables).
"""
from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from harness import export, quantize as common
from harness.errors import HarnessError
from harness.layout import INT8_GRAPH_FILE
from harness.onnx_graphs import graph_files, graph_io, onnx_feeds
from harness.recipes import Recipe

FP32 = {"weight": {"dtype": ["fp32"]}, "activation": {"dtype": ["fp32"]}}


class _Calibration:
    """INC's calibration dataloader: one (feeds, label) per calibration sequence."""

    batch_size = 1

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds

    def __iter__(self):
        return ((feed, 0) for feed in self.feeds)


def _activation_matmuls(graph) -> list[str]:
    """MatMul nodes with no weight (both inputs computed): the attention's QK^T and scores x V."""
    initializers = {init.name for init in graph.initializer}
    return [node.name for node in graph.node
            if node.op_type == "MatMul" and not any(name in initializers for name in node.input)]


def _used_opsets_only(model) -> None:
    """Drop the operator-set imports ONNX Runtime stamps on the graph but no node uses: DeepSparse refuses
    the graph over one of them (ai.onnx.ml 5, which its ONNX Runtime 1.15 does not know)."""
    used = {node.domain for node in model.graph.node} | {""}
    kept = [opset for opset in model.opset_import if opset.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def _fp32_nodes(graph, fp32_layers: str) -> list[str]:
    """The node-name patterns INC keeps FP32: the attention's matmuls and the MatMuls of the `fp32_layers`
    (a module name or its last part; the exporter names a Linear's node /<module path>/MatMul, a Conv1D's
    /<module path>/Gemm, which INC makes a MatMul named Gemm_MatMul)."""
    path = "[./]".join(re.escape(part) for part in fp32_layers.split("."))  # layers.0 stays one path part
    layers = [] if fp32_layers == "none" else [f".*/{path}/(Gemm_)?MatMul"]
    return [re.escape(name) for name in _activation_matmuls(graph)] + layers


def _fit(fp32_graph: Path, config_text: str, feeds: list[dict[str, np.ndarray]], fp32_layers: str):
    """INC's static post-training quantization of an ONNX graph: the quantized onnx.ModelProto."""
    import onnx
    from neural_compressor import PostTrainingQuantConfig, quantization, set_workspace

    from harness.backends import quiet

    model = onnx.load(str(fp32_graph))
    config = yaml.safe_load(config_text)
    config["op_name_dict"] = {**config.get("op_name_dict", {}),
                              **{pattern: FP32 for pattern in _fp32_nodes(model.graph, fp32_layers)}}
    config["calibration_sampling_size"] = [len(feeds)]
    with tempfile.TemporaryDirectory(prefix=".inc-", dir=fp32_graph.parent) as workspace, \
            quiet(logging.getLogger("neural_compressor"), logging.ERROR):  # its tuning strategy warns about mpi4py
        set_workspace(workspace)  # its tuning history, else ./nc_workspace/ wherever the harness runs
        quantized = quantization.fit(model, PostTrainingQuantConfig(**config), calib_dataloader=_Calibration(feeds))
    if quantized is None:
        raise HarnessError("Intel Neural Compressor found no INT8 graph for the model (quantization.fit returned None)")
    _used_opsets_only(quantized.model)
    return quantized.model


def _module_of(node) -> str:
    """The module a QLinearMatMul quantizes: the exporter names a Linear's MatMul after its module
    (`/encoder/layer.0/attention/self/query/MatMul`; a Conv1D's Gemm: `/transformer/h.0/attn/c_attn/Gemm`) and
    INC its quantized node after that (`..._quant`)."""
    return node.name.removesuffix("_quant").strip("/").rsplit("/", 1)[0].replace("/", ".")


def _weight_matmuls(graph) -> list:
    """The graph's QLinearMatMuls with a weight (an initializer as second input)."""
    initializers = {init.name for init in graph.initializer}
    return [node for node in graph.node if node.op_type == "QLinearMatMul" and node.input[3] in initializers]


def _graph_weights(graph, params: dict[str, torch.Tensor],
                   in_out: set[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{parameter name: (int8 values, scale)} of the graph's QLinearMatMul weights, in the parameter's layout
    ([out, in] for a Linear; [in, out], the graph's, for the weights named in `in_out`: GPT-2's Conv1D)."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    weights = {}
    for node in _weight_matmuls(graph):
        name = f"{_module_of(node)}.weight"
        values = torch.from_numpy(numpy_helper.to_array(initializers[node.input[3]]).copy())  # [in, out]
        values = values if name in in_out else values.t()
        zero_point = numpy_helper.to_array(initializers[node.input[5]])
        if name not in params or tuple(params[name].shape) != tuple(values.shape):
            raise HarnessError(f"INC's INT8 graph quantizes a MatMul ({node.name}) that is no Linear of the model")
        if zero_point.any():
            raise HarnessError(f"INC gave {name} a zero point other than 0: its recipe must quantize weights "
                               f"symmetrically (scheme: [sym]) so pruned zeros stay zero")
        scale = torch.tensor(float(numpy_helper.to_array(initializers[node.input[4]]).reshape(-1)[0]))
        weights[name] = (values, scale)
    return weights


@dataclass(frozen=True)
class _Step:
    """An INT8 activation step of the graph: a value is (q - zero_point) x scale, q an integer in [low, high]."""

    scale: float
    zero_point: int
    low: int
    high: int

    def round(self, values: torch.Tensor) -> torch.Tensor:
        steps = torch.clamp(torch.round(values / self.scale) + self.zero_point, self.low, self.high)
        return (steps - self.zero_point) * self.scale


def _activation_steps(graph) -> dict[str, tuple[_Step, _Step]]:
    """{module name: (its input's step, its product's step)} for each QLinearMatMul of the graph with a weight
    (QLinearMatMul inputs: x, x scale, x zero point, w, w scale, w zero point, y scale, y zero point)."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in graph.initializer}

    def step(scale: str, zero_point: str) -> _Step:
        zero = numpy_helper.to_array(initializers[zero_point])
        limits = np.iinfo(zero.dtype)
        return _Step(float(numpy_helper.to_array(initializers[scale]).reshape(-1)[0]), int(zero.reshape(-1)[0]),
                     int(limits.min), int(limits.max))

    return {_module_of(node): (step(node.input[1], node.input[2]), step(node.input[6], node.input[7]))
            for node in _weight_matmuls(graph)}


class _GraphRounding:
    """Hooks rounding a quantized layer's input to its QLinearMatMul's input step and its product, before the
    bias, to the output step. Only a layer's first call in a forward is the QLinearMatMul: the exporter names
    later calls `<module>_1/MatMul`, ... (DeBERTa's query and key projections of the relative positions), with
    the weight as an input, not an initializer, and INC keeps those FP32 like the attention's matmuls."""

    def __init__(self, model, steps: dict[str, tuple[_Step, _Step]]):
        self.steps = steps
        self.calls: dict[str, int] = {}
        model.register_forward_pre_hook(lambda module, args: self.calls.clear())

    def round_input(self, name: str, args: tuple):
        self.calls[name] = self.calls.get(name, 0) + 1
        return (self.steps[name][0].round(args[0]), *args[1:]) if self.calls[name] == 1 else None

    def round_product(self, name: str, module, output: torch.Tensor):
        if self.calls[name] > 1:
            return None
        step, bias = self.steps[name][1], module.bias
        return step.round(output) if bias is None else step.round(output - bias) + bias


def with_int8_activations(model, graph_path: Path):
    """The run's `model` (INT8 weights) rounding its activations like INC's INT8 graph at `graph_path` (hooks; the
    model changes in place). INC makes no fake-quantized PyTorch model; this is the export's parity reference."""
    import onnx

    modules = dict(model.named_modules())
    graph = onnx.load(str(graph_path), load_external_data=False).graph  # the steps are small inline initializers
    rounding = _GraphRounding(model, _activation_steps(graph))
    for name in rounding.steps:
        if name not in modules:
            raise HarnessError(f"INC's INT8 graph {graph_path} quantizes a MatMul of {name}, which the model lacks")
        modules[name].register_forward_pre_hook(lambda module, args, name=name: rounding.round_input(name, args))
        modules[name].register_forward_hook(
            lambda module, args, output, name=name: rounding.round_product(name, module, output))
    return model


def quantize(loaded, recipe: Recipe, calibration: list[dict], targets: list[str], output: Path) -> dict:
    """Quantize the pruned `loaded.model`'s ONNX graph with INC, calibrated on `calibration`; write the run's
    `quantization/` into `output` (the staging run directory) and the quantized weights into the model."""
    import onnx

    quantization = recipe.quantization
    text = quantization.render_text(0.0, targets)
    target = common.quantization_dir(output)
    fp32_dir = target / "fp32"
    fp32_dir.mkdir(parents=True)
    export.export_fp32(loaded, fp32_dir)
    export.check_parity(loaded, fp32_dir)
    fp32_graph = fp32_dir / graph_files(loaded.spec.architecture)[0]
    names = graph_io(fp32_graph)[0]
    feeds = [onnx_feeds(names, {key: value.numpy() for key, value in batch.items() if key != "labels"})
             for batch in calibration]
    int8_graph = _fit(fp32_graph, text, feeds, quantization.params.get("fp32_layers", "none"))
    shutil.rmtree(fp32_dir)
    params = dict(loaded.model.named_parameters())
    quantized = _graph_weights(int8_graph.graph, params, common.conv1d_weights(loaded.model))
    if not set(quantized) & set(targets):
        raise HarnessError(f"quantization recipe {quantization.name} quantized none of the pruned target weights "
                           f"(e.g. {targets[0]})")
    zeros = common.write_weights(params, quantized, quantization.name)
    onnx.save(int8_graph, str(target / INT8_GRAPH_FILE))
    summary = dict(common.summarize(quantization, calibration, quantized, targets, zeros), int8_attention=False,
                   graph=INT8_GRAPH_FILE)
    common.write_state(target, text, loaded.model, quantized, summary)
    return summary
