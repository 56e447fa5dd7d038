"""INT8 composed with pruning (`<pruning>+int8`) on a tiny BERT and a tiny Llama: the recipe name, zeros
surviving quantization, the INT8 graph's quantized ops and its parity with the fake-quantized PyTorch model,
the LM head kept FP32 or quantized, the INT8 checkpoint, and one-line refusals of combinations that cannot work."""
import re

import numpy as np
import onnx
import pytest
import torch
import yaml
from compressed_tensors.compressors.sparse_bitmask import BitmaskCompressor
from safetensors.torch import load_file

from harness import evaluate, export, load, prune, quantize, sizes
from harness.errors import HarnessError
from harness.layout import COMPRESSED_INT8_SUBDIR, RECOVERY_FILE, SPARSITY_FILE, Sparsity
from harness.onnx_graphs import onnx_feeds, quantized_ops, run_onnx, zero_points
from harness.recipes import load_recipe, unquantized
from harness.rundir import RunDir
from harness.sparsity import saved_tensors

TINY_BERT = {  # SparseML's INT8 export converts BERT's graph (DeBERTa-v2's it cannot: refused)
    "description": "2-layer BERT encoder, random weights (INT8 tests)", "architecture": "encoder",
    "source": {"config": {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                          "intermediate_size": 256, "max_position_embeddings": 128}},
    "model_class": "AutoModel", "task": "feature-extraction", "seq_len": 32, "benchmarks": ["sst2_probe"],
}
RECIPE = "sparseml/oneshot-magnitude+int8"
# The INT8 graph on ONNX Runtime vs the fake-quantized PyTorch model: the same integer arithmetic, so
# they agree to float rounding (measured 7e-7 here); FP32 activations differ by more than 10x that bound.
INT8_PARITY_ATOL = 1e-4
INT8_ENGINE_RTOL = 1e-3  # DeepSparse vs ONNX Runtime on the INT8 graph: mean abs diff / mean |output| (rounding flips)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    extra = tmp_path_factory.mktemp("registry") / "tiny-bert.yaml"
    extra.write_text(yaml.safe_dump({"tiny-bert": TINY_BERT}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HARNESS_EXTRA_MODELS", str(extra))
        fp32 = prune.prune("tiny-bert", 50, "sparseml/oneshot-magnitude")
        int8 = prune.prune("tiny-bert", 50, RECIPE)
        yield fp32, int8, export.ensure_onnx(int8)


def test_a_composed_recipe_names_its_quantization_and_supports_what_both_support():
    recipe = load_recipe(RECIPE)
    assert recipe.name == RECIPE and recipe.quantization.name == "sparseml/int8"
    assert recipe.architectures == ("encoder", "decoder")
    variant = load_recipe(f"{RECIPE}@fp32_head=none,mask_type=block4")  # either recipe's parameters
    assert variant.quantization.params["fp32_head"] == "none" and variant.params["mask_type"] == "block4"
    assert unquantized(variant.name) == "sparseml/oneshot-magnitude@mask_type=block4"
    with pytest.raises(HarnessError, match="sparseml/oneshot-magnitude prunes: only recovery and quantization"):
        load_recipe("sparseml/oneshot-magnitude+oneshot-magnitude")


@pytest.mark.parametrize("model, recipe, message", [
    ("tiny-m2m100", RECIPE, "cannot prune encoder-decoder models like 'tiny-m2m100' (it supports: decoder, encoder)"),
    ("tiny-deberta", RECIPE, "cannot quantize deberta-v2 models: SparseML 1.8's INT8 ONNX conversion"),
    ("tiny-deberta", "sparseml/int8", "recipe sparseml/int8 quantizes: compose it after a pruning recipe, "
                                      "e.g. sparseml/oneshot-magnitude+int8"),
])
def test_a_combination_that_cannot_work_is_one_line_and_creates_nothing(model, recipe, message):
    with pytest.raises(HarnessError, match=re.escape(message)) as error:
        prune.prune(model, 50, recipe)
    assert "\n" not in str(error.value)
    assert not RunDir(load.resolve_spec(model).name, load_recipe(recipe).name, 50).path.parent.exists()


def test_zeros_survive_quantization(runs):
    fp32, int8, _ = runs
    pruned = dict(saved_tensors(fp32.model_dir))
    quantized = dict(saved_tensors(int8.model_dir))
    targets = int8.read(SPARSITY_FILE, Sparsity).prunable_tensors
    checkpoint = load_file(quantize.int8_checkpoint(int8.path))
    assert targets
    for name in targets:
        assert torch.equal(quantized[name] == 0, pruned[name] == 0), name  # the same mask, recounted
        values, scale = checkpoint[name], checkpoint[f"{name}.scale"]
        assert values.dtype == torch.int8 and torch.equal(values.float() * scale, quantized[name])
        assert bool(((quantized[name] - pruned[name]).abs() <= scale / 2 + 1e-7).all()), name  # the FP32 run's weights
    assert int8.stage_record("prune")["started_from"] == fp32.relative  # quantized the finished FP32 run
    assert int8.read(SPARSITY_FILE, Sparsity).achieved_percent == fp32.read(SPARSITY_FILE, Sparsity).achieved_percent
    summary = (quantize.quantization_dir(int8.path) / quantize.SUMMARY_FILE).read_text()
    assert '"zeros_preserved": true' in summary


def test_a_recovered_int8_run_starts_from_the_longest_finished_part_of_its_recipe(runs):
    fp32 = runs[0]  # sparseml/oneshot-magnitude at 50 %
    small = "tokens=256,train_seq_len=32,batch_size=2,accumulation=1"
    trained_here = prune.prune("tiny-bert", 50, f"sparseml/oneshot-magnitude+distil+int8@{small}")
    assert trained_here.stage_record("prune")["started_from"] == fp32.relative  # distilled, then quantized
    assert (trained_here.path / RECOVERY_FILE).exists()
    recovered = prune.prune("tiny-bert", 50, f"sparseml/oneshot-magnitude+distil@{small}")
    quantized_only = prune.prune("tiny-bert", 50, trained_here.recipe, force=True)
    assert quantized_only.stage_record("prune")["started_from"] == recovered.relative
    assert not (quantized_only.path / RECOVERY_FILE).exists()


def test_int8_graph_has_quantized_ops_and_matches_the_fake_quantized_model(runs):
    fp32, int8, onnx_dir = runs
    import onnx

    graph = onnx.load(str(onnx_dir / "model.onnx")).graph
    ops = quantized_ops(onnx_dir / "model.onnx")
    linears = 6 * 2  # q, k, v, attention output, intermediate, output per layer
    assert ops["MatMulInteger"] == linears and ops["QuantizeLinear"] > 0
    assert len(zero_points(graph)) == linears  # every INT8 weight has its zero point
    engine, fake_quantized, weights_only = _graph_and_pytorch(int8, onnx_dir)
    assert np.abs(engine - fake_quantized).max() < INT8_PARITY_ATOL
    assert np.abs(engine - weights_only).max() > 10 * INT8_PARITY_ATOL  # activations are INT8 in both
    summary = export.read_json(onnx_dir / "export.json")
    assert summary["precision"] == "int8" and summary["parity"]["ok"]
    assert summary["zeros"]["preserved"] and summary["zeros"]["onnx_percent"] == summary["zeros"]["checkpoint_percent"]


def _graph_and_pytorch(run: RunDir, onnx_dir) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """On a sample batch: the INT8 graph's output (ONNX Runtime), the restored fake-quantized PyTorch model's,
    and the run's PyTorch model's with FP32 activations (its INT8 weights only)."""
    loaded = load.load_model(str(run.path))
    values = export.sample_batch(loaded)
    inputs = {name: torch.from_numpy(array) for name, array in values.items()}
    with torch.no_grad():
        weights_only = loaded.model(**inputs).last_hidden_state.numpy()
        fake_quantized = quantize.restore(loaded.model, run.path)(**inputs).last_hidden_state.numpy()
    return run_onnx(onnx_dir, "encoder", values)["last_hidden_state"], fake_quantized, weights_only


def _on_deepsparse(run: RunDir, onnx_dir) -> tuple[float, np.ndarray, np.ndarray]:
    """The run's INT8 graph compiled on DeepSparse: its supported-ops fraction, its output on a sample batch,
    and ONNX Runtime's on the same batch."""
    deepsparse = pytest.importorskip("deepsparse")
    from harness.onnx_graphs import static_graph

    loaded = load.load_model(str(run.path))
    values = {name: np.pad(array, ((0, 0), (0, 32 - array.shape[1]))) for name, array in
              export.sample_batch(loaded).items()}
    values["token_type_ids"] = np.zeros_like(values["input_ids"])
    with static_graph(onnx_dir / "model.onnx", {"batch_size": 2, "sequence_length": 32}) as fixed:
        engine = deepsparse.Engine(str(fixed), batch_size=2, num_cores=1)
        (hidden,) = engine.run([values[name] for name in ("input_ids", "attention_mask", "token_type_ids")])
    return engine.fraction_of_supported_ops, hidden, run_onnx(onnx_dir, "encoder", values)["last_hidden_state"]


def test_int8_graph_compiles_on_deepsparse(runs):
    _, int8, onnx_dir = runs
    supported, hidden, reference = _on_deepsparse(int8, onnx_dir)
    assert supported == 1.0
    assert np.abs(hidden - reference).mean() < INT8_ENGINE_RTOL * np.abs(reference).mean()


def test_the_attention_matmuls_quantize_too_with_fp32_attention_false(runs):
    fp32, _, _ = runs
    int8 = prune.prune("tiny-bert", 50, f"{RECIPE}@fp32_attention=false")
    assert int8.stage_record("prune")["started_from"] == fp32.relative
    summary = export.read_json(quantize.quantization_dir(int8.path) / quantize.SUMMARY_FILE)
    assert summary["int8_attention"] and summary["zeros_preserved"]
    onnx_dir = export.ensure_onnx(int8)
    assert quantized_ops(onnx_dir / "model.onnx")["MatMulInteger"] == 6 * 2 + 2 * 2  # + QK^T, scores x V per layer
    engine, fake_quantized, _ = _graph_and_pytorch(int8, onnx_dir)  # restored with its quantized attention
    assert np.abs(engine - fake_quantized).max() < INT8_PARITY_ATOL
    supported, hidden, reference = _on_deepsparse(int8, onnx_dir)
    assert supported == 1.0
    assert np.abs(hidden - reference).mean() < INT8_ENGINE_RTOL * np.abs(reference).mean()


def test_sizes_report_the_int8_checkpoint_beside_the_fp32_one(runs):
    _, int8, onnx_dir = runs
    measured = sizes.sizes(int8, onnx_dir, "encoder", gzip_level=1)
    assert measured.checkpoint_int8.bytes < measured.checkpoint.bytes
    # sparse + INT8: the INT8 checkpoint in the sparse-bitmask format keeps its int8 values (1 byte each, not 4)
    assert measured.sparse_bitmask_int8.bytes < measured.sparse_bitmask.bytes
    original = dict(saved_tensors(quantize.int8_checkpoint(int8.path)))
    restored = dict(BitmaskCompressor(config=None).decompress(str(int8.path / COMPRESSED_INT8_SUBDIR)))
    assert restored.keys() == original.keys()
    assert all(restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor)
               for name, tensor in original.items())
    assert sum(tensor.dtype == torch.int8 for tensor in restored.values()) == 2 * 6 + 1  # the 2 layers' Linears, the pooler


def test_an_int8_probe_and_fidelity_read_the_int8_graph(runs):
    _, int8, _ = runs
    (probe,) = evaluate.evaluate(int8, limit=40, cores=1).benchmarks.values()
    engine = probe.deepsparse
    assert probe.status == "done" and engine.sample == probe.examples == 40  # the probe fits the graph's embeddings
    assert engine.agreement is None  # not a check of the graph against PyTorch's probe: the graph is the model
    # its INT8 activations move its embeddings from PyTorch's FP32 ones, a little (random weights: ~1e-6)
    assert 0.99 < engine.mean_cosine_vs_pytorch < 1 - 1e-7
    (fidelity,) = evaluate.evaluate(int8, ["embedding_fidelity"], limit=40, cores=1).benchmarks.values()
    assert fidelity.deepsparse.sample == fidelity.examples == 40  # so is the cosine to the dense model's
    assert 0.99 < fidelity.deepsparse.mean_cosine_vs_pytorch < 1 - 1e-7


@pytest.mark.parametrize("model, targets", [("tiny-llama", 2 * 7), ("tiny-gpt2", 4 * 4)])  # GPT-2: Conv1D layers
@pytest.mark.parametrize("head", ["lm_head", "none"])
def test_a_decoder_quantizes_with_its_lm_head_fp32_by_default_or_int8(model, targets, head):
    fp32 = prune.prune(model, 50, "sparseml/oneshot-magnitude")
    int8 = prune.prune(model, 50, f"{RECIPE}@fp32_head={head}")
    assert int8.stage_record("prune")["started_from"] == fp32.relative
    assert int8.read(SPARSITY_FILE, Sparsity).achieved_percent == fp32.read(SPARSITY_FILE, Sparsity).achieved_percent
    onnx_dir = export.ensure_onnx(int8)
    assert quantized_ops(onnx_dir / "model.onnx")["MatMulInteger"] == targets + (head == "none")
    summary = export.read_json(onnx_dir / "export.json")
    assert summary["parity"]["ok"] and summary["parity"]["outputs"]["logits"]["checked"] == "mean_abs_diff"
    assert summary["zeros"]["preserved"]
    checkpoint = load_file(quantize.int8_checkpoint(int8.path))
    assert ("lm_head.weight.scale" in checkpoint) == (head == "none")  # the tied head: its own INT8 copy
    if model == "tiny-llama" and head == "none":  # the run's perplexity is the INT8 graph's, whatever the engines
        (result,) = evaluate.evaluate(int8, ["wikitext2"], limit=1, engines=("pytorch",), cores=1).benchmarks.values()
        assert result.metrics == result.deepsparse.metrics
        assert result.deepsparse.difference["word_perplexity"] != 0  # PyTorch's FP32 activations differ


def test_smoothing_and_an_fp32_layer_in_every_block_keep_the_sparsity():
    fp32 = prune.prune("tiny-llama", 50, "sparseml/oneshot-magnitude")
    int8 = prune.prune("tiny-llama", 50, f"{RECIPE}@fp32_layers=down_proj,smoothing=0.5")
    assert int8.read(SPARSITY_FILE, Sparsity).achieved_percent == fp32.read(SPARSITY_FILE, Sparsity).achieved_percent
    summary = export.read_json(quantize.quantization_dir(int8.path) / quantize.SUMMARY_FILE)
    assert summary["smoothing"] == {"strength": 0.5, "norms": 2 * 2}  # 2 blocks: the attention's and the MLP's norm
    assert summary["unquantized_targets"] == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]
    before, after = dict(saved_tensors(fp32.path / "model")), dict(saved_tensors(int8.path / "model"))
    assert torch.equal(before["model.layers.1.mlp.down_proj.weight"], after["model.layers.1.mlp.down_proj.weight"])
    assert not torch.allclose(before["model.layers.1.input_layernorm.weight"],
                              after["model.layers.1.input_layernorm.weight"])  # its range moved into q, k, v
    onnx_dir = export.ensure_onnx(int8)
    assert quantized_ops(onnx_dir / "model.onnx")["MatMulInteger"] == 2 * 7 - 2
    assert export.read_json(onnx_dir / "export.json")["parity"]["ok"]


