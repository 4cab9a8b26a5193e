"""Quantize a float ONNX model as users do, with onnxruntime's own tools:

    python tests/quantize_fixture.py KIND SOURCE OUT [INPUT_NAME VOCAB]

KIND: ``int8`` (quantize_dynamic), ``int8-matmul`` (the same, MatMuls only), ``qdq``
(quantize_static, QDQ format, calibrated on random token ids), ``qoperator`` (quantize_static,
QOperator format), ``int4`` (MatMulNBitsQuantizer, 4-bit blocks of 32), ``int4-acc4`` (the same at
accuracy_level 4, int8 compute, as ONNX Runtime GenAI's and Olive's CPU recipes make them),
``int8-fused`` (``int8`` saved again by ONNX Runtime's optimizer, which fuses each projection into
DynamicQuantizeMatMul or MatMulIntegerToFloat).
Each runs quant_pre_process first, which folds the weights' Transposes so the MatMuls read
initializers. Run it in a process of its own: the pre-processing optimizes with per-session
threads, which a process that set ONNX Runtime's global thread pool forbids.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx


class _TokenReader:
    def __init__(self, name: str, vocab: int) -> None:
        rng = np.random.default_rng(0)
        self._batches = iter([{name: rng.integers(0, vocab, size=(2, 8), dtype=np.int64)} for _ in range(4)])

    def get_next(self):
        return next(self._batches, None)


def quantize(kind: str, source: Path, out: Path, input_name: str = "input_ids", vocab: int = 1000) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))
        if kind in ("int8", "int8-matmul"):
            only = ["MatMul"] if kind == "int8-matmul" else None
            quantize_dynamic(prepared, out, op_types_to_quantize=only, weight_type=QuantType.QInt8)
        elif kind == "int8-fused":
            import onnxruntime as ort

            unfused = Path(scratch) / "int8.onnx"
            quantize_dynamic(prepared, unfused, weight_type=QuantType.QInt8)
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            options.optimized_model_filepath = str(out)
            ort.InferenceSession(str(unfused), options, providers=["CPUExecutionProvider"])
        elif kind in ("qdq", "qoperator"):
            quantize_static(
                prepared,
                out,
                _TokenReader(input_name, vocab),
                quant_format=QuantFormat.QDQ if kind == "qdq" else QuantFormat.QOperator,
                op_types_to_quantize=["MatMul"],
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QUInt8,
            )
        elif kind in ("int4", "int4-acc4"):
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            quantizer = MatMulNBitsQuantizer(
                onnx.load(str(prepared)),
                block_size=32,
                is_symmetric=True,
                accuracy_level=4 if kind == "int4-acc4" else None,
            )
            quantizer.process()
            quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
        else:
            raise SystemExit(f"unknown kind {kind}")


if __name__ == "__main__":
    kind, source, out, *rest = sys.argv[1:]
    quantize(kind, Path(source), Path(out), *rest[:1], *(int(v) for v in rest[1:2]))
