"""Rewrite onnxruntime's fused ``Attention`` nodes as ``MultiHeadAttention``, for CPU memory.

onnxruntime's transformer optimizer fuses a vision tower's attention into ``Attention`` nodes
(com.microsoft) that carry the packed Q/K/V weight. On the CPU that kernel materializes every
head's full score matrix: for MedGemma's 896 px tower that is 16 heads × 4096 × 4096 floats =
1 GiB per layer at once, which alone breaks a 2 GB budget for the image encoder.
``MultiHeadAttention`` takes Q, K and V already projected and, on the CPU, runs MLAS's blocked
flash-attention kernel (scores never exist in full; blocks sized to the L2 cache) when there is
no mask, bias or past state, which is the case for a vision tower.

So each ``Attention`` becomes three ``MatMul`` nodes (the packed weight split back into Q, K, V;
the dynamic int8 quantizer then quantizes them like any other MatMul) feeding one
``MultiHeadAttention`` with the packed bias. The arithmetic is the same; the test compares
outputs against the unrewritten graph.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)
MS = "com.microsoft"


def attention_to_mha(model) -> int:
    """Rewrite ``model`` (an onnx.ModelProto) in place; returns how many nodes were rewritten.
    Attention nodes with a mask, past state or relative-position bias are left alone."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, n, drop = [], 0, set()
    for node in graph.node:
        extra = [i for i in node.input[3:] if i]
        if node.op_type != "Attention" or node.domain != MS or extra or node.input[1] not in inits:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("unidirectional") or attrs.get("past_present_share_buffer"):
            nodes.append(node)
            continue
        x, w_name = node.input[0], node.input[1]
        bias = node.input[2] if len(node.input) > 2 else ""
        w = numpy_helper.to_array(inits[w_name])
        sizes = list(attrs.get("qkv_hidden_sizes") or [w.shape[1] // 3] * 3)
        parts = np.split(w, np.cumsum(sizes)[:-1], axis=1)
        outs = []
        for tag, part in zip("qkv", parts, strict=True):
            wname, out = f"{node.name}_{tag}_weight", f"{node.name}_{tag}"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(part), wname))
            nodes.append(helper.make_node("MatMul", [x, wname], [out], name=f"{node.name}_{tag}_matmul"))
            outs.append(out)
        mha_attrs = {"num_heads": int(attrs["num_heads"])}
        if "scale" in attrs:
            mha_attrs["scale"] = float(attrs["scale"])
        nodes.append(
            helper.make_node(
                "MultiHeadAttention",
                [*outs, bias],
                list(node.output[:1]),
                name=f"{node.name}_mha",
                domain=MS,
                **mha_attrs,
            )
        )
        drop.add(w_name)
        n += 1
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    log.info("rewrote %d Attention nodes as MatMul + MultiHeadAttention", n)
    return n
