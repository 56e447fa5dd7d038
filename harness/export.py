"""Stage 4, export: a run's checkpoint to ONNX with optimum, checked against PyTorch.

`<run>/onnx/` holds the graphs under optimum's file names, opset 14 (the newest opset DeepSparse 1.8
runs completely: at opset 17+ `LayerNormalization` stays a native op that DeepSparse does not
compile), no KV cache, dynamic batch and sequence axes:

    decoder          model.onnx            input_ids, attention_mask[, position_ids] -> logits
                                           (position_ids only where optimum's config asks for it,
                                           e.g. GPT-2: cumsum(attention_mask) - 1; `onnx_graphs.onnx_feeds` fills it)
    encoder          model.onnx            input_ids, attention_mask[, token_type_ids] ->
                                           last_hidden_state (feature-extraction) or logits (text-classification)
    encoder-decoder  encoder_model.onnx    input_ids, attention_mask -> last_hidden_state
                     decoder_model.onnx    input_ids (decoder), encoder_hidden_states, encoder_attention_mask -> logits

plus config.json, the tokenizer files and `export.json`. Graphs over 2 GB keep their weights in
ONNX external data (`<graph>.onnx_data` beside the graph; optimum does this by itself).

Every export is verified before it is kept: ONNX Runtime and PyTorch run the same padded sample batch
(max abs diff per output, within ATOL + RTOL * max|PyTorch output|), and the zeros survive (each
pruned checkpoint tensor has an ONNX initializer of the same shape, up to transposition, with the same
number of zeros).

DeepSparse compiles for fixed shapes, so the graphs stay dynamic and a user compiles the engine for the
(batch, sequence) they need from a static copy: `with onnx_graphs.static_graph(path, {"batch_size": b,
"sequence_length": s}) as fixed: engine = deepsparse.Engine(str(fixed), batch_size=b, num_cores=n)`
(axes of the encoder-decoder graphs: batch_size, encoder_sequence_length, decoder_sequence_length).
With a dynamic sequence axis DeepSparse compiles nothing (fraction_of_supported_ops 0), and its own
`input_shapes=` argument overwrites the ONNX file in place.

An INT8 run (`<pruning>+int8`) exports its INT8 graph instead: SparseML's QAT export of the fake-quantized model
(`_sparseml_int8`, below; MatMulInteger with QuantizeLinear ops), checked against that model, or the graph INC
quantized itself (`quantization/model.onnx`, copied), checked against the run's model with its FP32 activations.

Llama-family rotary embeddings (transformers 4.40) form position x frequency as a MatMul with an
inner dimension of 1; DeepSparse 1.8's compiler asserts on it (graph.cpp:925) and aborts the
process. The export writes the same outer product elementwise (`_elementwise_rotary`), which it
compiles; the parity check against the unpatched PyTorch model confirms the graph is unchanged in value.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
import shutil
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from harness import load, quantize
from harness.errors import HarnessError
from harness.layout import EXPORT_FILE, ONNX_SUBDIR, SPARSITY_FILE, Sparsity
from harness.onnx_graphs import (decoder_start, graph_files, graph_io, onnx_feeds, quantized_ops, run_onnx,
                                 zero_points)
from harness.rundir import (WEIGHT_SUFFIXES, RunDir, fingerprint, read_json, require_free_space, stage_run, staging_dir,
                            write_json)
from harness.runargs import add_run_arguments, run_from_args

OPSET = 14
# Bumped when the exported graphs change for the same checkpoint and opset (2: elementwise rotary).
GRAPH_REVISION = 2
ATOL, RTOL = 1e-4, 1e-4
EXPORT_SIZE_FACTOR = 1.3  # ONNX + external data vs the checkpoint (a tied embedding is stored twice), with margin
SAMPLE_TEXTS = (
    "Sparse networks keep only the weights that matter, and a CPU can skip the rest.",
    "Short one.",
)
UNSUPPORTED_OP = re.compile(r"operator '?([\w:.]+)'?")


def export_inputs(run: RunDir) -> str:
    """The fingerprint of what an export depends on: the run's weights (their prune record) and the export settings."""
    prune_record = run.stage_record("prune")
    return fingerprint(prune_record.get("inputs"), prune_record.get("finished"), OPSET, GRAPH_REVISION, ATOL, RTOL)