@pytest.mark.parametrize("model, variant, message", [
    ("tiny-llama", "fp32_layers=down_prj", "fp32_layers=down_prj names no layer of the model"),
    ("tiny-gpt2", "smoothing=0.5", "smoothing has no mappings for gpt2 models (known: llama)"),
    ("tiny-gpt2", "fp32_attention=false", "fp32_attention=false has no quantizable-matmul modification for gpt2"),
    ("tiny-gpt2", "qat_tokens=640", "qat_tokens trains with a recovery step's settings: compose "
                                    "<pruning>+distil+int8"),
])
def test_a_quantization_parameter_that_cannot_apply_is_one_line(model, variant, message):
    with pytest.raises(HarnessError, match=re.escape(message)) as error:
        prune.prune(model, 50, f"{RECIPE}@{variant}")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("variant, matmuls", [("", 2 * 7), ("@fp32_attention=false", 2 * 7 + 2 * 2)])
def test_a_llama_int8_graph_compiles_on_deepsparse_and_matches_onnx_runtime(variant, matmuls):
    deepsparse = pytest.importorskip("deepsparse")
    from harness.onnx_graphs import static_graph

    def compiled(onnx_dir):
        with static_graph(onnx_dir / "model.onnx", {"batch_size": 2, "sequence_length": 16}) as fixed:
            return deepsparse.Engine(str(fixed), batch_size=2, num_cores=1)

    fp32_engine = compiled(export.ensure_onnx(prune.prune("tiny-llama", 50, "sparseml/oneshot-magnitude")))
    onnx_dir = export.ensure_onnx(prune.prune("tiny-llama", 50, RECIPE + variant))
    assert quantized_ops(onnx_dir / "model.onnx")["MatMulInteger"] == matmuls  # + QK^T, scores x V per block
    engine = compiled(onnx_dir)  # with the rotary embedding as tables: it compiles
    assert engine.fraction_of_supported_ops >= fp32_engine.fraction_of_supported_ops  # (0.96 vs 0.90 here)
    values = {"input_ids": np.arange(2 * 16).reshape(2, 16) % 200, "attention_mask": np.ones((2, 16), dtype=np.int64)}
    feeds = onnx_feeds([graph_input.name for graph_input in onnx.load(onnx_dir / "model.onnx").graph.input], values)
    (logits,) = engine.run(list(feeds.values()))
    reference = run_onnx(onnx_dir, "decoder", values)["logits"]
    assert np.abs(logits - reference).mean() < INT8_ENGINE_RTOL * np.abs(reference).mean()


