"""A pickle decoder and encoder that never imports or calls anything named in the data.

``torch.save`` writes the object tree of a state dict as a pickle (protocol 2) next to the
tensor bytes. The hyperparameters we edit live in that pickle, so we interpret its opcodes
ourselves: plain data (dicts, lists, numbers, strings) becomes plain Python values and every
reference to code (a ``GLOBAL``, a ``REDUCE`` call, a persistent storage id) becomes an inert
placeholder that only remembers what it was. Nothing is ever imported or executed, which is
what makes reading a hostile file safe.

The encoder is the mirror image: for protocol 2 it emits exactly the opcodes CPython's pickler
emits for the equivalent objects, so ``encode_pickle(decode_pickle(data)) == data`` for files
written by ``torch.save``. That byte-exactness is what lets a rewrite keep every global, every
storage reference and every shared object as they were.
"""

from __future__ import annotations

import math
import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import StateFileError

__all__ = [
    "DecodedPickle",
    "GlobalRef",
    "NewObj",
    "PersistentRef",
    "PickleDecodeError",
    "PickleEncodeError",
    "PickledOrderedDict",
    "Reduced",
    "ScalarSlot",
    "ScalarTensorEdit",
    "TensorInfo",
    "TensorRebuild",
    "TensorScalar",
    "TensorUsage",
    "WEIGHTS_ONLY_ALLOWED_GLOBALS",
    "decode_pickle",
    "decode_pickle_info",
    "describe",
    "encode_pickle",
    "find_tensors",
    "find_scalar_edits",
    "referenced_globals",
    "scalar_tensor_slot",
    "tensor_info",
    "tensor_usage",
    "tree_difference",
    "weights_only_violation",
]


class PickleDecodeError(StateFileError):
    """The pickle stream is malformed or uses an opcode this decoder does not support."""


class PickleEncodeError(ValueError):
    """An object cannot be encoded (a type the pickle format layer does not know)."""


# --------------------------------------------------------------------------------------------
# Placeholders for everything that is not plain data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlobalRef:
    """A ``GLOBAL``/``STACK_GLOBAL`` reference: only the dotted name, never the object."""

    module: str
    name: str

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class PersistentRef:
    """A ``BINPERSID`` reference (torch uses it for storages: ``('storage', type, key, ...)``)."""

    pid: Any


_NO_STATE: Any = None  # placeholders use ``has_state`` so a real ``None`` state stays distinct


@dataclass(eq=False)
class Reduced:
    """A ``REDUCE`` call ``func(*args)`` that was recorded, not performed.

    Mutable because later opcodes complete it: ``SETITEMS`` adds ``items``, ``APPENDS`` adds
    ``appends`` and ``BUILD`` sets ``state``. Equality is structural (see ``tree_difference``
    for comparisons that also respect sharing).
    """

    func: Any
    args: Any
    items: list[tuple[Any, Any]] = field(default_factory=list)
    appends: list[Any] = field(default_factory=list)
    state: Any = _NO_STATE
    has_state: bool = False

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and tree_difference(self, other) is None

    __hash__ = None  # type: ignore[assignment]  # mutable, like a dict


@dataclass(eq=False)
class NewObj(Reduced):
    """A ``NEWOBJ`` instantiation ``cls.__new__(cls, *args)`` that was recorded, not performed.

    ``func`` holds the class reference (usually a ``GlobalRef``).
    """

    @property
    def cls(self) -> Any:
        return self.func


@dataclass(frozen=True)
class TensorScalar:
    """The single element of a one-element tensor, as read from (or meant for) its storage.

    The pickle only says where a tensor's bytes are; ``stateformat`` reads the element of every
    one-element tensor so ``list`` can show a 0-d learning rate, and builds the new element of
    an edit. ``raw`` is exactly what the storage record holds (the archive's byte order).
    """

    dtype: str
    value: float | int | bool
    text: str  # shortest literal the dtype reads back as this element ("0.001", not 0.00100000004)
    raw: bytes
    storage_key: str
    location: str  # the device tag torch saved ("cpu", "cuda:0"); an edit never changes it
    offset: int  # element index in the storage (the tensor's storage_offset)
    byteorder: str = "little"  # of the archive (its ``byteorder`` record)
    shared: str | None = None  # why an in-place edit would change something else, or None

    @property
    def display_value(self) -> float | int | bool:
        """The value as ``text`` reads: ``0.001`` for a float32 element, not 0.0010000000474."""
        return float(self.text) if isinstance(self.value, float) else self.value


@dataclass(eq=False)
class TensorRebuild(Reduced):
    """A ``torch._utils._rebuild_tensor_v2`` call: a tensor, recorded like any ``Reduced``.

    Its own class only so that a tensor can carry ``scalar``, its element when it has exactly
    one (filled in by ``stateformat`` after decoding; never part of the pickle itself).
    """

    scalar: TensorScalar | None = None


@dataclass(frozen=True)
class ScalarTensorEdit:
    """A one-element tensor whose element is to be replaced in place.

    It pickles as ``original`` (same object, so memo sharing, dtype, shape, stride and the
    storage's device tag stay exactly as they were); ``scalar`` is the new element, which
    ``stateformat`` writes into the storage record. The editor puts this marker where the tensor
    was, copy-on-write, like any other new value.
    """

    original: TensorRebuild
    scalar: TensorScalar


class PickledOrderedDict(OrderedDict):
    """A ``collections.OrderedDict()`` from the pickle, usable as an ordinary mapping.

    ``pickle_state`` carries a ``BUILD`` state (an OrderedDict's ``__dict__``) if there was one.
    """

    pickle_state: Any = _NO_STATE
    pickle_has_state: bool = False


class _DistinctStr(str):
    """A string that was a separate opcode in the pickle but that CPython would have shared.

    CPython returns one cached object for every empty or single-character latin-1 string, so
    two separate ``BINUNICODE '0'`` opcodes would decode to the *same* object and re-encode as
    one string plus a memo reference. Only that ambiguous case gets this subclass (it is a
    ``str`` in every other respect), so the encoder can see the two strings were distinct.
    """

    __slots__ = ()


