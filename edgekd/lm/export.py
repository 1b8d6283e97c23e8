"""A causal LM as an ONNX decoder with a KV cache: one graph for prefill and decode steps.

The graph is written from a plain PyTorch decoder that takes the Hugging Face model's own weights (Llama
family: RMSNorm, rotary positions, grouped-query attention, SiLU-gated MLP), so the exported operators are
the few every runtime runs: MatMul, Mul, Add, Softmax, Concat, Gather and the like. Its parity with the
Hugging Face forward is tested (logits and greedy tokens).

Inputs:  input_ids (batch, seq) int64; past_key_{i}, past_value_{i} (batch, kv_heads, past, head_dim) float32
Outputs: logits (batch, seq, vocab); present_key_{i}, present_value_{i} (batch, kv_heads, past + seq, head_dim)

Prefill passes a past of length 0; each decode step passes the presents it got back and one new token.
Positions continue from the past's length; attention is causal over past and new tokens. Batches are
unpadded (every sequence in a batch has the same length).

For ONNX Runtime the attention is exported fused (`fused=True`): each layer's rotary positions, grouped-query
attention and cache concatenation become one com.microsoft GroupQueryAttention node, with the same inputs
and outputs, fed by one packed query-key-value projection, and each residual Add with the RMSNorm after it
becomes one SkipSimplifiedLayerNormalization (ONNX Runtime's optimizer fuses neither); the plain graph (for OpenVINO and TensorRT, which do not run the contrib op) has hundreds of
shape and attention nodes more (SmolLM2-135M in ONNX Runtime: its INT8 12-layer student decodes 1.27x
faster fused, the FP32 teacher 1.23x; tools/lm_attention_benchmark.py). Fused needs head sizes in multiples
of 16."""
from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..bench.lm_runner import KV_LENGTH, POSITIONS_KEY  # the board runner's names: one definition
from ..errors import ModelError, StageError
from ..runs import atomic_path
from .models import lm_layers

__all__ = ["KV_LENGTH", "KVDecoder", "export_lm_onnx", "fusable", "io_names", "kv_shape", "save_checked"]

MASKED = -1e9  # added to the scores of future tokens (finite: a fully masked row cannot make NaNs)


def io_names(layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) of the exported decoder."""
    past = [n for i in range(layers) for n in (f"past_key_{i}", f"past_value_{i}")]
    present = [n for i in range(layers) for n in (f"present_key_{i}", f"present_value_{i}")]
    return ["input_ids", *past], ["logits", *present]


def kv_shape(config, batch: int, length: int) -> tuple[int, int, int, int]:
    """The shape of one layer's past keys (or values) for `length` cached tokens."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return batch, getattr(config, "num_key_value_heads", None) or heads, length, head_dim


