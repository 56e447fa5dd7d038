"""Registry, loading, run directories, recipes and the CLI's handling of bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig

from harness import cli, environment, load
from harness.errors import HarnessError
from harness.recipes import available, load_recipe, parse_overrides
from harness.rundir import parse_level, read_json, stage_run, staging_dir, write_atomic


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    return code, capsys.readouterr().err.strip().splitlines()


def test_every_registry_entry_is_well_formed():
    specs = load.registry()
    assert {"gpt2xl", "deberta", "deberta-mnli", "m2m100", "minilm", "tiny-gpt2", "tiny-deberta",
            "tiny-m2m100"} <= set(specs)
    for spec in specs.values():
        assert hasattr(transformers, spec.model_class), spec.name


@pytest.mark.parametrize("name,architecture", [("tiny-gpt2", "decoder"), ("tiny-deberta", "encoder"),
                                               ("tiny-m2m100", "encoder-decoder")])
def test_tiny_models_build_deterministically_and_run(name, architecture):
    loaded = load.load_model(name)
    assert loaded.spec.architecture == architecture
    params = sum(p.numel() for p in loaded.model.parameters())
    assert 1e6 < params < 10e6
    torch.manual_seed(load.BUILD_SEED)
    rebuilt = getattr(transformers, loaded.spec.model_class).from_config(loaded.model.config)
    for (name_a, a), (_, b) in zip(loaded.model.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), name_a
    batch = loaded.tokenizer("Sparsity, ça marche?", return_tensors="pt")
    extra = {"decoder_input_ids": torch.tensor([[2]])} if architecture == "encoder-decoder" else {}
    with torch.no_grad():
        assert torch.isfinite(loaded.model(**batch, **extra)[0]).all()


def test_minilm_is_the_real_pretrained_encoder():
    loaded = load.load_model("minilm")
    assert sum(p.numel() for p in loaded.model.parameters()) == 22_713_216
    embeddings = []
    for text in ("A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply."):
        batch = loaded.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = loaded.model(**batch).last_hidden_state
        embeddings.append(torch.nn.functional.normalize(hidden.mean(1), dim=-1))
    similar = float(embeddings[0] @ embeddings[1].T)
    unrelated = float(embeddings[0] @ embeddings[2].T)
    assert similar > 0.5 > unrelated  # random weights would not separate paraphrase from unrelated


def test_byte_tokenizer_round_trips_any_text():
    tokenizer = load.byte_tokenizer("encoder-decoder", ("en", "fr"))
    text = "Größe 42 — 日本語 ok"
    ids = tokenizer(text)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id
    assert len(ids) == len(text.encode()) + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.convert_tokens_to_ids("__fr__") == len(load.SPECIAL_TOKENS) + 256 + 1


@pytest.mark.parametrize("file,published", [("gpt2-xl.json", 1.558e9), ("deberta-v2-xxlarge.json", 1.5e9),
                                            ("m2m100_1.2B.json", 1.2e9)])
def test_shape_configs_match_published_parameter_counts(file, published):
    values = json.loads((load.CONFIGS_DIR / file).read_text())
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    auto = {"gpt2": "AutoModelForCausalLM", "deberta-v2": "AutoModel", "m2m_100": "AutoModelForSeq2SeqLM"}
    with torch.device("meta"):
        model = getattr(transformers, auto[config.model_type]).from_config(config)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - published) / published < 0.05


@pytest.mark.parametrize("value,ok", [("0", True), ("99.5", True), ("100", False), ("-1", False), ("abc", False)])
def test_level_validation(value, ok):
    if ok:
        assert parse_level(value) == float(value)
    else:
        with pytest.raises(HarnessError, match="LEVEL"):
            parse_level(value)


def test_unknown_model_lists_the_known_aliases(capsys):
    code, lines = run_cli(capsys, "prune", "--model", "no-such-model", "--level", "50")
    assert code == 2 and len(lines) == 1
    assert "minilm" in lines[0] and "tiny-gpt2" in lines[0]


def test_bad_level_is_one_line(capsys):
    code, lines = run_cli(capsys, "prune", "--model", "tiny-gpt2", "--level", "100")
    assert code == 2 and lines == ["error: LEVEL must be in [0, 100) (percent of prunable weights set to zero), got '100'"]


def test_the_cli_sets_the_library_environment_before_it_imports_a_stage(capsys, monkeypatch):
    for name in environment.DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # a user's own setting stays
    seen = {}
    build_parser = cli.build_parser  # imports the stage's module, and so SparseML or DeepSparse

    def recording_build_parser(stage=None):
        seen.update({name: os.environ.get(name) for name in environment.DEFAULTS})
        return build_parser(stage)

    monkeypatch.setattr(cli, "build_parser", recording_build_parser)
    assert run_cli(capsys, "recipes")[0] == 0
    assert seen == {**environment.DEFAULTS, "TOKENIZERS_PARALLELISM": "true"}



FAULTS_OF_A_REALLOCATION = """
import ctypes, resource, sys
from harness import environment
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
if sys.argv[1] == "keep":
    environment.keep_freed_memory()