def discarded_export(run: RunDir) -> dict | None:
    """The export record of a run whose verified export (of the current weights and settings) was deleted
    since by `sweep --discard-artifacts`, else None: the export stands, like the run's other results."""
    record = run.stage_record("export") or {}
    done = record.get("status") == "done" and record.get("inputs") == export_inputs(run)
    return record if done and "discarded" in run.manifest() and not (run.path / ONNX_SUBDIR).exists() else None


def ensure_onnx(run: RunDir, force: bool = False) -> Path:
    """Export the run's checkpoint to `<run>/onnx/` unless a verified export of it is current; return that dir."""
    run.require("prune")
    spec = load.resolve_spec(str(run.path))
    inputs = export_inputs(run)
    files = [f"{ONNX_SUBDIR}/{name}" for name in graph_files(spec.architecture)]
    if not force and run.is_current("export", inputs, [*files, f"{ONNX_SUBDIR}/{EXPORT_FILE}"]):
        return run.path / ONNX_SUBDIR

    weights = sum(f.stat().st_size for f in run.model_dir.iterdir() if f.name.endswith(WEIGHT_SUFFIXES))
    require_free_space(run.path, int(weights * EXPORT_SIZE_FACTOR), f"the ONNX export of {run.path}")
    loaded = load.load_model(spec)
    int8 = quantize.is_quantized(run.path)
    quantized_graph = quantize.quantized_graph(run.path)  # INC quantized the graph itself
    if int8:  # the parity reference is the fake-quantized model the recipe made
        loaded = dataclasses.replace(loaded, model=quantize.restore(loaded.model, run.path))
    with stage_run(run.manifest_path, "export", inputs) as record:
        with staging_dir(run.path / ONNX_SUBDIR) as tmp:
            if int8:
                _export_int8(loaded, quantized_graph, tmp)
            else:
                export_fp32(loaded, tmp)
            parity = check_parity(loaded, tmp, (lambda: load.load_model(spec).model) if int8 else None)
            zeros = check_zeros(run, tmp)
            graphs = {name: _graph_summary(tmp / name) for name in graph_files(spec.architecture)}
            write_json(tmp / EXPORT_FILE, {"model": spec.name, "architecture": spec.architecture, "task": spec.task,
                                           "opset": OPSET, "precision": "int8" if int8 else "fp32", "graphs": graphs,
                                           "parity": parity, "zeros": zeros})
        record.update(opset=OPSET, parity_max_abs_diff=parity["max_abs_diff"], parity_ok=parity["ok"],
                      zeros_preserved=zeros["preserved"], onnx_sparsity_percent=zeros["onnx_percent"])
    return run.path / ONNX_SUBDIR


def export_fp32(loaded: load.LoadedModel, output: Path) -> None:
    from optimum.exporters.onnx import onnx_export_from_model

    spec = loaded.spec
    try:
        # `task` without "-with-past": no KV cache inputs/outputs.
        with _elementwise_rotary():
            onnx_export_from_model(loaded.model, output, task=spec.task, opset=OPSET, do_validation=False)
    except Exception as exc:
        op = UNSUPPORTED_OP.search(str(exc))
        what = f"operator {op.group(1)}" if op else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        raise HarnessError(f"ONNX export (opset {OPSET}) of '{spec.name}' ({loaded.model.config.model_type}, "
                           f"{spec.architecture}, task {spec.task}) failed: {what}") from None
    missing = [name for name in graph_files(spec.architecture) if not (output / name).exists()]
    if missing:
        raise HarnessError(f"ONNX export of '{spec.name}' ({loaded.model.config.model_type}) did not write "
                           f"{', '.join(missing)}")


