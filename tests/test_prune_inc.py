"""The Intel Neural Compressor backend: levels, untouched tensors, patterns and schedules, measured from saved files."""
import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

from harness import load, prune, recovery, sparsity
from harness.backends import PruneJob, inc
from harness.errors import HarnessError
from harness.paths import PROJECT_ROOT
from harness.recipes import load_recipe, parse_overrides
from harness.rundir import MODEL_SUBDIR, RunDir

ONESHOT, GRADUAL = "inc/oneshot-magnitude", "inc/gradual-snip-momentum"
# 8 training steps of 4 x 32 tokens instead of the recipe's 2M tokens, same schedule shape
FAST = {"tokens": 1024, "train_seq_len": 32, "batch_size": 4, "accumulation": 1}
# (model, recipe, level, overrides): every tiny model with each recipe, then the headline run and the patterns
EVERY_MODEL_AND_RECIPE = [(model, recipe, 90, FAST if recipe == GRADUAL else {})
                          for model in ("tiny-gpt2", "tiny-deberta", "tiny-m2m100") for recipe in (ONESHOT, GRADUAL)]
RUNS = [
    *EVERY_MODEL_AND_RECIPE,
    ("tiny-m2m100", GRADUAL, 95, FAST),
    ("tiny-gpt2", ONESHOT, 50, {"pattern": "2:4"}),
    # 10 steps, ramp over 8: with its last pruning step at 6 (FAST), INC's exp schedule leaves one of 16k
    # groups of 4 with 3 weights (it stops at 49.997 %, a rounding of its own)
    ("tiny-m2m100", GRADUAL, 50, {**FAST, "tokens": 1280, "ramp": 0.8, "pattern": "2:4"}),
    ("tiny-gpt2", ONESHOT, 80, {"pattern": "4x1", "pruning_scope": "global"}),
]


def run_id(run) -> str:
    model, recipe, level, overrides = run
    return "-".join([model, recipe.split("/")[1], str(level), *(f"{k}={v}" for k, v in overrides.items())])


@pytest.fixture(scope="module")
def pruned():
    """Each run pruned once (lazily) -> (source tensors, pruned tensors, target names, model dir)."""
    cache = {}

    def get(run):
        key = run_id(run)
        if key not in cache:
            model, recipe, level, overrides = run
            run_dir = prune.prune(model, level, recipe, overrides)
            spec = load.resolve_spec(model)
            targets = sparsity.prunable_names(load.load_model(spec).model)
            source = {}
            for file in load.checkpoint_dir(spec).glob("*.safetensors"):
                source.update(load_file(file))
            saved = {}
            for file in (run_dir.path / MODEL_SUBDIR).glob("*.safetensors"):
                saved.update(load_file(file))
            cache[key] = source, saved, targets, run_dir.path / MODEL_SUBDIR
        return cache[key]

    return get


