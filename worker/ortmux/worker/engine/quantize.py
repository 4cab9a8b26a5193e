"""``--quantize``: a float base quantized once, when it enters the cache, by onnxruntime's tools.

- ``int8``: ``quant_pre_process`` (folds the weights' Transposes so every MatMul reads an
  initializer), then ``quantize_dynamic`` of the MatMuls (int8 weights, activations quantized per
  run); embeddings and everything else stay float.
- ``int4``: ``quant_pre_process``, then ``MatMulNBitsQuantizer`` (4-bit weight-only, symmetric
  blocks of 32 along the input features) at float compute; ``accuracy_level`` 4 (int8 compute)
  could not keep its prepacked weights in the cache (see
  :func:`~ortmux.worker.engine.quantized_ops.unsavable_prepacking`).

The tools run in a process of their own: the pre-processing optimizes with per-session threads,
which a process using ONNX Runtime's global thread pool (as the worker does) forbids, and a large
model's quantization then cannot grow the worker's memory. Both keep the float graph's activation
and result names, so the LoRA sites found on the float graph name the quantized ones.
"""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

from ortmux.worker.errors import InvalidArgument

QUANTIZE_KINDS = ("none", "int8", "int4")
QUANTIZE_VERSION = 1  # changes what a kind produces: part of the cache key
QUANTIZED_FILE = "quantized.onnx"
BLOCK_SIZE = 32
_FULL_MARKERS = ("No space left on device", "Disk quota exceeded", "errno 28", "Errno 28")


def quantize_model(kind: str, source: Path, directory: Path, *, label: str) -> Path:
    """``source`` (with its external data) quantized as ``kind`` into ``directory``; the new file."""
    out = directory / QUANTIZED_FILE
    done = subprocess.run(
        [sys.executable, "-m", __name__, kind, str(source.resolve()), str(out.resolve())],
        cwd=directory,  # the tools leave temporary files in the working directory
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 or not out.is_file():
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        if any(marker in done.stderr for marker in _FULL_MARKERS):
            # The cache's file system filled up: the cache builds the entry elsewhere instead.
            raise OSError(errno.ENOSPC, f"no space left to quantize {label} in {directory}")
        raise InvalidArgument(
            f"{label} at {source} cannot be quantized ({kind}): {lines[-1] if lines else 'no output'}",
            field="quantize",
        )
    return out


def _quantize(kind: str, source: Path, out: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_name("prepared.onnx")
    stored = {"save_as_external_data": True, "all_tensors_to_one_file": True}
    try:
        quant_pre_process(str(source), str(prepared), auto_merge=True, **stored)
    except Exception:  # symbolic shape inference cannot follow every export; ONNX's own still runs
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True, **stored)
    if kind == "int8":
        quantize_dynamic(
            prepared,
            out,
            op_types_to_quantize=["MatMul"],
            weight_type=QuantType.QInt8,
            use_external_data_format=True,
        )
    elif kind == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(prepared)), bits=4, block_size=BLOCK_SIZE, is_symmetric=True
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=True)
    else:
        raise SystemExit(f"unknown quantization '{kind}'")
    for leftover in out.parent.glob("prepared.onnx*"):  # a model's size, freed before optimizing
        leftover.unlink()


if __name__ == "__main__":
    _quantize(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
