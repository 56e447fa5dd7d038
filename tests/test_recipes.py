"""Recipe parameters typed by their defaults, the backend contract and registry, and the checks the
prune stage makes once for every backend; bad input fails with one line before anything is written."""
import subprocess
import sys
import types

import pytest
import torch

from harness import backends, cli, prune, runargs
from harness.backends import Backend, Schedule
from harness.errors import HarnessError
from harness.layout import SPARSITY_FILE, Sparsity
from harness.paths import PROJECT_ROOT
from harness.recipes import load_recipe
from harness.sparsity import saved_tensors
from harness.rundir import RunDir, read_json

GRADUAL = "sparseml/gradual-magnitude"


@pytest.fixture
def runs_root(tmp_path, monkeypatch):
    """An empty runs root of the test's own, to see whatever a failed prune leaves behind."""
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("HARNESS_RUNS", str(root))
    return root


def prune_cli(capsys, model: str, level: int, recipe: str, *options: str) -> tuple[int, list[str]]:
    """`python -m harness prune ...` in this process: exit code and the lines it wrote to stderr."""
    code = cli.main(["prune", "--model", model, "--level", str(level), "--recipe", recipe, *options])
    return code, capsys.readouterr().err.strip().splitlines()


def recipe_file(tmp_path, name: str, backend: str, params: str = "{}", samples: int = 0) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"backend: {backend}\ndescription: test recipe\ncalibration: {{samples: {samples}}}\n"
                    f"params: {params}\nrecipe: |\n  pruning_modifiers: []\n")
    return str(path)


# --- typed parameters -------------------------------------------------------------------------------

@pytest.mark.parametrize("model,recipe,options,message", [
    ("minilm", GRADUAL, ["--set", "tokens=abc"],
     "recipe sparseml/gradual-magnitude: parameter tokens must be an integer like its default 2000000, got 'abc'"),
    ("tiny-gpt2", GRADUAL, ["--set", "mask_updates=1.5"],
     "recipe sparseml/gradual-magnitude: parameter mask_updates must be an integer like its default 32, got 1.5"),
    ("tiny-gpt2", GRADUAL, ["--set", "batch_size=true"],
     "recipe sparseml/gradual-magnitude: parameter batch_size must be an integer like its default 16, got True"),
    ("tiny-gpt2", GRADUAL, ["--set", "lr=x"],
     "recipe sparseml/gradual-magnitude: parameter lr must be a number like its default 0.0001, got 'x'"),
    ("tiny-gpt2", "inc/oneshot-magnitude", ["--set", "pattern=4"],
     "recipe inc/oneshot-magnitude: parameter pattern must be a string like its default '1x1', got 4"),
    ("tiny-gpt2", GRADUAL, ["--set", "steps=8", "--set", "hold=8"],
     "recipe sparseml/gradual-magnitude has no parameter hold, steps (it has: corpus, tokens, train_seq_len, "
     "batch_size, accumulation, lr, temperature, kl_weight, hidden_weight, trainable, precision, lengths, checkpoint_minutes, control, "
     "ramp, init_sparsity, mask_updates, mask_type)"),
    ("tiny-gpt2", GRADUAL, ["--set", "ramp=1.5"], "recovery: kl_weight and ramp must be in [0, 1] and warmup in [0, 1)"),
    ("tiny-gpt2", GRADUAL, ["--set", "steps"], "--set expects name=value, got 'steps'"),
    ("tiny-gpt2", "common/distil", [], "recipe common/distil recovers: compose it after a pruning recipe, "
                                       "e.g. sparseml/oneshot-magnitude+distil"),
    ("tiny-gpt2", "sparseml/oneshot-magnitude+int8+distil", [], "recipe sparseml/oneshot-magnitude+int8+distil: steps "
     "compose as pruning, then recovery, then quantization, each at most once"),
    ("tiny-gpt2", f"{GRADUAL}+distil", [], f"recipe {GRADUAL}+distil: {GRADUAL} trains already (its own recovery section)"),
    ("tiny-gpt2", "sparseml/sparsegpt-recover@lr=0.001", [], "recipe sparseml/sparsegpt-recover is now "
     "sparseml/oneshot-sparsegpt+distil (the same steps, composed)"),
    ("tiny-deberta", "sparseml/oneshot-magnitude", ["--set", "mask_type=block3"],
     "recipe sparseml/oneshot-magnitude@mask_type=block3: Unknown mask_type block3. Supported mask types include "
     "'unstructured' and 'block4'"),
])
def test_a_bad_parameter_is_one_line_and_nothing_is_created(capsys, runs_root, model, recipe, options, message):
    code, lines = prune_cli(capsys, model, 90, recipe, *options)
    assert (code, lines) == (2, [f"error: {message}"])
    assert list(runs_root.iterdir()) == []


