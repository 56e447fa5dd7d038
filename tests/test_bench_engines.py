"""The bench's peer dense engines on tiny models: OpenVINO FP32 computes what ONNX Runtime and PyTorch compute,
OpenVINO INT8 (NNCF post-training quantization) stays close to FP32, and its quantized IR is made once."""
import numpy as np
import pytest

from harness import bench, engines, layout, onnx_graphs
from harness.quantize import SUMMARY_FILE
from harness.rundir import RunDir, read_json
from harness.timing import part_inputs
from conftest import write_run

# FP32 engines differ only in summation order and fused kernels: outputs agree to 1e-4 of their largest value.
FP32_TOLERANCE = 1e-4
# INT8 (8-bit weights per channel, 8-bit activations calibrated on real text; random-token inputs here):
# the outputs keep their direction (cosine to FP32) and stay within 15 % of the largest FP32 value.
INT8_MIN_COSINE = 0.99
INT8_TOLERANCE = 0.15


def run_steps(steps: dict, values: dict) -> dict[str, np.ndarray]:
    """Every part's outputs of one pass, as numpy arrays."""
    outputs, collected = {}, {}
    for part, step in steps.items():
        outputs = step(part_inputs(part, values, outputs))
        collected.update({name: np.asarray(value) for name, value in outputs.items()})
    return collected


def relative_difference(reference: np.ndarray, other: np.ndarray) -> float:
    return float(np.abs(reference - other).max() / np.abs(reference).max())


def cosine(reference: np.ndarray, other: np.ndarray) -> float:
    return float((reference * other).sum() / np.linalg.norm(reference) / np.linalg.norm(other))


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-deberta", "tiny-m2m100"])
def test_openvino_matches_onnx_runtime_and_pytorch(model):
    variant = bench.variant(write_run(model, 90))
    architecture = variant.spec.architecture
    values = engines.synthetic_inputs(variant.config, architecture, 2, 16)
    reference = onnx_graphs.run_onnx(variant.onnx_dir, architecture, values)
    openvino = run_steps(engines.OpenVino().steps(variant.onnx_dir, architecture, 1, values, "sparse"), values)
    pytorch = run_steps(engines.PyTorch().steps(variant, 1, values), values)
    compared = 0
    for name, expected in reference.items():
        assert openvino[name].shape == expected.shape
        assert relative_difference(expected, openvino[name]) < FP32_TOLERANCE, name
        if name in pytorch:
            assert relative_difference(pytorch[name], openvino[name]) < FP32_TOLERANCE, name
            compared += 1
    assert compared >= 1


def test_openvino_int8_stays_close_to_fp32_and_is_quantized_once():
    run = write_run("tiny-gpt2", 0)
    variant = bench.variant(run)
    values = engines.synthetic_inputs(variant.config, "decoder", 2, 16)
    fp32 = run_steps(engines.OpenVino().steps(variant.onnx_dir, "decoder", 1, values, "dense"), values)["logits"]
    int8 = run_steps(engines.OpenVinoInt8().steps(variant.onnx_dir, "decoder", 1, values, "dense"), values)["logits"]
    assert cosine(fp32, int8) > INT8_MIN_COSINE
    assert 0 < relative_difference(fp32, int8) < INT8_TOLERANCE  # quantized: close, but not the FP32 numbers

    folder = run.path / layout.OPENVINO_INT8_SUBDIR
    record = read_json(folder / layout.OPENVINO_INT8_FILE)
    assert record["calibration"] == engines.CALIBRATION  # training text, at the full calibration length
    import openvino

    model = openvino.Core().read_model(str(folder / "model.xml"))
    quantizers = [op for op in model.get_ops() if op.get_type_name() == "FakeQuantize"]
    assert len(quantizers) >= 4 * 4  # at least the four weight matrices of each of the four blocks
    made = (folder / "model.xml").stat().st_mtime_ns
    engines.OpenVinoInt8().steps(variant.onnx_dir, "decoder", 1, values, "dense")
    assert (folder / "model.xml").stat().st_mtime_ns == made  # the cached IR, not quantized again


def test_the_onnx_engines_compute_a_quantized_run_in_int8():
    run = write_run("tiny-gpt2", 90)
    assert {name: engines.engine_precision(engine, run) for name, engine in engines.ENGINES.items()} == {
        "deepsparse": "fp32", "onnxruntime": "fp32", "openvino": "fp32", "openvino-int8": "int8", "pytorch": "fp32"}
    quantized = RunDir("tiny-gpt2", "fixture/magnitude+int8", 90.0)
    (quantized.path / layout.QUANTIZATION_SUBDIR).mkdir(parents=True)
    (quantized.path / layout.QUANTIZATION_SUBDIR / SUMMARY_FILE).write_text("{}")  # what every quantizing prune leaves
    assert {name: engines.engine_precision(engine, quantized) for name, engine in engines.ENGINES.items()} == {
        "deepsparse": "int8", "onnxruntime": "int8", "openvino": "int8", "openvino-int8": "int8", "pytorch": "fp32"}
