"""Read an ONNX file's header (opset, inputs, outputs, external data) without loading weights.

Bundle verify calls :func:`check` on every ``.onnx`` file. The device ships onnxruntime, not
the ``onnx`` package, and onnxruntime can't open a graph without materialising every weight
(1.7 GB for the fp32 vision tower). So this is a small protobuf walker over the ModelProto:
it reads tags and lengths and *seeks past* node lists and tensor payloads, touching a few KB
of a 1.7 GB file. Along the way it proves the file is not truncated (every length fits inside
the file) and collects each initializer's external-data location, offset and length, so a
missing or short ``.onnx.data`` file is named before onnxruntime would map it.

Field numbers are onnx.proto3's (ModelProto, GraphProto, TensorProto, ValueInfoProto).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from edge.errors import IntegrityError

# onnx TensorProto.DataType -> name (the ones a graph's inputs and outputs use)
ELEM_TYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
}
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


@dataclass
class ONNXHeader:
    path: Path
    ir_version: int = 0
    opset: int = 0
    producer: str = ""
    inputs: dict[str, dict] = field(default_factory=dict)  # name -> {"type": ..., "shape": [...]}
    outputs: dict[str, dict] = field(default_factory=dict)
    initializers: int = 0
    external: dict[str, int] = field(default_factory=dict)  # data file -> bytes its tensors need


class _Reader:
    def __init__(self, f: BinaryIO, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    def truncated(self) -> IntegrityError:
        return IntegrityError(f"{self.path}: ONNX file is truncated or corrupt; copy it again")

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.f.read(1)
            if not b:
                raise self.truncated()
            result |= (b[0] & 0x7F) << shift
            if not b[0] & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise self.truncated()

    def fields(self, end: int):
        """Yield (field number, wire type, value) up to ``end``; for length-delimited fields the
        value is the payload length and the caller must read or :meth:`skip` it."""
        while self.f.tell() < end:
            key = self.varint()
            num, wt = key >> 3, key & 7
            if wt == 0:
                yield num, wt, self.varint()
            elif wt == 1:
                yield num, wt, int.from_bytes(self._read(8), "little")
            elif wt == 5:
                yield num, wt, int.from_bytes(self._read(4), "little")
            elif wt == 2:
                n = self.varint()
                if self.f.tell() + n > end:
                    raise self.truncated()
                yield num, wt, n
            else:
                raise self.truncated()
        if self.f.tell() != end:
            raise self.truncated()

    def _read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise self.truncated()
        return b

    def skip(self, n: int) -> None:
        self.f.seek(n, 1)

    def string(self, n: int) -> str:
        return self._read(n).decode("utf-8", errors="replace")

    def sub(self, n: int) -> int:
        """End offset of a length-``n`` sub-message starting here."""
        return self.f.tell() + n


def _value_info(r: _Reader, end: int) -> tuple[str, dict]:
    name, info = "", {"type": None, "shape": []}
    for num, wt, v in r.fields(end):
        if num == 1 and wt == 2:
            name = r.string(v)
        elif num == 2 and wt == 2:  # TypeProto
            for tnum, twt, tv in r.fields(r.sub(v)):
                if tnum == 1 and twt == 2:  # tensor_type
                    for snum, swt, sv in r.fields(r.sub(tv)):
                        if snum == 1 and swt == 0:
                            info["type"] = ELEM_TYPES.get(sv, str(sv))
                        elif snum == 2 and swt == 2:  # shape
                            for dnum, dwt, dv in r.fields(r.sub(sv)):
                                if dnum == 1 and dwt == 2:  # dim
                                    dim: int | str = "?"
                                    for inum, iwt, iv in r.fields(r.sub(dv)):
                                        if inum == 1 and iwt == 0:
                                            dim = iv
                                        elif inum == 2 and iwt == 2:
                                            dim = r.string(iv)
                                        elif iwt == 2:
                                            r.skip(iv)
                                    info["shape"].append(dim)
                                elif dwt == 2:
                                    r.skip(dv)
                        elif swt == 2:
                            r.skip(sv)
                elif twt == 2:
                    r.skip(tv)
        elif wt == 2:
            r.skip(v)
    return name, info


def _initializer(r: _Reader, end: int, h: ONNXHeader) -> None:
    location, offset, length, where = None, 0, None, 0
    for num, wt, v in r.fields(end):
        if num == 13 and wt == 2:  # external_data: StringStringEntryProto {key=1, value=2}
            key = val = ""
            for knum, kwt, kv in r.fields(r.sub(v)):
                if knum == 1 and kwt == 2:
                    key = r.string(kv)
                elif knum == 2 and kwt == 2:
                    val = r.string(kv)
                elif kwt == 2:
                    r.skip(kv)
            if key == "location":
                location = val
            elif key == "offset":
                offset = int(val)
            elif key == "length":
                length = int(val)
        elif num == 14 and wt == 0:
            where = v
        elif wt == 2:
            r.skip(v)  # raw_data and packed payloads: never read
    if where == _EXTERNAL:
        if not location or length is None:
            raise IntegrityError(f"{h.path}: an external tensor has no location/length; re-export it")
        h.external[location] = max(h.external.get(location, 0), offset + length)


def read_header(path: str | Path) -> ONNXHeader:
    """Parse a ModelProto's header fields, skipping weights. Raises IntegrityError if damaged."""
    path = Path(path)
    size = path.stat().st_size
    h = ONNXHeader(path)
    seen_graph = False
    with open(path, "rb") as f:
        r = _Reader(f, path, size)
        for num, wt, v in r.fields(size):
            if num == 1 and wt == 0:
                h.ir_version = v
            elif num == 2 and wt == 2:
                h.producer = r.string(v)
            elif num == 8 and wt == 2:  # opset_import {domain=1, version=2}
                domain, version = "", 0
                for onum, owt, ov in r.fields(r.sub(v)):
                    if onum == 1 and owt == 2:
                        domain = r.string(ov)
                    elif onum == 2 and owt == 0:
                        version = ov
                    elif owt == 2:
                        r.skip(ov)
                if domain in ("", "ai.onnx"):
                    h.opset = version
            elif num == 7 and wt == 2:  # graph
                seen_graph = True
                for gnum, gwt, gv in r.fields(r.sub(v)):
                    if gnum == 5 and gwt == 2:
                        h.initializers += 1
                        _initializer(r, r.sub(gv), h)
                    elif gnum in (11, 12) and gwt == 2:
                        name, info = _value_info(r, r.sub(gv))
                        (h.inputs if gnum == 11 else h.outputs)[name] = info
                    elif gwt == 2:
                        r.skip(gv)
            elif wt == 2:
                r.skip(v)
    if not seen_graph or not h.ir_version:
        raise IntegrityError(f"{path}: not an ONNX model (no graph); is it the right file?")
    return h