def test_block4_masks_prune_whole_groups_of_four_input_weights(runs_root):
    run = prune.prune("tiny-deberta", 75, "sparseml/oneshot-magnitude", {"mask_type": "block4"})
    weights = dict(saved_tensors(run.model_dir))
    targets = run.read(SPARSITY_FILE, Sparsity).prunable_tensors
    assert run.read(SPARSITY_FILE, Sparsity).achieved_percent == pytest.approx(75, abs=1)
    for name in targets:
        groups = (weights[name] == 0).reshape(weights[name].shape[0], -1, 4)
        assert bool((groups.all(-1) | ~groups.any(-1)).all()), name  # each group of 4 is all zero or none


def test_a_bool_parameter_takes_only_true_or_false(capsys, runs_root, tmp_path):
    recipe = recipe_file(tmp_path, "flagged", "sparseml", params="{enabled: true}")
    assert load_recipe(recipe).with_params({"enabled": "false"}).params == {"enabled": False}
    code, lines = prune_cli(capsys, "tiny-gpt2", 50, recipe, "--set", "enabled=1")
    assert (code, lines) == (2, ["error: recipe flagged: parameter enabled must be true or false like its default "
                                 "True, got 1"])
    assert list(runs_root.iterdir()) == []


def test_parameters_take_the_type_of_their_default():
    recipe = load_recipe(GRADUAL)
    assert recipe.with_params({"tokens": 200}).params["tokens"] == 200
    assert recipe.with_params({"tokens": "200"}).params["tokens"] == 200
    assert recipe.with_params({"lr": 1e-4}).params["lr"] == 1e-4
    assert recipe.with_params({"lr": "1e-4"}).params["lr"] == 1e-4
    three = recipe.with_params({"lr": 3}).params["lr"]
    assert three == 3.0 and type(three) is float
    # 1024 tokens = 2 steps of 16 x 32 tokens; the sparsity ramps over 3/4 of them
    short = recipe.with_params({"tokens": "1024", "train_seq_len": 32, "accumulation": 1})
    assert "train_steps: 2\nramp_steps: 2\n" in short.render_text(0.9, [])
    assert load_recipe("inc/oneshot-magnitude").with_params({"pattern": "2:4"}).params["pattern"] == "2:4"
    for calibrated in ("sparseml/oneshot-sparsegpt", "sparseml/oneshot-wanda"):
        assert load_recipe(calibrated).calibration.corpus == "fineweb"
        assert load_recipe(f"{calibrated}@calibration_corpus=wikipedia").calibration.corpus == "wikipedia"
    with pytest.raises(HarnessError, match="parameter lr must be a number"):
        recipe.with_params({"lr": "NaN"})


def test_a_recipe_with_changed_parameters_is_a_variant_with_its_own_name_and_runs(capsys, runs_root):
    variant = load_recipe(GRADUAL).with_params({"tokens": 8, "lr": 1e-3, "ramp": 0.75})  # ramp: its default
    assert variant.name == f"{GRADUAL}@lr=0.001,tokens=8" and variant.base_name == GRADUAL
    same = load_recipe(f"{GRADUAL}@tokens=8,lr=1e-3")
    assert (same.name, same.params) == (variant.name, variant.params)
    assert load_recipe(GRADUAL).with_params({"tokens": load_recipe(GRADUAL).defaults["tokens"]}).name == GRADUAL
    with pytest.raises(HarnessError, match="has no parameter tokenz"):
        load_recipe(f"{GRADUAL}@tokenz=8")
    with pytest.raises(HarnessError, match="expects name=value"):
        load_recipe(f"{GRADUAL}@tokens")
    oneshot = "inc/oneshot-magnitude"
    assert cli.main(["prune", "--model", "tiny-gpt2", "--level", "50", "--recipe", oneshot, "--set", "pattern=4x1"]) == 0
    assert cli.main(["prune", "--model", "tiny-gpt2", "--level", "50", "--recipe", oneshot]) == 0
    recipes_dir = runs_root / "tiny-gpt2" / "inc"
    assert sorted(d.name for d in recipes_dir.iterdir()) == ["oneshot-magnitude", "oneshot-magnitude@pattern=4x1"]
    manifest = RunDir("tiny-gpt2", f"{oneshot}@pattern=4x1", 50).manifest()
    assert manifest["params"]["pattern"] == "4x1" and manifest["recipe"] == f"{oneshot}@pattern=4x1"
    # the later stages find a variant's run whatever the order of its parameters
    reordered = "sparseml/oneshot-magnitude@owl_lambda=0.1,allocation=owl"
    assert runargs.resolve_run("tiny-gpt2", reordered, 50) == \
        RunDir("tiny-gpt2", "sparseml/oneshot-magnitude@allocation=owl,owl_lambda=0.1", 50)


# --- the backend contract and registry --------------------------------------------------------------

def test_every_registered_backend_provides_the_contract():
    assert backends.backend_names() == sorted(backends.REGISTRY) == ["inc", "sparseml"]  # helpers are not backends
    for name in backends.backend_names():
        backend = backends.get_backend(name)
        assert isinstance(backend, Backend) and backend.NAME == name