_ORDERED_DICT = GlobalRef("collections", "OrderedDict")
_REBUILD_TENSOR_V2 = GlobalRef("torch._utils", "_rebuild_tensor_v2")
_CODECS_ENCODE = GlobalRef("_codecs", "encode")
# At protocols < 3 CPython writes Python 2 module names (fix_imports): builtins -> __builtin__.
_BUILTINS_BYTES = GlobalRef("__builtin__", "bytes")
_BUILTINS_SET = GlobalRef("builtins", "set")
_LATIN1 = "latin1"  # one shared object, like the constant in CPython's save_bytes


@dataclass(frozen=True)
class DecodedPickle:
    """The result of decoding plus facts about the stream itself."""

    root: Any
    protocol: int
    opcodes: frozenset[str]  # names of the opcodes that occur (weights_only accepts a subset)
    usage: TensorUsage  # tensors and storage references, counted while decoding
    # Every global named and every persistent reference made by the stream, collected while
    # decoding so the weights_only check needs no second walk over a large state.
    globals_named: frozenset[str] = frozenset()
    persistent_refs: tuple[PersistentRef, ...] = ()


# --------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------

_MARK = object()  # stack sentinel for MARK

# Opcode bytes -> names. Only names are used for reporting; dispatch is by byte below.
_OPCODE_NAMES = {
    0x80: "PROTO", 0x95: "FRAME", 0x2E: "STOP", 0x28: "MARK", 0x30: "POP", 0x31: "POP_MARK",
    0x32: "DUP", 0x7D: "EMPTY_DICT", 0x5D: "EMPTY_LIST", 0x29: "EMPTY_TUPLE", 0x8F: "EMPTY_SET",
    0x90: "ADDITEMS", 0x91: "FROZENSET", 0x74: "TUPLE", 0x85: "TUPLE1", 0x86: "TUPLE2",
    0x87: "TUPLE3", 0x6C: "LIST", 0x64: "DICT", 0x61: "APPEND", 0x65: "APPENDS",
    0x73: "SETITEM", 0x75: "SETITEMS", 0x4E: "NONE", 0x88: "NEWTRUE", 0x89: "NEWFALSE",
    0x4A: "BININT", 0x4B: "BININT1", 0x4D: "BININT2", 0x8A: "LONG1", 0x8B: "LONG4",
    0x47: "BINFLOAT", 0x58: "BINUNICODE", 0x8C: "SHORT_BINUNICODE", 0x8D: "BINUNICODE8",
    0x55: "SHORT_BINSTRING", 0x54: "BINSTRING", 0x42: "BINBYTES", 0x43: "SHORT_BINBYTES",
    0x8E: "BINBYTES8", 0x63: "GLOBAL", 0x93: "STACK_GLOBAL", 0x52: "REDUCE", 0x62: "BUILD",
    0x81: "NEWOBJ", 0x92: "NEWOBJ_EX", 0x51: "BINPERSID", 0x68: "BINGET", 0x6A: "LONG_BINGET",
    0x71: "BINPUT", 0x72: "LONG_BINPUT", 0x94: "MEMOIZE",
}

# What torch's weights_only unpickler (torch/_weights_only_unpickler.py, torch 2.13) dispatches;
# any other opcode makes ``torch.load(weights_only=True)`` fail with "Unsupported operand".
WEIGHTS_ONLY_OPCODES = frozenset({
    "PROTO", "STOP", "MARK", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_SET", "TUPLE",
    "TUPLE1", "TUPLE2", "TUPLE3", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "NONE", "NEWTRUE",
    "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE",
    "SHORT_BINSTRING", "GLOBAL", "REDUCE", "BUILD", "NEWOBJ", "BINPERSID", "BINGET",
    "LONG_BINGET", "BINPUT", "LONG_BINPUT",
})

# Strings CPython hands out as shared singletons (see _DistinctStr).
def _is_cached_str(value: str) -> bool:
    return len(value) == 0 or (len(value) == 1 and ord(value) < 256)


