"""ONNX export: parity with PyTorch for the three tiny architectures, zeros preserved, bad input."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from harness import cli, export, load, onnx_graphs, sparsity
from harness.errors import HarnessError
from harness.layout import EXPORT_FILE, ONNX_SUBDIR
from harness.rundir import read_json
from conftest import RECIPE, write_run

def onnx_zero_counts(onnx_dir) -> list[int]:
    return [int((numpy_helper.to_array(t) == 0).sum()) for f in sorted(onnx_dir.glob("*.onnx"))
            for t in onnx.load(str(f)).graph.initializer if len(t.dims) >= 2]


EXPECTED_GRAPHS = {
    "tiny-gpt2": {"model.onnx": (["input_ids", "attention_mask", "position_ids"], ["logits"])},
    "tiny-llama": {"model.onnx": (["input_ids", "attention_mask", "position_ids"], ["logits"])},
    "tiny-deberta": {"model.onnx": (["input_ids", "attention_mask"], ["logits"])},
    "tiny-m2m100": {"encoder_model.onnx": (["input_ids", "attention_mask"], ["last_hidden_state"]),
                    "decoder_model.onnx": (["encoder_attention_mask", "input_ids", "encoder_hidden_states"], ["logits"])},
}


@pytest.fixture(scope="module", params=sorted(EXPECTED_GRAPHS))
def exported(request):
    run = write_run(request.param, 90)
    return run, export.ensure_onnx(run)


def test_export_writes_the_documented_graphs_and_records_the_stage(exported):
    run, onnx_dir = exported
    summary = read_json(onnx_dir / EXPORT_FILE)
    expected = EXPECTED_GRAPHS[run.model]
    assert {name: (g["inputs"], g["outputs"]) for name, g in summary["graphs"].items()} == {
        name: (inputs, outputs) for name, (inputs, outputs) in expected.items()}
    for name in expected:
        assert onnx.load(str(onnx_dir / name), load_external_data=False).opset_import[0].version == export.OPSET
    record = run.stage_record("export")
    assert record["status"] == "done" and record["zeros_preserved"] is True
    assert record["parity_max_abs_diff"] == summary["parity"]["max_abs_diff"] < 1e-3


def test_onnx_runtime_matches_pytorch_on_new_inputs(exported):
    run, onnx_dir = exported
    loaded = load.load_model(load.resolve_spec(str(run.path)))
    rng = np.random.default_rng(1)
    ids = rng.integers(4, loaded.model.config.vocab_size, size=(3, 20), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 12:] = 0
    values = {"input_ids": ids, "attention_mask": mask}
    if loaded.spec.architecture == "encoder-decoder":
        values["decoder_input_ids"] = np.array([[2, 7, 9]] * 3, dtype=np.int64)
    with torch.no_grad():
        reference = loaded.model(**{k: torch.from_numpy(v) for k, v in values.items()}).logits.numpy()
    logits = onnx_graphs.run_onnx(onnx_dir, loaded.spec.architecture, values)["logits"]
    assert logits.shape == reference.shape
    if loaded.spec.architecture == "decoder":  # padded positions carry no meaning (and differ in position ids)
        logits, reference = logits[mask == 1], reference[mask == 1]
    assert np.abs(logits - reference).max() < 1e-4 * max(1.0, np.abs(reference).max())


def test_zeros_survive_export(exported):
    run, onnx_dir = exported
    measured = read_json(run.path / "sparsity.json")
    zeros = read_json(onnx_dir / EXPORT_FILE)["zeros"]
    assert zeros["onnx_percent"] == zeros["checkpoint_percent"] == pytest.approx(measured["achieved_percent"], abs=1e-3)
    assert zeros["tensors_matched"] == zeros["tensors"] == len(measured["prunable_tensors"])
    pruned_zeros = sum(int((t == 0).sum()) for name, t in sparsity.saved_tensors(run.model_dir)
                       if name in measured["prunable_tensors"])
    assert sum(onnx_zero_counts(onnx_dir)) >= pruned_zeros > 0


def test_export_is_reused_until_forced(exported):
    run, onnx_dir = exported
    graph = onnx_dir / next(iter(EXPECTED_GRAPHS[run.model]))
    before = graph.stat().st_mtime_ns
    assert export.ensure_onnx(run) == onnx_dir and graph.stat().st_mtime_ns == before


def test_lost_zeros_are_detected(exported, tmp_path):
    run, onnx_dir = exported
    graph = next(iter(EXPECTED_GRAPHS[run.model]))
    model = onnx.load(str(onnx_dir / graph))
    largest = max(model.graph.initializer, key=lambda t: int((numpy_helper.to_array(t) == 0).sum()))
    dense = numpy_helper.to_array(largest).copy()
    dense[dense == 0] = 1e-3
    largest.CopyFrom(numpy_helper.from_array(dense, largest.name))
    for other in EXPECTED_GRAPHS[run.model]:
        if other != graph:
            (tmp_path / other).write_bytes((onnx_dir / other).read_bytes())
    onnx.save(model, str(tmp_path / graph))
    with pytest.raises(HarnessError, match="lost zeros"):
        export.check_zeros(run, tmp_path)


def test_static_graph_fixes_axes_and_leaves_the_export_alone(exported):
    run, onnx_dir = exported
    graph = onnx_dir / next(iter(EXPECTED_GRAPHS[run.model]))
    original = graph.read_bytes()
    dims = {"batch_size": 2, "sequence_length": 16, "encoder_sequence_length": 16, "decoder_sequence_length": 1}
    with onnx_graphs.static_graph(graph, dims) as fixed:
        shapes = [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(str(fixed)).graph.input]
        assert all(shape[0] == 2 and all(shape) for shape in shapes)
    assert not fixed.exists() and graph.read_bytes() == original


def test_deepsparse_compiles_every_export(exported):
    """Llama's rotary embedding made DeepSparse's compiler abort until the export wrote it elementwise."""
    from harness.evaluators.onnx_engine import compile_failure

    run, onnx_dir = exported
    dims = {"batch_size": 1, "sequence_length": 16, "encoder_sequence_length": 16, "decoder_sequence_length": 1}
    for name in EXPECTED_GRAPHS[run.model]:
        with onnx_graphs.static_graph(onnx_dir / name, dims) as fixed:
            assert compile_failure(fixed, 1) is None, (run.model, name)


def test_too_little_disk_is_one_line_before_any_writing(monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    run = write_run("tiny-gpt2", 50)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    assert cli.main(["export", "--model", "tiny-gpt2", "--level", "50", "--recipe", RECIPE, "--force"]) == 2
    assert "not enough disk space for the ONNX export" in capsys.readouterr().err
    assert not (run.path / ONNX_SUBDIR).exists()


def test_missing_run_says_to_prune_first(capsys):
    code = cli.main(["export", "--model", "tiny-gpt2", "--level", "42", "--recipe", RECIPE])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "make prune MODEL=tiny-gpt2 LEVEL=42" in lines[0]


def test_export_failure_names_the_operator_and_architecture(monkeypatch):
    import optimum.exporters.onnx as optimum_onnx

    def unsupported(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::fancy_attention' to ONNX opset version 14 is not supported.")

    monkeypatch.setattr(optimum_onnx, "onnx_export_from_model", unsupported)
    run = write_run("tiny-gpt2", 0)
    with pytest.raises(HarnessError) as error:
        export.ensure_onnx(run, force=True)
    assert "aten::fancy_attention" in str(error.value) and "gpt2" in str(error.value)
    assert not any(p.name.startswith(".onnx") for p in run.path.iterdir())