def test_backends_read_the_schedule_of_their_recipes():
    sparseml, inc = backends.get_backend("sparseml"), backends.get_backend("inc")
    # the training steps of the token budget: 2M tokens / (128 tokens x 16 x 2 sequences per step)
    assert sparseml.schedule(load_recipe(GRADUAL), 0.9) == Schedule(steps=488)
    assert sparseml.schedule(load_recipe(GRADUAL).with_params({"tokens": 6 * 128 * 32}), 0.9) == Schedule(6)
    assert sparseml.schedule(load_recipe("sparseml/oneshot-magnitude"), 0.9) == Schedule(steps=0)
    assert sparseml.schedule(load_recipe("sparseml/oneshot-sparsegpt"), 0.9) == Schedule(steps=0, calibrates=True)
    # INC's ramp ends at 3/4 of the steps; the rest trains with the mask fixed
    assert inc.schedule(load_recipe("inc/gradual-snip-momentum").with_params({"tokens": 8 * 128 * 32}), 0.9) == Schedule(6)
    assert inc.schedule(load_recipe("inc/oneshot-magnitude"), 0.9) == Schedule(steps=0)


def test_a_registered_module_without_the_contract_is_refused(monkeypatch):
    incomplete = types.ModuleType("harness.backends.incomplete")
    incomplete.NAME, incomplete.ARCHITECTURES, incomplete.LEVEL_HINT = "incomplete", ("decoder",), ""
    register(monkeypatch, incomplete)
    with pytest.raises(TypeError, match="does not provide harness.backends.Backend"):
        backends.get_backend("incomplete")
    with pytest.raises(HarnessError, match=r"unknown pruning backend 'nope' \(available: inc, incomplete, sparseml\)"):
        backends.get_backend("nope")


def test_the_backends_do_not_import_the_recipes():
    """recipes imports backends to check a recipe's backend name; the other way would be a cycle."""
    code = "import sys, harness.backends; assert 'harness.recipes' not in sys.modules, 'cycle'"
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --- the checks prune makes once for every backend --------------------------------------------------

def register(monkeypatch, module: types.ModuleType) -> None:
    monkeypatch.setitem(backends.REGISTRY, module.NAME, module.__name__)
    monkeypatch.setitem(sys.modules, module.__name__, module)


def fake_backend(share: float, schedule: Schedule = Schedule(steps=0)) -> types.ModuleType:
    """A backend that zeroes the first `share` of what it is asked to of each target weight."""
    module = types.ModuleType("harness.backends.fake")
    module.NAME, module.ARCHITECTURES, module.LEVEL_HINT = "fake", ("decoder",), "check the fake schedule"
    module.schedule = lambda recipe, sparsity: schedule

    def prune(job) -> None:
        params = dict(job.model.named_parameters())
        with torch.no_grad():
            for name in job.targets:
                flat = params[name].view(-1)
                flat[:int(flat.numel() * job.sparsity * share)] = 0

    module.prune = prune
    return module


def test_a_backend_that_misses_the_level_is_one_error_and_leaves_no_run(capsys, monkeypatch, runs_root, tmp_path):
    register(monkeypatch, fake_backend(share=0.5))
    code, lines = prune_cli(capsys, "tiny-gpt2", 50, recipe_file(tmp_path, "fake", "fake"))
    assert (code, lines) == (2, ["error: recipe fake left the targets 25.00% sparse instead of 50.00% (fake): "
                                 "check the fake schedule"])
    assert list(runs_root.iterdir()) == []  # no run, no staging directory, no empty recipe directory


def test_a_backend_that_reaches_the_level_writes_sparsity_json(capsys, monkeypatch, runs_root, tmp_path):
    register(monkeypatch, fake_backend(share=1.0))
    code, _ = prune_cli(capsys, "tiny-gpt2", 50, recipe_file(tmp_path, "fake", "fake"))
    assert code == 0
    stored = read_json(RunDir("tiny-gpt2", "fake", 50).path / SPARSITY_FILE)
    assert set(stored) == set(Sparsity.__dataclass_fields__)
    assert stored["target_percent"] == 50 and stored["achieved_percent"] == pytest.approx(50, abs=0.01)


@pytest.mark.parametrize("schedule,samples,params,message", [
    (Schedule(steps=3), 0, "{lr: 0.001}",
     "recipe fake trains for 3 steps: give it a `recovery` section (its training text and token budget)"),
    (Schedule(steps=0, calibrates=True), 0, "{}",
     "recipe fake calibrates on data: give it calibration data (`calibration: {samples: N}` in its header)"),
])
def test_a_schedule_missing_what_it_needs_fails_before_anything_is_written(
        capsys, monkeypatch, runs_root, tmp_path, schedule, samples, params, message):
    register(monkeypatch, fake_backend(share=1.0, schedule=schedule))
    code, lines = prune_cli(capsys, "tiny-gpt2", 50, recipe_file(tmp_path, "fake", "fake", params, samples))
    assert (code, lines) == (2, [f"error: {message}"])
    assert list(runs_root.iterdir()) == []