class _Decoder:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.stack: list[Any] = []
        self.memo: dict[int, Any] = {}
        self.protocol = 0
        self.opcodes: set[str] = set()
        # ids of cached strings already produced by an opcode (see _DistinctStr)
        self.produced_cached: set[int] = set()
        # Tensor bookkeeping for in-place element edits, counted here because a separate walk
        # over a large optimizer state costs as much as decoding it. A tensor is referenced
        # once where REDUCE builds it and once more per memo fetch.
        self.tensors: list[TensorRebuild] = []
        self.tensor_refs: dict[int, int] = {}
        self.storage_refs: dict[str, int] = {}
        self.globals_named: set[str] = set()
        self.persistent: list[PersistentRef] = []

    def fail(self, message: str, at: int | None = None) -> PickleDecodeError:
        where = self.pos if at is None else at
        return PickleDecodeError(f"invalid pickle at byte {where}: {message}")

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise self.fail(f"truncated (wanted {n} bytes)")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def take_line(self) -> str:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            raise self.fail("unterminated text argument")
        line = self.data[self.pos:end]
        self.pos = end + 1
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"bad text argument: {exc}") from None

    def pop(self) -> Any:
        if not self.stack:
            raise self.fail("stack underflow")
        value = self.stack.pop()
        if value is _MARK:
            raise self.fail("unexpected MARK")
        return value

    def top(self) -> Any:
        if not self.stack or self.stack[-1] is _MARK:
            raise self.fail("stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        # Scan back to the last MARK; everything above it is the group.
        for index in range(len(self.stack) - 1, -1, -1):
            if self.stack[index] is _MARK:
                items = self.stack[index + 1:]
                del self.stack[index:]
                return items
        raise self.fail("no MARK on the stack")

    def push_str(self, raw: bytes) -> None:
        try:
            value = raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as exc:
            raise self.fail(f"bad UTF-8 string: {exc}") from None
        if _is_cached_str(value):
            if id(value) in self.produced_cached:
                value = _DistinctStr(value)
            else:
                self.produced_cached.add(id(value))
        self.stack.append(value)

    def memo_put(self, index: int) -> None:
        self.memo[index] = self.top()

    def memo_get(self, index: int) -> None:
        try:
            value = self.memo[index]
        except KeyError:
            raise self.fail(f"memo index {index} was never stored") from None
        if type(value) is TensorRebuild:
            self.tensor_refs[id(value)] += 1
        self.stack.append(value)

    def set_items(self, target: Any, pairs: list[Any]) -> None:
        if len(pairs) % 2:
            raise self.fail("odd number of items for SETITEMS")
        for i in range(0, len(pairs), 2):
            key, value = pairs[i], pairs[i + 1]
            if isinstance(target, dict):
                try:
                    target[key] = value
                except TypeError:
                    raise self.fail(f"unhashable dict key {type(key).__name__}") from None
            elif isinstance(target, Reduced):
                target.items.append((key, value))
            else:
                raise self.fail(f"SETITEM on {type(target).__name__}")

    def append_items(self, target: Any, values: list[Any]) -> None:
        if isinstance(target, list):
            target.extend(values)
        elif isinstance(target, Reduced):
            target.appends.extend(values)
        else:
            raise self.fail(f"APPEND on {type(target).__name__}")

    def reduce(self, func: Any, args: Any) -> Any:
        # The few reductions that stand for plain data become that data; the encoder emits
        # the same reductions for them again.
        if func == _ORDERED_DICT and args == ():
            return PickledOrderedDict()
        if (func == _CODECS_ENCODE and type(args) is tuple and len(args) == 2
                and isinstance(args[0], str) and args[1] == _LATIN1):
            try:
                return args[0].encode("latin1")
            except UnicodeEncodeError:
                pass
        if func in (_BUILTINS_BYTES, GlobalRef("builtins", "bytes")) and args == ():
            return b""
        if func == _REBUILD_TENSOR_V2:
            tensor = TensorRebuild(func, args)
            self.tensors.append(tensor)
            self.tensor_refs[id(tensor)] = 1
            return tensor
        return Reduced(func, args)

    def run(self) -> Any:  # noqa: C901 - one flat dispatch is the clearest form of an interpreter
        data = self.data
        unpack_from = struct.unpack_from
        while True:
            if self.pos >= len(data):
                raise self.fail("truncated (no STOP opcode)")
            start = self.pos
            op = data[start]
            self.pos += 1
            name = _OPCODE_NAMES.get(op)
            if name is None:
                raise self.fail(f"unsupported opcode 0x{op:02x}", start)
            self.opcodes.add(name)
            stack = self.stack
            if op == 0x71:  # BINPUT
                self.memo_put(self.take(1)[0])
            elif op == 0x68:  # BINGET
                self.memo_get(self.take(1)[0])
            elif op == 0x58:  # BINUNICODE
                (n,) = unpack_from("<I", self.take(4))
                self.push_str(self.take(n))
            elif op == 0x28:  # MARK
                stack.append(_MARK)
            elif op == 0x4B:  # BININT1
                stack.append(self.take(1)[0])
            elif op == 0x4D:  # BININT2
                stack.append(unpack_from("<H", self.take(2))[0])
            elif op == 0x4A:  # BININT
                stack.append(unpack_from("<i", self.take(4))[0])
            elif op == 0x8A:  # LONG1
                n = self.take(1)[0]
                stack.append(int.from_bytes(self.take(n), "little", signed=True))
            elif op == 0x8B:  # LONG4
                (n,) = unpack_from("<i", self.take(4))
                stack.append(int.from_bytes(self.take(n), "little", signed=True))
            elif op == 0x47:  # BINFLOAT
                stack.append(unpack_from(">d", self.take(8))[0])
            elif op == 0x7D:  # EMPTY_DICT
                stack.append({})
            elif op == 0x5D:  # EMPTY_LIST
                stack.append([])
            elif op == 0x29:  # EMPTY_TUPLE
                stack.append(())
            elif op == 0x74:  # TUPLE
                stack.append(tuple(self.pop_mark()))
            elif op in (0x85, 0x86, 0x87):  # TUPLE1..3
                count = op - 0x84
                if len(stack) < count or any(v is _MARK for v in stack[-count:]):
                    raise self.fail("stack underflow")
                items = tuple(stack[-count:])
                del stack[-count:]
                stack.append(items)
            elif op == 0x75:  # SETITEMS
                pairs = self.pop_mark()
                self.set_items(self.top(), pairs)
            elif op == 0x73:  # SETITEM
                value = self.pop()
                key = self.pop()
                self.set_items(self.top(), [key, value])
            elif op == 0x65:  # APPENDS
                values = self.pop_mark()
                self.append_items(self.top(), values)
            elif op == 0x61:  # APPEND
                value = self.pop()
                self.append_items(self.top(), [value])
            elif op == 0x4E:  # NONE
                stack.append(None)
            elif op == 0x88:  # NEWTRUE
                stack.append(True)
            elif op == 0x89:  # NEWFALSE
                stack.append(False)
            elif op == 0x63:  # GLOBAL
                module = self.take_line()
                qualname = self.take_line()
                self.globals_named.add(f"{module}.{qualname}")
                stack.append(GlobalRef(module, qualname))
            elif op == 0x93:  # STACK_GLOBAL
                qualname = self.pop()
                module = self.pop()
                if not isinstance(module, str) or not isinstance(qualname, str):
                    raise self.fail("STACK_GLOBAL needs two strings", start)
                self.globals_named.add(f"{module}.{qualname}")
                stack.append(GlobalRef(str(module), str(qualname)))
            elif op == 0x52:  # REDUCE
                args = self.pop()
                func = self.pop()
                stack.append(self.reduce(func, args))
            elif op == 0x81:  # NEWOBJ
                args = self.pop()
                cls = self.pop()
                stack.append(NewObj(cls, args))
            elif op == 0x92:  # NEWOBJ_EX: keyword arguments are kept as a third element
                kwargs = self.pop()
                args = self.pop()
                cls = self.pop()
                stack.append(NewObj(cls, (args, kwargs)))
            elif op == 0x62:  # BUILD
                state = self.pop()
                target = self.top()
                if isinstance(target, Reduced):
                    target.state, target.has_state = state, True
                elif isinstance(target, PickledOrderedDict):
                    target.pickle_state, target.pickle_has_state = state, True
                else:
                    raise self.fail(f"BUILD on {type(target).__name__}", start)
            elif op == 0x51:  # BINPERSID
                ref = PersistentRef(self.pop())
                self.persistent.append(ref)
                _, key = _storage_dtype(ref)
                if key is not None:
                    self.storage_refs[key] = self.storage_refs.get(key, 0) + 1
                stack.append(ref)
            elif op == 0x6A:  # LONG_BINGET
                self.memo_get(unpack_from("<I", self.take(4))[0])
            elif op == 0x72:  # LONG_BINPUT
                self.memo_put(unpack_from("<I", self.take(4))[0])
            elif op == 0x94:  # MEMOIZE
                self.memo_put(len(self.memo))
            elif op == 0x8C:  # SHORT_BINUNICODE
                self.push_str(self.take(self.take(1)[0]))
            elif op == 0x8D:  # BINUNICODE8
                self.push_str(self.take(unpack_from("<Q", self.take(8))[0]))
            elif op == 0x43:  # SHORT_BINBYTES
                stack.append(self.take(self.take(1)[0]))
            elif op == 0x42:  # BINBYTES
                stack.append(self.take(unpack_from("<I", self.take(4))[0]))
            elif op == 0x8E:  # BINBYTES8
                stack.append(self.take(unpack_from("<Q", self.take(8))[0]))
            elif op in (0x55, 0x54):  # SHORT_BINSTRING / BINSTRING (Python 2 ``str``)
                n = self.take(1)[0] if op == 0x55 else unpack_from("<i", self.take(4))[0]
                raw = self.take(n)
                # torch's weights_only loader decodes these as ASCII text; we do the same
                # and keep anything else as bytes.
                try:
                    stack.append(raw.decode("ascii"))
                except UnicodeDecodeError:
                    stack.append(raw)
            elif op == 0x8F:  # EMPTY_SET: kept as a recorded set() call
                stack.append(Reduced(_BUILTINS_SET, ([],)))
            elif op == 0x90:  # ADDITEMS
                values = self.pop_mark()
                target = self.top()
                if not (isinstance(target, Reduced) and target.func == _BUILTINS_SET):
                    raise self.fail("ADDITEMS on a non-set", start)
                target.args[0].extend(values)
            elif op == 0x91:  # FROZENSET
                stack.append(Reduced(GlobalRef("builtins", "frozenset"), (self.pop_mark(),)))
            elif op == 0x6C:  # LIST
                stack.append(self.pop_mark())
            elif op == 0x64:  # DICT
                pairs = self.pop_mark()
                result: dict[Any, Any] = {}
                self.set_items(result, pairs)
                stack.append(result)
            elif op == 0x30:  # POP
                if not stack:
                    raise self.fail("stack underflow", start)
                stack.pop()
            elif op == 0x31:  # POP_MARK
                self.pop_mark()
            elif op == 0x32:  # DUP
                stack.append(self.top())
            elif op == 0x80:  # PROTO
                self.protocol = self.take(1)[0]
                if self.protocol > 5:
                    raise self.fail(f"unsupported pickle protocol {self.protocol}", start)
            elif op == 0x95:  # FRAME: framing is only a read-ahead hint
                self.take(8)
            elif op == 0x2E:  # STOP
                result_value = self.pop()
                if stack:
                    raise self.fail("objects left on the stack at STOP", start)
                return result_value
            else:  # pragma: no cover - every name in _OPCODE_NAMES is handled above
                raise self.fail(f"unhandled opcode {name}", start)


def decode_pickle_info(data: bytes) -> DecodedPickle:
    """Decode a pickle stream into plain data plus placeholders, and report protocol/opcodes."""
    decoder = _Decoder(bytes(data))
    try:
        root = decoder.run()
    except RecursionError:  # pragma: no cover - the decoder is iterative; kept for safety
        raise PickleDecodeError("invalid pickle: nested too deeply") from None
    usage = TensorUsage(decoder.storage_refs, decoder.tensor_refs, tuple(decoder.tensors))
    return DecodedPickle(root, decoder.protocol, frozenset(decoder.opcodes), usage,
                         frozenset(decoder.globals_named), tuple(decoder.persistent))


def decode_pickle(data: bytes) -> Any:
    """Decode a pickle stream without importing or calling anything it names."""
    return decode_pickle_info(data).root


# --------------------------------------------------------------------------------------------
# Encoder (protocol 2, CPython's exact opcode choices)
# --------------------------------------------------------------------------------------------

_BATCHSIZE = 1000  # CPython's _BATCHSIZE for APPENDS/SETITEMS


class _Encoder:
    def __init__(self) -> None:
        self.out = bytearray()
        # Memo keyed like CPython's: by id(obj) for objects, by value for globals (CPython keys
        # on the class object, which is unique per dotted name). Values keep objects alive so
        # ids cannot be recycled while encoding.
        self.memo: dict[Any, tuple[int, Any]] = {}

    # -- memo -------------------------------------------------------------------------------
    def put(self, key: Any, obj: Any) -> None:
        index = len(self.memo)
        self.memo[key] = (index, obj)
        self.out += b"q" + bytes((index,)) if index < 256 else b"r" + struct.pack("<I", index)

    def get(self, key: Any) -> bool:
        hit = self.memo.get(key)
        if hit is None:
            return False
        index = hit[0]
        self.out += b"h" + bytes((index,)) if index < 256 else b"j" + struct.pack("<I", index)
        return True

    # -- dispatch ---------------------------------------------------------------------------
    def save(self, obj: Any) -> None:  # noqa: C901 - mirrors the pickler's type dispatch
        out = self.out
        if obj is None:
            out += b"N"
        elif obj is True:
            out += b"\x88"
        elif obj is False:
            out += b"\x89"
        elif isinstance(obj, int):
            self.save_int(obj)
        elif isinstance(obj, float):
            out += b"G" + struct.pack(">d", obj)
        elif self.get(("id", id(obj))):
            return
        elif isinstance(obj, str):
            raw = obj.encode("utf-8", "surrogatepass")
            out += b"X" + struct.pack("<I", len(raw)) + raw
            self.put(("id", id(obj)), obj)
        elif type(obj) is dict:
            out += b"}"
            self.put(("id", id(obj)), obj)
            self.save_setitems(obj.items())
        elif type(obj) is list:
            out += b"]"
            self.put(("id", id(obj)), obj)
            self.save_appends(obj)
        elif type(obj) is tuple:
            self.save_tuple(obj)
        elif isinstance(obj, OrderedDict):
            self.save_ordered_dict(obj)
        elif isinstance(obj, GlobalRef):
            self.save_global(obj)
        elif isinstance(obj, PersistentRef):
            # CPython's save_pers: the id, then BINPERSID; the result is not memoized.
            self.save(obj.pid)
            out += b"Q"
        elif isinstance(obj, Reduced):
            self.save_reduced(obj)
        elif isinstance(obj, ScalarTensorEdit):
            # The pickle keeps the original tensor; only its storage bytes change.
            self.save(obj.original)
        elif isinstance(obj, bytes):
            self.save_bytes(obj)
        else:
            raise PickleEncodeError(f"cannot encode {type(obj).__qualname__}")

    def save_int(self, value: int) -> None:
        if 0 <= value < 256:
            self.out += b"K" + bytes((value,))
        elif 0 <= value < 65536:
            self.out += b"M" + struct.pack("<H", value)
        elif -(2**31) <= value < 2**31:
            self.out += b"J" + struct.pack("<i", value)
        else:
            raw = _encode_long(value)
            if len(raw) < 256:
                self.out += b"\x8a" + bytes((len(raw),)) + raw
            else:
                self.out += b"\x8b" + struct.pack("<i", len(raw)) + raw

    def save_tuple(self, obj: tuple[Any, ...]) -> None:
        if not obj:
            self.out += b")"  # the empty tuple is a singleton; CPython never memoizes it
            return
        short = len(obj) <= 3
        if not short:
            self.out += b"("
        for item in obj:
            self.save(item)
        # A tuple containing itself (only possible through a mutable member) was memoized
        # while its items were saved; CPython then discards the copy and refers to the memo.
        if ("id", id(obj)) in self.memo:
            self.out += b"0" * len(obj) if short else b"1"
            self.get(("id", id(obj)))
            return
        self.out += bytes((0x84 + len(obj),)) if short else b"t"
        self.put(("id", id(obj)), obj)

    def save_setitems(self, items: Any) -> None:
        batch: list[tuple[Any, Any]] = []
        for pair in items:
            batch.append(pair)
            if len(batch) == _BATCHSIZE:
                self.flush_setitems(batch)
                batch = []
        if batch:
            self.flush_setitems(batch)

    def flush_setitems(self, batch: list[tuple[Any, Any]]) -> None:
        if len(batch) == 1:
            self.save(batch[0][0])
            self.save(batch[0][1])
            self.out += b"s"
            return
        self.out += b"("
        for key, value in batch:
            self.save(key)
            self.save(value)
        self.out += b"u"

    def save_appends(self, values: Any) -> None:
        for start in range(0, len(values), _BATCHSIZE):
            batch = values[start:start + _BATCHSIZE]
            if len(batch) == 1:
                self.save(batch[0])
                self.out += b"a"
                continue
            self.out += b"("
            for value in batch:
                self.save(value)
            self.out += b"e"

    def save_global(self, ref: GlobalRef) -> None:
        if self.get(("global", ref.module, ref.name)):
            return
        self.out += b"c" + ref.module.encode("utf-8") + b"\n" + ref.name.encode("utf-8") + b"\n"
        self.put(("global", ref.module, ref.name), ref)

    def save_ordered_dict(self, obj: OrderedDict[Any, Any]) -> None:
        # OrderedDict.__reduce__ is (OrderedDict, (), state-or-None, None, iter(items)).
        self.save_global(_ORDERED_DICT)
        self.out += b")R"
        self.put(("id", id(obj)), obj)
        self.save_setitems(obj.items())
        if isinstance(obj, PickledOrderedDict) and obj.pickle_has_state:
            self.save(obj.pickle_state)
            self.out += b"b"

    def save_reduced(self, obj: Reduced) -> None:
        self.save(obj.func)
        self.save(obj.args)
        self.out += b"\x81" if isinstance(obj, NewObj) else b"R"
        key = ("id", id(obj))
        if key in self.memo:  # the object was reached again through its own arguments
            self.out += b"0"
            self.get(key)
        else:
            self.put(key, obj)
        if obj.appends:
            self.save_appends(obj.appends)
        if obj.items:
            self.save_setitems(obj.items)
        if obj.has_state:
            self.save(obj.state)
            self.out += b"b"

    def save_bytes(self, obj: bytes) -> None:
        # Protocol 2 has no bytes opcode for Python 3; CPython's save_bytes reduces to
        # ``_codecs.encode(str(obj, 'latin1'), 'latin1')`` (or ``bytes()`` when empty).
        if not obj:
            self.save_global(_BUILTINS_BYTES)
            self.out += b")R"
        else:
            self.save_global(_CODECS_ENCODE)
            self.save((obj.decode("latin1"), _LATIN1))
            self.out += b"R"
        self.put(("id", id(obj)), obj)


def _encode_long(value: int) -> bytes:
    # Two's complement, little-endian, minimal length (pickle's encode_long).
    if value == 0:
        return b""
    nbytes = (value.bit_length() >> 3) + 1
    raw = value.to_bytes(nbytes, "little", signed=True)
    if value < 0 and nbytes > 1 and raw[-1] == 0xFF and (raw[-2] & 0x80):
        raw = raw[:-1]
    return raw


def encode_pickle(obj: Any, protocol: int = 2) -> bytes:
    """Encode ``obj`` exactly as CPython's pickler would at protocol 2, placeholders included."""
    if protocol != 2:
        raise PickleEncodeError(f"only pickle protocol 2 is supported (asked for {protocol})")
    encoder = _Encoder()
    encoder.out += b"\x80\x02"
    encoder.save(obj)
    encoder.out += b"."
    return bytes(encoder.out)


# --------------------------------------------------------------------------------------------
# Walking the tree: tensors, globals, structural comparison
# --------------------------------------------------------------------------------------------


def _children(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield value
        if isinstance(node, PickledOrderedDict) and node.pickle_has_state:
            yield node.pickle_state
    elif isinstance(node, (list, tuple)):
        yield from node
    elif isinstance(node, Reduced):
        yield node.func
        yield node.args
        for key, value in node.items:
            yield key
            yield value
        yield from node.appends
        if node.has_state:
            yield node.state
    elif isinstance(node, PersistentRef):
        yield node.pid
    elif isinstance(node, ScalarTensorEdit):
        yield node.original


def _walk(root: Any) -> Iterator[Any]:
    """Every node once (shared nodes are visited once), iteratively so depth cannot overflow."""
    seen: set[int] = set()
    pending = [root]
    while pending:
        node = pending.pop()
        if isinstance(node, (dict, list, tuple, Reduced, PersistentRef)):
            if id(node) in seen:
                continue
            seen.add(id(node))
        yield node
        children = list(_children(node))
        children.reverse()
        pending.extend(children)


def _scan(root: Any) -> tuple[set[str], list[PersistentRef]]:
    """One pass over the tree: the globals it refers to and its persistent references."""
    names: set[str] = set()
    persistent: list[PersistentRef] = []
    for node in _walk(root):
        if isinstance(node, GlobalRef):
            names.add(node.qualname)
        elif isinstance(node, PersistentRef):
            persistent.append(node)
        elif isinstance(node, PickledOrderedDict):
            names.add(_ORDERED_DICT.qualname)
        elif isinstance(node, bytes):
            names.add(_CODECS_ENCODE.qualname if node else _BUILTINS_BYTES.qualname)
    return names, persistent


def referenced_globals(obj: Any) -> set[str]:
    """The dotted names of every global the tree refers to (``"torch._utils.x"``)."""
    return _scan(obj)[0]


# The globals torch.load(weights_only=True) resolves without add_safe_globals, as listed by
# _get_allowed_globals() in torch/_weights_only_unpickler.py (checked against torch 2.13).
_DTYPE_NAMES = (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
    "bool", "complex128", "complex64", "complex32", "qint8", "qint32", "quint8", "quint4x2",
    "quint2x4", "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
    "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2", "bits16", "bits1x8", "bits2x4",
    "bits4x2", "bits8", "uint1", "uint2", "uint3", "uint4", "uint5", "uint6", "uint7", "int1",
    "int2", "int3", "int4", "int5", "int6", "int7",
)
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "BFloat16Storage": "bfloat16", "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64", "QInt8Storage": "qint8", "QInt32Storage": "qint32",
    "QUInt8Storage": "quint8", "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
    "UntypedStorage": "uint8",
}
_TENSOR_CLASSES = (
    "Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
)
_REBUILD_FUNCTIONS = (
    "_rebuild_parameter", "_rebuild_parameter_with_state", "_rebuild_qtensor",
    "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_sparse_tensor",
    "_rebuild_meta_tensor_no_storage", "_rebuild_nested_tensor", "_rebuild_wrapper_subclass",
    "_rebuild_device_tensor_from_numpy", "_rebuild_device_tensor_from_cpu_tensor",
)
_QSCHEMES = (
    "per_tensor_affine", "per_tensor_symmetric", "per_channel_affine", "per_channel_symmetric",
    "per_channel_affine_float_qparams",
)


def _build_allowlist() -> frozenset[str]:
    names = {
        "collections.OrderedDict", "collections.Counter", "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout", "torch.Size", "torch.Tensor", "torch.device",
        "_codecs.encode", "builtins.bytearray", "builtins.set", "builtins.complex",
        "torch._tensor._rebuild_from_type_v2", "torch.storage.TypedStorage",
        "torch.storage.UntypedStorage",
    }
    names.update(f"torch.{dtype}" for dtype in _DTYPE_NAMES)
    names.update(f"torch.{qscheme}" for qscheme in _QSCHEMES)
    names.update(f"torch._utils.{func}" for func in _REBUILD_FUNCTIONS)
    for storage in _STORAGE_DTYPES:
        if storage != "UntypedStorage":
            names.add(f"torch.{storage}")
            if not storage.startswith("Q"):
                names.add(f"torch.cuda.{storage}")
    for kind in _TENSOR_CLASSES:
        names.add(f"torch.{kind}Tensor")
        names.add(f"torch.cuda.{kind}Tensor")
        if kind != "Bool":
            names.add(f"torch.sparse.{kind}Tensor")
            names.add(f"torch.cuda.sparse.{kind}Tensor")
    return frozenset(names)


WEIGHTS_ONLY_ALLOWED_GLOBALS: frozenset[str] = _build_allowlist()

# Python 2 names the weights_only loader translates before looking them up (torch._utils).
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def weights_only_violation(
    root: Any, opcodes: frozenset[str] | None = None, *, decoded: DecodedPickle | None = None,
) -> str | None:
    """Why ``torch.load(weights_only=True)`` (default allowlist) would refuse this tree, or None.

    ``opcodes`` (from ``decode_pickle_info``) adds the check for opcodes that loader lacks.
    With ``decoded`` (the stream ``root`` came from), its opcodes, globals and persistent
    references are used as collected while decoding instead of walking the tree again.
    """
    if decoded is not None:
        opcodes = decoded.opcodes
    if opcodes is not None:
        unsupported = sorted(opcodes - WEIGHTS_ONLY_OPCODES)
        if unsupported:
            return f"uses pickle opcode(s) {', '.join(unsupported)}"
    if decoded is not None:
        names: set[str] = set(decoded.globals_named)
        persistent: list[PersistentRef] = list(decoded.persistent_refs)
    else:
        names, persistent = _scan(root)
    for name in sorted(names):
        module, _, attr = name.rpartition(".")
        normalized = f"{_PY2_MODULES.get(module, module)}.{attr}"
        if normalized not in WEIGHTS_ONLY_ALLOWED_GLOBALS:
            return f"refers to global {name}"
    for node in persistent:
        pid = node.pid
        is_storage = isinstance(pid, tuple) and len(pid) > 0 and pid[0] == "storage"
        if not is_storage and type(pid) is not int:
            return f"has a persistent reference that is not a storage ({pid!r:.60})"
    return None


@dataclass(frozen=True)
class TensorInfo:
    """What a tensor rebuild in the pickle describes (never the data itself)."""

    dtype: str
    shape: tuple[int, ...]
    storage_key: str | None
    kind: str = "tensor"  # "tensor" or "parameter"

    def __str__(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"{self.kind}({self.dtype}, shape=[{dims}])"


def _storage_dtype(ref: PersistentRef) -> tuple[str, str | None]:
    pid = ref.pid
    if isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage":
        storage_type = pid[1]
        name = storage_type.name if isinstance(storage_type, GlobalRef) else str(storage_type)
        return _STORAGE_DTYPES.get(name, name), str(pid[2])
    return "unknown", None


def _dtype_name(node: Any) -> str | None:
    if isinstance(node, GlobalRef) and node.module == "torch":
        return node.name
    return None


def tensor_info(node: Any) -> TensorInfo | None:
    """Describe ``node`` if it is a tensor/parameter rebuild call, else None."""
    if not isinstance(node, Reduced) or not isinstance(node.func, GlobalRef):
        return None
    func, args = node.func, node.args
    if not isinstance(args, tuple):
        return None
    if func.module == "torch._utils":
        if func.name in ("_rebuild_parameter", "_rebuild_parameter_with_state") and args:
            inner = tensor_info(args[0])
            if inner is not None:
                return TensorInfo(inner.dtype, inner.shape, inner.storage_key, "parameter")
            return None
        if func.name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                         "_rebuild_qtensor") and len(args) >= 3:
            storage = args[0]
            dtype, key = ("unknown", None)
            if isinstance(storage, PersistentRef):
                dtype, key = _storage_dtype(storage)
            if func.name == "_rebuild_tensor_v3" and len(args) >= 7:
                dtype = _dtype_name(args[6]) or dtype  # v3 stores untyped bytes + a dtype
            shape = tuple(args[2]) if isinstance(args[2], (tuple, list)) else ()
            return TensorInfo(dtype, tuple(int(d) for d in shape if isinstance(d, int)), key)
    if func.module == "torch._tensor" and func.name == "_rebuild_from_type_v2" and len(args) >= 3:
        inner_args = args[2]
        if isinstance(inner_args, tuple):
            return tensor_info(Reduced(args[0], inner_args))
    return None


@dataclass(frozen=True)
class ScalarSlot:
    """Where the element of a one-element ``_rebuild_tensor_v2`` tensor lives."""

    dtype: str
    shape: tuple[int, ...]
    storage_key: str
    location: str
    offset: int  # in elements
    storage_numel: int


def scalar_tensor_slot(node: Any) -> ScalarSlot | None:
    """The storage slot of a one-element tensor rebuilt by ``_rebuild_tensor_v2``, else None.

    Only the plain v2 form qualifies: ``(storage, offset, size, stride, requires_grad, hooks
    [, metadata])`` with a typed-storage persistent id ``('storage', type, key, location,
    numel)``. Anything else (parameters, v3, quantized tensors) keeps being only described.
    """
    if not isinstance(node, TensorRebuild) or not isinstance(node.args, tuple):
        return None
    args = node.args
    if len(args) < 4 or not isinstance(args[0], PersistentRef):
        return None
    pid = args[0].pid
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[3], str) and _plain_int(pid[4])):
        return None
    offset, size = args[1], args[2]
    if not _plain_int(offset) or not isinstance(size, tuple):
        return None
    if not all(_plain_int(d) for d in size) or math.prod(size) != 1:
        return None
    dtype, key = _storage_dtype(args[0])
    if key is None or not 0 <= offset < pid[4]:
        return None
    return ScalarSlot(dtype, tuple(size), key, pid[3], offset, pid[4])


