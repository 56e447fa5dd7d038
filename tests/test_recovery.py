"""Recovery training on tiny models: the loss falls, the mask stays fixed, a killed run resumes to the
same weights as an uninterrupted one, a budget that cannot fit fails before training."""
import copy
import dataclasses

import pytest
import torch

from harness import load, recovery, sparsity
from harness.errors import HarnessError
from conftest import killed_after

PLAN = recovery.RecoveryPlan(tokens=16 * 2 * 2 * 32, seq_len=32, batch_size=2, accumulation=2, lr=3e-3,
                             warmup=0.1, checkpoint_minutes=0.0, precision="bf16")


def resume_in(directory, targets):
    return recovery.Resume(directory, PLAN, targets, "test weights")


def pruned_pair(alias: str):
    """(student pruned to 50 % by magnitude, dense teacher, tokenizer, architecture, targets)."""
    loaded = load.load_model(alias)
    teacher = copy.deepcopy(loaded.model)
    targets = sparsity.prunable_names(loaded.model)
    params = dict(loaded.model.named_parameters())
    with torch.no_grad():
        for name in targets:
            flat = params[name].view(-1)
            flat[flat.abs().argsort()[:flat.numel() // 2]] = 0
    return loaded.model, teacher, loaded.tokenizer, loaded.spec.architecture, targets


@pytest.mark.parametrize("alias, precision, hidden_weight, trainable", [
    ("tiny-gpt2", "fp32", 0.0, "targets"), ("tiny-gpt2", "bf16", 0.0, "targets"), ("tiny-gpt2", "bf16", 0.0, "all"),
    ("tiny-m2m100", "bf16", 0.0, "targets"), ("tiny-m2m100", "bf16", 1.0, "targets+norms+biases")])
def test_loss_falls_and_the_mask_stays_fixed(alias, precision, hidden_weight, trainable, tmp_path):
    student, teacher, tokenizer, architecture, targets = pruned_pair(alias)
    plan = dataclasses.replace(PLAN, precision=precision, hidden_weight=hidden_weight, trainable=trainable)
    params = dict(student.named_parameters())
    zeros = {name: params[name] == 0 for name in targets}
    trained = {"targets": set(targets), "all": set(params),
               "targets+norms+biases": set(targets) | {n for n, p in params.items() if p.dim() == 1}}[trainable]
    untouched = {n: p.detach().clone() for n, p in params.items() if n not in trained}
    result = recovery.recover(student, teacher, tokenizer, architecture, targets, plan, resume_in(tmp_path, targets))
    losses = [point.loss for point in result.curve]
    assert len(losses) == plan.steps == 16 and result.precision == precision
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4])
    for name in targets:
        assert torch.equal(params[name] == 0, zeros[name])  # exactly the pruned weights are zero
    assert all(torch.equal(params[n], value) for n, value in untouched.items())  # only the trainable ones train
    assert all(not torch.equal(params[n], teacher.get_parameter(n)) for n in trained)


def test_the_encoder_loss_is_zero_for_the_teacher_itself_and_grows_with_the_difference():
    loaded = load.load_model("minilm")
    batch = dict(loaded.tokenizer(["a sentence to embed", "and another one, longer than the first"],
                                  padding=True, return_tensors="pt"))
    with torch.no_grad():
        teacher_out = loaded.model(**batch)
        assert float(recovery.distillation_loss(teacher_out, teacher_out, batch, PLAN)) == pytest.approx(0, abs=1e-6)
        student, _, _, _, _ = pruned_pair("minilm")
        student_out = student(**batch)
    shifted = type(teacher_out)(last_hidden_state=teacher_out.last_hidden_state + 0.1)
    assert 0 < float(recovery.distillation_loss(shifted, teacher_out, batch, PLAN)) \
        < float(recovery.distillation_loss(student_out, teacher_out, batch, PLAN))


