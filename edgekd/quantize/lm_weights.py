"""Weight-only quantization of an exported LM decoder with ONNX Runtime's own quantizers.

int8: block-wise INT8 weights (block 32, symmetric: finer than per channel) of every MatMul with a
      constant weight, in ONNX Runtime's MatMulNBits kernel; activations stay float until the kernel's
      int8 compute (accuracy_level 4). Dynamic quantization (MatMulInteger, activations quantized per
      tensor on the fly) cost a distilled SmolLM2 student 30% of validation perplexity; this costs 0.3%.
int4: block-wise INT4 weights (block 32, symmetric) in the same kernel
      (onnxruntime.quantization.matmul_nbits_quantizer), accuracy_level 4.
The embedding Gather stays float (INT4 Gather saves no memory at run time, as ORT's docs note)."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

from ..errors import StageError
from ..runs import atomic_path

__all__ = ["INT4_BLOCK", "OV_WEIGHT_FORMATS", "WEIGHT_FORMATS", "compress_ov_weights", "quantize_lm_weights"]

INT4_BLOCK = 32
WEIGHT_FORMATS = {
    "int8": f"INT8 weights in blocks of {INT4_BLOCK}, symmetric (ONNX Runtime MatMulNBits)",
    "int4": f"INT4 weights in blocks of {INT4_BLOCK}, symmetric (ONNX Runtime MatMulNBits)",
}
OV_WEIGHT_FORMATS = {
    "int8": "INT8 weights per channel, asymmetric (NNCF weight compression, OpenVINO)",
    "int4": f"INT4 weights in groups of {INT4_BLOCK}, symmetric (NNCF weight compression, OpenVINO)",
}


def compress_ov_weights(fp32: Path, out: Path, weights: str) -> Path:
    """The OpenVINO IR of `fp32` with NNCF's weight compression (`weights`: int8 or int4) at `out` (.xml)."""
    if weights not in OV_WEIGHT_FORMATS:
        raise StageError(f"quantize.weights: {weights!r} is not one of {', '.join(OV_WEIGHT_FORMATS)}")
    try:
        import nncf
        import openvino as ov
    except ImportError:
        raise StageError("quantize: NNCF weight compression needs the openvino extra (pip install 'edgekd[openvino]')") \
            from None
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        model = ov.convert_model(str(fp32))
        if weights == "int8":
            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        else:
            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=INT4_BLOCK,
                                          ratio=1.0)
        ov.save_model(model, str(out), compress_to_fp16=False)
    except Exception as e:  # noqa: BLE001
        raise StageError(f"quantize: NNCF {weights} weight compression of {fp32.name} failed: "
                         f"{str(e).splitlines()[0][:200]}") from None
    return out


def quantize_lm_weights(fp32: Path, out: Path, weights: str) -> Path:
    """Write `fp32` with `weights` ("int8" or "int4") quantized to `out`; returns `out`."""
    import onnx

    if weights not in WEIGHT_FORMATS:
        raise StageError(f"quantize.weights: {weights!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    # the quantizers log every skipped node (MatMulNBits' own logger at INFO, with its own handler)
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [g.level for g in loggers]
    for g in loggers:
        g.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), atomic_path(out) as tmp:
            warnings.simplefilter("ignore")
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            q = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=8 if weights == "int8" else 4,
                                     block_size=INT4_BLOCK, is_symmetric=True, accuracy_level=4)
            q.process()
            onnx.save(q.model.model, str(tmp))
    except StageError:
        raise
    except Exception as e:  # noqa: BLE001 - the quantizers raise many types
        raise StageError(f"quantize: {weights} weights of {fp32.name} failed: {str(e).splitlines()[0][:200]}") from None
    finally:
        for g, lv in zip(loggers, levels, strict=True):
            g.setLevel(lv)
    return out
