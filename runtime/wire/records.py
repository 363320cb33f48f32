"""Typed records from plain msgpack data and back, checked against their type hints.

One reader for every dataclass that crosses the wire (message fields, the status, model load
states): a value of the wrong type, a missing field or an unknown literal is a
``ProtocolError`` naming where it is, never a ``KeyError`` in whoever reads it later.
Unknown keys are ignored: a newer peer may send fields this one does not know.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from ..errors import Attempt, FanoutError, ProtocolError, brief, error_from_wire

Reader = Callable[[Any, str], Any]


@dataclass(frozen=True)
class Check:
    """``Annotated[T, Check(ok, what)]``: read as ``T``, and then ``ok(value)`` must hold
    (``what`` says what was expected). For a value that stays plain data, say a token id in
    range or a tool call's map, yet must be well formed before it is passed on."""

    ok: Callable[[Any], bool]
    what: str


def read(tp: Any, value: Any, where: str) -> Any:
    """``value`` (plain data) as ``tp``; ``ProtocolError`` naming ``where`` if it is not one."""
    return reader(tp)(value, where)


def plain(value: Any) -> Any:
    """A record as plain data (dicts, lists, scalars) for msgpack or JSON."""
    if isinstance(value, (Attempt, FanoutError)):
        return value.to_wire()
    custom = getattr(value, "to_plain", None)  # a record with its own wire form
    if custom is not None:
        return custom()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


@functools.cache
def reader(tp: Any) -> Reader:
    """A checking reader for the type ``tp`` (built once per type)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return lambda v, where: v
    if origin is Annotated:
        base, *meta = args
        return _checked(reader(base), [m for m in meta if isinstance(m, Check)])
    if origin in (Union, types.UnionType):
        return _union([reader(a) for a in args if a is not type(None)],
                      type(None) in args, describe(tp))
    if origin is Literal:
        return _literal(frozenset(args), describe(tp))
    if origin is tuple and args and args[-1] is not Ellipsis:
        return _fixed([reader(a) for a in args], describe(tp))
    if origin in (list, tuple) or tp in (list, tuple):
        return _sequence(reader(args[0]) if args else reader(Any), origin or tp, describe(tp))
    if origin is dict or tp is dict:
        return _mapping(reader(args[1]) if args else reader(Any))
    if tp is Attempt:
        return _guarded(Attempt.from_wire)
    if tp is FanoutError:
        return _guarded(error_from_wire)
    custom = getattr(tp, "from_plain", None)  # a record with its own wire form
    if custom is not None:
        return _guarded(custom)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _record(tp)
    if tp in (int, float, str, bool, bytes):
        return _scalar(tp)
    raise TypeError(f"no wire reader for {tp!r}")


def describe(tp: Any) -> str:
    """A type as a reader of error messages knows it: ``str | None``, ``list[Attempt]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(describe(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is Annotated:
        return describe(args[0])
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else describe(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _expected(where: str, what: str, value: Any) -> ProtocolError:
    return ProtocolError(f"{where}: expected {what}, got {type(value).__name__}")


def _scalar(tp: type) -> Reader:
    accepts: tuple[type, ...] = (int, float) if tp is float else (tp,)

    def read_scalar(value: Any, where: str) -> Any:
        if not isinstance(value, accepts) or (isinstance(value, bool) and tp is not bool):
            raise _expected(where, tp.__name__, value)
        if tp is float:  # an int sent for a float is read as one, as msgspec reads it
            number = float(typing.cast(float, value))
            if not math.isfinite(number):
                raise ProtocolError(f"{where}: expected a finite float, got {value!r}")
            return number
        return value
    return read_scalar


def _union(options: list[Reader], optional: bool, what: str) -> Reader:
    def read_union(value: Any, where: str) -> Any:
        if value is None and optional:
            return None
        for option in options:
            try:
                return option(value, where)
            except ProtocolError:
                continue
        raise _expected(where, what, value)
    return read_union if len(options) != 1 else _optional(options[0], optional, what)


def _optional(option: Reader, optional: bool, what: str) -> Reader:
    def read_optional(value: Any, where: str) -> Any:
        if value is None and optional:
            return None
        return option(value, where)
    return read_optional


def _literal(allowed: frozenset, what: str) -> Reader:
    def read_literal(value: Any, where: str) -> Any:
        if not isinstance(value, str | int) or value not in allowed:
            raise ProtocolError(f"{where}: expected {what}, got {brief(value, 60)}")
        return value
    return read_literal


def _sequence(item: Reader, origin: type, what: str) -> Reader:
    def read_sequence(value: Any, where: str) -> Any:
        if not isinstance(value, list | tuple):
            raise _expected(where, what, value)
        return origin(item(v, f"{where}[{i}]") for i, v in enumerate(value))
    return read_sequence


def _fixed(items: list[Reader], what: str) -> Reader:
    def read_fixed(value: Any, where: str) -> Any:
        if not isinstance(value, list | tuple) or len(value) != len(items):
            raise ProtocolError(f"{where}: expected {what}, got {brief(value, 60)}")
        return tuple(item(v, f"{where}[{i}]") for i, (item, v) in enumerate(zip(items, value)))
    return read_fixed


def _mapping(item: Reader) -> Reader:
    def read_mapping(value: Any, where: str) -> Any:
        if not isinstance(value, dict):
            raise _expected(where, "a map", value)
        out = {}
        for key, v in value.items():
            if not isinstance(key, str):
                raise ProtocolError(f"{where}: keys must be strings, got {brief(key, 60)}")
            out[key] = item(v, f"{where}.{key if len(key) <= 40 else brief(key, 40)}")
        return out
    return read_mapping


def _checked(inner: Reader, checks: list[Check]) -> Reader:
    def read_checked(value: Any, where: str) -> Any:
        value = inner(value, where)
        for check in checks:
            if not check.ok(value):
                raise ProtocolError(f"{where}: expected {check.what}, got {brief(value, 60)}")
        return value
    return read_checked


def _guarded(parse: Callable[[Any], Any]) -> Reader:
    def read_custom(value: Any, where: str) -> Any:
        try:
            return parse(value)
        except ProtocolError as exc:
            raise ProtocolError(f"{where}: {exc.message}") from None
    return read_custom


def _record(cls: type) -> Reader:
    hints = typing.get_type_hints(cls)
    plan = [(f.name, reader(hints[f.name]),
             f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(cls) if f.init]

    def read_record(value: Any, where: str) -> Any:
        if not isinstance(value, dict):
            raise _expected(where, f"a {cls.__name__} map", value)
        kwargs = {}
        for name, read_field, required in plan:
            if name in value:
                kwargs[name] = read_field(value[name], f"{where}.{name}")
            elif required:
                raise ProtocolError(f"{where}: missing field {name!r}")
        return cls(**kwargs)
    return read_record
