"""The analyze stage on checkpoints with planted zeros and small values, so every count is known exactly.

Every weight of a planted model is first given a random magnitude in [0.2, 1) (above every absolute
threshold and above 0.1 * std ~ 0.064), then chosen tensors get known numbers of 0, 2e-5, 2e-4, 2e-3 and
2e-2 entries. The expected count for a measure is then the number of planted entries below its limit.
"""
import csv
import re

import numpy as np
import pytest
import torch
from matplotlib import image

from harness import analyze, cli, load, sparsity
from harness.layout import (ANALYSIS_SUBDIR, BY_LAYER_PNG, HEATMAP_PNG, HISTOGRAM_PNG, MANIFEST, MODEL_SUBDIR,
                            SPARSITY_FILE, STRUCTURE_CSV, STRUCTURE_JSON, SUMMARY_MD, to_json)
from harness.paths import runs_dir
from harness.rundir import RunDir, read_json, safe_name, stage_run, staging_dir, write_json
from harness.structure import MODULE_TYPES, Thresholds, classify, tally_tensor

# Largest planted magnitude each default measure includes (relative limits: 0.01 * std ~ 0.0064, 0.1 * std ~ 0.064).
INCLUDED_UP_TO = {"zero": 0.0, "abs<0.0001": 2e-5, "abs<0.001": 2e-4, "abs<0.01": 2e-3, "abs<0.1": 2e-2,
                  "rel<0.01std": 2e-3, "rel<0.1std": 2e-2}
KEYS = list(INCLUDED_UP_TO)

# (tensor, layer, module type, prunable, {planted value: count})
GPT2_PLANTS = [
    ("transformer.h.0.attn.c_attn.weight", "0", "attn_qkv", True, {0.0: 1000, 2e-5: 100, -2e-4: 200, 2e-3: 300, -2e-2: 400}),
    ("transformer.h.2.mlp.c_proj.weight", "2", "mlp_down", True, {0.0: 5000}),
    ("transformer.h.1.ln_1.bias", "1", "norm", False, {0.0: 10, -2e-5: 5}),
    ("transformer.wte.weight", "other", "embedding", False, {0.0: 256, -2e-2: 100}),
    ("transformer.h.3.attn.c_proj.bias", "3", "bias", False, {2e-3: 7}),
]
# (tensor, section, {planted value: count})
M2M_PLANTS = [
    ("model.encoder.layers.0.fc1.weight", "encoder", {0.0: 111, 2e-3: 11}),
    ("model.decoder.layers.1.self_attn.q_proj.weight", "decoder", {0.0: 222}),
    ("model.decoder.layers.0.encoder_attn.k_proj.weight", "cross-attention", {0.0: 333, -2e-4: 33}),
    ("model.shared.weight", "other", {0.0: 44}),
]
# tensor-name suffix -> module type, first match wins: a norm's bias belongs to the norm
GPT2_TYPES = {"ln_1.weight": "norm", "ln_1.bias": "norm", "ln_2.weight": "norm", "ln_2.bias": "norm",
              "ln_f.weight": "norm", "ln_f.bias": "norm", ".bias": "bias", "attn.c_attn.weight": "attn_qkv",
              "attn.c_proj.weight": "attn_out", "mlp.c_fc.weight": "mlp_up", "mlp.c_proj.weight": "mlp_down",
              "wte.weight": "embedding", "wpe.weight": "embedding"}


def expected_count(plants: dict, key: str) -> int:
    return sum(count for value, count in plants.items() if abs(value) <= INCLUDED_UP_TO[key])


def planted_checkpoint(alias: str, plants: dict, directory):
    """Build `alias`, give every weight a magnitude in [0.2, 1), plant `plants` ({name: {value: count}}), save."""
    loaded = load.load_model(alias)
    generator = torch.Generator().manual_seed(0)
    parameters = dict(loaded.model.named_parameters())
    with torch.no_grad():
        for parameter in parameters.values():
            magnitude = torch.rand(parameter.shape, generator=generator) * 0.8 + 0.2
            sign = torch.randint(0, 2, parameter.shape, generator=generator) * 2 - 1
            parameter.copy_(magnitude * sign)
        for name, planted in plants.items():
            flat, start = parameters[name].view(-1), 0
            for value, count in planted.items():
                flat[start:start + count] = value
                start += count
    loaded.model.save_pretrained(directory, safe_serialization=True)
    loaded.tokenizer.save_pretrained(directory)
    return loaded.model