def fusable(config) -> bool:
    """Whether ONNX Runtime's GroupQueryAttention with rotary takes this model: head sizes in multiples of 16."""
    heads = config.num_attention_heads
    return (getattr(config, "head_dim", None) or config.hidden_size // heads) % 16 == 0


class _RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _SkipRMSNorm(torch.autograd.Function):
    """The residual sum x + skip and its RMSNorm, exported as ONNX Runtime's com.microsoft
    SkipSimplifiedLayerNormalization (one node for the Add and the norm, its outputs 0 and 3; ONNX Runtime's
    own optimizer fuses only LayerNormalization with its Add). Returns (norm(x + skip), x + skip)."""

    @staticmethod
    def forward(ctx, x, skip, weight, eps: float):  # noqa: ARG004
        s = x + skip
        return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * weight, s

    @staticmethod
    def symbolic(g, x, skip, weight, eps: float):
        out, _, _, total = g.op("com.microsoft::SkipSimplifiedLayerNormalization", x, skip, weight, epsilon_f=eps,
                                outputs=4)
        out.setType(x.type())
        total.setType(x.type())
        return out, total


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _GroupQueryAttention(torch.autograd.Function):
    """Rotary positions and causal grouped-query attention over the past and the new tokens, exported as ONNX
    Runtime's fused com.microsoft GroupQueryAttention (one node per layer, do_rotary with the cos/sin tables;
    present = past + new, as the plain graph's). qkv (b, t, (heads + 2 kv_heads) * d): the query, key and
    value projections packed in one (the node's packed-QKV form), unrotated; past (b, kv_heads, p, d); cos,
    sin (max positions, d / 2)."""

    @staticmethod
    def forward(ctx, qkv, past_k, past_v, seqlens_k, total, cos, sin, heads: int, kv_heads: int,  # noqa: ARG004
                rotary: bool = True, window: int = 0):
        d = past_k.shape[-1]
        q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        b, t, _ = q.shape
        p = past_k.shape[2]
        qh, kh = q.view(b, t, heads, d), k.view(b, t, kv_heads, d)
        if rotary:
            c = torch.cat((cos[p:p + t], cos[p:p + t]), dim=-1)[None, :, None]
            s = torch.cat((sin[p:p + t], sin[p:p + t]), dim=-1)[None, :, None]
            qh, kh = qh * c + _rotate_half(qh) * s, kh * c + _rotate_half(kh) * s
        qh, kh = qh.transpose(1, 2), kh.transpose(1, 2)
        kk = torch.cat([past_k, kh], dim=2)
        vv = torch.cat([past_v, v.view(b, t, kv_heads, d).transpose(1, 2)], dim=2)
        rep = heads // kv_heads
        scores = torch.matmul(qh, kk.repeat_interleave(rep, dim=1).transpose(2, 3)) / math.sqrt(d)
        keys, rows = torch.arange(p + t)[None, :], (torch.arange(t) + p)[:, None]
        hidden = (keys > rows) | (keys <= rows - window) if window else keys > rows
        scores = scores.masked_fill(hidden, MASKED)
        out = torch.matmul(torch.softmax(scores, dim=-1), vv.repeat_interleave(rep, dim=1))
        return out.transpose(1, 2).reshape(b, t, heads * d), kk, vv

    @staticmethod
    def symbolic(g, qkv, past_k, past_v, seqlens_k, total, cos, sin, heads: int, kv_heads: int, rotary: bool = True,
                 window: int = 0):
        # key and value are given as qkv again here and left out after export (_packed): the packed form. A
        # sliding window of w tokens (the query's own included) is the node's local_window_size w (as ONNX
        # Runtime counts it; checked against Hugging Face's mask in the tests).
        out, present_k, present_v = g.op("com.microsoft::GroupQueryAttention", qkv, qkv, qkv, past_k, past_v,
                                         seqlens_k, total, cos, sin, num_heads_i=heads, kv_num_heads_i=kv_heads,
                                         do_rotary_i=int(rotary), rotary_interleaved_i=0,
                                         local_window_size_i=window if window else -1, outputs=3)
        out.setType(qkv.type())  # what ONNX shape inference cannot say of a contrib op
        present_k.setType(past_k.type().with_sizes([None] * 4))
        present_v.setType(past_v.type().with_sizes([None] * 4))
        return out, present_k, present_v


def _packed(*linears: nn.Linear) -> nn.Linear:
    """One Linear whose outputs are the given Linears' outputs, concatenated in order."""
    out = nn.Linear(linears[0].in_features, sum(m.out_features for m in linears),
                    bias=linears[0].bias is not None)
    with torch.no_grad():
        out.weight.copy_(torch.cat([m.weight for m in linears]))
        if out.bias is not None:
            out.bias.copy_(torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in linears]))
    return out.requires_grad_(False)


def _contrib_forms(proto) -> None:
    """The contrib nodes as ONNX Runtime takes them: GroupQueryAttention's key and value left out (packed
    QKV), SkipSimplifiedLayerNormalization's unused mean and inverse deviation outputs left out."""
    for node in proto.graph.node:
        if node.op_type == "GroupQueryAttention":
            node.input[1] = node.input[2] = ""
        elif node.op_type == "SkipSimplifiedLayerNormalization":
            node.output[1] = node.output[2] = ""


def layer_windows(cfg, n: int) -> list[int | None]:
    """Each layer's sliding attention window in tokens (the query's own included), None for full attention:
    Mistral windows every layer; Qwen2 and SmolLM3 the layers their `layer_types` name, when enabled. A window
    at least the model's positions long changes nothing and is left out."""
    w = getattr(cfg, "sliding_window", None)
    if not w or not getattr(cfg, "use_sliding_window", True) or w >= int(getattr(cfg, "max_position_embeddings", 0) or 0):
        return [None] * n
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list) and len(types) == n:
        return [int(w) if kind == "sliding_attention" else None for kind in types]
    return [int(w)] * n


