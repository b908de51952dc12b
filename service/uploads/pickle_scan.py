"""A static scan of a ``torch.save`` pickle: what it would build, found without unpickling it.

Nothing here executes or imports anything a pickle names. The scan follows the opcodes with a
symbolic stack and refuses every global, call and opcode a plain state dict does not need.
"""

from __future__ import annotations

import math
import pickletools
from dataclasses import dataclass
from typing import Any

from .common import UploadRejected

# Bytes per element of the storage classes torch.save writes for a dense state dict; an
# UntypedStorage counts bytes. Names as they appear in the pickle (module.name).
STORAGE_ITEMSIZE: dict[str, int] = {
    "torch.DoubleStorage": 8,
    "torch.FloatStorage": 4,
    "torch.HalfStorage": 2,
    "torch.BFloat16Storage": 2,
    "torch.LongStorage": 8,
    "torch.IntStorage": 4,
    "torch.ShortStorage": 2,
    "torch.CharStorage": 1,
    "torch.ByteStorage": 1,
    "torch.BoolStorage": 1,
    "torch.ComplexDoubleStorage": 16,
    "torch.ComplexFloatStorage": 8,
    "torch.storage.UntypedStorage": 1,
}
# dtypes that _rebuild_tensor_v3 names (those without a legacy storage class), as torch.save
# writes them; every one is also in torch.load(weights_only=True)'s allowlist.
_TORCH_DTYPES: frozenset[str] = frozenset(
    f"torch.{d}"
    for d in (
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
        "uint16",
        "uint32",
        "uint64",
        "complex32",
        "bits8",
        "bits16",
        "bits1x8",
        "bits2x4",
        "bits4x2",
    )
)
_REBUILD_TENSOR = frozenset({"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3"})
_REBUILD_PARAMETER = frozenset(
    {"torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"}
)
_ORDERED_DICT = "collections.OrderedDict"
# What a state dict saved by torch.save may name, and nothing else: a strict subset of what
# torch.load(weights_only=True) accepts (a test checks that), so the API never accepts a file
# the worker's loader would refuse for its globals.
ALLOWED_PICKLE_GLOBALS: frozenset[str] = frozenset(
    {_ORDERED_DICT, *_REBUILD_TENSOR, *_REBUILD_PARAMETER, *STORAGE_ITEMSIZE, *_TORCH_DTYPES}
)
# The only callables the pickle may invoke (REDUCE) or instantiate (NEWOBJ).
_CALLABLE_GLOBALS = frozenset({_ORDERED_DICT, *_REBUILD_TENSOR, *_REBUILD_PARAMETER})
# Opcodes torch's weights-only unpickler implements (torch/_weights_only_unpickler.py, torch
# 2.14): the protocol-2 subset torch.save writes. A pickle using others (protocol 4's FRAME,
# MEMOIZE, STACK_GLOBAL ...) is not necessarily unsafe, but the worker could not load it.
TORCH_OPCODES = frozenset(
    {
        "APPEND", "APPENDS", "BINFLOAT", "BINGET", "BININT", "BININT1", "BININT2",
        "BINPERSID", "BINPUT", "BINUNICODE", "BUILD", "EMPTY_DICT", "EMPTY_LIST",
        "EMPTY_SET", "EMPTY_TUPLE", "GLOBAL", "LONG1", "LONG_BINGET", "LONG_BINPUT",
        "MARK", "NEWFALSE", "NEWOBJ", "NEWTRUE", "NONE", "PROTO", "REDUCE", "SETITEM",
        "SETITEMS", "SHORT_BINSTRING", "STOP", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    }
)  # fmt: skip


# Symbolic values of the scan: just enough of each object to check what is called on it.
@dataclass(frozen=True)
class _Global:
    name: str


@dataclass(frozen=True)
class _Str:
    value: str


@dataclass(frozen=True)
class _Int:
    value: int


@dataclass(frozen=True)
class _Tuple:
    items: tuple[object, ...]


@dataclass(frozen=True)
class _Storage:
    cls: str
    key: str
    numel: int