def test_encoders_train_on_mixed_length_spans_in_their_special_tokens_and_padding_is_no_loss():
    loaded = load.load_model("minilm")
    tokenizer, plan = loaded.tokenizer, recovery.RecoveryPlan(tokens=4 * 16 * 64, seq_len=64, batch_size=16,
                                                              accumulation=1, lengths="mixed")
    batches = recovery.Batches(tokenizer, plan, "encoder", has_labels=False)
    lengths = []
    for index in range(4):
        batch = batches(index)
        for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
            length = sum(mask)
            assert mask == [1] * length + [0] * (len(mask) - length)
            assert ids[0] == tokenizer.cls_token_id and ids[length - 1] == tokenizer.sep_token_id
            assert set(ids[length:]) <= {tokenizer.pad_token_id}
            lengths.append(length)
    assert min(lengths) >= recovery.MIN_MIXED_LEN and max(lengths) <= 64
    per_batch = [set(lengths[i:i + 16]) for i in range(0, 64, 16)]  # one length per micro-batch: nothing to pad
    assert all(len(one) == 1 for one in per_batch) and len(set().union(*per_batch)) > 1
    again = recovery.Batches(tokenizer, plan, "encoder", has_labels=False)(3)  # a restart sees the same batch
    assert torch.equal(again["input_ids"], batch["input_ids"])
    fixed = recovery.Batches(tokenizer, dataclasses.replace(plan, lengths="auto"), "decoder", has_labels=True)(0)
    assert fixed["input_ids"].shape == (16, 64) and bool(fixed["attention_mask"].all())

    batch = dict(tokenizer(["a short span", "and a longer span of text that the shorter one is padded to"],
                           padding=True, return_tensors="pt"))
    with torch.no_grad():
        teacher_out = loaded.model(**batch)
    hidden = teacher_out.last_hidden_state.clone()
    hidden[batch["attention_mask"] == 0] += 5.0  # what the model computes at padding is no target
    moved = type(teacher_out)(last_hidden_state=hidden)
    assert float(recovery.distillation_loss(moved, teacher_out, batch, plan)) == pytest.approx(0, abs=1e-6)


def test_sentences_run_from_a_start_to_an_end_packed_in_micro_batches_that_the_budget_counts(tmp_path):
    tokenizer = load.load_model("minilm").tokenizer
    plan = recovery.RecoveryPlan(tokens=4 * 16 * 32, seq_len=32, batch_size=16, accumulation=1, lengths="sentences")
    ends = {tokenizer.convert_tokens_to_ids(token) for token in (".", "!", "?")}
    batches = recovery.Batches(tokenizer, plan, "encoder", has_labels=False)
    ranges, real = [], 0
    for index in range(4):
        batch = batches(index)
        lengths = batch["attention_mask"].sum(1).tolist()
        for ids, length in zip(batch["input_ids"].tolist(), lengths):
            sentence = ids[1:length - 1]
            assert ids[0] == tokenizer.cls_token_id and ids[length - 1] == tokenizer.sep_token_id
            assert recovery.MIN_MIXED_LEN <= length <= 32
            assert not ends & set(sentence[:-1]) and tokenizer.sep_token_id not in sentence  # one sentence, one document
            assert sentence[-1] in ends or length == 32  # ends at its end, or was cut at seq_len
        assert batch["input_ids"].numel() <= 16 * 32  # as many sentences as fit in batch_size x seq_len slots
        ranges.append((min(lengths), max(lengths)))
        real += sum(lengths)
    assert real > 0.8 * plan.tokens  # the budget counts tokens trained on, not 16 sentences' slots
    ranges.sort()
    assert all(high <= low for (_, high), (low, _) in zip(ranges, ranges[1:]))  # sorted by length: little padding
    assert len({low for low, _ in ranges}) > 1
    again = recovery.Batches(tokenizer, plan, "encoder", has_labels=False)(3)  # a restart sees the same batch
    assert torch.equal(again["input_ids"], batch["input_ids"])
    default = recovery.Batches(tokenizer, dataclasses.replace(plan, lengths="auto"), "encoder", has_labels=False)
    assert torch.equal(default(3)["input_ids"], batch["input_ids"])  # encoders train on sentences by default

    text = tmp_path / "no-sentences.txt"
    text.write_text(("words without an end " * 40 + "\n") * 40)  # one document in 20 is held out
    with pytest.raises(HarnessError, match="has 0 sentences of at least 6 tokens .* use lengths=mixed"):
        recovery.Batches(tokenizer, dataclasses.replace(plan, corpus=str(text)), "encoder", has_labels=False)


