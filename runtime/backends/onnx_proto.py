"""Tiny ONNX protobuf reading and writing without the onnx package.

Reading: each graph input's declared dims (to fix free dimensions for static-shape NPUs).
Writing: a one-node float32 model, for the QNN probe of device discovery and the no-op model
of ``fanout bench scale``.
"""
from __future__ import annotations

import mmap
import os
from typing import Any

IR_VERSION = 7
OPSET = 13
FLOAT = 1  # TensorProto.DataType


def one_node_model(op: str, inputs: list[str], shape: tuple[int | str, ...],
                   name: str = "graph") -> bytes:
    """``y = op(*inputs)`` over float32 tensors of ``shape`` (IR 7, opset 13); a dimension
    given as a name is dynamic."""
    # TensorShapeProto.dim: dim_value (1) for a size, dim_param (2) for a named dynamic one
    dims = b"".join(_field(1, _field(1 if isinstance(d, int) else 2, d)) for d in shape)
    tensor_type = _field(1, _field(1, FLOAT) + _field(2, dims))  # TypeProto.tensor_type

    def value_info(value: str) -> bytes:
        return _field(1, value) + _field(2, tensor_type)

    node = b"".join(_field(1, i) for i in inputs) + _field(2, "y") + _field(4, op)
    graph = (_field(1, node) + _field(2, name)
             + b"".join(_field(11, value_info(i)) for i in dict.fromkeys(inputs))
             + _field(12, value_info("y")))
    return _field(1, IR_VERSION) + _field(8, _field(2, OPSET)) + _field(7, graph)


def _field(number: int, value: int | str | bytes) -> bytes:
    """One protobuf field: an int as a varint, text or bytes length-delimited."""
    if isinstance(value, int):
        return _put_varint(number << 3) + _put_varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _put_varint(number << 3 | 2) + _put_varint(len(data)) + data


def _put_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def read_onnx_inputs(path: str | os.PathLike) -> dict[str, list[int | str | None]]:
    """Each graph input's dims: an int, the symbolic name, or None (free and unnamed)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            return _graph_inputs(buf, path)  # returns plain Python values: no view outlives buf
        finally:
            buf.release()


def _graph_inputs(buf: memoryview, path: Any) -> dict[str, list[int | str | None]]:
    graph = next((v for fno, v in _fields(buf) if fno == 7), None)
    if graph is None:
        raise ValueError(f"{path}: no graph in the model")
    inputs: dict[str, list[int | str | None]] = {}
    for fno, vi in _fields(graph):
        if fno != 11:
            continue
        name, dims = "", []
        for f2, v2 in _fields(vi):
            if f2 == 1:
                name = bytes(v2).decode()
            elif f2 == 2:
                dims = _tensor_dims(v2)
        inputs[name] = dims
    return inputs


def _tensor_dims(type_proto: memoryview) -> list[int | str | None]:
    dims: list[int | str | None] = []
    for f, tensor in _fields(type_proto):
        if f != 1:
            continue
        for f2, shape in _fields(tensor):
            if f2 != 2:
                continue
            for f3, dim in _fields(shape):
                if f3 != 1:
                    continue
                d: int | str | None = None
                for f4, v in _fields(dim):
                    if f4 == 1:
                        d = v if isinstance(v, int) else None
                    elif f4 == 2:
                        d = bytes(v).decode()
                dims.append(d)
    return dims


def _fields(buf: memoryview):
    """(field number, value) of one protobuf message: varints as int, bytes as memoryview."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        fno, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
            yield fno, v
        elif wt == 2:
            ln, i = _varint(buf, i)
            yield fno, buf[i:i + ln]
            i += ln
        elif wt == 1:
            i += 8
        elif wt == 5:
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