def zero_fraction(tensors: list[torch.Tensor]) -> float:
    return sum(int((t == 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)


def as_linear(model: torch.nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
    """The weight in nn.Linear layout [out, in] (GPT-2's Conv1D stores [in, out])."""
    return weight.t() if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), Conv1D) else weight


@pytest.mark.parametrize("run", RUNS, ids=run_id)
def test_level_is_reached_and_nothing_else_changes(pruned, run):
    source, saved, targets, _ = pruned(run)
    level = run[2]
    assert sorted(saved) == sorted(source)
    assert set(targets) <= set(saved)
    achieved = 100 * zero_fraction([saved[name] for name in targets])
    assert abs(achieved - level) <= 1.0, f"{achieved:.2f}% for level {level}"
    for name in set(saved) - set(targets):
        assert saved[name].dtype == source[name].dtype and torch.equal(saved[name], source[name]), name
    if run[1] == ONESHOT:  # magnitude pruning only zeroes weights, the survivors keep their exact values
        for name in targets:
            kept = saved[name] != 0
            assert torch.equal(saved[name][kept], source[name][kept]), name


@pytest.mark.parametrize("run", EVERY_MODEL_AND_RECIPE, ids=run_id)
def test_pruned_checkpoint_loads_and_runs(pruned, run):
    *_, model_dir = pruned(run)
    loaded = load.load_model(str(model_dir))
    batch = loaded.tokenizer(["The pruned model still computes something."], return_tensors="pt")
    if loaded.spec.architecture == "encoder-decoder":
        batch["decoder_input_ids"] = batch["input_ids"][:, :4]
    with torch.no_grad():
        logits = loaded.model(**batch).logits
    assert logits.shape[0] == 1 and torch.isfinite(logits).all()


@pytest.mark.parametrize("run", [r for r in RUNS if r[3].get("pattern") == "2:4"], ids=run_id)
def test_2_of_4_pattern_along_the_input_dimension(pruned, run):
    _, saved, targets, _ = pruned(run)
    model = load.load_model(run[0]).model
    for name in targets:
        weight = as_linear(model, name, saved[name])
        groups = weight.reshape(weight.shape[0], -1, 4)
        assert int(torch.count_nonzero(groups, dim=-1).max()) <= 2, name


def test_4x1_blocks_span_four_output_channels(pruned):
    run = next(r for r in RUNS if r[3].get("pattern") == "4x1")
    _, saved, targets, _ = pruned(run)
    model = load.load_model(run[0]).model
    for name in targets:
        weight = as_linear(model, name, saved[name])
        blocks = (weight == 0).reshape(weight.shape[0] // 4, 4, weight.shape[1])
        assert torch.equal(blocks.all(dim=1), blocks.any(dim=1)), f"{name} has partially pruned 4x1 blocks"


def test_gradual_schedule_ramps_to_the_level_at_its_last_step(tmp_path):
    """Measure the target weights after every training step; GPT-2's Conv1D modules come back afterwards."""
    loaded = load.load_model("tiny-gpt2")
    model, teacher = loaded.model, copy.deepcopy(loaded.model)
    recipe = load_recipe(GRADUAL).with_params({**FAST, "ramp": 1.0, "pruning_frequency": 2})
    plan = recipe.recovery
    targets = sparsity.prunable_names(model)
    params = dict(model.named_parameters())
    history = []

    def train(hooks: recovery.Hooks):
        def after(step):
            hooks.after_step(step)
            weights = dict(model.named_parameters())
            history.append(zero_fraction([weights[name] for name in targets]))

        return recovery.recover(model, teacher, loaded.tokenizer, "decoder", targets, plan,
                                recovery.Resume(tmp_path, plan, targets, "test"),
                                recovery.Hooks(hooks.before_step, hooks.before_optimizer_step, after))

    job = PruneJob(model=model, tokenizer=loaded.tokenizer, spec=loaded.spec, recipe=recipe, sparsity=0.9,
                   targets=targets, progress=lambda message: None, train=train)
    inc.prune(job)
    final = zero_fraction([params[name] for name in targets])
    assert len(history) == plan.steps == 8
    assert all(a <= b + 1e-9 for a, b in zip(history, history[1:])), history
    assert history[0] < 0.5 and history[-1] < 0.9 - 0.02, history  # still ramping before the last pruning step
    assert final == pytest.approx(0.9, abs=0.001)
    assert all(isinstance(model.get_submodule(name.rsplit(".", 1)[0]), Conv1D) for name in targets)
    assert all(params[name] is model.get_parameter(name) for name in targets)
    assert not any(module._forward_pre_hooks or module._forward_hooks for module in model.modules())
    assert not hasattr(model, "prunings")


def test_a_recipe_that_misses_the_level_names_the_schedule_keys(tmp_path):
    recipe_file = tmp_path / "fixed.yaml"
    text = (PROJECT_ROOT / "recipes/inc/oneshot-magnitude.yaml").read_text()
    recipe_file.write_text(text.replace("target_sparsity: ${sparsity}", "target_sparsity: 0.5"))
    with pytest.raises(HarnessError) as error:
        prune.prune("tiny-gpt2", 90, str(recipe_file))
    assert str(error.value) == ("recipe fixed left the targets 50.00% sparse instead of 90.00% (inc): "
                                "check its schedule (start_step, end_step, pruning_frequency)")
    assert not RunDir("tiny-gpt2", "fixed", 90).path.exists()


def test_n_in_m_above_its_ceiling_is_a_user_error():
    with pytest.raises(HarnessError, match="N/M=0.5"):
        prune.prune("tiny-gpt2", 90, ONESHOT, {"pattern": "2:4"})


def test_set_keeps_n_in_m_patterns_and_reads_exponents():
    assert parse_overrides(["pattern=2:4", "lr=1e-4", "steps=200"]) == {"pattern": "2:4", "lr": 1e-4, "steps": 200}