def saved_state(directory) -> dict[str, np.ndarray]:
    return {name: tensor.numpy() for name, tensor in sparsity.saved_tensors(directory) if tensor.is_floating_point()}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    directory = tmp_path_factory.mktemp("planted-gpt2")
    planted_checkpoint("tiny-gpt2", {name: plants for name, *_, plants in GPT2_PLANTS}, directory)
    out = analyze.analyze(str(directory))
    return directory, out, read_json(out / STRUCTURE_JSON)


@pytest.fixture(scope="module")
def m2m(tmp_path_factory):
    directory = tmp_path_factory.mktemp("planted-m2m100")
    planted_checkpoint("tiny-m2m100", {name: plants for name, _, plants in M2M_PLANTS}, directory)
    out = analyze.analyze(str(directory))
    return directory, out, read_json(out / STRUCTURE_JSON)


def assert_groups_sum_to_overall(structure: dict) -> None:
    overall = structure["overall"]["all"]
    for kind in ("by_layer", "by_module_type", "by_section"):
        if not structure[kind]:
            continue
        assert sum(g["params"] for g in structure[kind].values()) == overall["params"], kind
        for key in structure["measures"]:
            assert sum(g["counts"][key] for g in structure[kind].values()) == overall["counts"][key], (kind, key)
    for layer, row in structure["by_layer_and_type"].items():
        assert sum(cell["params"] for cell in row.values()) == structure["by_layer"][layer]["params"]
        for key in structure["measures"]:
            assert sum(cell["counts"][key] for cell in row.values()) == structure["by_layer"][layer]["counts"][key]


def assert_fractions_are_exact(group: dict) -> None:
    for key, count in group["counts"].items():
        assert group["fractions"][key] == count / group["params"]


def test_every_planted_count_and_fraction_is_exact(gpt2):
    directory, _, structure = gpt2
    state = saved_state(directory)
    assert list(structure["measures"]) == KEYS
    rows = {row["name"]: row for row in structure["tensors"]}
    assert set(rows) == set(state)  # every float tensor once; lm_head is tied to wte and saved once
    planted = {name: plants for name, *_, plants in GPT2_PLANTS}
    for name, row in rows.items():
        assert row["params"] == state[name].size
        assert row["counts"] == {key: expected_count(planted.get(name, {}), key) for key in KEYS}, name
        assert_fractions_are_exact(row)

    total = sum(array.size for array in state.values())
    overall = structure["overall"]["all"]
    assert overall["params"] == total
    assert overall["counts"]["zero"] == 1000 + 5000 + 10 + 256
    assert overall["counts"]["abs<0.0001"] == 1000 + 100 + 5000 + 10 + 5 + 256
    assert overall["counts"]["abs<0.1"] == 1000 + 100 + 200 + 300 + 400 + 5000 + 10 + 5 + 256 + 100 + 7
    assert overall["fractions"]["zero"] == 6266 / total
    for group in [overall, structure["overall"]["prunable"], *structure["by_layer"].values(),
                  *structure["by_module_type"].values()]:
        assert_fractions_are_exact(group)


