"""Weight-only quantization of an exported LM decoder with ONNX Runtime's own quantizers.

int8: block-wise INT8 weights (block 32, symmetric: finer than per channel) of every MatMul with a
      constant weight, in ONNX Runtime's MatMulNBits kernel; activations stay float until the kernel's
      int8 compute (accuracy_level 4). Dynamic quantization (MatMulInteger, activations quantized per
      tensor on the fly) cost a distilled SmolLM2 student 30% of validation perplexity; this costs 0.3%.
int4: block-wise INT4 weights (block 32, symmetric) in the same kernel
      (onnxruntime.quantization.matmul_nbits_quantizer), accuracy_level 4, and the token embedding in
      4-bit blocks too (GatherBlockQuantized: a quarter of the float table's memory, on disk and at run
      time); other constant Gathers (the rotary tables) stay float.
int4_mixed: as int4, but the weights that narrow their input (the MLP's down projections, the attention's
      key and value projections) and the LM head stay INT8 blocks, as llama.cpp's Q4_K_M keeps its output,
      value and down projections at higher precision. On a distilled SmolLM2 student this cost 4% of
      perplexity where int4 cost 18%, and decoded 1.18x faster than int8.
A tied model (the token embedding is the LM head's weight, as in SmolLM2 and Llama 3.2) keeps one table:
the embedding reads the quantized head's own blocks (a GatherBlockQuantized over the head's MatMulNBits
weight with its bits and scales), as ONNX Runtime GenAI's shared embeddings do. The float
export writes that table twice; on a distilled SmolLM2 student sharing took int8 from 195.1 to 85.4 MB,
int4_mixed from 86.9 to 72.8 MB (its embedding now in INT8 blocks: 1% lower perplexity) and int4 from
64.2 to 50.0 MB (the same values: the same picks). An untied model's INT8 embedding stays float and its INT4
embedding gets its own 4-bit blocks."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from ..errors import StageError
from ..runs import atomic_path

__all__ = ["INT4_BLOCK", "OV_WEIGHT_FORMATS", "WEIGHT_FORMATS", "compress_ov_weights", "eight_bit_matmuls",
           "precision", "quantize_lm_weights", "embedding_shares_head", "share_head_with_embedding"]

INT4_BLOCK = 32
WEIGHT_FORMATS = {
    "int8": f"INT8 weights in blocks of {INT4_BLOCK}, symmetric, a tied embedding read from the LM head's blocks "
            "(ONNX Runtime MatMulNBits, GatherBlockQuantized)",
    "int4": f"INT4 weights and embedding in blocks of {INT4_BLOCK}, symmetric (ONNX Runtime MatMulNBits, "
            "GatherBlockQuantized)",
    "int4_mixed": f"INT4 weights and embedding in blocks of {INT4_BLOCK}, symmetric, with the LM head and the down, "
                  "key and value projections in INT8 blocks (ONNX Runtime MatMulNBits, GatherBlockQuantized)",
}
MIXED_INT4_RATIO = 0.7  # OpenVINO: the share of the layers' weights NNCF puts in INT4, the most sensitive stay INT8
OV_WEIGHT_FORMATS = {
    "int8": "INT8 weights per channel, asymmetric (NNCF weight compression, OpenVINO)",
    "int4": f"INT4 weights in groups of {INT4_BLOCK}, symmetric (NNCF weight compression, OpenVINO)",
    "int4_mixed": f"INT4 weights in groups of {INT4_BLOCK}, symmetric, for {MIXED_INT4_RATIO:.0%} of the layers' "
                  "weights, the rest INT8 (NNCF weight compression by sensitivity, OpenVINO)",
}


def precision(weights: str) -> str:
    """The runtime precision of a weight format (int4_mixed runs as an INT4 model)."""
    return "int4" if weights == "int4_mixed" else weights


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
                                          ratio=1.0 if weights == "int4" else MIXED_INT4_RATIO)
        ov.save_model(model, str(out), compress_to_fp16=False)
    except Exception as e:  # noqa: BLE001
        raise StageError(f"quantize: NNCF {weights} weight compression of {fp32.name} failed: "
                         f"{str(e).splitlines()[0][:200]}") from None
    return out


def _other_gathers(model) -> list[str] | None:
    """The names of the constant-table Gathers that are not the token embedding (its indices are input_ids),
    to keep float; None where the embedding's Gather is not found or a Gather to keep has no name."""
    tables = {i.name for i in model.graph.initializer}
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tables]
    if not any(n.input[1] == "input_ids" for n in gathers):
        return None
    others = [n.name for n in gathers if n.input[1] != "input_ids"]
    return None if any(not name for name in others) else others


