"""Sequential layer-wise calibration: every block is calibrated on exactly the inputs the pruned model
before it produces, in every architecture (checked against a full forward pass of the final model)."""
import pytest
import torch

from harness import layerwise, load, reconstruct, sparsegpt, sparsity
from harness.errors import HarnessError

TEXTS = ("The quick brown fox jumps over the lazy dog, and then some more words follow.",
         "Another sentence that is long enough to fill a few tokens.")


def batches_for(loaded, texts=TEXTS) -> list[dict]:
    batches = [dict(loaded.tokenizer([text], return_tensors="pt", truncation=True, max_length=24)) for text in texts]
    if loaded.spec.architecture == "encoder-decoder":
        for batch in batches:
            batch["decoder_input_ids"] = batch["input_ids"][:, :6]
    return batches


def halve(model, names: list[str]) -> None:
    """Zero the smaller half of each weight (a stand-in pruner)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            flat = params[name].view(-1)
            flat[flat.abs().argsort()[:flat.numel() // 2]] = 0


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama", "tiny-deberta", "tiny-m2m100"])
def test_each_block_is_calibrated_on_the_outputs_of_the_pruned_blocks_before_it(alias):
    loaded = load.load_model(alias)
    model, batches = loaded.model, batches_for(loaded)
    targets = sparsity.prunable_names(model)
    seen = {}

    def calibrate_and_prune(block, run):
        hidden = []
        handle = block.module.register_forward_pre_hook(
            lambda module, args, kwargs: hidden.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        run()
        handle.remove()
        seen[block.name] = hidden
        halve(model, block.targets)

    found = layerwise.blocks(model, targets)
    done = list(layerwise.sequential(model, found, batches, calibrate_and_prune))
    assert done == [block.name for block in found] and len(done) >= 2
    assert sorted(t for block in found for t in block.targets) == sorted(targets)
    assert sparsity.zero_fraction(dict(model.named_parameters())[t] for t in targets) == pytest.approx(0.5, abs=0.01)
    for block in found:  # what a full forward of the final (pruned) model feeds each block
        direct = layerwise.capture(model, block, batches)
        for calibrated, (args, kwargs) in zip(seen[block.name], direct.calls):
            assert torch.allclose(calibrated, args[0] if args else kwargs["hidden_states"], atol=1e-5)


def test_encoder_to_decoder_is_captured_again_not_chained():
    loaded = load.load_model("tiny-m2m100")
    found = layerwise.blocks(loaded.model, sparsity.prunable_names(loaded.model))
    chained = layerwise.chained_transitions(loaded.model, found, batches_for(loaded)[0])
    last_encoder = max(i for i, block in enumerate(found) if ".encoder." in block.name)
    assert last_encoder not in chained
    assert chained == set(range(len(found) - 1)) - {last_encoder}


def test_targets_outside_every_block_are_refused():
    loaded = load.load_model("tiny-gpt2")
    with pytest.raises(HarnessError, match="lm_head.weight"):
        layerwise.blocks(loaded.model, [*sparsity.prunable_names(loaded.model), "lm_head.weight"])


def final_hidden(model, batches) -> list[torch.Tensor]:
    with torch.no_grad():
        return [(out.decoder_hidden_states if "decoder_hidden_states" in out else out.hidden_states)[-1]
                for out in (model(**batch, output_hidden_states=True) for batch in batches)]


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-m2m100"])  # m2m100: the decoder's inputs captured, not chained
def test_reconstruction_keeps_the_masks_and_brings_the_pruned_model_closer_to_the_dense_one(alias, capsys):
    dense = load.load_model(alias).model
    batches = batches_for(load.load_model(alias))
    wanted = final_hidden(dense, batches)
    results = {}
    for plan in (None, reconstruct.Reconstruction(epochs=30, lr=0.001, trainable="block")):
        model = load.load_model(alias).model
        found = layerwise.blocks(model, sparsity.prunable_names(model))
        list(layerwise.sequential(model, found, batches, lambda block, run: halve(model, block.targets), plan))
        error = sum(float(((got - want) ** 2).sum()) for got, want in zip(final_hidden(model, batches), wanted))
        params = dict(model.named_parameters())
        results[plan] = error, {t: params[t] == 0 for block in found for t in block.targets}
    (plain, plain_zeros), (trained, trained_zeros) = results.values()
    assert all(torch.equal(plain_zeros[t], trained_zeros[t]) for t in plain_zeros)  # the same mask: halve's
    assert trained < 0.5 * plain
    printed = capsys.readouterr()
    lines = [line for line in (printed.out + printed.err).splitlines() if "reconstruction error" in line]
    assert len(lines) == len(found) and all(float(line.split()[-1]) < float(line.split()[-3]) for line in lines)


def test_reconstruction_that_does_not_lower_the_error_is_undone(capsys):
    plain, diverged = (load.load_model("tiny-llama").model for _ in range(2))
    batches = batches_for(load.load_model("tiny-llama"))
    for model, plan in ((plain, None), (diverged, reconstruct.Reconstruction(epochs=1, lr=100.0))):
        found = layerwise.blocks(model, sparsity.prunable_names(model))
        list(layerwise.sequential(model, found, batches, lambda block, run: halve(model, block.targets), plan))
    assert capsys.readouterr().out.count("not lower: undone") == len(found)
    for (name, got), want in zip(diverged.named_parameters(), plain.parameters()):
        assert torch.equal(got, want), name


def test_reconstruction_is_given_the_dense_blocks_outputs_on_the_samples_it_needs_only(monkeypatch):
    loaded = load.load_model("tiny-m2m100")  # its decoder's inputs are captured again, not chained
    dense = load.load_model("tiny-m2m100").model
    batches = batches_for(loaded, [f"Sample {k}: {TEXTS[k % 2]}" for k in range(6)])
    monkeypatch.setattr(reconstruct, "ERROR_SAMPLES", 2)
    plan = reconstruct.Reconstruction(epochs=0.5, lr=0.001)
    train, checked = reconstruct.Reconstruction.train, []

    def spy(self, block, inputs, targets):
        assert sorted(targets) == plan.samples(len(batches)) and 2 < len(targets) < len(batches)
        outputs = []
        handle = dense.get_submodule(block.name).register_forward_hook(
            lambda module, args, output: outputs.append(layerwise.first_output(output)))
        with torch.no_grad():
            for index in targets:
                dense(**layerwise._model_kwargs(dense, batches[index]))
        handle.remove()
        assert all(torch.allclose(targets[index], output, atol=1e-5) for index, output in zip(targets, outputs))
        checked.append(block.name)
        return train(self, block, inputs, targets)

    monkeypatch.setattr(reconstruct.Reconstruction, "train", spy)
    found = layerwise.blocks(loaded.model, sparsity.prunable_names(loaded.model))
    list(layerwise.sequential(loaded.model, found, batches, lambda block, run: halve(loaded.model, block.targets),
                              plan))
    assert checked == [block.name for block in found]


def test_sparsegpt_hessians_are_sparsemls_computed_once_per_input(monkeypatch):
    from sparseml.modifiers.obcq.utils.sgpt_wrapper import SparseGptWrapper

    harness_run, sparseml_run = (load.load_model("tiny-llama").model for _ in range(2))
    batches = batches_for(load.load_model("tiny-llama"))
    targets = sparsity.prunable_names(sparseml_run)
    fasterprune, hessians = SparseGptWrapper.fasterprune, {}

    def spy(self, **kwargs):
        hessians.setdefault(self.name, []).append(self.H.clone())
        return fasterprune(self, **kwargs)

    monkeypatch.setattr(SparseGptWrapper, "fasterprune", spy)

    def calibrate_and_prune(block, run):  # SparseML's own Hessians, one per layer
        wrappers = [SparseGptWrapper(t, sparseml_run.get_submodule(t.rsplit(".", 1)[0])) for t in block.targets]
        handles = [w.layer.register_forward_hook(lambda m, args, out, w=w: w.add_batch(args[0].data, out.data))
                   for w in wrappers]
        run()
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for wrapper in wrappers:
                wrapper.fasterprune(sparsity=0.5, blocksize=128, percdamp=0.01)

    list(layerwise.sequential(sparseml_run, layerwise.blocks(sparseml_run, targets), batches, calibrate_and_prune))
    add, computed = sparsegpt.Hessian.add, []
    monkeypatch.setattr(sparsegpt.Hessian, "add", lambda self, x: computed.append(x) or add(self, x))
    sparsegpt.prune(harness_run, targets, batches, 0.5)
    per_block = 4  # q (its H serves k and v), o, gate (serves up), down
    assert len(computed) == len(batches) * per_block * len(layerwise.blocks(harness_run, targets))
    for target, (sparseml_h, harness_h) in hessians.items():
        assert torch.allclose(harness_h, sparseml_h, rtol=1e-3, atol=1e-4), target  # float32 sums in two orders
    for (name, got), want in zip(harness_run.named_parameters(), sparseml_run.parameters()):
        assert torch.allclose(got, want, atol=1e-5), name


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama"])
def test_the_calibration_pass_feeds_every_target_layer_and_stops_after_the_last_one(alias):
    loaded = load.load_model(alias)
    model, batches = loaded.model, batches_for(loaded, [f"Sample {k}: {TEXTS[k % 2]}" for k in range(4)])
    block = layerwise.blocks(model, sparsity.prunable_names(model))[0]
    inputs = layerwise.capture(model, block, batches)
    fed = {t: 0 for t in block.targets}
    handles = [model.get_submodule(t.rsplit(".", 1)[0]).register_forward_hook(
        lambda module, args, out, t=t: fed.__setitem__(t, fed[t] + 1)) for t in block.targets]
    finished = []
    handles.append(block.module.register_forward_hook(lambda module, args, out: finished.append(1)))
    layerwise.calibration_pass(block, inputs)
    for handle in handles:
        handle.remove()
    assert fed == {t: len(batches) for t in block.targets}
    assert len(finished) == 1  # the first sample only: the others stop at the block's last target layer