def test_layers_types_and_prunable_set(gpt2):
    directory, _, structure = gpt2
    state = saved_state(directory)

    def layer(name):
        match = re.search(r"\.h\.(\d+)\.", name)
        return match.group(1) if match else "other"

    assert list(structure["by_layer"]) == ["0", "1", "2", "3", "other"]
    for name_layer, group in structure["by_layer"].items():
        plants = [p for name, lay, _, _, p in GPT2_PLANTS if lay == name_layer]
        assert group["params"] == sum(a.size for n, a in state.items() if layer(n) == name_layer)
        assert group["counts"] == {key: sum(expected_count(p, key) for p in plants) for key in KEYS}
    for _, lay, module_type, _, plants in GPT2_PLANTS:  # each plant is alone in its layer x type cell
        cell = structure["by_layer_and_type"][lay][module_type]
        assert cell["counts"] == {key: expected_count(plants, key) for key in KEYS}
    for row in structure["tensors"]:
        assert row["module_type"] == next(t for suffix, t in GPT2_TYPES.items() if row["name"].endswith(suffix))
        assert row["section"] == ""  # sections are for encoder-decoder models only

    prunable = [n for n in state if re.search(r"\.h\.\d+\.(attn|mlp)\.\w+\.weight$", n)]
    assert len(prunable) == 16
    assert sorted(r["name"] for r in structure["tensors"] if r["prunable"]) == sorted(prunable)
    assert structure["overall"]["prunable"]["params"] == sum(state[n].size for n in prunable)
    assert structure["overall"]["prunable"]["counts"]["zero"] == 1000 + 5000
    assert structure["by_layer"]["2"]["prunable"]["counts"]["zero"] == 5000
    assert_groups_sum_to_overall(structure)


def test_magnitude_statistics_match_numpy(gpt2):
    directory, _, structure = gpt2
    state = saved_state(directory)
    for row in structure["tensors"]:
        values = state[row["name"]].astype(np.float64)
        assert row["mean_abs"] == pytest.approx(np.abs(values).mean(), rel=1e-9)
        assert row["std"] == pytest.approx(values.std(), rel=1e-9)
        assert row["max_abs"] == np.abs(values).max()
        if values.size >= 65536:  # big enough that the nearest-rank and interpolated percentiles agree
            for q in (10, 50, 90):
                assert row["percentiles_abs"][f"p{q}"] == pytest.approx(np.percentile(np.abs(values), q), rel=2.5e-3)
    layer0 = np.concatenate([a.ravel() for n, a in state.items() if ".h.0." in n]).astype(np.float64)
    assert structure["by_layer"]["0"]["std"] == pytest.approx(layer0.std(), rel=1e-9)
    assert structure["by_layer"]["0"]["percentiles_abs"]["p50"] == pytest.approx(np.median(np.abs(layer0)), rel=2.5e-3)


def test_csv_has_one_row_per_tensor_matching_the_json(gpt2):
    _, out, structure = gpt2
    with open(out / STRUCTURE_CSV) as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == [t["name"] for t in structure["tensors"]]
    for row, tensor in zip(rows, structure["tensors"]):
        assert int(row["params"]) == tensor["params"] and int(row["zeros"]) == tensor["counts"]["zero"]
        for key in KEYS:
            assert float(row[f"frac_{key}"]) == tensor["fractions"][key]
        assert row["shape"] == "x".join(map(str, tensor["shape"]))


def test_plots_and_summary_are_written(gpt2):
    _, out, structure = gpt2
    for name in (HISTOGRAM_PNG, BY_LAYER_PNG, HEATMAP_PNG):
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = image.imread(path)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300
        assert pixels[..., :3].std() > 0.02, f"{name} is blank"
    summary = (out / SUMMARY_MD).read_text()
    assert "exact zero" in summary and "By layer" in summary and HEATMAP_PNG in summary
    assert f"{structure['overall']['all']['params']:,}" in summary
    assert structure["peak_rss_mb"] > 0 and f"in {structure['wall_time_s']} s, peak memory" in summary