@dataclass(frozen=True)
class _Tensor:
    shape: tuple[int, ...]


class _Dict:
    """A dict or OrderedDict; remembers which string keys hold tensors (the state dict)."""

    def __init__(self, ordered: bool) -> None:
        self.ordered = ordered
        self.tensors: dict[str, tuple[int, ...]] = {}


class _List:
    pass


class _Set:
    pass


class _Other:
    """A plain value (None, bool, float, bytes, ...) that no opcode can call into."""


_OTHER = _Other()


@dataclass(frozen=True)
class PickleScan:
    """What a state dict's pickle references, from :func:`scan_state_dict_pickle`."""

    protocol: int
    globals: frozenset[str]
    storages: dict[str, tuple[str, int]]  # record key -> (storage class, numel)
    tensors: dict[str, tuple[int, ...]]  # top-level state-dict key -> shape
    n_tensors: int
    parameters: int
    unsupported_opcodes: frozenset[str]


class _Unsafe(Exception):
    pass


class _Malformed(Exception):
    pass


def _shape_of(value: object) -> tuple[int, ...]:
    if not isinstance(value, _Tuple) or not all(
        isinstance(v, _Int) and v.value >= 0 for v in value.items
    ):
        raise _Malformed("a tensor's size is not a tuple of non-negative integers")
    return tuple(v.value for v in value.items if isinstance(v, _Int))