def test_the_hidden_state_term_covers_every_layer_relative_to_its_scale_and_skips_padding():
    loaded = load.load_model("minilm")
    batch = dict(loaded.tokenizer(["a sentence to embed", "and another one, longer than the first"],
                                  padding=True, return_tensors="pt"))
    student, _, _, _, _ = pruned_pair("minilm")
    with torch.no_grad():
        teacher_out = loaded.model(**batch, output_hidden_states=True)
        student_out = student(**batch, output_hidden_states=True)
    layers = recovery.hidden_states(teacher_out)
    assert len(layers) == loaded.model.config.num_hidden_layers
    assert float(recovery.squarehead_loss(teacher_out, teacher_out, batch)) == 0
    term = float(recovery.squarehead_loss(student_out, teacher_out, batch))
    assert term > 0
    scaled = [type(out)(last_hidden_state=out.last_hidden_state, hidden_states=tuple(10 * h for h in out.hidden_states))
              for out in (student_out, teacher_out)]
    assert float(recovery.squarehead_loss(*scaled, batch)) == pytest.approx(term, rel=1e-5)  # relative to scale
    padding = (batch["attention_mask"] == 0).unsqueeze(-1)
    moved = type(teacher_out)(last_hidden_state=teacher_out.last_hidden_state,
                              hidden_states=tuple(h + 5.0 * padding for h in teacher_out.hidden_states))
    assert float(recovery.squarehead_loss(moved, teacher_out, batch)) == pytest.approx(0, abs=1e-6)
    plan = dataclasses.replace(PLAN, hidden_weight=0.5)
    assert float(recovery.distillation_loss(student_out, teacher_out, batch, plan)) == pytest.approx(
        float(recovery.distillation_loss(student_out, teacher_out, batch, PLAN)) + 0.5 * term, rel=1e-5)


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    student, teacher, tokenizer, architecture, targets = pruned_pair("tiny-gpt2")
    reference = copy.deepcopy(student)
    recovery.recover(reference, teacher, tokenizer, architecture, targets, PLAN, resume_in(tmp_path / "reference", targets))

    interrupted = copy.deepcopy(student)
    with killed_after(losses=6 * PLAN.accumulation):
        recovery.recover(interrupted, teacher, tokenizer, architecture, targets, PLAN, resume_in(tmp_path / "run", targets))
    state = resume_in(tmp_path / "run", targets)
    state.save({**state.load(), "seconds": 1000.0})  # as if the killed invocation had trained for 1000 s
    resumed = copy.deepcopy(teacher)  # as prune resumes: the state holds the pruned, trained weights
    result = recovery.recover(resumed, teacher, tokenizer, architecture, targets, PLAN, resume_in(tmp_path / "run", targets))
    assert result.resumed_from == 6
    assert 1000 < result.wall_time_s < 1600  # training time sums the invocations
    assert [p.step for p in result.curve] == list(range(1, PLAN.steps + 1))
    for name, param in reference.named_parameters():
        assert torch.equal(param, resumed.get_parameter(name)), name


def test_a_budget_that_does_not_fit_fails_before_training(tmp_path, monkeypatch):
    student, teacher, tokenizer, architecture, targets = pruned_pair("tiny-gpt2")
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    monkeypatch.setattr(recovery.psutil, "virtual_memory", lambda: type("M", (), {"available": 2**20})())
    with pytest.raises(HarnessError, match="recovery needs about .* GiB .* available: lower batch_size"):
        recovery.recover(student, teacher, tokenizer, architecture, targets, PLAN, resume_in(tmp_path, targets))
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters())


def test_bad_plans_are_one_clear_line():
    from harness.sweep import controls

    with pytest.raises(HarnessError, match="trainable must be one of"):
        recovery.RecoveryPlan(trainable="everything").check()
    with pytest.raises(HarnessError, match="kl_weight"):
        recovery.RecoveryPlan(kl_weight=2).check()
    with pytest.raises(HarnessError, match="lengths must be one of"):
        recovery.RecoveryPlan(lengths="short").check()
    with pytest.raises(HarnessError, match="control=true with kl_weight 1 distils the dense model into itself"):
        recovery.RecoveryPlan(control=True).check()
    assert controls(["sparseml/oneshot-magnitude+distil"]) == []  # pure distillation: no control
    with pytest.raises(HarnessError, match="precision must be one of auto, fp32, bf16"):
        recovery.RecoveryPlan(precision="fp16").check()


RECOVER = "sparseml/oneshot-magnitude+distil"
SMALL = {"tokens": 12 * 2 * 32, "train_seq_len": 32, "batch_size": 2, "accumulation": 1, "lr": 3e-3,
         "checkpoint_minutes": 0.0}