def _plain_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TensorUsage:
    """How often each storage and each tensor object is used in a tree.

    A storage named by two persistent ids backs two tensors (views); a tensor object reached
    from two places is one object the pickle memo shares. Either way, rewriting its bytes in
    place would change more than the one value being edited.
    """

    storage_refs: dict[str, int]
    tensor_refs: dict[int, int]  # id(TensorRebuild) -> places it occurs
    tensors: tuple[TensorRebuild, ...]


_BRANCHES = (dict, list, tuple, Reduced, PersistentRef)


def tensor_usage(root: Any) -> TensorUsage:
    """Count storage references and tensor occurrences in one pass over the tree.

    Every read runs this over optimizer states with tens of thousands of nodes, so unlike
    ``_walk`` it queues only nodes that can have children and visits each edge once.
    """
    storage_refs: dict[str, int] = {}
    tensor_refs: dict[int, int] = {}
    tensors: list[TensorRebuild] = []
    seen: set[int] = set()
    pending = [root]
    while pending:
        node = pending.pop()
        if isinstance(node, ScalarTensorEdit):
            node = node.original  # an edit stands where its tensor was
        if isinstance(node, TensorRebuild):
            tensor_refs[id(node)] = tensor_refs.get(id(node), 0) + 1
        if not isinstance(node, _BRANCHES) or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, PersistentRef):
            _, key = _storage_dtype(node)
            if key is not None:
                storage_refs[key] = storage_refs.get(key, 0) + 1
        elif isinstance(node, TensorRebuild):
            tensors.append(node)
        pending.extend(child for child in _children(node)
                       if isinstance(child, (*_BRANCHES, ScalarTensorEdit)))
    return TensorUsage(storage_refs, tensor_refs, tuple(tensors))


