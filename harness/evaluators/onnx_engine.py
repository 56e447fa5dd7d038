"""Run an exported ONNX graph the way users deploy it: DeepSparse, compiled for fixed input shapes.

DeepSparse compiles an engine for one batch size and one set of input shapes, so callers pad their
inputs to fixed shapes (`pad_right`) and mask the padding. When DeepSparse cannot compile a graph,
ONNX Runtime runs it instead and `runtime` says so. Some graphs (e.g. SmolLM2's Llama export) make
DeepSparse's compiler abort the whole process rather than raise, so the first compile of each
graph is tried in a child process (`child.child_failure`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from harness import onnx_graphs
from harness.child import child_failure
from harness.errors import HarnessError

COMPILE_PROBE = "import sys; from deepsparse import Engine; Engine(sys.argv[1], batch_size=int(sys.argv[2]), num_cores=1)"


def pad_right(rows: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows right-padded to `length`: (input_ids, attention_mask), int64 arrays [rows, length]."""
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"a row of {len(row)} tokens does not fit the engine's {length} positions")
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


def compile_failure(static_graph: Path, batch_size: int) -> str | None:
    """Why DeepSparse cannot compile a static graph (tried in a child process), or None if it can."""
    return child_failure(COMPILE_PROBE, str(static_graph), str(batch_size))


# Source graphs whose compile succeeded in a child process (an abort depends only on the graph's ops,
# the same at every sparsity level and batch size).
_COMPILES_CLEANLY: set[str] = set()


def deepsparse_engine(static_graph: Path, batch_size: int, num_cores: int | None, source: str) -> object:
    """A DeepSparse engine for a static copy of the graph `source`; the first compile of each source is tried
    in a child process first, and RuntimeError(reason) is raised if DeepSparse cannot compile it."""
    if source not in _COMPILES_CLEANLY:
        failure = compile_failure(static_graph, batch_size)
        if failure:
            raise RuntimeError(failure)
        _COMPILES_CLEANLY.add(source)
    from deepsparse import Engine

    return Engine(str(static_graph), batch_size=batch_size, num_cores=num_cores)


class FixedShapeModel:
    """One ONNX graph; `run` feeds it the inputs it declares from a dict of arrays.

    A DeepSparse engine is compiled for each distinct set of input shapes seen (callers keep them fixed).
    """

    def __init__(self, path: Path, runtime: str = "deepsparse", num_cores: int | None = None):
        import onnx

        if not Path(path).exists():
            raise HarnessError(f"ONNX graph {path} does not exist - run `make export` for this run first")
        self.path = Path(path)
        graph = onnx.load(str(path), load_external_data=False).graph
        self.input_names = [i.name for i in graph.input]
        self.axes = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
        self.runtime = runtime
        self.num_cores = num_cores  # None: all physical cores (one core keeps up far better on a busy machine)
        self._engines: dict[tuple, object] = {}  # DeepSparse engines by input shapes
        self._session = None  # the ONNX Runtime fallback (any shapes)

    def run(self, values: dict[str, np.ndarray]) -> np.ndarray:
        """The graph's first output; its inputs are taken from `values` by name (position_ids and
        token_type_ids are derived when the graph wants them and `values` lacks them)."""
        feeds = {name: np.ascontiguousarray(array) for name, array in onnx_graphs.onnx_feeds(self.input_names, values).items()}
        if self.runtime == "deepsparse":
            engine = self._deepsparse_engine(feeds)
            if engine is not None:
                return engine.run(list(feeds.values()))[0]
        if self._session is None:
            self._session = onnx_graphs.ort_session(self.path)
        return self._session.run(None, feeds)[0]

    def _deepsparse_engine(self, feeds: dict[str, np.ndarray]):
        shapes = tuple(array.shape for array in feeds.values())
        if shapes not in self._engines:
            dims = {axis: size for name, array in feeds.items() for axis, size in zip(self.axes[name], array.shape) if axis}
            batch_size = shapes[0][0]
            try:
                with onnx_graphs.static_graph(self.path, dims) as static:
                    self._engines[shapes] = deepsparse_engine(static, batch_size, self.num_cores, str(self.path))
            except RuntimeError as failure:
                from tqdm import tqdm

                tqdm.write(f"eval: DeepSparse cannot compile {self.path.name} ({failure}); using ONNX Runtime instead")
                self.runtime = "onnxruntime"
                return None
        return self._engines[shapes]
