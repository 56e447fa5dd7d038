"""SparseML backend: each recipe on each tiny architecture, checked against the saved weights.

Every check reads the safetensors files the prune stage wrote and compares them with the source
checkpoint: sparsity of the target weights, bit-identical other tensors, and what distinguishes the
methods (magnitude pruning keeps the largest weights untouched; SparseGPT reconstructs the rest).
"""
import os
import subprocess
import sys
import time

import pytest
import torch

from harness import load, prune, recovery, sparsity
from harness.errors import HarnessError
from harness.layout import SPARSITY_FILE
from harness.paths import PROJECT_ROOT
from harness.recipes import load_recipe
from harness.rundir import RunDir, read_json
from conftest import killed_after

TINY_MODELS = ("tiny-gpt2", "tiny-deberta", "tiny-m2m100")
RECIPES = ("sparseml/oneshot-magnitude", "sparseml/gradual-magnitude", "sparseml/oneshot-sparsegpt")
CASES = [(model, recipe, 90) for recipe in RECIPES for model in TINY_MODELS] + [
    ("tiny-gpt2", "sparseml/oneshot-magnitude", 50),
    ("tiny-deberta", "sparseml/oneshot-magnitude", 50),
    ("tiny-m2m100", "sparseml/oneshot-magnitude", 50),
    ("tiny-deberta", "sparseml/oneshot-sparsegpt", 50),
]
TOLERANCE_POINTS = 1.0
# SparseGPT's paper-scale calibration (128 x 2048 tokens) and the 2M-token training budget are for real
# models; the tiny ones need little (here 8 training steps of 4 x 32 tokens)
TRAINING = {"tokens": 1024, "train_seq_len": 32, "batch_size": 4, "accumulation": 1}
OVERRIDES = {"sparseml/oneshot-sparsegpt": {"samples": 16, "seq_len": 64}, "sparseml/gradual-magnitude": TRAINING}


def tensors(model_dir) -> dict:
    return dict(sparsity.saved_tensors(model_dir))


def percent_zero(weights: list[torch.Tensor]) -> float:
    return 100.0 * sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def forward(loaded: load.LoadedModel) -> torch.Tensor:
    batch = loaded.tokenizer("Sparse networks, ça marche?", return_tensors="pt")
    if loaded.spec.architecture == "encoder-decoder":
        batch["decoder_input_ids"] = batch["input_ids"][:, :4]
    with torch.no_grad():
        return loaded.model(**batch)[0]


@pytest.fixture(scope="module")
def sources():
    """Per model: its target weight names and the tensors of its source checkpoint."""
    cache = {}

    def get(model: str):
        if model not in cache:
            loaded = load.load_model(model)
            cache[model] = (sparsity.prunable_names(loaded.model), tensors(load.checkpoint_dir(loaded.spec)))
        return cache[model]

    return get


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """Runs each (model, recipe, level) once, from a scratch working directory; returns run and wall time."""
    cache = {}
    workdir = tmp_path_factory.mktemp("cwd")

    def get(model: str, recipe: str, level: int):
        key = (model, recipe, level)
        if key not in cache:
            cwd = os.getcwd()
            os.chdir(workdir)
            try:
                started = time.perf_counter()
                run = prune.prune(model, level, recipe, OVERRIDES.get(recipe))
                cache[key] = (run, time.perf_counter() - started)
            finally:
                os.chdir(cwd)
            assert not (workdir / "sparse_logs").exists(), "SparseML wrote its log files into the working directory"
        return cache[key]

    return get


def test_a_recipe_edited_only_in_its_comments_and_layout_leaves_its_runs_current(pruned):
    run, _ = pruned("tiny-gpt2", "sparseml/oneshot-magnitude", 90)
    recipe, spec = load_recipe("sparseml/oneshot-magnitude"), load.resolve_spec("tiny-gpt2").to_dict()
    assert run.is_pruned(spec, recipe.text, recipe.params)
    assert run.is_pruned(spec, "# a comment added since\n" + recipe.text.replace(": ", ":   ", 1), recipe.params)
    assert not run.is_pruned(spec, recipe.text + "\nnote: a key added since\n", recipe.params)
    assert not run.is_pruned(spec, recipe.text, {**recipe.params, "level_tolerance": 1})