def _export_int8(loaded: load.LoadedModel, quantized_graph: Path | None, output: Path) -> None:
    """A quantized run's graph, with config and tokenizer: the one INC quantized (`quantized_graph`), or
    SparseML's QAT export (`_sparseml_int8`)."""
    spec = loaded.spec
    try:
        if quantized_graph:
            shutil.copyfile(quantized_graph, output / graph_files(spec.architecture)[0])
        else:
            _sparseml_int8(loaded.model, spec, sample_batch(loaded), output, OPSET)
    except Exception as exc:
        raise HarnessError(f"INT8 ONNX export (opset {OPSET}) of '{spec.name}' ({spec.architecture}, task {spec.task}) "
                           f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    loaded.model.config.save_pretrained(output)
    loaded.tokenizer.save_pretrained(output)


@contextlib.contextmanager
def _elementwise_rotary() -> Iterator[None]:
    """Llama's rotary cos/sin with the position x frequency outer product as a broadcast multiply."""
    from transformers.models.llama import modeling_llama

    rotary = modeling_llama.LlamaRotaryEmbedding  # its scaling variants call this forward too
    original = rotary.forward

    def forward(self, x, position_ids):
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :].float()
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype=x.dtype), angles.sin().to(dtype=x.dtype)

    rotary.forward = forward
    try:
        yield
    finally:
        rotary.forward = original


def _graph_summary(path: Path) -> dict:
    inputs, outputs = graph_io(path)
    external = path.with_name(path.name + "_data")
    return {
        "inputs": inputs,
        "outputs": outputs,
        "bytes": path.stat().st_size + (external.stat().st_size if external.exists() else 0),
        "external_data": external.exists(),
        "quantized_ops": quantized_ops(path),
    }


def sample_batch(loaded: load.LoadedModel) -> dict[str, np.ndarray]:
    """The padded two-sentence batch used for parity (int64 input_ids and attention_mask)."""
    tokenizer = loaded.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(list(SAMPLE_TEXTS), padding=True, truncation=True, max_length=loaded.spec.seq_len,
                      return_tensors="np")
    return {"input_ids": batch["input_ids"].astype(np.int64), "attention_mask": batch["attention_mask"].astype(np.int64)}


def _torch_outputs(model, values: dict[str, np.ndarray], architecture: str, names: list[str]) -> dict[str, np.ndarray]:
    """The model's outputs `names` (as the graph names them) on `values`, the graph's inputs (position_ids too)."""
    kwargs = {k: torch.from_numpy(v) for k, v in values.items()}
    with torch.no_grad():
        output = model(**kwargs)
    return {name: (output.encoder_last_hidden_state if name == "last_hidden_state" and architecture == "encoder-decoder"
                   else output[name]).numpy() for name in names}


def check_parity(loaded: load.LoadedModel, onnx_dir: Path, fp32_activations: Callable | None = None) -> dict:
    """Max abs diff between ONNX Runtime and PyTorch on the sample batch; raises if over the tolerance.

    An INT8 graph is held to its mean abs diff from the fake-quantized model instead: integer kernels round a
    few activations to the neighbouring step, and a decoder carries such a flip to every later position. It
    must stay within `quantize.INT8_MEAN_RTOL` of the mean output or within `quantize.INT8_FLIP_SHARE` of the
    fake quantization's own effect (the mean abs diff from the run's model with FP32 activations, which
    `fp32_activations()` loads), whichever is larger (both looser on CPUs without VNNI,
    `quantize.int8_parity_factor`): a graph that is not the INT8 model misses by more."""
    values = sample_batch(loaded)
    architecture = loaded.spec.architecture
    if architecture == "encoder-decoder":
        values["decoder_input_ids"] = decoder_start(loaded.model.config, len(SAMPLE_TEXTS))
    onnx_out = run_onnx(onnx_dir, architecture, values)
    if "position_ids" in graph_io(onnx_dir / graph_files(architecture)[0])[0]:
        values["position_ids"] = onnx_feeds(["position_ids"], values)["position_ids"]
    reference = _torch_outputs(loaded.model, values, architecture, list(onnx_out))
    effect = _torch_outputs(fp32_activations(), values, architecture, list(onnx_out)) if fp32_activations else None
    diffs, ok = {}, True
    int8_factor = quantize.int8_parity_factor() if effect else 1.0
    for name, onnx_value in onnx_out.items():
        error = np.abs(reference[name] - onnx_value)
        checked = "mean_abs_diff" if effect else "max_abs_diff"
        if effect:
            tolerance = int8_factor * max(
                quantize.INT8_MEAN_RTOL * float(np.abs(reference[name]).mean()),
                quantize.INT8_FLIP_SHARE * float(np.abs(reference[name] - effect[name]).mean()))
        else:
            tolerance = ATOL + RTOL * float(np.abs(reference[name]).max())
        diffs[name] = {"max_abs_diff": float(error.max()), "mean_abs_diff": float(error.mean()), "checked": checked,
                       "tolerance": tolerance}
        ok &= diffs[name][checked] <= tolerance
    result = {"max_abs_diff": max(d["max_abs_diff"] for d in diffs.values()), "outputs": diffs, "ok": ok,
              "sample_shape": list(values["input_ids"].shape)}
    if not ok:
        worst = max(diffs, key=lambda n: diffs[n][diffs[n]["checked"]] / diffs[n]["tolerance"])
        raise HarnessError(f"ONNX export of '{loaded.spec.name}' ({architecture}) does not match PyTorch: "
                           f"output {worst} differs by {diffs[worst][diffs[worst]['checked']]:.3g} "
                           f"({diffs[worst]['checked']}; tolerance {diffs[worst]['tolerance']:.3g})")
    return result


