"""The engines the bench times, behind one interface: DeepSparse, ONNX Runtime and PyTorch.

All engines see the same inputs (`synthetic_inputs`: random token ids, seed 0, full attention mask);
DeepSparse and ONNX Runtime run a variant's ONNX export, PyTorch its checkpoint eagerly. An engine
times one scenario for every variant (the sparse run and, alongside, its dense baseline) and returns
the wall times of `timing.time_interleaved`. In-process engines only build steps (`InProcess`);
DeepSparse compiles and times in a child process (`time_deepsparse_request` is the child's side), so
a compile that aborts or runs out of memory ends only the child. A new engine is one class and one
entry in ENGINES.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from harness import load, onnx_graphs
from harness.child import child_failure
from harness.errors import HarnessError
from harness.rundir import RunDir, read_json, write_json
from harness.timing import Step, Times, time_interleaved

INPUT_SEED = 0
# One graph per part; encoder-decoders run encoder then decoder (in onnx_graphs.graph_files order).
PARTS = {"model.onnx": "model", "encoder_model.onnx": "encoder", "decoder_model.onnx": "decoder"}
PROJECT_DIR = str(Path(__file__).resolve().parents[1])  # what the DeepSparse child imports the harness from


def synthetic_inputs(config, architecture: str, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    """Random token ids (fixed seed) with a full attention mask; plus one decoder start token for encoder-decoders."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and seq_len > limit:
        raise HarnessError(f"--seq-len {seq_len} is longer than the model's {limit} positions")
    rng = np.random.default_rng(INPUT_SEED)
    values = {"input_ids": rng.integers(4, config.vocab_size, size=(batch_size, seq_len), dtype=np.int64),
              "attention_mask": np.ones((batch_size, seq_len), dtype=np.int64)}
    if architecture == "encoder-decoder":
        values["decoder_input_ids"] = onnx_graphs.decoder_start(config, batch_size)
    return values


@dataclass
class Variant:
    """One side of the comparison (the sparse run or its dense baseline): its ONNX export and, loaded
    on first use, its PyTorch model (released while other engines run, so a full-size model is in
    memory once: as PyTorch weights or inside one engine)."""

    run: RunDir
    onnx_dir: Path
    spec: load.ModelSpec
    _loaded: load.LoadedModel | None = None

    @property
    def loaded(self) -> load.LoadedModel:
        if self._loaded is None:
            self._loaded = load.load_model(self.spec)
        return self._loaded

    @property
    def config(self):
        """The model's config, without loading its weights."""
        from transformers import AutoConfig

        return self._loaded.model.config if self._loaded else AutoConfig.from_pretrained(self.run.model_dir)

    def release(self) -> None:
        """Drop the PyTorch model; the next use loads it again."""
        self._loaded = None
        gc.collect()


class Engine(Protocol):
    """What the bench needs of an engine."""

    label: str  # its name in messages
    may_fail: bool  # a failure makes it unavailable from that scenario on, instead of ending the bench

    def times(self, variants: dict[str, Variant], threads: int, values: dict, settings: dict) -> Times:
        """Wall times of one scenario (`values`) for every variant, as `timing.time_interleaved`."""


class InProcess:
    """An engine timed in this process: it builds each variant's steps, one per graph part."""

    label = ""
    may_fail = False

    def steps(self, variant: Variant, threads: int, example: dict) -> dict[str, Step]:
        raise NotImplementedError

    def times(self, variants: dict[str, Variant], threads: int, values: dict, settings: dict) -> Times:
        return time_interleaved({name: self.steps(v, threads, values) for name, v in variants.items()}, values, settings)


class OnnxRuntime(InProcess):
    """ONNX Runtime CPU sessions on the exported graphs."""

    label = "ONNX Runtime"

    def steps(self, variant: Variant, threads: int, example: dict) -> dict[str, Step]:
        steps = {}
        for graph in onnx_graphs.graph_files(variant.spec.architecture):
            session = onnx_graphs.ort_session(variant.onnx_dir / graph, threads)
            names, outputs = onnx_graphs.graph_io(variant.onnx_dir / graph)
            steps[PARTS[graph]] = _ort_step(session, names, outputs)
        return steps


def _ort_step(session, names: list[str], outputs: list[str]) -> Step:
    return lambda values: dict(zip(outputs, session.run(None, onnx_graphs.onnx_feeds(names, values))))