for _ in range(2):  # 256 MB, written, freed; then the same again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(2**28)
    ctypes.memset(block, 1, 2**28)
    libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_freed_memory_serves_a_freed_large_block_again_without_new_pages():
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REALLOCATION, mode], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parent.parent)
        return int(out.stdout)
    assert faults("default") > 2**28 // 4096 // 2  # a fresh mapping each time: the kernel faults in its pages
    assert faults("keep") < 1000

def test_hub_model_missing_offline_says_how_to_get_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    code, lines = run_cli(capsys, "prune", "--model", "gpt2xl", "--level", "50")
    assert code == 2 and len(lines) == 1
    assert "huggingface-cli download gpt2-xl" in lines[0]


def test_recipes_are_listed_and_unknown_ones_rejected():
    assert "sparseml/oneshot-magnitude" in available()
    with pytest.raises(HarnessError, match="unknown recipe 'nope/x'.*sparseml/oneshot-magnitude"):
        load_recipe("nope/x")


@pytest.mark.parametrize("text,problem", [
    ("backend: sparseml\nrecipe: [unclosed\n", "not valid YAML"),
    ("backend: sparseml\n", "missing keys recipe"),
    ("backend: sparseml\nrecipe: x\ncolour: red\n", "unknown keys colour"),
    ("backend: magic\nrecipe: x\n", "unknown backend 'magic'"),
    ("backend: sparseml\nrecipe: x\ntargets: 3\n", "targets must be"),
])
def test_malformed_recipe_names_the_file_and_the_problem(tmp_path, text, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(HarnessError) as error:
        load_recipe(str(path))
    assert str(path) in str(error.value) and problem in str(error.value)


def test_recipe_parameter_overrides():
    assert parse_overrides(["steps=200", "lr=1e-4", "pattern=4x1"]) == {"steps": 200, "lr": 1e-4, "pattern": "4x1"}
    with pytest.raises(HarnessError, match="name=value"):
        parse_overrides(["steps"])
    with pytest.raises(HarnessError, match="no parameter bogus"):
        load_recipe("sparseml/oneshot-magnitude").with_params({"bogus": 1})


def test_staging_dir_leaves_nothing_on_failure_and_replaces_on_success(tmp_path):
    final = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        with staging_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise KeyboardInterrupt
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):  # a run directory whose model and recipe directories it made: they go too
        with staging_dir(tmp_path / "model" / "recipe" / "50"):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "model" / "recipe" / ".50.resume").mkdir(parents=True)  # but not one holding something else
    with pytest.raises(KeyboardInterrupt):
        with staging_dir(tmp_path / "model" / "recipe" / "50"):
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.rglob("*")] == ["model", "recipe", ".50.resume"]
    shutil.rmtree(tmp_path / "model")
    for content in (b"old", b"new"):
        with staging_dir(final) as tmp:
            (tmp / "data").write_bytes(content)
    assert (final / "data").read_bytes() == b"new" and len(list(tmp_path.iterdir())) == 1


