"""ONNX graphs of an export: which files an architecture has, their inputs and outputs, feeds, running
them on ONNX Runtime, and fixed-shape copies for DeepSparse (see `export` for what the graphs hold)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from harness.errors import HarnessError

GRAPHS = {
    "decoder": ("model.onnx",),
    "encoder": ("model.onnx",),
    "encoder-decoder": ("encoder_model.onnx", "decoder_model.onnx"),
}


def graph_files(architecture: str) -> tuple[str, ...]:
    """The ONNX file names of an architecture, in run order (encoder before decoder)."""
    return GRAPHS[architecture]


def graph_io(path: Path) -> tuple[list[str], list[str]]:
    """Input and output names of an ONNX graph, in graph order."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [i.name for i in graph.input], [o.name for o in graph.output]


def ort_session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session (all graph optimisations; `threads` intra-op threads)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# Quantized operators: operator -> (input index of a quantized constant, input index of its zero point)
QUANTIZED_CONSTANT_INPUTS = {"MatMulInteger": (1, 3), "ConvInteger": (1, 3), "QLinearMatMul": (3, 5),
                             "QLinearConv": (3, 5), "DequantizeLinear": (0, 2)}


QUANTIZED_OPS = (*QUANTIZED_CONSTANT_INPUTS, "QuantizeLinear")


def quantized_ops(path: Path) -> dict[str, int]:
    """How many quantized operators (integer matmuls and convolutions, quantize/dequantize) a graph holds, by type."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    return {kind: count for kind in QUANTIZED_OPS if (count := sum(node.op_type == kind for node in nodes))}


def zero_points(graph) -> dict[str, int]:
    """{initializer name: the value that stands for 0.0 in it} for the quantized weights of a graph.

    SparseML stores INT8 weights as uint8 with zero point 128 (what DeepSparse's kernels take), so a
    pruned zero is a 128 there; every other initializer's zero is 0."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    points = {}
    for node in graph.node:
        if node.op_type in QUANTIZED_CONSTANT_INPUTS:
            value, point = QUANTIZED_CONSTANT_INPUTS[node.op_type]
            if len(node.input) > point and node.input[value] in initializers and node.input[point] in initializers:
                zero = numpy_helper.to_array(initializers[node.input[point]])
                if zero.size == 1:
                    points[node.input[value]] = int(zero.reshape(-1)[0])
    return points


def onnx_feeds(input_names: list[str], values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds for a graph's inputs from `values`, deriving position_ids and token_type_ids when the graph wants them."""
    feeds = {}
    for name in input_names:
        if name in values:
            feeds[name] = values[name]
        elif name == "position_ids":
            mask = values["attention_mask"]
            feeds[name] = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)
        elif name == "token_type_ids":
            feeds[name] = np.zeros_like(values["input_ids"])
        else:
            raise HarnessError(f"the ONNX graph wants an input '{name}' the harness does not know how to fill")
    return feeds


@contextlib.contextmanager
def static_graph(path: Path, dims: dict[str, int]) -> Iterator[Path]:
    """A temporary copy of a graph with its symbolic axes (batch_size, sequence_length, ...) fixed from `dims`.

    The copy sits beside the original so a graph with external data still finds it. Compile DeepSparse
    from it: `deepsparse.Engine(str(copy), batch_size=b, num_cores=n)`; DeepSparse's own `input_shapes=`
    override rewrites the ONNX file it is given in place, which would break the export for other engines.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for graph_input in model.graph.input:
        for dim in graph_input.type.tensor_type.shape.dim:
            if dim.dim_param:
                if dim.dim_param not in dims:
                    raise HarnessError(f"{path.name}: no size given for axis '{dim.dim_param}' of input {graph_input.name}")
                dim.dim_value = dims[dim.dim_param]
    fd, name = tempfile.mkstemp(prefix=f".static-{path.stem}-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(model, name)
        yield Path(name)
    finally:
        os.unlink(name)


def run_onnx(onnx_dir: Path, architecture: str, values: dict[str, np.ndarray], sessions: dict | None = None) -> dict:
    """Run the exported graph(s) on `values` with ONNX Runtime; returns {output name: array}
    (encoder-decoder: both graphs' outputs; `values` then needs decoder_input_ids).
    Pass `sessions` ({graph file: ort_session(...)}) to reuse sessions across calls."""
    sessions = sessions or {name: ort_session(onnx_dir / name) for name in graph_files(architecture)}
    outputs: dict[str, np.ndarray] = {}
    for name in graph_files(architecture):
        session = sessions[name]
        graph_values = decoder_values(values, outputs["last_hidden_state"]) if name == "decoder_model.onnx" else values
        feeds = onnx_feeds([i.name for i in session.get_inputs()], graph_values)
        outputs.update(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    return outputs


def decoder_values(values: dict[str, np.ndarray], encoder_hidden_states: np.ndarray) -> dict[str, np.ndarray]:
    """The decoder graph's inputs: decoder tokens, the encoder's output and the encoder's mask."""
    return {"input_ids": values["decoder_input_ids"], "encoder_hidden_states": encoder_hidden_states,
            "encoder_attention_mask": values["attention_mask"]}


def decoder_start(config, batch_size: int) -> np.ndarray:
    """One decoder start token per row: what a single decoder pass sees first."""
    return np.full((batch_size, 1), config.decoder_start_token_id, dtype=np.int64)
