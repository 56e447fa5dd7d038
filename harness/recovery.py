"""Recovery: distil the dense model into the pruned one on training text, with the mask fixed, or
train through a gradual recipe's pruning schedule.

The student is the pruned model, the teacher the dense one it came from. Batches are sequences of a
training corpus (`corpus.token_sequences`, never evaluation data; a budget larger than the corpus
reads it again): full `seq_len` spans for decoders
and encoder-decoders; for encoders, whole sentences wrapped in the tokenizer's special tokens, the form of
an encoder's inputs (a sentence embedder never sees 128 tokens without [CLS]; `sentence_batches`), or with
`lengths: mixed`, spans of random length between MIN_MIXED_LEN and `seq_len`, one length per micro-batch.
A token budget rather than a step count: `tokens` counts `batch_size` x `seq_len` slots per micro-batch,
which fixed spans and packed sentences fill and mixed spans about half (the curve counts the real tokens);
AdamW with linear warm-up and cosine decay, gradient accumulation. The
loss: for models with logits (decoders, encoder-decoders, classifiers), temperature-scaled KL from
the teacher's distribution, mixed with the model's own language-modelling loss by `kl_weight`; for
headless encoders (MiniLM), one minus the cosine of the mean-pooled embeddings plus the mean squared
error of the last hidden states (both over the real tokens). With `hidden_weight` > 0, a layer-wise
term is added: every layer's hidden states pulled towards the teacher's (SquareHead, `squarehead_loss`).
Every pruned weight stays exactly zero: its mask is re-applied after each optimizer step. A gradual recipe passes its backend's `Hooks` instead: they run around every step
and own the masks (the sparsity ramps over the first `ramp` of the steps, then stays fixed).

A long run checkpoints its state (trained weights, optimizer, step, loss curve, RNG) every
`checkpoint_minutes` into a resume directory; started again with the same plan, it goes on from
there and ends with the same weights as an uninterrupted run. With hooks, the steps before the checkpoint
are replayed through them without training, so the backend's schedule is where it was; its masks are
recomputed from the checkpointed weights, whose pruned weights are zero.
"""
from __future__ import annotations

import io
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import psutil
import torch
from tqdm import tqdm

from harness import corpus, environment, timing
from harness.errors import HarnessError
from harness.evaluators.onnx_engine import pad_right
from harness.layout import CurvePoint, Recovery
from harness.rundir import fingerprint, write_atomic

STATE_FILE = "recovery-state.pt"
KEY_FILE = "recovery-state.key"  # the state's key, readable without loading the state
TRAINABLE = ("targets", "targets+norms+biases", "all")  # all: the dense rest (embeddings, head) too
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 where the CPU multiplies bf16 matrices natively, else fp32
LENGTHS = ("auto", "fixed", "mixed", "sentences")  # auto: sentences for encoders, fixed otherwise
MIN_MIXED_LEN = 8


