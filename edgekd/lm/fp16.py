"""A mixed-precision FP16 copy of an exported KV-cache decoder (lm.export), for TensorRT's strongly typed builds.

TensorRT 10.12 deprecated its FP16 builder flag and TensorRT 11 removed it: a strongly typed network takes
its precision from the model, so an FP16 engine needs an FP16 model. Weights, matrix products, attention
and the KV cache become float16; three things stay float32, as TensorRT's own advice for FP16 transformers
has it: the rotary phases and the causal mask (computed from positions, where FP16 would lose whole
radians past a few thousand tokens), the RMSNorm statistics (the squares overflow FP16's 65504) and, at the
graph's edge, the logits (so perplexity and greedy picks read float32).

The same float32 nodes are listed for weakly typed builds (TensorRT below 10.12), which take the FP32
model with `--fp16` and these layers held at FP32 (`--layerPrecisions`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .export import save_checked

__all__ = ["FP32_OUTPUTS", "float32_nodes", "mixed_fp16", "write_mixed_fp16"]

FP32_OUTPUTS = ("logits",)
FP32_STATISTICS = ("Pow", "ReduceMean")  # RMSNorm: mean of squares; what follows from them alone stays FP32 too
FP16_MAX = 65504.0


def float32_nodes(model) -> list[str]:
    """Names of the nodes that stay float32, in graph order: those that read no activation (positions, the
    mask and their constants), the RMSNorm statistics and the nodes fed only by those."""
    from onnx import TensorProto

    g = model.graph
    graph_inputs = {i.name for i in g.input}
    act = {i.name for i in g.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    act |= {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    keep: set[str] = set()
    for n in g.node:  # graph order is topological
        ins = [i for i in n.input if i]
        if n.op_type != "Constant":
            fed = [producer[i] for i in ins if i in producer and producer[i].op_type != "Constant"]
            if (not any(i in act for i in ins) or n.op_type in FP32_STATISTICS
                    or (fed and all(f.name in keep for f in fed) and not graph_inputs.intersection(ins))):
                keep.add(n.name)
        if n.op_type != "Shape" and any(i in act for i in ins):  # a shape is not an activation
            act.update(n.output)
    readers: dict[str, list[str]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.name)
    for n in g.node:  # a constant stays float32 where a float32 node reads it (inv_freq, the mask value)
        if n.op_type == "Constant" and any(r in keep for r in readers.get(n.output[0], [])):
            keep.add(n.name)
    return [n.name for n in g.node if n.name in keep]


def _half(tensor):
    from onnx import numpy_helper

    values = numpy_helper.to_array(tensor).astype(np.float32)
    return numpy_helper.from_array(np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16), tensor.name)


def mixed_fp16(model):
    """(the model converted in place to mixed FP16, the float32 nodes that compute floats)."""
    from onnx import TensorProto, helper, shape_inference

    float32, float16 = TensorProto.FLOAT, TensorProto.FLOAT16
    model = shape_inference.infer_shapes(model)
    g = model.graph
    keep = set(float32_nodes(model))
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({i.name: i.data_type for i in g.initializer})
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    half: set[str] = set()  # float tensors that are float16 now
    for i in g.input:
        if types.get(i.name) == float32:
            i.type.tensor_type.elem_type = float16
            half.add(i.name)
    for t in g.initializer:
        if t.data_type == float32 and all(r.name not in keep for r in readers.get(t.name, [])):
            t.CopyFrom(_half(t))
            half.add(t.name)
    nodes, casts, computing = [], {}, []

    def cast(name: str, to: int) -> str:
        if (name, to) not in casts:
            out = f"{name}_as_{'fp16' if to == float16 else 'fp32'}"
            nodes.append(helper.make_node("Cast", [name], [out], name=f"{out}_cast", to=to))
            casts[name, to] = out
        return casts[name, to]

    for n in g.node:
        low = n.name not in keep
        if n.op_type == "Constant":
            for a in n.attribute:
                if low and a.name == "value" and a.t.data_type == float32:
                    a.t.CopyFrom(_half(a.t))
                    half.update(n.output)
            nodes.append(n)
            continue
        for k, name in enumerate(n.input):
            if name and (types.get(name) == float32 or name in half):
                if low and name not in half:
                    n.input[k] = cast(name, float16)
                elif not low and name in half:
                    n.input[k] = cast(name, float32)
        if low:
            for a in n.attribute:
                if n.op_type == "Cast" and a.name == "to" and a.i == float32:
                    a.i = float16
            half.update(o for o in n.output if types.get(o) == float32)
        elif any(types.get(o) == float32 for o in n.output):
            computing.append(n.name)
        nodes.append(n)
    for o in g.output:
        if o.name not in half:
            continue
        if o.name in FP32_OUTPUTS:  # computed in float16, handed out as float32
            inner = f"{o.name}_fp16"
            for n in nodes:
                n.output[:] = [inner if x == o.name else x for x in n.output]
                n.input[:] = [inner if x == o.name else x for x in n.input]
            nodes.append(helper.make_node("Cast", [inner], [o.name], name=f"{o.name}_as_fp32_cast", to=float32))
        else:
            o.type.tensor_type.elem_type = float16
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # inferred for float32; TensorRT and the checker infer their own
    return model, computing


def write_mixed_fp16(src: Path, dst: Path) -> list[str]:
    """Write the mixed FP16 copy of the decoder at `src` to `dst` (checked with onnx.checker); returns the
    float32 nodes that compute floats (what a weakly typed build holds at FP32)."""
    import onnx

    model, computing = mixed_fp16(onnx.load(str(src)))
    save_checked(model, dst, f"jetson: the FP16 copy of {src.name} fails onnx.checker")
    return computing