def find_scalar_edits(root: Any) -> list[ScalarTensorEdit]:
    """Every pending in-place tensor element edit in the tree."""
    return [node for node in _walk(root) if isinstance(node, ScalarTensorEdit)]


def find_tensors(root: Any) -> list[Reduced]:
    """Every tensor rebuild in the tree, in pickle order (shared tensors once).

    The ``_rebuild_tensor_v2`` inside a ``_rebuild_parameter`` is part of one tensor, so only
    the outer call is listed.
    """
    found = [node for node in _walk(root) if tensor_info(node) is not None]
    inner = {id(node.args[0]) for node in found
             if isinstance(node.args, tuple) and node.args and isinstance(node.args[0], Reduced)}
    return [node for node in found if id(node) not in inner]


def describe(node: Any) -> str:
    """A short human description of a placeholder: ``tensor(float32, shape=[3, 4])``.

    A one-element tensor whose element was read shows it: ``tensor(float32, value=0.001)``.
    """
    if isinstance(node, ScalarTensorEdit):
        return _describe_scalar(node.original, node.scalar)
    if isinstance(node, TensorRebuild) and node.scalar is not None:
        return _describe_scalar(node, node.scalar)
    info = tensor_info(node)
    if info is not None:
        return str(info)
    if isinstance(node, PersistentRef):
        dtype, key = _storage_dtype(node)
        pid = node.pid
        numel = pid[4] if isinstance(pid, tuple) and len(pid) >= 5 else "?"
        return f"storage({dtype}, numel={numel}, key={key})"
    if isinstance(node, GlobalRef):
        return f"global({node.qualname})"
    if isinstance(node, Reduced):
        func = node.func
        name = func.qualname if isinstance(func, GlobalRef) else type(func).__name__
        if name == "torch.Size" and isinstance(node.args, tuple) and node.args:
            return f"torch.Size({list(node.args[0])})"
        if name == "torch.device" and isinstance(node.args, tuple):
            return f"device({', '.join(repr(a) for a in node.args)})"
        return f"object({name})"
    return type(node).__name__


