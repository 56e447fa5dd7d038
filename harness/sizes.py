"""A run's size on disk: the checkpoint, its ONNX graphs, both gzipped, and compressed-tensors' sparse-bitmask format.

Gzip sizes are measured by streaming (nothing is written); the sparse-bitmask copy is written to
`<run>/compressed/` (a quantized run's INT8 checkpoint also to `<run>/compressed-int8/`: sparse + INT8),
loadable with compressed-tensors.
"""
from __future__ import annotations

import gzip
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness import load, onnx_graphs, quantize
from harness.layout import COMPRESSED_INT8_SUBDIR, COMPRESSED_SUBDIR, SizeEntry, Sizes
from harness.rundir import RunDir, staging_dir, write_json


def gzip_size(paths: list[Path], level: int = 6) -> int:
    """Bytes of the files gzip-compressed at `level`, streamed; nothing is written."""
    class Counter:
        size = 0

        def write(self, data):
            self.size += len(data)

        def flush(self):
            pass

    counter = Counter()
    with gzip.GzipFile(fileobj=counter, mode="wb", compresslevel=level, mtime=0) as stream:
        for path in paths:
            with open(path, "rb") as handle:
                shutil.copyfileobj(handle, stream, 1 << 22)
    return counter.size


def write_bitmask(run: RunDir, int8: bool = False) -> Path:
    """The checkpoint (`int8`: the quantized run's INT8 checkpoint, int8 values and their scales) in
    compressed-tensors' sparse-bitmask format (every tensor: values in their own dtype + bitmask + row
    offsets), in shards of about load.SHARD_BYTES with an index, so memory holds one shard, not the model."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.sparse_bitmask import BitmaskTensor
    from compressed_tensors.config import BitmaskConfig
    from safetensors.torch import save_file

    from harness.sparsity import saved_tensors

    target = run.path / (COMPRESSED_INT8_SUBDIR if int8 else COMPRESSED_SUBDIR)
    source = quantize.int8_checkpoint(run.path) if int8 else run.model_dir
    with staging_dir(target) as tmp:
        shards, shard, shard_bytes, zeros, numel = [], {}, 0, 0, 0

        def flush() -> None:
            save_file(shard, tmp / f"shard-{len(shards)}", metadata={"format": "pt"})
            shards.append(list(shard))

        for name, tensor in saved_tensors(source):
            parts = BitmaskTensor.from_dense(tensor).dict(name_prefix=name)
            shard.update(parts)
            shard_bytes += sum(part.numel() * part.element_size() for part in parts.values())
            zeros, numel = zeros + int((tensor == 0).sum()), numel + tensor.numel()
            if shard_bytes >= load.SHARD_BYTES:
                flush()
                shard, shard_bytes = {}, 0
        if shard or not shards:
            flush()
        weight_map = {}
        for index, names in enumerate(shards):
            file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
            os.replace(tmp / f"shard-{index}", tmp / file)
            weight_map.update(dict.fromkeys(names, file))
        write_json(tmp / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
        shutil.copy(run.model_dir / "config.json", tmp / "config.json")
        ModelCompressor(sparsity_config=BitmaskConfig(global_sparsity=zeros / numel)).update_config(str(tmp))
    return target


def sizes(run: RunDir, onnx_dir: Path, architecture: str, gzip_level: int = 6) -> Sizes:
    """Bytes and bits per weight of the checkpoint, the ONNX graphs, both gzipped, and the sparse-bitmask format;
    for a quantized run also its INT8 checkpoint, plain and in the sparse-bitmask format (its ONNX graphs are
    INT8 already)."""
    from harness.sparsity import saved_tensors

    params = sum(tensor.numel() for _, tensor in saved_tensors(run.model_dir))
    checkpoint = sorted(run.model_dir.glob("*.safetensors"))
    graphs = [onnx_dir / name for name in onnx_graphs.graph_files(architecture)]
    onnx_files = [p for graph in graphs for p in (graph, graph.with_name(graph.name + "_data")) if p.exists()]
    quantized = quantize.is_quantized(run.path)

    def entry(size: int) -> SizeEntry:
        return SizeEntry(bytes=size, bits_per_weight=round(8 * size / params, 3))

    def total(paths) -> int:
        return sum(p.stat().st_size for p in paths)

    with ThreadPoolExecutor(2) as pool:  # zlib releases the GIL: both files compress at once
        checkpoint_gzip, onnx_gzip = pool.map(lambda files: gzip_size(files, gzip_level), [checkpoint, onnx_files])
    return Sizes(
        params=params,
        checkpoint=entry(total(checkpoint)),
        checkpoint_gzip=entry(checkpoint_gzip),
        onnx=entry(total(onnx_files)),
        onnx_gzip=entry(onnx_gzip),
        sparse_bitmask=entry(total(write_bitmask(run).glob("*.safetensors"))),
        checkpoint_int8=entry(total([quantize.int8_checkpoint(run.path)])) if quantized else None,
        sparse_bitmask_int8=entry(total(write_bitmask(run, int8=True).glob("*.safetensors"))) if quantized else None,
    )