def test_encoder_decoder_and_cross_attention_split(m2m):
    directory, _, structure = m2m
    state = saved_state(directory)

    def section(name):
        if "encoder_attn" in name:
            return "cross-attention"
        return "decoder" if ".decoder." in name else "encoder" if ".encoder." in name else "other"

    assert list(structure["by_section"]) == ["cross-attention", "decoder", "encoder", "other"]
    for name_section, group in structure["by_section"].items():
        plants = [p for _, sec, p in M2M_PLANTS if sec == name_section]
        assert group["params"] == sum(a.size for n, a in state.items() if section(n) == name_section)
        assert group["counts"] == {key: sum(expected_count(p, key) for p in plants) for key in KEYS}
        assert_fractions_are_exact(group)
    # per decoder layer: q/k/v/out weights and biases and the encoder_attn_layer_norm weight and bias
    assert structure["by_section"]["cross-attention"]["tensors"] == 2 * (8 + 2)
    assert list(structure["by_layer"]) == ["encoder.0", "encoder.1", "decoder.0", "decoder.1", "other"]
    assert structure["by_layer_and_type"]["decoder.0"]["attn_k (cross)"]["counts"]["zero"] == 333
    assert structure["by_layer_and_type"]["decoder.1"]["attn_q"]["counts"]["zero"] == 222
    assert structure["by_layer_and_type"]["encoder.0"]["mlp_up"]["counts"]["abs<0.01"] == 111 + 11
    assert_groups_sum_to_overall(structure)