def check(path: Path, entry: dict) -> dict:
    """Bundle verify hook: header parses, I/O names match the manifest, external data present.

    Raises IntegrityError naming the file (the .onnx or its external data file).
    """
    h = read_header(path)
    want = entry.get("onnx", {})
    for kind in ("inputs", "outputs"):
        names = sorted(getattr(h, kind))
        if kind in want and names != sorted(want[kind]):
            raise IntegrityError(f"{path}: ONNX {kind} are {names}, the manifest says {sorted(want[kind])}")
    declared = want.get("external_data")
    if declared is not None and sorted(h.external) != sorted([declared] if declared else []):
        raise IntegrityError(
            f"{path}: ONNX external data is {sorted(h.external) or 'none'}, the manifest says {declared!r}"
        )
    for name, need in h.external.items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise IntegrityError(f"{path}: external data location {name!r} is outside the bundle")
        data = path.parent / rel
        try:
            have = data.stat().st_size
        except FileNotFoundError:
            raise IntegrityError(f"{data}: external data of {path.name} is missing; copy it again") from None
        if have < need:
            raise IntegrityError(
                f"{data}: external data is truncated ({have} bytes, {path.name} needs {need})"
            )
    facts = {"opset": h.opset, "inputs": ",".join(h.inputs), "outputs": ",".join(h.outputs)}
    if h.external:
        facts["external"] = ",".join(h.external)
    return facts