def eight_bit_matmuls(model, packed_qkv: bool = True) -> list[str]:
    """The MatMuls that int4_mixed keeps in INT8: those whose constant weight narrows its input (in > out
    features: down, key and value projections), the LM head (as many outputs as the embedding has rows) and,
    with `packed_qkv`, the packed query-key-value projections that feed GroupQueryAttention (they hold the
    key and value projections)."""
    tables = {i.name: list(i.dims) for i in model.graph.initializer}
    vocab = {tables[n.input[0]][0] for n in model.graph.node
             if n.op_type == "Gather" and n.input[0] in tables and n.input[1] == "input_ids"}
    packed = {n.input[0] for n in model.graph.node if n.op_type == "GroupQueryAttention" and len(n.input) > 2
              and not n.input[1] and not n.input[2]} if packed_qkv else set()
    keep = []
    for n in model.graph.node:
        dims = next((tables[i] for i in n.input if i in tables), None) if n.op_type == "MatMul" else None
        if dims is not None and len(dims) == 2 and (dims[0] > dims[1] or dims[1] in vocab or n.output[0] in packed):
            keep.append(n.name)
    return keep


def _embedding_and_head(model) -> tuple:
    """(the token embedding's node, the LM head's node: the one that writes the logits), either None if absent."""
    embed = next((n for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")
                  and len(n.input) > 1 and n.input[1] == "input_ids"), None)
    head = next((n for n in model.graph.node if "logits" in n.output), None)
    return embed, head


def embedding_shares_head(model) -> bool:
    """Whether the float decoder's token embedding can read its quantized LM head's blocks: the table is the
    head's weight, transposed (a tied model: the export writes the same values twice), and its rows fill
    whole blocks of INT4_BLOCK."""
    from onnx import numpy_helper

    embed, head = _embedding_and_head(model)
    tables = {i.name: i for i in model.graph.initializer}
    if embed is None or head is None or embed.op_type != "Gather" or head.op_type != "MatMul" \
            or embed.input[0] not in tables or head.input[1] not in tables:
        return False
    a, b = (numpy_helper.to_array(tables[name]) for name in (embed.input[0], head.input[1]))
    return a.ndim == 2 and a.shape[1] % INT4_BLOCK == 0 and a.shape[::-1] == b.shape and bool((a == b.T).all())


