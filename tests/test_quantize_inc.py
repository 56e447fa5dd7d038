"""INC's post-training INT8 of the exported graph (`inc/<pruning>+int8`, harness.quantize_inc) on the tiny DeBERTa,
Llama and GPT-2: zeros surviving quantization, the checkpoint holding the graph's INT8 weights, the graph's quantized
ops and its agreement with PyTorch and DeepSparse, layers kept FP32, and one-line refusals."""
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import load_file

from harness import export, load, prune, quantize
from harness.errors import HarnessError
from harness.layout import SPARSITY_FILE, Sparsity
from harness.onnx_graphs import graph_io, onnx_feeds, quantized_ops, run_onnx, static_graph
from harness.rundir import RunDir
from harness.sparsity import saved_tensors

MODEL, RECIPE = "tiny-deberta", "inc/oneshot-magnitude+int8"
# DeepSparse vs ONNX Runtime on the INT8 graph: mean abs diff / mean |output| (INT8 rounding flips at most)
ENGINE_RTOL = 1e-3
# The same for a decoder's logits: a flip at one position reaches every later one (measured 5e-3 on both)
DECODER_ENGINE_RTOL = 2e-2


def _graph_int8_weights(onnx_dir) -> list[np.ndarray]:
    """The INT8 weights of the graph's QLinearMatMuls, as the graph holds them ([in, out])."""
    graph = onnx.load(str(onnx_dir / "model.onnx")).graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    return [initializers[node.input[3]] for node in graph.node
            if node.op_type == "QLinearMatMul" and node.input[3] in initializers]


def _on_deepsparse(onnx_dir, architecture: str, input_ids: np.ndarray):
    """(the DeepSparse engine compiled for the graph, its logits, ONNX Runtime's logits) on `input_ids` [2, 16]."""
    import deepsparse

    graph = onnx_dir / "model.onnx"
    names = graph_io(graph)[0]
    feeds = onnx_feeds(names, {"input_ids": input_ids, "attention_mask": np.ones((2, 16), np.int64)})
    reference = run_onnx(onnx_dir, architecture, feeds)["logits"]
    with static_graph(graph, {"batch_size": 2, "sequence_length": 16}) as fixed:
        engine = deepsparse.Engine(str(fixed), batch_size=2, num_cores=1)
        (logits,) = engine.run([feeds[name] for name in names])
    return engine, logits, reference


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    fp32 = prune.prune(MODEL, 50, "inc/oneshot-magnitude")
    elsewhere = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(elsewhere)
        int8 = prune.prune(MODEL, 50, RECIPE)
    assert not list(elsewhere.iterdir())  # INC's workspace (tuning history) is not left where the harness ran
    return fp32, int8, export.ensure_onnx(int8)


def test_zeros_survive_and_the_checkpoint_holds_the_graphs_int8_weights(runs):
    fp32, int8, onnx_dir = runs
    pruned = dict(saved_tensors(fp32.model_dir))
    quantized = dict(saved_tensors(int8.model_dir))
    checkpoint = load_file(quantize.int8_checkpoint(int8.path))
    targets = int8.read(SPARSITY_FILE, Sparsity).prunable_tensors
    graph_weights = [weights.T for weights in _graph_int8_weights(onnx_dir)]
    assert targets and int8.stage_record("prune")["started_from"] == fp32.relative
    for name in targets:
        assert torch.equal(quantized[name] == 0, pruned[name] == 0), name  # the same mask, recounted
        values, scale = checkpoint[name], checkpoint[f"{name}.scale"]
        assert values.dtype == torch.int8 and torch.equal(values.float() * scale, quantized[name])
        assert bool(((quantized[name] - pruned[name]).abs() <= scale / 2 + 1e-7).all()), name
        assert any(np.array_equal(weights, values.numpy()) for weights in graph_weights)  # the graph's own
    assert int8.read(SPARSITY_FILE, Sparsity).achieved_percent == fp32.read(SPARSITY_FILE, Sparsity).achieved_percent
    summary = export.read_json(quantize.quantization_dir(int8.path) / quantize.SUMMARY_FILE)
    assert summary["backend"] == "inc" and summary["zeros_preserved"] and summary["quantized_targets"] == len(targets)
    assert summary["zeros_after"] >= summary["zeros_before"] > 0  # small weights may round to zero


def test_int8_graph_has_quantized_matmuls_and_stays_near_pytorch(runs):
    fp32, int8, onnx_dir = runs
    ops = quantized_ops(onnx_dir / "model.onnx")
    targets = int8.read(SPARSITY_FILE, Sparsity).prunable_tensors
    assert ops["QLinearMatMul"] == len(targets) + 2 and ops["QuantizeLinear"] > 0  # every Linear, pooler and head too
    report = export.read_json(onnx_dir / "export.json")
    assert report["precision"] == "int8" and report["parity"]["ok"] and report["zeros"]["preserved"]
    loaded = load.load_model(str(int8.path))
    values = export.sample_batch(loaded)
    logits = run_onnx(onnx_dir, "encoder", values)["logits"]

    def outputs(model) -> np.ndarray:
        with torch.no_grad():
            return model(**{k: torch.from_numpy(v) for k, v in values.items()}).logits.numpy()

    weights_only, fp32_logits = outputs(loaded.model), outputs(load.load_model(str(fp32.path)).model)
    rounded = outputs(quantize.restore(loaded.model, int8.path))  # rounding its activations like the graph
    assert not np.array_equal(weights_only, fp32_logits)  # the run's weights are the quantized ones
    assert np.abs(logits - weights_only).mean() > 0  # INT8 activations
    bound = quantize.int8_parity_factor() * quantize.INT8_MEAN_RTOL
    assert np.abs(logits - rounded).mean() <= bound * np.abs(rounded).mean()