QAT = "sparseml/oneshot-magnitude+distil+int8"
QAT_SMALL = {"tokens": 256, "train_seq_len": 32, "batch_size": 2, "accumulation": 1, "lr": 0.01,
             "checkpoint_minutes": 0.0}
QAT_TOKENS = 640  # 10 steps of 2 x 32 tokens


def _int8_weights(run: RunDir) -> dict[str, torch.Tensor]:
    return load_file(quantize.int8_checkpoint(run.path))


def test_quantization_aware_training_trains_the_int8_weights_under_the_calibrated_scales():
    """tiny GPT-2 (its Conv1D layers are trained as Linear and stored back transposed)."""
    recovered = prune.prune("tiny-gpt2", 50, "sparseml/oneshot-magnitude+distil", QAT_SMALL)
    post_training = prune.prune("tiny-gpt2", 50, QAT, QAT_SMALL)
    trained = prune.prune("tiny-gpt2", 50, QAT, {**QAT_SMALL, "qat_tokens": QAT_TOKENS})
    for run in (post_training, trained):
        assert run.stage_record("prune")["started_from"] == recovered.relative
    summary = export.read_json(quantize.quantization_dir(trained.path) / quantize.SUMMARY_FILE)
    curve = summary["qat"]["curve"]
    assert summary["qat"]["tokens"] == QAT_TOKENS and len(curve) == 10
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert trained.stage_record("prune")["qat_tokens"] == QAT_TOKENS
    targets = trained.read(SPARSITY_FILE, Sparsity).prunable_tensors
    fp32, ptq, qat = (dict(saved_tensors(run.model_dir)) for run in (recovered, post_training, trained))
    ptq_int8, qat_int8 = _int8_weights(post_training), _int8_weights(trained)
    moved = 0
    for name in targets:
        assert not qat[name][fp32[name] == 0].any(), name  # the mask is fixed (rounding adds zeros)
        assert torch.equal(qat_int8[f"{name}.scale"], ptq_int8[f"{name}.scale"]), name  # so are the scales
        assert torch.equal(qat_int8[name].float() * qat_int8[f"{name}.scale"], qat[name]), name  # on the INT8 grid
        moved += int((qat_int8[name] != ptq_int8[name]).sum())
    assert moved > 0.05 * sum(int((fp32[name] != 0).sum()) for name in targets)  # training moved INT8 values
    assert export.read_json(export.ensure_onnx(trained) / "export.json")["parity"]["ok"]