@dataclass(frozen=True)
class RecoveryPlan:
    tokens: int = 2_000_000  # training tokens (the budget)
    seq_len: int = 512
    batch_size: int = 4  # sequences per micro-batch
    accumulation: int = 4  # micro-batches per optimizer step
    lr: float = 1e-4
    warmup: float = 0.05  # fraction of the steps with a linear warm-up
    weight_decay: float = 0.0
    temperature: float = 2.0
    kl_weight: float = 1.0  # models with logits: 1 = pure distillation, 0 = pure language modelling
    hidden_weight: float = 0.0  # weight of the layer-wise hidden-state term (SquareHead) added to the loss
    trainable: str = "targets"  # or "targets+norms+biases", or "all"
    precision: str = "auto"  # bf16: mixed precision (fp32 weights and optimizer, bf16 matrix products)
    lengths: str = "auto"  # training sequences: fixed (seq_len tokens), mixed (wrapped spans), sentences, auto
    corpus: str = corpus.DEFAULT_CORPUS
    checkpoint_minutes: float = 10.0
    seed: int = 0
    ramp: float = 0.0  # gradual recipes: fraction of the steps over which the sparsity ramps (0: pruned before)
    control: bool = False  # level 0 trains too: the domain-adaptation control (`sweep --control`)

    @property
    def sequences_per_step(self) -> int:
        return self.batch_size * self.accumulation

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.seq_len * self.sequences_per_step))

    def check(self) -> None:
        if self.trainable not in TRAINABLE:
            raise HarnessError(f"recovery: trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        if self.precision not in PRECISIONS:
            raise HarnessError(f"recovery: precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.lengths not in LENGTHS:
            raise HarnessError(f"recovery: lengths must be one of {', '.join(LENGTHS)}, got {self.lengths!r}")
        if min(self.tokens, self.seq_len, self.batch_size, self.accumulation) < 1 or self.lr <= 0:
            raise HarnessError("recovery: tokens, seq_len, batch_size, accumulation and lr must be positive")
        if self.lengths == "mixed" and self.seq_len < MIN_MIXED_LEN:
            raise HarnessError(f"recovery: mixed lengths need seq_len of at least {MIN_MIXED_LEN}, got {self.seq_len}")
        if not 0 <= self.kl_weight <= 1 or not 0 <= self.warmup < 1 or not 0 <= self.ramp <= 1:
            raise HarnessError("recovery: kl_weight and ramp must be in [0, 1] and warmup in [0, 1)")
        if self.hidden_weight < 0:
            raise HarnessError(f"recovery: hidden_weight must be 0 or more, got {self.hidden_weight}")
        if self.control and self.kl_weight == 1:
            raise HarnessError("recovery: control=true with kl_weight 1 distils the dense model into itself, which "
                               "leaves it as it is: set kl_weight below 1, so the control also learns the training "
                               "text (the domain adaptation it controls for)")

    @property
    def ramp_steps(self) -> int:
        return round(self.ramp * self.steps)


def resolved_precision(plan: RecoveryPlan) -> str:
    if plan.precision == "auto":
        return "bf16" if timing.cpu_has_bf16() else "fp32"
    return plan.precision


def teacher_dtype(plan: RecoveryPlan) -> torch.dtype:
    return torch.bfloat16 if resolved_precision(plan) == "bf16" else torch.float32


def _nothing(step: int) -> None:
    pass


@dataclass(frozen=True)
class Hooks:
    """What a pruning schedule does around each training step (step numbers from 0)."""

    before_step: Callable[[int], None] = _nothing
    before_optimizer_step: Callable[[int], None] = _nothing  # gradients are available here
    after_step: Callable[[int], None] = _nothing


def trainable_names(model: torch.nn.Module, targets: list[str], trainable: str) -> list[str]:
    if trainable == "all":
        return [n for n, _ in model.named_parameters()]
    names = set(targets)
    if trainable == "targets+norms+biases":
        names |= {n for n, p in model.named_parameters() if p.dim() == 1}
    return [n for n, _ in model.named_parameters() if n in names]


def memory_needed(model: torch.nn.Module, trained: list[str], plan: RecoveryPlan) -> int:
    """Bytes: student and teacher weights, gradients and two AdamW moments of the trained weights, and
    activations kept for the backward pass (a generous ~24 floats per hidden unit per token and layer)."""
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    sizes = dict(model.named_parameters())
    trained_numel = sum(sizes[n].numel() for n in trained)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", 1024)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", 24)
    vocab = getattr(config, "vocab_size", 0)
    tokens = plan.batch_size * plan.seq_len
    activations = tokens * (24 * hidden * layers + 3 * vocab)
    return 4 * (2 * params + 3 * trained_numel + activations)


def _learning_rate(plan: RecoveryPlan, step: int) -> float:
    warm = max(1, int(plan.warmup * plan.steps))
    if step < warm:
        return plan.lr * (step + 1) / warm
    progress = (step - warm) / max(1, plan.steps - warm)
    return plan.lr * 0.5 * (1 + math.cos(math.pi * progress))


def hidden_states(output) -> list[torch.Tensor]:
    """Each layer's output in a forward run with `output_hidden_states` (both stacks of an encoder-decoder)."""
    return [state for key in ("hidden_states", "encoder_hidden_states", "decoder_hidden_states")
            for state in (getattr(output, key, None) or ())[1:]]  # [0] is the embeddings


def squarehead_loss(student_out, teacher_out, batch: dict) -> torch.Tensor:
    """SquareHead (Kurtic et al. 2023, "Sparse Fine-tuning for Inference Acceleration of LLMs"): per layer, the
    squared error to the teacher's hidden states over the teacher's squared norm (so every layer counts
    alike, whatever its scale), averaged over the layers; padding is no target."""
    mask = batch["attention_mask"]
    losses = []
    for student, teacher in zip(hidden_states(student_out), hidden_states(teacher_out), strict=True):
        weight = mask.unsqueeze(-1).float() if mask.shape == student.shape[:2] else torch.ones(1)
        teacher = teacher.float()
        losses.append(((student.float() - teacher) ** 2 * weight).sum() / (teacher ** 2 * weight).sum().clamp_min(1e-12))
    return torch.stack(losses).mean()


def distillation_loss(student_out, teacher_out, batch: dict, plan: RecoveryPlan) -> torch.Tensor:
    """The output term (below), plus `hidden_weight` x the layer-wise hidden-state term."""
    loss = output_loss(student_out, teacher_out, batch, plan)
    if plan.hidden_weight:
        loss = loss + plan.hidden_weight * squarehead_loss(student_out, teacher_out, batch)
    return loss


def output_loss(student_out, teacher_out, batch: dict, plan: RecoveryPlan) -> torch.Tensor:
    logits = getattr(student_out, "logits", None)
    if logits is not None:
        temperature = plan.temperature
        kl = torch.nn.functional.kl_div(
            torch.log_softmax(logits / temperature, -1).flatten(0, -2),
            torch.log_softmax(teacher_out.logits / temperature, -1).flatten(0, -2),
            log_target=True, reduction="batchmean") * temperature ** 2
        if plan.kl_weight == 1 or student_out.loss is None:
            return kl
        return plan.kl_weight * kl + (1 - plan.kl_weight) * student_out.loss
    hidden, target = student_out.last_hidden_state, teacher_out.last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    pooled_target = (target * mask).sum(1) / mask.sum(1)
    cosine = torch.nn.functional.cosine_similarity(pooled, pooled_target, dim=-1).mean()
    squared_error = ((hidden - target) ** 2 * mask).sum() / (mask.sum() * hidden.shape[-1])
    return (1 - cosine) + squared_error


class Batches:
    """The training batches of a plan: micro-batch `index` of the run, the same on every (re)start."""

    def __init__(self, tokenizer, plan: RecoveryPlan, architecture: str, has_labels: bool):
        lengths = plan.lengths if plan.lengths != "auto" else "sentences" if architecture == "encoder" else "fixed"
        micro_batches = plan.steps * plan.accumulation
        self.plan, self.has_labels, self.tokenizer = plan, has_labels, tokenizer if lengths != "fixed" else None
        if lengths == "fixed":
            self.sequences = corpus.token_sequences(tokenizer, plan.corpus, micro_batches * plan.batch_size,
                                                    plan.seq_len, repeat=True)
            return
        # spans of the corpus, each to be wrapped in the special tokens
        special = len(tokenizer.build_inputs_with_special_tokens([]))
        generator = torch.Generator().manual_seed(plan.seed)
        if lengths == "sentences":
            self.groups = sentence_batches(tokenizer, plan, micro_batches, special, generator)
            return
        # mixed: consecutive spans of one token stream, one length per micro-batch: no padding to compute (16 spans
        # of 8-24 tokens padded to the longest were a third padding; MiniLM trains 1.26x faster without it)
        span_lengths = torch.randint(MIN_MIXED_LEN - special, plan.seq_len - special + 1, (micro_batches,),
                                     generator=generator).repeat_interleave(plan.batch_size)
        stream = corpus.token_sequences(tokenizer, plan.corpus, 1, int(span_lengths.sum()), repeat=True)[0]
        spans = torch.split(stream, span_lengths.tolist())
        self.groups = [spans[i:i + plan.batch_size] for i in range(0, len(spans), plan.batch_size)]

    def __call__(self, index: int) -> dict:
        if self.tokenizer is None:
            ids = self.sequences[index * self.plan.batch_size:(index + 1) * self.plan.batch_size]
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        else:
            spans = [self.tokenizer.build_inputs_with_special_tokens(span.tolist()) for span in self.groups[index]]
            ids, mask = pad_right(spans, max(map(len, spans)), self.tokenizer.pad_token_id or 0)
            batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if self.has_labels:
            # decoders shift it; encoder-decoders learn to reproduce it; padding is no target
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch


def sentence_batches(tokenizer, plan: RecoveryPlan, count: int, special: int, generator) -> list[list[torch.Tensor]]:
    """`count` micro-batches of the corpus's sentences as token spans (from a sentence's start to its `.`, `!` or
    `?`; with the `special` tokens around them, cut at `seq_len`, and sentences shorter than MIN_MIXED_LEN
    skipped). A micro-batch holds as many sentences as fit in `batch_size` x `seq_len` slots padded to its
    longest, so the budget counts the tokens trained on, whatever the sentences' lengths; sentences are sorted
    by length within chunks of up to 64 micro-batches (padding is a few slots); the micro-batches are shuffled.

    MiniLM embeds sentences: at 90 %, 0.83 M real tokens of sentences of up to 24 tokens raised the cosine to the
    dense embeddings from 0.717 (random 8-24-token spans, which mostly start mid-sentence) to 0.754."""
    size = count * plan.batch_size * plan.seq_len * 3  # tokens of the corpus to read: a cut sentence loses its rest
    while True:
        stream = corpus.token_sequences(tokenizer, plan.corpus, 1, size, repeat=True)[0].tolist()
        batches, sentences = _sentence_micro_batches(tokenizer, stream, plan, count, special)
        if len(batches) >= count or not batches:  # enough, or none to be had
            break
        size = size * 2 * count // len(batches)  # sentences much longer than seq_len: read more
    if not batches:
        raise HarnessError(f"recovery: corpus {plan.corpus} has {sentences} sentences of at least "
                           f"{MIN_MIXED_LEN - special} tokens (ending in . ! or ?) in {len(stream):,} tokens: "
                           f"use lengths=mixed")
    return [[torch.tensor(sentence) for sentence in batches[index]]
            for index in torch.randperm(count, generator=generator).tolist()]


def _sentence_micro_batches(tokenizer, stream: list[int], plan: RecoveryPlan, count: int,
                            special: int) -> tuple[list[list[list[int]]], int]:
    """Micro-batches of the sentences of a token stream, until there are `count`; and how many sentences it read."""
    ends = {tokenizer.convert_tokens_to_ids(token) for token in (".", "!", "?")} - {tokenizer.unk_token_id}
    separator = corpus.separator_id(tokenizer)
    capacity = plan.batch_size * plan.seq_len
    chunk_capacity = min(64, count) * capacity  # a small budget is not only the shortest sentences of a large chunk
    batches, chunk, chunk_slots, sentences, start = [], [], 0, 0, 0
    for position, token in enumerate(stream):
        if token in ends and position + 1 - start >= MIN_MIXED_LEN - special:
            chunk.append(stream[start:position + 1][:plan.seq_len - special])
            chunk_slots += len(chunk[-1]) + special
            sentences += 1
            if chunk_slots >= chunk_capacity:
                full, chunk = _packed(chunk, capacity, special)
                batches += full
                chunk_slots = sum(len(sentence) + special for sentence in chunk)
                if len(batches) >= count:
                    return batches, sentences
        if token in ends or token == separator:  # a document's unterminated tail is no sentence
            start = position + 1
    full, rest = _packed(chunk, capacity, special)
    return batches + full + ([rest] if rest else []), sentences


def _packed(sentences: list[list[int]], capacity: int, special: int) -> tuple[list, list]:
    """Sentences sorted by length into micro-batches of at most `capacity` padded slots; the last, partial
    micro-batch is returned apart (the next chunk fills it)."""
    batches, current = [], []
    for sentence in sorted(sentences, key=len):
        if current and (len(current) + 1) * (len(sentence) + special) > capacity:
            batches.append(current)
            current = []
        current.append(sentence)
    return batches, current


class Resume:
    """A run's recovery state in `directory`, saved atomically; it is used only by a run with the same plan,
    targets and starting weights (`identity`, e.g. the prune stage's fingerprint)."""

    def __init__(self, directory: Path, plan: RecoveryPlan, targets: list[str], identity: object):
        self.directory = directory
        self.path = directory / STATE_FILE
        self.key = fingerprint(asdict(plan), targets, identity)

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        state = torch.load(self.path, weights_only=False)
        return state if state.get("key") == self.key else None

    def exists(self) -> bool:
        key_file = self.directory / KEY_FILE
        return self.path.exists() and key_file.exists() and key_file.read_text() == self.key

    def save(self, state: dict) -> None:
        buffer = io.BytesIO()
        torch.save({**state, "key": self.key}, buffer)
        write_atomic(self.path, buffer.getvalue())
        write_atomic(self.directory / KEY_FILE, self.key)


def recover(student: torch.nn.Module, teacher: torch.nn.Module, tokenizer, architecture: str, targets: list[str],
            plan: RecoveryPlan, resume: Resume, hooks: Hooks | None = None) -> Recovery:
    """Train `student` in place (continuing from `resume`'s state if it has one: then the student's target
    weights need not be pruned yet, the state holds them); returns what `recovery.json` holds.
    Without `hooks` the mask is the student's zeros, fixed; with them, the pruning schedule's.
    In bf16 precision both forwards run under autocast (load the teacher in `teacher_dtype(plan)`: it only
    runs forward); the student's weights, gradients and optimizer stay fp32, so the mask and resume are exact."""
    plan.check()
    precision = resolved_precision(plan)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    trained = trainable_names(student, targets, plan.trainable)
    needed, available = memory_needed(student, trained, plan), psutil.virtual_memory().available
    if needed > available:
        raise HarnessError(f"recovery needs about {needed / 2**30:.1f} GiB (weights, teacher, optimizer, activations "
                           f"of {plan.batch_size} x {plan.seq_len} tokens) but {available / 2**30:.1f} GiB is "
                           f"available: lower batch_size or seq_len (raise accumulation to keep the batch)")
    params = dict(student.named_parameters())
    for name, param in params.items():
        param.requires_grad_(name in trained)
    optimizer = torch.optim.AdamW([params[n] for n in trained], lr=plan.lr, weight_decay=plan.weight_decay)
    state = resume.load()
    curve, start_step, resumed_from, seconds_before = [], 0, None, 0.0
    if state:
        with torch.no_grad():
            for name in trained:
                params[name].copy_(state["weights"][name])
        optimizer.load_state_dict(state["optimizer"])
        curve, start_step, resumed_from = state["curve"], state["step"], state["step"]
        seconds_before = state.get("seconds", 0.0)  # the checkpointed work's training time in earlier invocations
        torch.set_rng_state(state["rng"])
    else:
        torch.manual_seed(plan.seed)
    masks = {} if hooks else {name: params[name] != 0 for name in targets}
    hooks = hooks or Hooks()
    _replay(hooks, start_step, trained, params)
    has_labels = getattr(student.config, "is_encoder_decoder", False) or architecture == "decoder"
    batches = Batches(tokenizer, plan, architecture, has_labels)
    teacher.eval()
    student.train()
    if 2 * needed <= available:  # faster steps for up to ~40 % more peak memory (keep_freed_memory)
        environment.keep_freed_memory()
    started, last_save = time.time(), time.time()
    seen = seen_before = curve[-1].tokens if curve else 0
    progress = tqdm(range(start_step, plan.steps), initial=start_step, total=plan.steps, unit="step",
                    desc=f"{'distillation' if masks else 'pruning + distillation'} ({plan.tokens / 1e6:g}M tokens)")
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(plan, step)
        hooks.before_step(step)
        total = 0.0
        for micro in range(plan.accumulation):
            batch = batches(step * plan.accumulation + micro)
            seen += int(batch["attention_mask"].sum())
            with autocast:
                with torch.no_grad():
                    teacher_out = teacher(**batch, output_hidden_states=bool(plan.hidden_weight))
                student_out = student(**batch, output_hidden_states=bool(plan.hidden_weight))
                loss = distillation_loss(student_out, teacher_out, batch, plan) / plan.accumulation
            loss.backward()
            total += float(loss.detach())
        hooks.before_optimizer_step(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hooks.after_step(step)
        with torch.no_grad():
            for name, mask in masks.items():
                params[name].mul_(mask)
        curve.append(CurvePoint(step + 1, seen, round(total, 6)))
        progress.set_postfix(loss=f"{total:.4f}", tok_s=f"{(seen - seen_before) / (time.time() - started):.0f}")
        if time.time() - last_save > 60 * plan.checkpoint_minutes and step + 1 < plan.steps:
            resume.save({"step": step + 1, "weights": {n: params[n].detach().clone() for n in trained},
                         "optimizer": optimizer.state_dict(), "curve": curve, "rng": torch.get_rng_state(),
                         "seconds": seconds_before + time.time() - started})
            last_save = time.time()
    progress.close()
    student.eval()
    for param in params.values():
        param.requires_grad_(True)
    return Recovery(plan=asdict(plan), precision=precision, curve=curve, tokens=seen,
                    steps=plan.steps, wall_time_s=round(seconds_before + time.time() - started, 1),
                    resumed_from=resumed_from)


def _replay(hooks: Hooks, steps: int, trained: list[str], params: dict) -> None:
    """Take a pruning schedule through `steps` steps without training (resuming a gradual run). The
    gradients a criterion may read are the weights themselves, so scores rank by magnitude and the
    restored zeros stay pruned."""
    for step in range(steps):
        hooks.before_step(step)
        for name in trained:
            params[name].grad = params[name].detach().clone()
        hooks.before_optimizer_step(step)
        for name in trained:
            params[name].grad = None
        hooks.after_step(step)