def _shape_zero_key(shape, zeros: int) -> tuple:
    # Sorted shape: the exporter may store a weight transposed (MatMul wants [in, out]).
    return tuple(sorted(shape)), zeros


def check_zeros(run: RunDir, onnx_dir: Path) -> dict:
    """Do the checkpoint's pruned tensors reappear in the ONNX initializers with the same zero counts?"""
    import onnx
    from onnx import numpy_helper

    from harness.sparsity import match_saved_name, saved_tensors

    prunable = set(run.read(SPARSITY_FILE, Sparsity).prunable_tensors)
    wanted: Counter = Counter()
    zeros = numel = 0
    for name, tensor in saved_tensors(run.model_dir):
        if match_saved_name(name, prunable):
            count = int((tensor == 0).sum())
            wanted[_shape_zero_key(tensor.shape, count)] += 1
            zeros, numel = zeros + count, numel + tensor.numel()
    found: Counter = Counter()
    for file in sorted(onnx_dir.glob("*.onnx")):
        graph = onnx.load(str(file)).graph
        zero = zero_points(graph)  # an INT8 weight's zero is its zero point
        for initializer in graph.initializer:
            if len(initializer.dims) >= 2:
                array = numpy_helper.to_array(initializer)
                found[_shape_zero_key(array.shape, int((array == zero.get(initializer.name, 0)).sum()))] += 1
    # the exporter stores identical initializers once: a shape's all-zero tensors (layers an allocation zeroed) share one
    missing = Counter({key: count for key, count in wanted.items()
                       if found[key] < (1 if key[1] == np.prod(key[0]) else count)})
    preserved = not missing
    matched = wanted - missing
    matched_zeros = sum(z * n for (_, z), n in matched.items())
    matched_numel = sum(int(np.prod(s)) * n for (s, _), n in matched.items())
    result = {
        "checkpoint_percent": round(100.0 * zeros / numel, 4) if numel else 0.0,
        "onnx_percent": round(100.0 * matched_zeros / matched_numel, 4) if matched_numel else 0.0,
        "tensors": sum(wanted.values()),
        "tensors_matched": sum(matched.values()),
        "preserved": preserved,
    }
    if not preserved:
        raise HarnessError(f"ONNX export of {run.path} lost zeros: {sum(missing.values())} of {result['tensors']} "
                           f"pruned tensors have no ONNX initializer with the same shape and zero count")
    return result


