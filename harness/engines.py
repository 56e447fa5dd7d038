"""The engines the bench times, behind one interface: DeepSparse, ONNX Runtime, OpenVINO (FP32 and INT8) and PyTorch.

All engines see the same inputs (`synthetic_inputs`: random token ids, seed 0, full attention mask);
DeepSparse, ONNX Runtime and OpenVINO run a variant's ONNX export, PyTorch its checkpoint eagerly. An
engine times one scenario for every variant (the sparse run and, alongside, its dense baseline) and
returns the wall times of `timing.time_interleaved`. In-process engines only build steps (`InProcess`);
DeepSparse and OpenVINO compile and time in a child process (`InChild`; `time_child_request` is the
child's side), so a compile that aborts or runs out of memory ends only the child, and their thread
pools never share a process with torch's. Each engine computes at a precision: the ONNX engines at the
export's own (INT8 for a run a quantization recipe made, `run_precision`), PyTorch in FP32, and
`openvino-int8` in INT8 (the export quantized by NNCF post-training quantization, calibrated on training
text, cached in `<run>/openvino-int8/`). A new engine is one class and one entry in ENGINES.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from harness import corpus, load, onnx_graphs
from harness.child import child_failure
from harness.errors import HarnessError
from harness.layout import EXPORT_FILE, OPENVINO_INT8_FILE, OPENVINO_INT8_SUBDIR
from harness.rundir import RunDir, fingerprint, read_json, staging_dir, write_json
from harness.timing import Step, Times, part_inputs, time_interleaved

INPUT_SEED = 0
# One graph per part; encoder-decoders run encoder then decoder (in onnx_graphs.graph_files order).
PARTS = {"model.onnx": "model", "encoder_model.onnx": "encoder", "decoder_model.onnx": "decoder"}
PROJECT_DIR = str(Path(__file__).resolve().parents[1])  # what the engine children import the harness from


def synthetic_inputs(config, architecture: str, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    """Random token ids (fixed seed) with a full attention mask; plus one decoder start token for encoder-decoders."""
    limit = position_limit(config)
    if limit and seq_len > limit:
        raise HarnessError(f"--seq-len {seq_len} is longer than the model's {limit} positions")
    rng = np.random.default_rng(INPUT_SEED)
    values = {"input_ids": rng.integers(4, config.vocab_size, size=(batch_size, seq_len), dtype=np.int64),
              "attention_mask": np.ones((batch_size, seq_len), dtype=np.int64)}
    if architecture == "encoder-decoder":
        values["decoder_input_ids"] = onnx_graphs.decoder_start(config, batch_size)
    return values


def position_limit(config) -> int | None:
    """The longest sequence the model takes (None if its config does not say)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


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
    precision: str | None  # "fp32" | "int8": what its matrix products compute in; None: the export's (`engine_precision`)
    may_fail: bool  # a failure makes it unavailable from that scenario on, instead of ending the bench

    def times(self, variants: dict[str, Variant], threads: int, values: dict, settings: dict) -> Times:
        """Wall times of one scenario (`values`) for every variant, as `timing.time_interleaved`."""


def run_precision(run: RunDir) -> str:
    """The precision a run's export computes in: "int8" if a quantization recipe made the run, else "fp32"."""
    from harness.quantize import is_quantized

    return "int8" if is_quantized(run.path) else "fp32"


def engine_precision(engine: Engine, run: RunDir) -> str:
    """The precision an engine computes a run in."""
    return engine.precision or run_precision(run)


class InProcess:
    """An engine timed in this process: it builds each variant's steps, one per graph part."""

    label = ""
    precision = None
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
    precision = "fp32"  # a quantized run's checkpoint holds its INT8 values times their scales, in FP32

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