def test_staging_dir_removes_what_killed_processes_left(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan, live, other = (tmp_path / f".run.tmp-{dead.pid}-x", tmp_path / f".run.tmp-{os.getpid()}-y",
                           tmp_path / f".other.tmp-{dead.pid}-z")
    for path in (orphan, live, other):
        path.mkdir()
        (path / "weights.safetensors").write_bytes(b"x")
    with staging_dir(tmp_path / "run") as tmp:
        (tmp / "data").write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "run"])


SIGTERMED_CHILD = """
import sys, time
from pathlib import Path
from harness.cli import interrupt_on_sigterm
from harness.rundir import staging_dir
interrupt_on_sigterm()
try:
    with staging_dir(Path(sys.argv[1]) / "run") as tmp:
        (tmp / "half.safetensors").write_bytes(b"x")
        print("ready", flush=True)
        time.sleep(60)
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", SIGTERMED_CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).parents[1])
    assert child.stdout.readline().strip() == "ready"
    child.terminate()
    assert child.wait(timeout=30) == 130 and list(tmp_path.iterdir()) == []


def test_write_atomic_keeps_old_content_when_the_write_fails(tmp_path):
    path = tmp_path / "a.json"
    write_atomic(path, "old")
    with pytest.raises(TypeError):
        write_atomic(path, 12345)  # not str/bytes: fails inside the write
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_stage_records_its_own_peak_memory_and_its_childrens(tmp_path):
    manifest = tmp_path / "manifest.json"
    with stage_run(manifest, "quiet", "x"):
        pass
    # a child holding 300 MB, like the DeepSparse compile the bench starts
    hungry = "b = bytearray(300 * 2**20); import time; time.sleep(1)"
    with stage_run(manifest, "bench", "x"):
        subprocess.run([sys.executable, "-c", hungry], check=True)
    stages = read_json(manifest)["stages"]
    assert "children_peak_rss_mb" not in stages["quiet"]
    assert 300 <= stages["bench"]["children_peak_rss_mb"] < 400
    assert stages["bench"]["peak_rss_mb"] < stages["quiet"]["peak_rss_mb"] + 100


@pytest.mark.parametrize("recipe", ["sparseml/oneshot-magnitude", "inc/oneshot-magnitude"])
def test_layer_wise_one_shot_in_groups_gives_the_same_weights(monkeypatch, recipe):
    """Both backends prune big models in groups of layers, in threads (backends.in_groups)."""
    from harness import backends, sparsity

    targets = sparsity.prunable_names(load.load_model("tiny-gpt2").model)

    def pruned_weights(group_bytes: int) -> dict:
        monkeypatch.setattr(backends, "GROUP_BYTES", group_bytes)
        loaded = load.load_model("tiny-gpt2")
        assert len(backends.weight_groups(loaded.model, targets, group_bytes)) == (1 if group_bytes > 1e9 else len(targets))
        backends.get_backend(recipe.split("/")[0]).prune(backends.PruneJob(
            model=loaded.model, tokenizer=loaded.tokenizer, spec=loaded.spec, recipe=load_recipe(recipe),
            sparsity=0.5, targets=targets))
        return {name: param.detach().clone() for name, param in loaded.model.named_parameters()}

    whole, one_by_one = pruned_weights(10**12), pruned_weights(1)  # one group; one target per group
    assert whole.keys() == one_by_one.keys() and all(torch.equal(whole[n], one_by_one[n]) for n in whole)
    assert 0.49 < sparsity.zero_fraction(whole[name] for name in targets) < 0.51