def saved_weights(run) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(run.model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_prune_with_recovery_resumes_after_an_interruption_to_the_uninterrupted_result():
    from harness import prune
    from harness.layout import RECOVERY_FILE
    from harness.rundir import read_json

    reference = prune.prune("tiny-gpt2", 50, RECOVER, SMALL)
    expected = saved_weights(reference)
    curve = read_json(reference.path / RECOVERY_FILE)["curve"]
    assert len(curve) == 12 and not reference.resume_dir.exists()

    with killed_after(losses=5):
        prune.prune("tiny-gpt2", 50, RECOVER, SMALL, force=True)
    assert reference.resume_dir.exists()  # the state outlives the discarded staging directory
    resumed = prune.prune("tiny-gpt2", 50, RECOVER, SMALL, force=True)
    assert read_json(resumed.path / RECOVERY_FILE)["resumed_from"] == 5
    assert not resumed.resume_dir.exists()
    assert read_json(resumed.path / RECOVERY_FILE)["curve"] == curve
    actual = saved_weights(resumed)
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    measured = read_json(resumed.path / "sparsity.json")
    assert measured["achieved_percent"] == pytest.approx(50, abs=0.01)

    from harness import report
    from harness.report.format import number

    markdown = report.report(["tiny-gpt2"])[0].read_text()
    section = markdown.split("## Recovery")[1].split("\n## ")[0]
    row = next(line for line in section.splitlines() if line.startswith(f"| {resumed.recipe} | 50 |"))
    precision = recovery.resolved_precision(recovery.RecoveryPlan())  # the recipe's auto, on this machine
    assert f"| fineweb | {precision} | {number(SMALL['tokens'])} | 12 | {number(curve[0]['loss'])} |" in row
    assert "recovery loss curves" in section


def test_a_recovery_step_starts_from_the_finished_one_shot_run_and_keeps_its_mask():
    from harness import prune
    from harness.layout import RECOVERY_FILE, SPARSITY_FILE, Sparsity
    from harness.rundir import read_json

    one_shot = prune.prune("tiny-gpt2", 50, "sparseml/oneshot-magnitude")
    recovered = prune.prune("tiny-gpt2", 50, RECOVER, {**SMALL, "tokens": 4 * 2 * 32})
    assert recovered.stage_record("prune")["started_from"] == one_shot.relative
    assert len(read_json(recovered.path / RECOVERY_FILE)["curve"]) == 4
    before, after = saved_weights(one_shot), saved_weights(recovered)
    targets = recovered.read(SPARSITY_FILE, Sparsity).prunable_tensors
    assert all(torch.equal(after[name] == 0, before[name] == 0) for name in targets)  # the one-shot mask, kept
    assert any(not torch.equal(after[name], before[name]) for name in targets)  # and trained


def test_calibration_reads_full_length_training_sequences_capped_by_the_context():
    from harness import prune
    from harness.recipes import Calibration

    loaded = load.load_model("tiny-gpt2")
    batches = prune.calibration_batches(loaded, Calibration(samples=3, seq_len=100_000))
    assert len(batches) == 3
    assert all(tuple(b["input_ids"].shape) == (1, loaded.model.config.n_positions) for b in batches)
    assert all(bool(b["attention_mask"].all()) and torch.equal(b["labels"], b["input_ids"]) for b in batches)


def test_level_0_is_the_untrained_dense_model_unless_the_recipe_asks_for_the_control():
    from safetensors.torch import load_file

    from harness import prune
    from harness.layout import RECOVERY_FILE
    from harness.rundir import read_json
    from harness.sweep import controls

    source = {k: v for f in load.checkpoint_dir(load.resolve_spec("tiny-gpt2")).glob("*.safetensors")
              for k, v in load_file(f).items()}
    short = {**SMALL, "tokens": 4 * 2 * 32}
    dense = prune.prune("tiny-gpt2", 0, RECOVER, {**short, "kl_weight": 0.5})
    assert not (dense.path / RECOVERY_FILE).exists()
    assert all(torch.equal(value, source[name]) for name, value in saved_weights(dense).items())
    [control] = controls([dense.recipe, "sparseml/oneshot-magnitude"])
    assert "control=true," in control and control.startswith(f"{RECOVER}@")
    trained = prune.prune("tiny-gpt2", 0, control)
    assert len(read_json(trained.path / RECOVERY_FILE)["curve"]) == 4
    changed = [name for name, value in saved_weights(trained).items() if not torch.equal(value, source[name])]
    assert changed and set(changed) <= set(sparsity.prunable_names(load.load_model("tiny-gpt2").model))