def _describe_scalar(node: TensorRebuild, scalar: TensorScalar) -> str:
    info = tensor_info(node)
    shape = info.shape if info is not None else ()
    dims = f"shape=[{', '.join(str(d) for d in shape)}], " if shape else ""
    return f"tensor({scalar.dtype}, {dims}value={scalar.text})"


# --------------------------------------------------------------------------------------------
# Structural comparison that also checks sharing
# --------------------------------------------------------------------------------------------


def _kind(node: Any) -> str:
    if node is None or isinstance(node, bool):
        return repr(node)
    if isinstance(node, OrderedDict):
        return "OrderedDict"
    for kind in (int, float, str, bytes, dict, list, tuple):
        if isinstance(node, kind):
            return kind.__name__
    return type(node).__name__


def _same_float(a: float, b: float) -> bool:
    # Bit equality: distinguishes -0.0 from 0.0 and compares NaNs by payload.
    return struct.pack(">d", a) == struct.pack(">d", b)


def tree_difference(a: Any, b: Any) -> str | None:
    """Where two decoded trees differ, or None when equal *and* shared the same way.

    Containers shared in ``a`` (same object at two places) must be shared in ``b`` at the same
    places and vice versa; that is what the pickle memo preserves.
    """
    pairs_ab: dict[int, int] = {}
    pairs_ba: dict[int, int] = {}
    keep: list[Any] = []  # hold compared objects so ids stay unique during the walk
    pending: list[tuple[Any, Any, str]] = [(a, b, "$")]
    while pending:
        x, y, path = pending.pop()
        # A pending element edit pickles as its original tensor (its bytes are checked apart).
        if isinstance(x, ScalarTensorEdit):
            x = x.original
        if isinstance(y, ScalarTensorEdit):
            y = y.original
        kx, ky = _kind(x), _kind(y)
        if kx != ky:
            return f"{path}: {kx} != {ky}"
        if isinstance(x, (dict, list, Reduced, PersistentRef)) or (
                isinstance(x, tuple) and len(x) > 0):
            seen_x, seen_y = pairs_ab.get(id(x)), pairs_ba.get(id(y))
            if seen_x is not None or seen_y is not None:
                if seen_x != id(y) or seen_y != id(x):
                    return f"{path}: shared differently"
                continue
            pairs_ab[id(x)], pairs_ba[id(y)] = id(y), id(x)
            keep.append((x, y))
        if isinstance(x, float):
            if not _same_float(x, y):
                return f"{path}: {x!r} != {y!r}"
        elif isinstance(x, (int, str, bytes)) or x is None:
            if x != y:
                return f"{path}: {x!r:.80} != {y!r:.80}"
        elif isinstance(x, dict):
            if list(x.keys()) != list(y.keys()):
                return f"{path}: keys {list(x.keys())!r:.120} != {list(y.keys())!r:.120}"
            for key in reversed(list(x.keys())):
                pending.append((x[key], y[key], f"{path}.{key}"))
            # an OrderedDict's BUILD state (its __dict__), absent for plain dicts
            state_x = getattr(x, "pickle_state", None) if getattr(x, "pickle_has_state", False) \
                else None
            state_y = getattr(y, "pickle_state", None) if getattr(y, "pickle_has_state", False) \
                else None
            pending.append((state_x, state_y, f"{path}.<state>"))
        elif isinstance(x, (list, tuple)):
            if len(x) != len(y):
                return f"{path}: length {len(x)} != {len(y)}"
            for index in range(len(x) - 1, -1, -1):
                pending.append((x[index], y[index], f"{path}.{index}"))
        elif isinstance(x, GlobalRef):
            if x != y:
                return f"{path}: {x.qualname} != {y.qualname}"
        elif isinstance(x, PersistentRef):
            pending.append((x.pid, y.pid, f"{path}.<pid>"))
        elif isinstance(x, Reduced):
            if x.has_state != y.has_state or len(x.items) != len(y.items) or len(
                    x.appends) != len(y.appends):
                return f"{path}: {describe(x)} != {describe(y)}"
            pending.append((x.func, y.func, f"{path}.<func>"))
            pending.append((x.args, y.args, f"{path}.<args>"))
            pending.append((list(x.items), list(y.items), f"{path}.<items>"))
            pending.append((list(x.appends), list(y.appends), f"{path}.<appends>"))
            if x.has_state:
                pending.append((x.state, y.state, f"{path}.<state>"))
        else:
            if x != y:
                return f"{path}: {x!r:.80} != {y!r:.80}"
    del keep
    return None