@pytest.mark.parametrize("model,recipe,level", CASES)
def test_prune_reaches_level_and_changes_only_targets(pruned, sources, model, recipe, level):
    run, seconds = pruned(model, recipe, level)
    targets, source = sources(model)
    saved = tensors(run.model_dir)
    assert set(targets) <= set(saved) <= set(source)

    achieved = percent_zero([saved[name] for name in targets])
    print(f"{model} {recipe} {level}%: achieved {achieved:.3f}% in {seconds:.1f} s")
    assert abs(achieved - level) <= TOLERANCE_POINTS
    assert read_json(run.path / SPARSITY_FILE)["achieved_percent"] == pytest.approx(achieved, abs=1e-3)
    for name in targets:  # every recipe here prunes layer by layer
        assert abs(percent_zero([saved[name]]) - level) <= TOLERANCE_POINTS, name
    for name in set(saved) - set(targets):
        assert saved[name].dtype == source[name].dtype and torch.equal(saved[name], source[name]), name

    loaded = load.load_model(str(run.path))
    assert torch.isfinite(forward(loaded)).all()


@pytest.mark.parametrize("model", TINY_MODELS)
def test_oneshot_magnitude_keeps_the_largest_weights_untouched(pruned, sources, model):
    run, _ = pruned(model, "sparseml/oneshot-magnitude", 90)
    targets, source = sources(model)
    saved = tensors(run.model_dir)
    for name in targets:
        kept = saved[name] != 0
        assert torch.equal(saved[name][kept], source[name][kept]), name
        assert source[name][kept].abs().min() >= source[name][~kept].abs().max(), name


@pytest.mark.parametrize("model", TINY_MODELS)
def test_sparsegpt_reconstructs_the_kept_weights(pruned, sources, model):
    run, _ = pruned(model, "sparseml/oneshot-sparsegpt", 90)
    targets, source = sources(model)
    saved = tensors(run.model_dir)
    for name in targets:
        kept = saved[name] != 0
        assert not torch.equal(saved[name][kept], source[name][kept]), name
    # not magnitude pruning: some pruned weights were larger than some kept ones
    name = targets[0]
    kept = saved[name] != 0
    assert source[name][kept].abs().min() < source[name][~kept].abs().max()


@pytest.mark.parametrize("sequential, path", [(True, "SparseML's SparseGPT solver, block by block"),
                                              (False, "a sparseml.core session")])
def test_sparsegpt_runs_block_by_block_or_through_sparsemls_session(capsys, sequential, path):
    run = prune.prune("tiny-gpt2", 70, "sparseml/oneshot-sparsegpt",
                      {**OVERRIDES["sparseml/oneshot-sparsegpt"], "sequential": sequential}, force=True)
    assert f"sparseml: pruned through {path}" in capsys.readouterr().out
    saved = tensors(run.model_dir)
    for name in read_json(run.path / SPARSITY_FILE)["prunable_tensors"]:
        assert abs(percent_zero([saved[name]]) - 70) <= TOLERANCE_POINTS, name


def test_sparsegpt_with_block_reconstruction_keeps_its_level(capsys):
    overrides = {**OVERRIDES["sparseml/oneshot-sparsegpt"], "reconstruct_epochs": 1.0, "reconstruct_lr": 0.001}
    run = prune.prune("tiny-gpt2", 70, "sparseml/oneshot-sparsegpt", overrides, force=True)
    assert capsys.readouterr().out.count("reconstruction error") == 4  # one line per block (4 layers)
    saved = tensors(run.model_dir)
    for name in read_json(run.path / SPARSITY_FILE)["prunable_tensors"]:
        assert abs(percent_zero([saved[name]]) - 70) <= TOLERANCE_POINTS, name


@pytest.mark.parametrize("bad, message", [({"sequential": False}, "needs the harness's solver"),
                                          ({"reconstruct_lr": 0.0}, "reconstruct_lr positive"),
                                          ({"reconstruct_trainable": "all"}, "must be one of targets, block")])
def test_bad_block_reconstruction_is_one_line(bad, message):
    with pytest.raises(HarnessError, match=message):
        prune.prune("tiny-gpt2", 70, "sparseml/oneshot-sparsegpt",
                    {**OVERRIDES["sparseml/oneshot-sparsegpt"], "reconstruct_epochs": 1.0, **bad}, force=True)