def scan_state_dict_pickle(data: bytes) -> PickleScan:
    """Walk a pickle's opcodes with a symbolic stack, never unpickling; refuse anything unsafe.

    Only the globals in :data:`ALLOWED_PICKLE_GLOBALS` may be referenced (GLOBAL or
    STACK_GLOBAL), only OrderedDict and torch's tensor rebuild functions may be called (REDUCE,
    NEWOBJ), BUILD only sets an OrderedDict's attributes, items go only into dicts, lists and
    sets, and persistent ids must be storage records. INST, OBJ, EXT* and out-of-band buffers
    are refused outright. Raises ``ValueError`` (malformed) or :class:`UploadRejected`
    (``unsafe_pickle``).
    """
    stack: list[object] = []
    metastack: list[list[object]] = []
    memo: dict[int, object] = {}
    globals_seen: set[str] = set()
    storages: dict[str, tuple[str, int]] = {}
    unsupported: set[str] = set()
    protocol = 0
    n_tensors = 0
    parameters = 0
    result: object = None

    # As in pickle itself, MARK moves the current stack onto ``metastack`` and starts an empty
    # one; pop_mark() returns the items pushed since and restores the outer stack.
    def pop() -> object:
        if not stack:
            raise _Malformed("stack underflow")
        return stack.pop()

    def pop_mark() -> list[object]:
        nonlocal stack
        if not metastack:
            raise _Malformed("no MARK to pop to")
        items = stack
        stack = metastack.pop()
        return items

    def top() -> object:
        if not stack:
            raise _Malformed("stack underflow")
        return stack[-1]

    def check_global(name: str) -> _Global:
        globals_seen.add(name)
        if name not in ALLOWED_PICKLE_GLOBALS:
            raise _Unsafe(
                f"references the global {name}, which a state dict never needs (allowed: "
                "collections.OrderedDict, torch._utils tensor rebuild functions, torch storage "
                "classes and dtypes)"
            )
        return _Global(name)

    def setitem(target: object, key: object, value: object) -> None:
        if not isinstance(target, _Dict):
            raise _Unsafe("sets items on an object that is not a dict")
        if isinstance(key, _Str) and isinstance(value, _Tensor):
            target.tensors[key.value] = value.shape

    position: int | None = 0
    try:
        for opcode, raw_arg, pos in pickletools.genops(data):
            position = pos  # for the error message of a malformed pickle
            op = opcode.name
            arg: Any = raw_arg  # typed per opcode by pickletools (int, str, bytes, ...)
            if op not in TORCH_OPCODES:
                unsupported.add(op)
            if op == "PROTO":
                protocol = int(arg)
            elif op in ("FRAME", "MARK"):
                if op == "MARK":
                    metastack.append(stack)
                    stack = []
            elif op == "STOP":
                result = pop()
                break
            elif op in ("GLOBAL", "INST"):
                module, _, name = str(arg).partition(" ")
                full = f"{module}.{name}"
                if op == "INST":
                    globals_seen.add(full)
                    raise _Unsafe(f"instantiates {full} with the INST opcode")
                stack.append(check_global(full))
            elif op == "STACK_GLOBAL":
                name_v, module_v = pop(), pop()
                if not isinstance(name_v, _Str) or not isinstance(module_v, _Str):
                    raise _Unsafe("STACK_GLOBAL with a computed name")
                stack.append(check_global(f"{module_v.value}.{name_v.value}"))
            elif op == "OBJ":
                obj_items = pop_mark()
                cls = obj_items[0] if obj_items else None
                label = cls.name if isinstance(cls, _Global) else "an object"
                raise _Unsafe(f"instantiates {label} with the OBJ opcode")
            elif op in ("EXT1", "EXT2", "EXT4"):
                raise _Unsafe(f"uses the copyreg extension registry ({op} {arg})")
            elif op in ("NEXT_BUFFER", "READONLY_BUFFER", "PERSID"):
                raise _Unsafe(f"uses the {op} opcode, which a state dict never needs")
            elif op == "REDUCE":
                args, func = pop(), pop()
                if not isinstance(func, _Global) or func.name not in _CALLABLE_GLOBALS:
                    what = func.name if isinstance(func, _Global) else "a non-global object"
                    raise _Unsafe(f"calls {what} (REDUCE), which a state dict never needs")
                if not isinstance(args, _Tuple):
                    raise _Malformed("REDUCE arguments are not a tuple")
                if func.name == _ORDERED_DICT:
                    stack.append(_Dict(ordered=True))
                elif func.name in _REBUILD_TENSOR:
                    if len(args.items) < 4 or not isinstance(args.items[0], _Storage):
                        raise _Malformed("a tensor rebuilt without a storage")
                    shape = _shape_of(args.items[2])
                    n_tensors += 1
                    parameters += math.prod(shape)
                    stack.append(_Tensor(shape))
                else:  # _rebuild_parameter*: wraps a tensor already counted
                    if not args.items or not isinstance(args.items[0], _Tensor):
                        raise _Malformed("a parameter rebuilt from something not a tensor")
                    stack.append(args.items[0])
            elif op in ("NEWOBJ", "NEWOBJ_EX"):
                if op == "NEWOBJ_EX":
                    pop()  # kwargs
                pop()  # args
                cls = pop()
                if not isinstance(cls, _Global) or cls.name != _ORDERED_DICT:
                    what = cls.name if isinstance(cls, _Global) else "a non-global object"
                    raise _Unsafe(f"instantiates {what} (NEWOBJ), which a state dict never needs")
                stack.append(_Dict(ordered=True))
            elif op == "BUILD":
                pop()  # the state
                target = top()
                if not (isinstance(target, _Dict) and target.ordered):
                    what = target.name if isinstance(target, _Global) else type(target).__name__
                    raise _Unsafe(f"sets the state of {what.lstrip('_')} (BUILD)")
            elif op == "BINPERSID":
                pid = pop()
                fields = pid.items if isinstance(pid, _Tuple) else ()
                storage_cls = fields[1] if len(fields) == 5 else None
                record = fields[2] if len(fields) == 5 else None
                count = fields[4] if len(fields) == 5 else None
                if not (
                    fields[:1] == (_Str("storage"),)
                    and isinstance(storage_cls, _Global)
                    and storage_cls.name in STORAGE_ITEMSIZE
                    and isinstance(record, _Str)
                    and isinstance(count, _Int)
                ):
                    raise _Unsafe("loads a persistent object that is not a tensor storage")
                cls_name, key, numel = storage_cls.name, record.value, count.value
                storages[key] = (cls_name, numel)
                stack.append(_Storage(cls_name, key, numel))
            elif op in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = top()
            elif op == "MEMOIZE":
                memo[len(memo)] = top()
            elif op in ("GET", "BINGET", "LONG_BINGET"):
                if int(arg) not in memo:
                    raise _Malformed(f"memo key {arg} read before it is written")
                stack.append(memo[int(arg)])
            elif op in (
                "UNICODE",
                "SHORT_BINUNICODE",
                "BINUNICODE",
                "BINUNICODE8",
                "STRING",
                "BINSTRING",
                "SHORT_BINSTRING",
            ):
                stack.append(_Str(str(arg)))
            elif op in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"):
                stack.append(_Int(int(arg)) if not isinstance(arg, bool) else _OTHER)
            elif op in ("EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "TUPLE"):
                if op == "TUPLE":
                    # pop_mark() rebinds ``stack``: take the items before naming the list.
                    marked = _Tuple(tuple(pop_mark()))
                    stack.append(marked)
                else:
                    n = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}[op]
                    items_t = [pop() for _ in range(n)][::-1]
                    stack.append(_Tuple(tuple(items_t)))
            elif op in ("EMPTY_DICT", "DICT"):
                new = _Dict(ordered=False)
                if op == "DICT":
                    pairs = pop_mark()
                    if len(pairs) % 2:
                        raise _Malformed("DICT with an odd number of items")
                    for k, v in zip(pairs[::2], pairs[1::2], strict=True):
                        setitem(new, k, v)
                stack.append(new)
            elif op == "SETITEM":
                value, key_v = pop(), pop()
                setitem(top(), key_v, value)
            elif op == "SETITEMS":
                pairs = pop_mark()
                if len(pairs) % 2:
                    raise _Malformed("SETITEMS with an odd number of items")
                target_d = top()
                for k, v in zip(pairs[::2], pairs[1::2], strict=True):
                    setitem(target_d, k, v)
            elif op in ("EMPTY_LIST", "LIST"):
                if op == "LIST":
                    pop_mark()
                stack.append(_List())
            elif op in ("APPEND", "APPENDS"):
                if op == "APPEND":
                    pop()
                else:
                    pop_mark()
                if not isinstance(top(), _List):
                    raise _Unsafe("appends to an object that is not a list")
            elif op in ("EMPTY_SET", "FROZENSET"):
                if op == "FROZENSET":
                    pop_mark()
                stack.append(_Set())
            elif op == "ADDITEMS":
                pop_mark()
                if not isinstance(top(), _Set):
                    raise _Unsafe("adds items to an object that is not a set")
            elif op == "POP":
                if stack:
                    pop()
                else:
                    pop_mark()  # POP right after a MARK discards the mark, as pickle does
            elif op == "POP_MARK":
                pop_mark()
            elif op == "DUP":
                stack.append(top())
            elif op in (
                "NONE",
                "NEWTRUE",
                "NEWFALSE",
                "FLOAT",
                "BINFLOAT",
                "BINBYTES",
                "SHORT_BINBYTES",
                "BINBYTES8",
                "BYTEARRAY8",
            ):
                stack.append(_OTHER)
            else:  # an opcode this scanner does not model: refuse rather than guess
                raise _Unsafe(f"uses the {op} opcode, which a state dict never needs")
        else:
            raise _Malformed("no STOP opcode")
    except _Unsafe as exc:
        raise UploadRejected(
            f"unsafe pickle: {exc}; only plain state dicts (torch.save(model.state_dict(), f)) "
            "are accepted",
            code="unsafe_pickle",
            globals=sorted(globals_seen - ALLOWED_PICKLE_GLOBALS),
        ) from None
    except _Malformed as exc:
        raise ValueError(f"{exc} at byte {position}") from None
    if not isinstance(result, _Dict):
        raise ValueError("the pickle does not hold a dict (a state dict)")
    return PickleScan(
        protocol=protocol,
        globals=frozenset(globals_seen),
        storages=storages,
        tensors=dict(result.tensors),
        n_tensors=n_tensors,
        parameters=parameters,
        unsupported_opcodes=frozenset(unsupported),
    )