def add_arguments(parser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--force", action="store_true", help="export again even if the export is current")


def main(args) -> None:
    run = run_from_args(args)
    discarded = None if args.force else discarded_export(run)
    if discarded:
        print(f"export: {run.path} was exported and verified on {discarded['finished']} (parity max abs diff "
              f"{discarded['parity_max_abs_diff']:.2e}); its ONNX was discarded since to save disk (--force redoes it)")
        return
    onnx_dir = ensure_onnx(run, args.force)
    summary = read_json(onnx_dir / EXPORT_FILE)
    print(f"export: {onnx_dir}: "
          f"{', '.join(summary['graphs'])} (opset {summary['opset']}); parity max abs diff "
          f"{summary['parity']['max_abs_diff']:.2e}; zeros preserved: "
          f"{summary['zeros']['onnx_percent']:.2f}% in ONNX = {summary['zeros']['checkpoint_percent']:.2f}% in the checkpoint")


# --- SparseML's INT8 graph -------------------------------------------------------------------------

class _MainOutput(torch.nn.Module):
    """The model with the export's input order and only its main output (optimum's graphs have one too)."""

    def __init__(self, model, input_names: list[str], output_name: str):
        super().__init__()
        self.model, self.input_names, self.output_name = model, input_names, output_name

    def forward(self, *inputs, **named):  # SparseML runs it once with the named inputs, then traces it positionally
        return self.model(**named, **dict(zip(self.input_names, inputs)))[self.output_name]


@contextlib.contextmanager
def _rotary_tables(model):
    """Each rotary-embedding module (Llama's) answering from a table of its cos and sin at every position,
    computed once by the module itself, instead of from `inv_freq x position_ids`: DeepSparse 1.8 compiles an
    INT8 Llama graph only without that in-graph product and its Cos / Sin (otherwise "Assertion at
    src/lib/engine/execution/graph.cpp:925", whichever layers are quantized); the values are the same."""
    modules = [module for module in model.modules() if type(module).__name__.endswith("RotaryEmbedding")
               and "position_ids" in inspect.signature(module.forward).parameters]
    originals = []
    for module in modules:
        positions = torch.arange(model.config.max_position_embeddings)[None]
        with torch.no_grad():
            cos, sin = module(torch.zeros(1, dtype=torch.float32), positions)

        def lookup(x, position_ids, cos=cos[0], sin=sin[0]):
            return cos[position_ids].to(x.dtype), sin[position_ids].to(x.dtype)

        originals.append(module.__dict__.get("forward"))
        module.forward = lookup
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            del module.forward
            if original is not None:
                module.forward = original


def _sparseml_int8(qat_model, spec, sample: dict, output: Path, opset: int) -> None:
    """SparseML's QAT export of the fake-quantized model, converted to quantized ops, into `output/model.onnx`,
    with optimum's input names and dynamic axes (batch_size, sequence_length); rotary embeddings as tables."""
    import onnx
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers optimum's ONNX configs with TasksManager)
    from optimum.exporters.tasks import TasksManager
    from sparseml.pytorch.utils.exporter import export_onnx as sparseml_export

    from harness.backends.sparseml import _quiet_sparseml

    constructor = TasksManager.get_exporter_config_constructor("onnx", qat_model, task=spec.task,
                                                             library_name="transformers")
    onnx_config = constructor(qat_model.config)
    axes = {**onnx_config.inputs, **onnx_config.outputs}
    input_names, (output_name,) = list(onnx_config.inputs), list(onnx_config.outputs)
    feeds = onnx_feeds(input_names, sample)
    batch = OrderedDict((name, torch.from_numpy(feeds[name])) for name in input_names)
    path = output / "model.onnx"
    with _quiet_sparseml(), _rotary_tables(qat_model):
        sparseml_export(_MainOutput(qat_model, input_names, output_name).eval(), batch, str(path), opset=opset,
                        convert_qat=True, dynamo=False, output_names=[output_name],
                        dynamic_axes={name: dict(axes[name]) for name in [*input_names, output_name]})
    graph = onnx.load(str(path), load_external_data=False)  # a large graph keeps its weights beside it
    for value in [*graph.graph.input, *graph.graph.output]:  # SparseML names every axis 0 "batch"
        for index, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param and index in axes.get(value.name, {}):
                dim.dim_param = axes[value.name][index]
    onnx.save(graph, str(path))