def test_a_killed_quantization_aware_training_resumes_to_the_uninterrupted_result():
    from conftest import killed_after

    params = {**QAT_SMALL, "qat_tokens": QAT_TOKENS}
    prune.prune("tiny-gpt2", 50, "sparseml/oneshot-magnitude+distil", QAT_SMALL)
    expected = _int8_weights(prune.prune("tiny-gpt2", 50, QAT, params))  # from the +distil run: QAT trains alone
    with killed_after(losses=4):
        prune.prune("tiny-gpt2", 50, QAT, params, force=True)
    resumed = prune.prune("tiny-gpt2", 50, QAT, params, force=True)
    summary = export.read_json(quantize.quantization_dir(resumed.path) / quantize.SUMMARY_FILE)
    assert summary["qat"]["resumed_from"] == 4 and not resumed.resume_dir.exists()
    actual = _int8_weights(resumed)
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)


def test_discarding_an_int8_run_deletes_its_int8_checkpoint_and_keeps_its_results(runs):
    _, int8, _ = runs  # last in this module: the other tests read these weights
    freed = int8.discard_artifacts()
    assert not quantize.int8_checkpoint(int8.path).exists() and not list(int8.model_dir.glob("*.safetensors"))
    assert freed == int8.manifest()["discarded"]["bytes"] and "quantization/int8.safetensors" in int8.manifest()["discarded"]["paths"]
    assert int8.read(SPARSITY_FILE, Sparsity).achieved_percent > 0 and quantize.is_quantized(int8.path)