class PyTorch(InProcess):
    """Eager PyTorch on the checkpoint, fed the same named inputs as the ONNX graphs."""

    label = "PyTorch"

    def times(self, variants: dict[str, Variant], threads: int, values: dict, settings: dict) -> Times:
        with torch_threads(threads):
            return super().times(variants, threads, values, settings)

    def steps(self, variant: Variant, threads: int, example: dict) -> dict[str, Step]:
        import torch

        model = variant.loaded.model

        def tensors(values: dict, *names: str) -> dict:
            return {name: torch.as_tensor(values[name]) for name in names}

        def run_model(v: dict) -> dict:
            with torch.no_grad():
                return dict(model(**tensors(v, "input_ids", "attention_mask")))

        def encoder(v: dict) -> dict:
            with torch.no_grad():
                return {"last_hidden_state": model.get_encoder()(**tensors(v, "input_ids", "attention_mask")).last_hidden_state}

        def decoder(v: dict) -> dict:
            v = tensors(v, "input_ids", "encoder_hidden_states", "encoder_attention_mask")
            with torch.no_grad():
                return {"logits": model(encoder_outputs=(v["encoder_hidden_states"],),
                                        attention_mask=v["encoder_attention_mask"], decoder_input_ids=v["input_ids"]).logits}

        return {"encoder": encoder, "decoder": decoder} if variant.spec.architecture == "encoder-decoder" else {"model": run_model}


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch.set_num_threads(threads) for the block; the process's own setting afterwards (later stages of an
    in-process sweep run with it)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class DeepSparse:
    """DeepSparse engines compiled for each scenario's shapes, compiled and timed in a child process.

    A compile may abort the whole process (SmolLM2's Llama export) or need more memory than the machine
    has (DeBERTa-v2-xxlarge at batch 16): either ends only the child, and RuntimeError says why. Each
    graph compiles once, and the child's memory is all returned when the scenario ends.
    """

    label = "DeepSparse"
    may_fail = True

    def times(self, variants: dict[str, Variant], threads: int, values: dict, settings: dict) -> Times:
        if importlib.util.find_spec("deepsparse") is None:
            raise ModuleNotFoundError("No module named 'deepsparse'")
        with tempfile.TemporaryDirectory(prefix="harness-deepsparse-") as folder:
            np.savez(Path(folder) / "inputs.npz", **values)
            write_json(Path(folder) / "request.json", {
                "variants": {name: [str(v.onnx_dir), v.spec.architecture] for name, v in variants.items()},
                "threads": threads, "settings": settings})
            failure = child_failure(DEEPSPARSE_CHILD, folder, PROJECT_DIR)
            if failure:
                raise RuntimeError(f"DeepSparse failed: {failure}")
            return read_json(Path(folder) / "times.json")


# The child imports this module, not the bench stage; it inherits environment.configure()'s variables.
DEEPSPARSE_CHILD = ("import sys; sys.path.insert(0, sys.argv[2]); "
                    "from harness.engines import time_deepsparse_request; time_deepsparse_request(sys.argv[1])")


def time_deepsparse_request(folder: str) -> None:
    """The child's side of `DeepSparse.times`: compile the request's graphs, time them, write times.json."""
    request = read_json(Path(folder) / "request.json")
    with np.load(Path(folder) / "inputs.npz") as stored:
        values = dict(stored)
    steps = {name: deepsparse_steps(Path(onnx_dir), architecture, request["threads"], values, name)
             for name, (onnx_dir, architecture) in request["variants"].items()}
    print("timing", flush=True)
    write_json(Path(folder) / "times.json", time_interleaved(steps, values, request["settings"]))


def deepsparse_steps(onnx_dir: Path, architecture: str, threads: int, example: dict, label: str) -> dict[str, Step]:
    """DeepSparse engines compiled for the example's shapes (from static copies of the graphs)."""
    from deepsparse import Engine

    batch_size, seq_len = example["input_ids"].shape
    dims = {"batch_size": batch_size, "sequence_length": seq_len, "encoder_sequence_length": seq_len,
            "decoder_sequence_length": example.get("decoder_input_ids", example["input_ids"]).shape[1]}
    steps = {}
    for graph in onnx_graphs.graph_files(architecture):
        names, outputs = onnx_graphs.graph_io(onnx_dir / graph)
        print(f"compiling {graph} ({label})", flush=True)  # what the parent names if this child dies
        with onnx_graphs.static_graph(onnx_dir / graph, dims) as fixed:
            engine = Engine(str(fixed), batch_size=batch_size, num_cores=threads)
        steps[PARTS[graph]] = _deepsparse_step(engine, names, outputs)
    return steps


def _deepsparse_step(engine, names: list[str], outputs: list[str]) -> Step:
    return lambda values: dict(zip(outputs, engine.run(list(onnx_graphs.onnx_feeds(names, values).values()))))


# engine name (as --engines takes it) -> engine; the order is the order they are timed in
ENGINES: dict[str, Engine] = {"deepsparse": DeepSparse(), "onnxruntime": OnnxRuntime(), "pytorch": PyTorch()}