def test_parity_refuses_an_int8_graph_that_is_not_the_model_s(runs):
    _, int8, onnx_dir = runs
    dense = load.load_model(MODEL)
    dense.model = quantize.restore(dense.model, int8.path)
    with pytest.raises(HarnessError, match="does not match PyTorch"):
        export.check_parity(dense, onnx_dir, lambda: load.load_model(MODEL).model)


def test_int8_graph_compiles_on_deepsparse_and_matches_onnx_runtime(runs):
    pytest.importorskip("deepsparse")
    _, int8, onnx_dir = runs
    _, logits, reference = _on_deepsparse(onnx_dir, "encoder", np.random.default_rng(0).integers(5, 100, (2, 16)))
    assert np.abs(logits - reference).mean() <= ENGINE_RTOL * np.abs(reference).mean()


@pytest.mark.parametrize("model, fp32_layers", [("tiny-llama", "down_proj"), ("tiny-gpt2", "mlp.c_proj")])
def test_a_decoder_quantizes_every_linear_but_its_fp32_layers_and_its_tied_head(model, fp32_layers):
    """Llama's Linear layers and GPT-2's Conv1D ones (stored [in, out], as the graph holds them)."""
    fp32 = prune.prune(model, 50, "inc/oneshot-magnitude")
    int8 = prune.prune(model, 50, f"{RECIPE}@fp32_layers={fp32_layers}")
    targets = int8.read(SPARSITY_FILE, Sparsity).prunable_tensors
    kept = sorted(name for name in targets if name.endswith(f".{fp32_layers}.weight"))
    summary = export.read_json(quantize.quantization_dir(int8.path) / quantize.SUMMARY_FILE)
    assert kept and summary["unquantized_targets"] == kept and summary["zeros_preserved"]
    onnx_dir = export.ensure_onnx(int8)
    assert quantized_ops(onnx_dir / "model.onnx")["QLinearMatMul"] == len(targets) - len(kept)  # the LM head: FP32
    assert export.read_json(onnx_dir / "export.json")["parity"]["ok"]
    graph_weights = _graph_int8_weights(onnx_dir)
    pruned, quantized = dict(saved_tensors(fp32.model_dir)), dict(saved_tensors(int8.model_dir))
    checkpoint = load_file(quantize.int8_checkpoint(int8.path))
    in_out = model == "tiny-gpt2"
    for name in sorted(set(targets) - set(kept)):
        values, scale = checkpoint[name], checkpoint[f"{name}.scale"]
        assert torch.equal(values.float() * scale, quantized[name]) and not quantized[name][pruned[name] == 0].any()
        layout = values.numpy() if in_out else values.numpy().T  # the graph's MatMul weights are [in, out]
        assert any(np.array_equal(weights, layout) for weights in graph_weights), name
    for name in kept:
        assert torch.equal(quantized[name], pruned[name])


@pytest.mark.parametrize("model, compiled", [("tiny-llama", 0.9), ("tiny-gpt2", 1.0)])
def test_a_decoders_int8_graph_compiles_on_deepsparse_and_matches_onnx_runtime(model, compiled):
    pytest.importorskip("deepsparse")
    onnx_dir = export.ensure_onnx(prune.prune(model, 50, RECIPE))
    engine, logits, reference = _on_deepsparse(onnx_dir, "decoder", np.arange(32).reshape(2, 16) % 200)
    assert engine.fraction_of_supported_ops >= compiled  # (Llama 0.92: its rotary Cos / Sin run outside)
    assert np.abs(logits - reference).mean() <= DECODER_ENGINE_RTOL * np.abs(reference).mean()


@pytest.mark.parametrize("model, recipe, message", [
    ("tiny-m2m100", RECIPE, "cannot prune encoder-decoder models like 'tiny-m2m100' (it supports: decoder, encoder)"),
    (MODEL, "inc/oneshot-magnitude+sparseml/int8", "recipe sparseml/int8 is for backend sparseml, not inc"),
])
def test_a_combination_that_cannot_work_is_one_line_and_creates_nothing(model, recipe, message):
    with pytest.raises(HarnessError, match=re.escape(message)) as error:
        prune.prune(model, 50, recipe)
    assert "\n" not in str(error.value)
    assert not RunDir(load.resolve_spec(model).name, recipe, 50).path.parent.exists()


def test_discarding_an_inc_int8_run_deletes_its_int8_graph_too(runs):
    _, int8, _ = runs  # last in this module: the other tests read these files
    graph = quantize.quantized_graph(int8.path)
    assert graph is not None
    int8.discard_artifacts()
    assert not graph.exists() and not quantize.int8_checkpoint(int8.path).exists()
    assert "quantization/model.onnx" in int8.manifest()["discarded"]["paths"] and quantize.is_quantized(int8.path)