class InChild:
    """An engine compiled and timed in a child process: `times` sends the child the request, the child
    builds each variant's steps with `steps` and times them (`time_child_request`)."""

    label = ""
    precision = None
    may_fail = True
    module = ""  # what the child imports; without it the engine is unavailable

    def steps(self, onnx_dir: Path, architecture: str, threads: int, example: dict, label: str) -> dict[str, Step]:
        """The child's side: one compiled step per graph part for the example's shapes (`label` names the variant)."""
        raise NotImplementedError

    def times(self, variants: dict[str, Variant], threads: int, values: dict, settings: dict) -> Times:
        if importlib.util.find_spec(self.module) is None:
            raise ModuleNotFoundError(f"No module named '{self.module}'")
        with tempfile.TemporaryDirectory(prefix=f"harness-{self.module}-") as folder:
            np.savez(Path(folder) / "inputs.npz", **values)
            write_json(Path(folder) / "request.json", {
                "engine": type(self).__name__,
                "variants": {name: [str(v.onnx_dir), v.spec.architecture] for name, v in variants.items()},
                "threads": threads, "settings": settings})
            failure = child_failure(CHILD, folder, PROJECT_DIR)
            if failure:
                raise RuntimeError(f"{self.label} failed: {failure}")
            return read_json(Path(folder) / "times.json")


# The child imports this module, not the bench stage; it inherits environment.configure()'s variables.
CHILD = ("import sys; sys.path.insert(0, sys.argv[2]); "
         "from harness.engines import time_child_request; time_child_request(sys.argv[1])")


def time_child_request(folder: str) -> None:
    """The child's side of `InChild.times`: build the request's steps, time them, write times.json."""
    request = read_json(Path(folder) / "request.json")
    engine = globals()[request["engine"]]()
    with np.load(Path(folder) / "inputs.npz") as stored:
        values = dict(stored)
    steps = {name: engine.steps(Path(onnx_dir), architecture, request["threads"], values, name)
             for name, (onnx_dir, architecture) in request["variants"].items()}
    print("timing", flush=True)
    write_json(Path(folder) / "times.json", time_interleaved(steps, values, request["settings"]))


class DeepSparse(InChild):
    """DeepSparse engines compiled for each scenario's shapes (from static copies of the graphs).

    A compile may abort the whole process (SmolLM2's Llama export) or need more memory than the machine
    has (DeBERTa-v2-xxlarge at batch 16): either ends only the child, and RuntimeError says why. Each
    graph compiles once, and the child's memory is all returned when the scenario ends.
    """

    label = "DeepSparse"
    module = "deepsparse"

    def steps(self, onnx_dir: Path, architecture: str, threads: int, example: dict, label: str) -> dict[str, Step]:
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


# Compile settings for every OpenVINO engine: one stream of `threads` threads for the bench's one request at
# a time, and FP32 for what is not quantized (on CPUs with AMX or AVX512-BF16, OpenVINO's default is BF16).
OPENVINO_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}


class OpenVino(InChild):
    """OpenVINO's CPU plugin on the exported graphs, reshaped to each scenario's shapes."""

    label = "OpenVINO"
    module = "openvino"

    def model_file(self, onnx_dir: Path, architecture: str, graph: str, label: str) -> Path:
        """The file OpenVINO reads for one graph of the export."""
        return onnx_dir / graph

    def steps(self, onnx_dir: Path, architecture: str, threads: int, example: dict, label: str) -> dict[str, Step]:
        import openvino

        core = openvino.Core()
        steps, outputs = {}, {}
        for graph in onnx_graphs.graph_files(architecture):
            path = self.model_file(onnx_dir, architecture, graph, label)
            names, output_names = onnx_graphs.graph_io(onnx_dir / graph)
            part = PARTS[graph]
            inputs = part_inputs(part, example, outputs)
            print(f"compiling {graph} ({label})", flush=True)
            model = core.read_model(str(path))
            model.reshape({name: list(value.shape) for name, value in onnx_graphs.onnx_feeds(names, inputs).items()})
            compiled = core.compile_model(model, "CPU", {**OPENVINO_CONFIG, "INFERENCE_NUM_THREADS": threads})
            steps[part] = _openvino_step(compiled.create_infer_request(), names, output_names)
            outputs = steps[part](inputs)  # the next part's inputs (the decoder's encoder states)
        return steps


def _openvino_step(request, names: list[str], outputs: list[str]) -> Step:
    def run(values: dict) -> dict:
        result = request.infer(onnx_graphs.onnx_feeds(names, values))
        return {name: result[name] for name in outputs}

    return run


# The INT8 engine's calibration: training text (never evaluation data), as many sequences as it takes
# for stable activation ranges; shorter models use their own length.
CALIBRATION = {"corpus": corpus.DEFAULT_CORPUS, "samples": 64, "seq_len": 128}