class KVDecoder(nn.Module):
    """The Hugging Face causal LM's weights in a decoder that takes and returns its KV cache as tensors.
    fused: attention as ONNX Runtime's GroupQueryAttention node (ONNX Runtime only; other runtimes read
    the plain graph)."""

    def __init__(self, hf_model: nn.Module, fused: bool = False):
        super().__init__()
        self.fused = fused
        cfg = hf_model.config
        if getattr(cfg, "model_type", "") not in ("llama", "mistral", "qwen2", "smollm3"):
            raise ModelError(f"KV-cache export: model family {getattr(cfg, 'model_type', '?')!r} is not supported "
                             "(Llama-family decoders: llama, mistral, qwen2)")
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type in ("dynamic", "longrope"):
            raise ModelError(f"KV-cache export: rope type {rope_type!r} changes with the sequence length and is not "
                             "supported (default, linear, llama3 and yarn are)")
        theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        inv = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        self.rope_scale = 1.0  # yarn scales cos and sin
        rotary = getattr(getattr(hf_model, "model", None), "rotary_emb", None)
        if rotary is not None and isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
            inv = rotary.inv_freq.detach().float().clone()  # the model's own frequencies (llama3, linear, yarn)
            self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
        elif rope_type != "default":
            raise ModelError(f"KV-cache export: rope type {rope_type!r} needs the model's rotary embedding")
        if 2 * inv.numel() != self.head_dim:
            raise ModelError(f"KV-cache export: rotary positions over {2 * inv.numel()} of {self.head_dim} head "
                             "dimensions (partial rotary) are not supported")
        self.register_buffer("inv_freq", inv, persistent=False)
        if fused:  # GroupQueryAttention's rotary tables: every position the model takes
            angles = torch.arange(int(getattr(cfg, "max_position_embeddings", 2048)), dtype=torch.float32)[:, None] * inv
            self.register_buffer("cos_table", angles.cos() * self.rope_scale, persistent=False)
            self.register_buffer("sin_table", angles.sin() * self.rope_scale, persistent=False)
        n = len(lm_layers(hf_model))
        flags = getattr(cfg, "no_rope_layers", None)  # SmolLM3: 1 where a layer rotates, 0 where it does not
        self.rotary = [bool(f) for f in flags] if isinstance(flags, list) and len(flags) == n else [True] * n
        self.windows = layer_windows(cfg, n)
        eps = cfg.rms_norm_eps
        self.embed = hf_model.get_input_embeddings()
        self.layers = nn.ModuleList()
        for layer in lm_layers(hf_model):
            a, m = layer.self_attn, layer.mlp
            block = nn.Module()
            block.norm1 = _RMSNorm(layer.input_layernorm.weight, eps)
            block.norm2 = _RMSNorm(layer.post_attention_layernorm.weight, eps)
            block.q, block.k, block.v, block.o = a.q_proj, a.k_proj, a.v_proj, a.o_proj
            if fused:  # one projection for the query, key and value: GroupQueryAttention's packed input
                block.qkv = _packed(a.q_proj, a.k_proj, a.v_proj)
            block.gate, block.up, block.down = m.gate_proj, m.up_proj, m.down_proj
            self.layers.append(block)
        self.norm = _RMSNorm(hf_model.model.norm.weight, eps)
        self.head = hf_model.get_output_embeddings()
        self.config = cfg

    def _attend(self, block: nn.Module, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                past_k: torch.Tensor, past_v: torch.Tensor, mask: torch.Tensor):
        b, t, _ = x.shape
        q = block.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = block.k(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = block.v(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if cos is not None:  # None: a layer without rotary positions (NoPE)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        rep = self.heads // self.kv_heads
        kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k
        vv = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        scores = torch.matmul(q, kk.transpose(2, 3)) * (1.0 / math.sqrt(self.head_dim)) + mask
        out = torch.matmul(torch.softmax(scores, dim=-1), vv)
        return block.o(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)), k, v

    def _attend_fused(self, i: int, block: nn.Module, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                      seqlens: torch.Tensor, total: torch.Tensor):
        out, k, v = _GroupQueryAttention.apply(block.qkv(x), past_k, past_v, seqlens, total, self.cos_table,
                                               self.sin_table, self.heads, self.kv_heads, self.rotary[i],
                                               self.windows[i] or 0)
        return block.o(out), k, v

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor):
        if self.fused:
            return self._forward_fused(input_ids, *past)
        t = input_ids.shape[1]
        p = past[0].shape[2]
        positions = torch.arange(t, dtype=torch.float32) + p
        freqs = positions[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None] * self.rope_scale, emb.sin()[None, None] * self.rope_scale
        keys = torch.arange(t + p, dtype=torch.float32)
        masks = {}  # one per window size (0: the whole past)
        for w in {w or 0 for w in self.windows}:
            hidden = keys[None, :] > positions[:, None]
            if w:  # a sliding window of w tokens, the query's own included
                hidden = hidden | (keys[None, :] <= positions[:, None] - w)
            masks[w] = torch.where(hidden, torch.tensor(MASKED), torch.tensor(0.0))
        h = self.embed(input_ids)
        presents = []
        for i, block in enumerate(self.layers):
            rot = (cos, sin) if self.rotary[i] else (None, None)
            a, k, v = self._attend(block, block.norm1(h), *rot, past[2 * i], past[2 * i + 1],
                                   masks[self.windows[i] or 0])
            h = h + a
            x = block.norm2(h)
            h = h + block.down(nn.functional.silu(block.gate(x)) * block.up(x))
            presents += [k, v]
        return (self.head(self.norm(h)), *presents)

    def _forward_fused(self, input_ids: torch.Tensor, *inputs: torch.Tensor):
        from torch.onnx.operators import shape_as_tensor

        past = inputs[:2 * len(self.layers)]
        t = shape_as_tensor(input_ids)[1]
        p = shape_as_tensor(past[0])[2]
        if len(inputs) > len(past):  # kv_length: the cached tokens, where the past is a longer shared buffer
            p = torch.where(inputs[-1][0] >= 0, inputs[-1][0], p)
        total = (p + t).to(torch.int32)  # GroupQueryAttention: the total length, and per row its last index
        seqlens = (input_ids[:, 0] * 0 + (p + t - 1)).to(torch.int32)
        h = self.embed(input_ids)
        x = self.layers[0].norm1(h)
        presents = []
        for i, block in enumerate(self.layers):  # each residual Add and the norm after it: one node
            a, k, v = self._attend_fused(i, block, x, past[2 * i], past[2 * i + 1], seqlens, total)
            x, h = _SkipRMSNorm.apply(a, h, block.norm2.weight, block.norm2.eps)
            mlp = block.down(nn.functional.silu(block.gate(x)) * block.up(x))
            after = self.layers[i + 1].norm1 if i + 1 < len(self.layers) else self.norm
            x, h = _SkipRMSNorm.apply(mlp, h, after.weight, after.eps)
            presents += [k, v]
        return (self.head(x), *presents)


