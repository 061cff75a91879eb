"""The dependency-free ONNX header reader agrees with the onnx package and catches damage."""

from __future__ import annotations

import shutil

import pytest

from edge.bundle import onnx_header
from edge.errors import IntegrityError


def _onnx_io(path):
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    return (
        {i.name: dims(i) for i in m.graph.input},
        {o.name: dims(o) for o in m.graph.output},
        next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
        m.ir_version,
        len(m.graph.initializer),
    )


@pytest.mark.parametrize("name", ["vision-fp32.onnx", "text-int8.onnx", "vision-fp16.onnx"])
def test_header_matches_onnx(medsiglip_bundle, name):
    path = medsiglip_bundle / "medsiglip" / name
    h = onnx_header.read_header(path)
    inputs, outputs, opset, ir, n_init = _onnx_io(path)
    assert {k: v["shape"] for k, v in h.inputs.items()} == inputs
    assert {k: v["shape"] for k, v in h.outputs.items()} == outputs
    assert (h.opset, h.ir_version, h.initializers) == (opset, ir, n_init)
    assert h.inputs[next(iter(h.inputs))]["type"] in ("float32", "int64")
    assert all(v["type"] == "float32" for v in h.outputs.values())  # fp16 keeps fp32 I/O
    assert h.external == {}


def test_header_lists_external_data(medsiglip_ext_bundle):
    path = medsiglip_ext_bundle / "medsiglip" / "vision-int8.onnx"
    h = onnx_header.read_header(path)
    data = path.with_name("vision-int8.onnx.data")
    assert list(h.external) == [data.name] and 0 < h.external[data.name] <= data.stat().st_size


def test_truncated_and_foreign_files(medsiglip_bundle, tmp_path):
    src = medsiglip_bundle / "medsiglip" / "vision-fp32.onnx"
    for cut in (10, src.stat().st_size // 2, src.stat().st_size - 1):
        p = tmp_path / f"cut{cut}.onnx"
        p.write_bytes(src.read_bytes()[:cut])
        with pytest.raises(IntegrityError, match=f"cut{cut}.onnx: ONNX file is truncated"):
            onnx_header.read_header(p)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(IntegrityError, match="junk.onnx"):
        onnx_header.read_header(junk)


def test_check_against_manifest(medsiglip_ext_bundle, tmp_path):
    from edge.bundle.manifest import open_bundle

    b = open_bundle(medsiglip_ext_bundle)
    entry = b.file("medsiglip", "text", precision="fp32")
    d = tmp_path / "m"
    shutil.copytree(medsiglip_ext_bundle / "medsiglip", d)
    graph, data = d / "text-fp32.onnx", d / "text-fp32.onnx.data"
    facts = onnx_header.check(graph, entry)
    assert facts["inputs"] == "input_ids" and facts["external"] == data.name
    with pytest.raises(IntegrityError, match="inputs are"):
        onnx_header.check(graph, {**entry, "onnx": {**entry["onnx"], "inputs": ["pixel_values"]}})
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(IntegrityError, match=r"text-fp32\.onnx\.data: external data is truncated"):
        onnx_header.check(graph, entry)
    data.unlink()
    with pytest.raises(
        IntegrityError, match=r"text-fp32\.onnx\.data: external data of text-fp32\.onnx is missing"
    ):
        onnx_header.check(graph, entry)