class OpenVinoInt8(OpenVino):
    """OpenVINO on the export quantized to INT8 by NNCF's post-training quantization (symmetric per-channel
    weights, activations calibrated on CALIBRATION), what a user would deploy as a dense INT8 model."""

    label = "OpenVINO INT8"
    precision = "int8"
    module = "nncf"

    def times(self, variants: dict[str, Variant], threads: int, values: dict, settings: dict) -> Times:
        """Times the FP32 variants only: a quantization recipe's run is INT8 already (the other engines time it)."""
        fp32 = {name: v for name, v in variants.items() if run_precision(v.run) == "fp32"}
        if not fp32:
            raise RuntimeError("the run is INT8 already (a quantization recipe's): OpenVINO INT8 quantizes FP32 exports")
        return super().times(fp32, threads, values, settings)

    def model_file(self, onnx_dir: Path, architecture: str, graph: str, label: str) -> Path:
        return openvino_int8_ir(onnx_dir, architecture, label) / f"{Path(graph).stem}.xml"


def openvino_int8_ir(onnx_dir: Path, architecture: str, label: str) -> Path:
    """`<run>/openvino-int8/`: the export's graphs quantized by NNCF as OpenVINO IR, made once per export."""
    from importlib.metadata import version

    folder = onnx_dir.parent / OPENVINO_INT8_SUBDIR
    graphs = onnx_graphs.graph_files(architecture)
    versions = {"nncf": version("nncf"), "openvino": version("openvino")}  # without importing nncf (5 s)
    key = fingerprint((onnx_dir / EXPORT_FILE).read_text(), [(g, (onnx_dir / g).stat().st_mtime_ns) for g in graphs],
                      CALIBRATION, versions)
    if (folder / OPENVINO_INT8_FILE).exists() and read_json(folder / OPENVINO_INT8_FILE)["fingerprint"] == key:
        return folder
    import nncf
    import openvino

    core = openvino.Core()
    samples, seq_len = calibration_values(onnx_dir, architecture)
    outputs = [{} for _ in samples]
    with staging_dir(folder) as tmp:
        for graph in graphs:
            part = PARTS[graph]
            names, output_names = onnx_graphs.graph_io(onnx_dir / graph)
            inputs = [onnx_graphs.onnx_feeds(names, part_inputs(part, values, previous))
                      for values, previous in zip(samples, outputs)]
            if graph != graphs[-1]:  # the next part calibrates on this part's FP32 outputs
                compiled = core.compile_model(core.read_model(str(onnx_dir / graph)), "CPU", OPENVINO_CONFIG)
                outputs = [{name: result[name] for name in output_names} for result in map(compiled, inputs)]
            print(f"quantizing {graph} ({label})", flush=True)
            with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout says what the child does
                quantized = nncf.quantize(core.read_model(str(onnx_dir / graph)), nncf.Dataset(inputs),
                                          subset_size=len(inputs), model_type=nncf.ModelType.TRANSFORMER)
            openvino.save_model(quantized, str(tmp / f"{Path(graph).stem}.xml"), compress_to_fp16=False)
        write_json(tmp / OPENVINO_INT8_FILE, {"fingerprint": key, "calibration": {**CALIBRATION, "seq_len": seq_len},
                                              **versions})
    return folder


def calibration_values(onnx_dir: Path, architecture: str) -> tuple[list[dict[str, np.ndarray]], int]:
    """CALIBRATION's sequences of training text, one batch-1 input dict each, and their length."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(onnx_dir)
    seq_len = min(CALIBRATION["seq_len"], position_limit(config) or CALIBRATION["seq_len"])
    sequences = corpus.token_sequences(load.load_tokenizer(onnx_dir), CALIBRATION["corpus"], CALIBRATION["samples"],
                                       seq_len).numpy()
    samples = [{"input_ids": ids[None], "attention_mask": np.ones((1, seq_len), dtype=np.int64)} for ids in sequences]
    if architecture == "encoder-decoder":
        for values in samples:
            values["decoder_input_ids"] = onnx_graphs.decoder_start(config, 1)
    return samples, seq_len


# engine name (as --engines takes it) -> engine; the order is the order they are timed in
ENGINES: dict[str, Engine] = {"deepsparse": DeepSparse(), "onnxruntime": OnnxRuntime(), "openvino": OpenVino(),
                              "openvino-int8": OpenVinoInt8(), "pytorch": PyTorch()}