def export_lm_onnx(hf_model: nn.Module, path: Path, opset: int = 17, fused: bool = False) -> Path:
    """Write the KV-cache decoder of `hf_model` to `path` (checked with onnx.checker); returns `path`.
    fused: attention as ONNX Runtime's GroupQueryAttention (a graph for ONNX Runtime only)."""
    import onnx

    dec = KVDecoder(hf_model, fused=fused).eval()
    n = len(dec.layers)
    inputs, outputs = io_names(n)
    ids = torch.zeros(1, 3, dtype=torch.long)
    past = [torch.zeros(kv_shape(dec.config, 1, 2)) for _ in range(2 * n)]
    if fused:  # kv_length, -1 unless fed (an initializer: a default the caller may override)
        past.append(torch.tensor([-1], dtype=torch.long))
        inputs = [*inputs, KV_LENGTH]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    axes.update({name: {0: "batch", 2: "past"} for name in inputs[1:1 + 2 * n]})
    axes.update({name: {0: "batch", 2: "total"} for name in outputs[1:]})
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(dec, (ids, *past), buf, dynamo=False, opset_version=opset, input_names=inputs,
                              output_names=outputs, dynamic_axes=axes, do_constant_folding=True)
        except Exception as e:  # noqa: BLE001 - the exporter raises many types
            raise StageError(f"export: the KV-cache decoder did not export: {str(e).splitlines()[0][:200]}") from None
    proto = onnx.load_from_string(buf.getvalue())
    limit = getattr(dec.config, "max_position_embeddings", None)
    if limit:  # what edgekd bench checks a prompt and its continuation against
        onnx.helper.set_model_props(proto, {POSITIONS_KEY: str(int(limit))})
    if fused:
        _contrib_forms(proto)
        from onnx import numpy_helper

        proto.graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), KV_LENGTH))
    return save_checked(proto, path, "export: onnx.checker rejected the KV-cache decoder")


def save_checked(proto, path: Path, rejected: str) -> Path:
    """Write the ONNX model `proto` to `path` (atomically) once onnx.checker accepts it, else raise StageError
    with `rejected` and the checker's first line; returns `path`."""
    import onnx

    try:
        onnx.checker.check_model(proto)
    except Exception as e:  # noqa: BLE001 - the checker raises several types
        raise StageError(f"{rejected}: {str(e).splitlines()[0]}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return path