def share_head_with_embedding(model) -> bool:
    """Make the token embedding read the quantized LM head's blocks (as ONNX Runtime GenAI does for tied
    models): a GatherBlockQuantized over the head's MatMulNBits weight itself, one row of blocks per token,
    then a Reshape of the gathered rows to the hidden size, replace the embedding's own table, which the file
    then no longer holds. The gather reads the weight as it is (a Reshape of it would be folded into a
    second copy when ONNX Runtime optimizes the graph); only its scales are its own, shaped (rows, blocks, 1).
    Only for a head without zero points whose rows fill whole blocks. True where the graph was changed."""
    from onnx import helper, numpy_helper

    embed, head = _embedding_and_head(model)
    if embed is None or head is None or head.op_type != "MatMulNBits" or len(head.input) > 3:
        return False
    attrs = {a.name: a.i for a in head.attribute}
    tables = {i.name: i for i in model.graph.initializer}
    weight, scales = tables.get(head.input[1]), tables.get(head.input[2])
    if weight is None or scales is None or attrs.get("K", 0) % attrs.get("block_size", 1) or len(weight.dims) != 3:
        return False
    rows, blocks = weight.dims[0], weight.dims[1]
    own_scales, shape = f"{head.input[2]}_per_block", f"{embed.output[0]}_shape"
    model.graph.initializer.extend([
        numpy_helper.from_array(numpy_helper.to_array(scales).reshape(rows, blocks, 1), own_scales),
        numpy_helper.from_array(np.asarray([0, 0, -1], dtype=np.int64), shape)])
    nodes = [helper.make_node("GatherBlockQuantized", [head.input[1], "input_ids", own_scales],
                              [f"{embed.output[0]}_blocks"], name="/embed/Gather_head", domain="com.microsoft",
                              bits=attrs["bits"], block_size=attrs["block_size"], gather_axis=0, quantize_axis=2),
             helper.make_node("Reshape", [f"{embed.output[0]}_blocks", shape], [embed.output[0]],
                              name="/embed/head_rows")]
    at = list(model.graph.node).index(embed)
    model.graph.node.remove(embed)
    for k, n in enumerate(nodes):
        model.graph.node.insert(at + k, n)
    used = {i for n in model.graph.node for i in n.input}
    for name in embed.input:
        if name in tables and name not in used:
            model.graph.initializer.remove(tables[name])
    return True


def _at_opset(model, version: int):
    """`model` converted to the default domain's opset `version` (onnx's version converter), or None where
    that fails: then the embedding stays float rather than the graph invalid."""
    import onnx
    from onnx import version_converter

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), version)
    if current >= version:
        return model
    try:
        converted = version_converter.convert_version(model, version)
        onnx.checker.check_model(converted)
    except Exception:  # noqa: BLE001 - the converter raises many types; the float embedding is the fallback
        return None
    return converted


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

            model = onnx.load(str(fp32))
            shared = embedding_shares_head(model)  # then the embedding's own table is not quantized, but dropped
            extra: dict = {}
            eight = eight_bit_matmuls(model) if weights == "int4_mixed" else []
            others = _other_gathers(model) if weights != "int8" and not shared else None
            if others is not None:  # a 4-bit table is an INT4 tensor: opset 21, which the quantizer declares
                model = _at_opset(model, 21)
                others = None if model is None else others
                model = model or onnx.load(str(fp32))
            if others is not None:
                extra = {"op_types_to_quantize": ("MatMul", "Gather"), "quant_axes": (("MatMul", 0), ("Gather", 1)),
                         "nodes_to_exclude": others}
            if eight:
                extra["nodes_to_exclude"] = [*extra.get("nodes_to_exclude", []), *eight]
            q = MatMulNBitsQuantizer(model, bits=8 if weights == "int8" else 4, block_size=INT4_BLOCK,
                                     is_symmetric=True, accuracy_level=4, **extra)
            q.process()
            model = q.model.model
            if eight:  # the float MatMuls left are the ones kept for 8 bits
                q = MatMulNBitsQuantizer(model, bits=8, block_size=INT4_BLOCK, is_symmetric=True, accuracy_level=4,
                                         op_types_to_quantize=("MatMul",))
                q.process()
                model = q.model.model
            if shared:
                share_head_with_embedding(model)
            onnx.save(model, str(tmp))
    except StageError:
        raise
    except Exception as e:  # noqa: BLE001 - the quantizers raise many types
        raise StageError(f"quantize: {weights} weights of {fp32.name} failed: {str(e).splitlines()[0][:200]}") from None
    finally:
        for g, lv in zip(loggers, levels, strict=True):
            g.setLevel(lv)
    return out