@pytest.mark.parametrize("name, module_type", [
    ("encoder.layer.0.attention.self.query.weight", "attn_q"),  # BERT / MiniLM
    ("encoder.layer.0.attention.self.key.weight", "attn_k"),
    ("encoder.layer.0.attention.output.dense.weight", "attn_out"),
    ("encoder.layer.0.attention.output.LayerNorm.weight", "norm"),
    ("encoder.layer.0.intermediate.dense.weight", "mlp_up"),
    ("encoder.layer.0.output.dense.weight", "mlp_down"),
    ("embeddings.position_embeddings.weight", "embedding"),
    ("pooler.dense.weight", "head"),
    ("deberta.encoder.layer.3.attention.self.value_proj.weight", "attn_v"),  # DeBERTa-v2
    ("deberta.encoder.rel_embeddings.weight", "embedding"),
    ("classifier.weight", "head"),
    ("model.decoder.layers.0.encoder_attn.out_proj.weight", "attn_out"),  # M2M100
    ("model.encoder.layers.1.fc2.weight", "mlp_down"),
    ("model.decoder.layers.0.encoder_attn_layer_norm.bias", "norm"),
    ("model.shared.weight", "embedding"),
    ("lm_head.weight", "lm_head"),
    ("model.layers.7.self_attn.o_proj.weight", "attn_out"),  # Llama
    ("model.layers.7.mlp.gate_proj.weight", "mlp_gate"),
    ("model.layers.7.mlp.up_proj.weight", "mlp_up"),
    ("model.layers.7.mlp.down_proj.weight", "mlp_down"),
    ("model.layers.7.post_attention_layernorm.weight", "norm"),
    ("model.embed_tokens.weight", "embedding"),
    ("transformer.h.0.attn.c_attn.bias", "bias"),  # GPT-2
])
def test_module_type_table(name, module_type):
    assert classify(MODULE_TYPES, name) == module_type


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_threshold_comparisons_are_exact_at_the_boundary(dtype):
    """A stored value counts as below t exactly when its real value is below t (no rounding of t)."""
    below = torch.tensor(1e-4, dtype=dtype)  # rounds to nearest: may be just above or just below 1e-4
    values = torch.stack([below, torch.nextafter(below, torch.tensor(1.0, dtype=dtype)),
                          torch.nextafter(below, torch.tensor(0.0, dtype=dtype)), torch.tensor(0.1, dtype=dtype),
                          torch.tensor(-0.0, dtype=dtype), torch.tensor(3.0, dtype=dtype)])
    tally = tally_tensor("t", values, Thresholds((1e-4, 0.1), ()))
    exact = [float(v) for v in values.float()]  # every 16/32-bit value is exact in float64
    assert tally.counts["abs<0.0001"] == sum(abs(v) < 1e-4 for v in exact)
    assert tally.counts["abs<0.1"] == sum(abs(v) < 0.1 for v in exact)
    assert tally.counts["zero"] == 1


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """A run directory like prune writes: the planted GPT-2 with exactly half of each prunable tensor zeroed."""
    source = tmp_path_factory.mktemp("planted-gpt2-run")
    model = planted_checkpoint("tiny-gpt2", {name: plants for name, *_, plants in GPT2_PLANTS}, source)
    spec = load.resolve_spec("tiny-gpt2")
    targets = sparsity.prunable_names(model)
    run = RunDir(spec.name, "test/planted", 50)
    with staging_dir(run.path) as tmp:
        write_json(tmp / MANIFEST, {"model": spec.name, "spec": spec.to_dict(), "recipe": run.recipe, "level": 50})
        with stage_run(tmp / MANIFEST, "prune", "planted"):
            parameters = dict(model.named_parameters())
            with torch.no_grad():
                for name in targets:
                    flat = parameters[name].view(-1)
                    flat[flat.abs().argsort()[:flat.numel() // 2]] = 0
            model.save_pretrained(tmp / MODEL_SUBDIR, safe_serialization=True)
            write_json(tmp / SPARSITY_FILE, to_json(sparsity.measure(tmp / MODEL_SUBDIR, targets, 50)))
    expected_zeros = sum(parameters[name].numel() // 2 for name in targets)
    return run, expected_zeros


def test_run_directory_shows_achieved_vs_target(pruned_run):
    run, expected_zeros = pruned_run
    out = analyze.analyze(str(run.path))
    assert out == run.path / ANALYSIS_SUBDIR
    structure = read_json(out / STRUCTURE_JSON)
    measured = read_json(run.path / SPARSITY_FILE)
    prunable = structure["overall"]["prunable"]
    assert prunable["counts"]["zero"] == expected_zeros
    assert structure["run"]["target_fraction"] == 0.5
    assert structure["run"]["achieved_fraction"] == expected_zeros / prunable["params"]
    for layer, percent in measured["per_layer_percent"].items():
        assert structure["by_layer"][layer]["prunable"]["fractions"]["zero"] == pytest.approx(percent / 100, abs=1e-6)
    record = run.stage_record("analyze")
    assert record["status"] == "done" and record["peak_rss_mb"] > 0
    assert 0 < structure["wall_time_s"] <= record["wall_time_s"]  # the measuring is timed within the stage
    assert all((run.path / name).exists() for name in record["outputs"])
    assert "achieved" in (out / SUMMARY_MD).read_text()

    # the same run addressed as --model/--recipe/--level is up to date and is not rewritten
    before = (out / STRUCTURE_JSON).stat().st_mtime_ns
    assert cli.main(["analyze", "--model", "tiny-gpt2", "--recipe", "test/planted", "--level", "50"]) == 0
    assert (out / STRUCTURE_JSON).stat().st_mtime_ns == before


def _one_line_error(capsys, argv: list[str], expected: str) -> None:
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], lines


def test_bad_inputs_fail_with_one_line_and_leave_nothing(tmp_path, capsys, gpt2):
    planted_dir, _, _ = gpt2
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((planted_dir / "config.json").read_text())
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((planted_dir / "config.json").read_text())
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")

    _one_line_error(capsys, ["analyze", "--model", str(empty)], "has no weights")
    _one_line_error(capsys, ["analyze", "--model", str(pickled)], "reads only safetensors")
    _one_line_error(capsys, ["analyze", "--model", "nonexistent"], "unknown model 'nonexistent'")
    _one_line_error(capsys, ["analyze", "--model", str(tmp_path / "missing")], "unknown model")
    _one_line_error(capsys, ["analyze", "--model", "tiny-gpt2", "--recipe", "sparseml/oneshot-magnitude"], "needs --level")
    _one_line_error(capsys, ["analyze", "--model", "tiny-gpt2", "--level", "37"], "make prune")
    _one_line_error(capsys, ["analyze", "--model", "tiny-gpt2", "--thresholds", "1e-3,abc"], "--thresholds")
    for path in (empty, pickled):
        assert not (runs_dir() / safe_name(str(path))).exists()