def recording_sparsity_after_each_step(monkeypatch) -> list[float]:
    """The targets' sparsity (percent) after each training step of the gradual recipes run from now on."""
    real_recover, after_each_step = recovery.recover, []

    def recording_recover(student, *args, hooks=None):
        weights = [param for name, param in student.named_parameters() if name in set(args[3])]

        def after_step(step):
            hooks.after_step(step)
            after_each_step.append(percent_zero(weights))

        return real_recover(student, *args, hooks=recovery.Hooks(hooks.before_step, hooks.before_optimizer_step, after_step))

    monkeypatch.setattr(recovery, "recover", recording_recover)
    return after_each_step


@pytest.mark.parametrize("ramp", [0.75, 1.0])
def test_gradual_schedule_ramps_while_distilling_then_holds_at_the_target(monkeypatch, ramp):
    """Sparsity after each training step: init_sparsity first, rising, the target from the ramp's end on."""
    after_each_step = recording_sparsity_after_each_step(monkeypatch)
    level, steps = 80, 8
    run = prune.prune("tiny-gpt2", level, "sparseml/gradual-magnitude", force=True,
                      overrides={**TRAINING, "tokens": steps * 4 * 32, "ramp": ramp, "mask_updates": 100})
    ramp_steps = round(ramp * steps)
    assert len(after_each_step) == steps
    assert after_each_step[0] == pytest.approx(5.0, abs=0.1)
    assert all(a <= b + 1e-9 for a, b in zip(after_each_step, after_each_step[1:]))
    assert 10 < after_each_step[ramp_steps // 2] < level - 5
    assert all(abs(s - level) <= TOLERANCE_POINTS for s in after_each_step[ramp_steps:])
    assert abs(read_json(run.path / SPARSITY_FILE)["achieved_percent"] - level) <= TOLERANCE_POINTS
    curve = read_json(run.path / "recovery.json")["curve"]
    assert [point["step"] for point in curve] == list(range(1, steps + 1))


def test_an_interrupted_gradual_run_resumes_to_the_masks_and_weights_of_an_uninterrupted_one():
    overrides = {**TRAINING, "tokens": 8 * 4 * 32, "mask_updates": 100, "checkpoint_minutes": 0.0}
    reference = tensors(prune.prune("tiny-gpt2", 70, "sparseml/gradual-magnitude", overrides, force=True).model_dir)
    with killed_after(losses=5):  # one micro-batch per step: killed in step 6
        prune.prune("tiny-gpt2", 70, "sparseml/gradual-magnitude", overrides, force=True)
    run = prune.prune("tiny-gpt2", 70, "sparseml/gradual-magnitude", overrides, force=True)
    assert read_json(run.path / "recovery.json")["resumed_from"] == 5
    resumed = tensors(run.model_dir)
    for name, tensor in reference.items():
        assert torch.equal(tensor == 0, resumed[name] == 0), name
        assert torch.allclose(tensor, resumed[name], atol=1e-6), name


def test_a_recipe_that_misses_the_level_is_an_error(tmp_path):
    recipe_file = tmp_path / "fixed.yaml"
    text = (PROJECT_ROOT / "recipes/sparseml/oneshot-magnitude.yaml").read_text()
    recipe_file.write_text(text.replace("final_sparsity: ${sparsity}", "final_sparsity: 0.5")
                           .replace("init_sparsity: ${sparsity}", "init_sparsity: 0.5"))
    with pytest.raises(HarnessError) as error:
        prune.prune("tiny-gpt2", 90, str(recipe_file))
    assert str(error.value) == ("recipe fixed left the targets 50.00% sparse instead of 90.00% (sparseml): "
                                "check that its schedule ends on the target (${sparsity})")
    assert not RunDir("tiny-gpt2", "fixed", 90).path.exists()


def test_minilm_end_to_end_through_the_cli(sources):
    """`make prune MODEL=minilm LEVEL=90` (the default recipe), in a fresh process."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "harness", "prune", "--model", "minilm", "--level", "90"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-2000:]
    run = RunDir("minilm", "sparseml/oneshot-magnitude", 90)
    targets, source = sources("minilm")
    saved = tensors(run.model_dir)
    achieved = percent_zero([saved[name] for name in targets])
    print(f"minilm sparseml/oneshot-magnitude 90%: achieved {achieved:.3f}% in {seconds:.1f} s (CLI)")
    assert abs(achieved - 90) <= TOLERANCE_POINTS
    for name in set(saved) - set(targets):
        assert torch.equal(saved[name], source[name]), name
    assert torch.isfinite(forward(load.load_model(str(run.path)))).all()
