"""A static scan of a ``torch.save`` pickle: what it would build, found without unpickling it.

Nothing here executes or imports anything a pickle names. :func:`scan_state_dict_pickle` walks
the opcodes (``pickletools.genops``) with a symbolic stack, and three tables say what a plain
state dict may do; everything else is refused:

:data:`ALLOWED_GLOBALS`
    the only globals a pickle may name (GLOBAL, STACK_GLOBAL), each with what it may build:
    what a call (REDUCE) returns, and whether NEWOBJ may instantiate it. Storage classes and
    dtypes may only be named.
:data:`OPCODES`
    the only opcodes the scan follows, each with its effect on the stack and memo (in
    pickletools' notation: what it pops -> what it pushes) and the step that models it.
:data:`REFUSED_OPCODES`
    why the opcodes that build arbitrary objects are refused (INST, OBJ, the copyreg
    extension registry); an opcode in neither table "is never needed by a state dict".

:data:`TORCH_OPCODES` is a fourth, narrower list: what torch's weights-only loader implements.
A pickle the scan accepts but that uses other opcodes is safe, yet the worker could not load
it; :mod:`.torch_model` refuses it with its own code.
"""

from __future__ import annotations

import math
import pickletools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .common import UploadRejected


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


def scan_state_dict_pickle(data: bytes) -> PickleScan:
    """Walk a pickle's opcodes with a symbolic stack, never unpickling; refuse anything unsafe.

    Only the globals in :data:`ALLOWED_GLOBALS` may be referenced, called or instantiated, and
    only as that table says; only the opcodes in :data:`OPCODES` are followed; BUILD only sets
    an OrderedDict's attributes, items go only into dicts, lists and sets, and persistent ids
    must be storage records. Raises ``ValueError`` (malformed) or :class:`UploadRejected`
    (``unsafe_pickle``).
    """
    scan = _Scan()
    position: int | None = 0  # of the current opcode, for the message of a malformed pickle
    try:
        for opcode, arg, pos in pickletools.genops(data):
            position = pos
            _step(scan, opcode.name, arg)
            if scan.stopped:
                break
        else:
            raise _Malformed("no STOP opcode")
    except _Unsafe as exc:
        raise UploadRejected(
            f"unsafe pickle: {exc}; only plain state dicts (torch.save(model.state_dict(), f)) "
            "are accepted",
            code="unsafe_pickle",
            globals=sorted(g for g in scan.globals_seen if g not in ALLOWED_GLOBALS),
        ) from None
    except _Malformed as exc:
        raise ValueError(f"{exc} at byte {position}") from None
    if not isinstance(scan.result, _Dict):
        raise ValueError("the pickle does not hold a dict (a state dict)")
    return PickleScan(
        protocol=scan.protocol,
        globals=frozenset(scan.globals_seen),
        storages=scan.storages,
        tensors=dict(scan.result.tensors),
        n_tensors=scan.n_tensors,
        parameters=scan.parameters,
        unsupported_opcodes=frozenset(scan.unsupported),
    )


def _step(scan: _Scan, op: str, arg: Any) -> None:
    """One opcode: followed as :data:`OPCODES` says, or refused."""
    if op not in TORCH_OPCODES:
        scan.unsupported.add(op)
    rule = OPCODES.get(op)
    if rule is None:
        why = REFUSED_OPCODES.get(op, _never_needed)
        raise _Unsafe(why(scan, op, arg))
    rule.run(scan, arg)


class _Unsafe(Exception):
    """The pickle does something a state dict never does: refused as ``unsafe_pickle``."""


class _Malformed(Exception):
    """The pickle is not well formed (pickle itself would fail to load it)."""


# ---- symbolic values: just enough of each object to check what is done with it -------------
# (BUILD's refusal names a value by its class name without the underscore: keep the names.)


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


# ---- the scanner's state ---------------------------------------------------------------------


class _Scan:
    """The symbolic stack and memo, and what the pickle has referenced so far.

    As in pickle itself, MARK moves the current stack onto ``metastack`` and starts an empty
    one; :meth:`pop_mark` returns the items pushed since and restores the outer stack.
    """

    def __init__(self) -> None:
        self.stack: list[object] = []
        self.metastack: list[list[object]] = []
        self.memo: dict[int, object] = {}
        self.globals_seen: set[str] = set()
        self.storages: dict[str, tuple[str, int]] = {}
        self.unsupported: set[str] = set()
        self.protocol = 0
        self.n_tensors = 0
        self.parameters = 0
        self.stopped = False
        self.result: object = None

    def push(self, value: object) -> None:
        self.stack.append(value)

    def pop(self) -> object:
        if not self.stack:
            raise _Malformed("stack underflow")
        return self.stack.pop()

    def top(self) -> object:
        if not self.stack:
            raise _Malformed("stack underflow")
        return self.stack[-1]

    def mark(self) -> None:
        self.metastack.append(self.stack)
        self.stack = []

    def pop_mark(self) -> list[object]:
        if not self.metastack:
            raise _Malformed("no MARK to pop to")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def named_global(self, name: str) -> _Global:
        """A global the pickle names: remembered, and refused unless :data:`ALLOWED_GLOBALS`
        holds it."""
        self.globals_seen.add(name)
        if name not in ALLOWED_GLOBALS:
            raise _Unsafe(
                f"references the global {name}, which a state dict never needs (allowed: "
                "collections.OrderedDict, torch._utils tensor rebuild functions, torch storage "
                "classes and dtypes)"
            )
        return _Global(name)


# ---- globals: what each allowed one may build ----------------------------------------------

Builder = Callable[[_Scan, _Tuple], object]


def _ordered_dict(scan: _Scan, args: _Tuple) -> object:
    return _Dict(ordered=True)


def _rebuild_tensor(scan: _Scan, args: _Tuple) -> object:
    """``_rebuild_tensor_v2/v3(storage, offset, size, stride, ...)``: a tensor, counted."""
    if len(args.items) < 4 or not isinstance(args.items[0], _Storage):
        raise _Malformed("a tensor rebuilt without a storage")
    shape = _shape_of(args.items[2])
    scan.n_tensors += 1
    scan.parameters += math.prod(shape)
    return _Tensor(shape)


def _rebuild_parameter(scan: _Scan, args: _Tuple) -> object:
    """``_rebuild_parameter*(tensor, requires_grad, ...)``: the tensor, already counted."""
    if not args.items or not isinstance(args.items[0], _Tensor):
        raise _Malformed("a parameter rebuilt from something not a tensor")
    return args.items[0]


def _shape_of(value: object) -> tuple[int, ...]:
    if not isinstance(value, _Tuple) or not all(
        isinstance(v, _Int) and v.value >= 0 for v in value.items
    ):
        raise _Malformed("a tensor's size is not a tuple of non-negative integers")
    return tuple(v.value for v in value.items if isinstance(v, _Int))


@dataclass(frozen=True)
class GlobalRule:
    """What a pickle may do with one global besides naming it."""

    role: str  # what a state dict uses it for
    call: Builder | None = None  # REDUCE may call it; what the call builds
    instantiate: bool = False  # NEWOBJ may instantiate it (an empty OrderedDict)


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
TORCH_DTYPES: frozenset[str] = frozenset(
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
_TENSOR = GlobalRule("a tensor from (storage, offset, size, stride)", call=_rebuild_tensor)
_PARAMETER = GlobalRule("a Parameter around a tensor", call=_rebuild_parameter)
# What a state dict saved by torch.save may name, and nothing else: a strict subset of what
# torch.load(weights_only=True) accepts (a test checks that), so the API never accepts a file
# the worker's loader would refuse for its globals.
ALLOWED_GLOBALS: dict[str, GlobalRule] = {
    "collections.OrderedDict": GlobalRule(
        "the state dict itself", call=_ordered_dict, instantiate=True
    ),
    "torch._utils._rebuild_tensor_v2": _TENSOR,
    "torch._utils._rebuild_tensor_v3": _TENSOR,
    "torch._utils._rebuild_parameter": _PARAMETER,
    "torch._utils._rebuild_parameter_with_state": _PARAMETER,
    **{name: GlobalRule("a storage class, in a persistent id") for name in STORAGE_ITEMSIZE},
    **{name: GlobalRule("a dtype, an argument of _rebuild_tensor_v3") for name in TORCH_DTYPES},
}
ALLOWED_PICKLE_GLOBALS: frozenset[str] = frozenset(ALLOWED_GLOBALS)


# ---- opcodes: one small step each ----------------------------------------------------------

Step = Callable[[_Scan, Any], None]  # (scan, the opcode's argument as pickletools decodes it)


def _protocol(scan: _Scan, arg: Any) -> None:
    scan.protocol = int(arg)


def _no_effect(scan: _Scan, arg: Any) -> None:
    pass


def _stop(scan: _Scan, arg: Any) -> None:
    scan.result = scan.pop()
    scan.stopped = True


def _push_other(scan: _Scan, arg: Any) -> None:
    scan.push(_OTHER)


def _push_int(scan: _Scan, arg: Any) -> None:
    # INT with "00"/"01" is how protocol 0 writes False/True
    scan.push(_Int(int(arg)) if not isinstance(arg, bool) else _OTHER)


def _push_str(scan: _Scan, arg: Any) -> None:
    scan.push(_Str(str(arg)))


def _mark(scan: _Scan, arg: Any) -> None:
    scan.mark()


def _pop(scan: _Scan, arg: Any) -> None:
    if scan.stack:
        scan.pop()
    else:
        scan.pop_mark()  # POP right after a MARK discards the mark, as pickle does


def _pop_mark(scan: _Scan, arg: Any) -> None:
    scan.pop_mark()


def _dup(scan: _Scan, arg: Any) -> None:
    scan.push(scan.top())


def _memo_put(scan: _Scan, arg: Any) -> None:
    scan.memo[int(arg)] = scan.top()


def _memoize(scan: _Scan, arg: Any) -> None:
    scan.memo[len(scan.memo)] = scan.top()


def _memo_get(scan: _Scan, arg: Any) -> None:
    if int(arg) not in scan.memo:
        raise _Malformed(f"memo key {arg} read before it is written")
    scan.push(scan.memo[int(arg)])


def _tuple_of(n: int) -> Step:
    """EMPTY_TUPLE, TUPLE1, TUPLE2, TUPLE3: a tuple of the top ``n`` items."""

    def step(scan: _Scan, arg: Any) -> None:
        items = [scan.pop() for _ in range(n)][::-1]
        scan.push(_Tuple(tuple(items)))

    return step


def _tuple_from_mark(scan: _Scan, arg: Any) -> None:
    items = scan.pop_mark()
    scan.push(_Tuple(tuple(items)))


def _empty_list(scan: _Scan, arg: Any) -> None:
    scan.push(_List())


def _list_from_mark(scan: _Scan, arg: Any) -> None:
    scan.pop_mark()
    scan.push(_List())


def _append(scan: _Scan, arg: Any) -> None:
    scan.pop()
    _require_list(scan.top())


def _appends(scan: _Scan, arg: Any) -> None:
    scan.pop_mark()
    _require_list(scan.top())


def _require_list(target: object) -> None:
    if not isinstance(target, _List):
        raise _Unsafe("appends to an object that is not a list")


def _empty_dict(scan: _Scan, arg: Any) -> None:
    scan.push(_Dict(ordered=False))


def _dict_from_mark(scan: _Scan, arg: Any) -> None:
    new = _Dict(ordered=False)
    for key, value in _pairs(scan.pop_mark(), "DICT"):
        _set_item(new, key, value)
    scan.push(new)


def _setitem(scan: _Scan, arg: Any) -> None:
    value, key = scan.pop(), scan.pop()
    _set_item(scan.top(), key, value)


def _setitems(scan: _Scan, arg: Any) -> None:
    pairs = _pairs(scan.pop_mark(), "SETITEMS")
    target = scan.top()
    for key, value in pairs:
        _set_item(target, key, value)


def _pairs(items: list[object], op: str) -> list[tuple[object, object]]:
    if len(items) % 2:
        raise _Malformed(f"{op} with an odd number of items")
    return list(zip(items[::2], items[1::2], strict=True))


def _set_item(target: object, key: object, value: object) -> None:
    """Items go only into dicts; a tensor under a string key is a state-dict entry."""
    if not isinstance(target, _Dict):
        raise _Unsafe("sets items on an object that is not a dict")
    if isinstance(key, _Str) and isinstance(value, _Tensor):
        target.tensors[key.value] = value.shape


def _empty_set(scan: _Scan, arg: Any) -> None:
    scan.push(_Set())


def _set_from_mark(scan: _Scan, arg: Any) -> None:
    scan.pop_mark()
    scan.push(_Set())


def _additems(scan: _Scan, arg: Any) -> None:
    scan.pop_mark()
    if not isinstance(scan.top(), _Set):
        raise _Unsafe("adds items to an object that is not a set")


def _global(scan: _Scan, arg: Any) -> None:
    module, _, name = str(arg).partition(" ")
    scan.push(scan.named_global(f"{module}.{name}"))


def _stack_global(scan: _Scan, arg: Any) -> None:
    name, module = scan.pop(), scan.pop()
    if not isinstance(name, _Str) or not isinstance(module, _Str):
        raise _Unsafe("STACK_GLOBAL with a computed name")
    scan.push(scan.named_global(f"{module.value}.{name.value}"))


def _reduce(scan: _Scan, arg: Any) -> None:
    args, func = scan.pop(), scan.pop()
    rule = ALLOWED_GLOBALS.get(func.name) if isinstance(func, _Global) else None
    if rule is None or rule.call is None:
        what = func.name if isinstance(func, _Global) else "a non-global object"
        raise _Unsafe(f"calls {what} (REDUCE), which a state dict never needs")
    if not isinstance(args, _Tuple):
        raise _Malformed("REDUCE arguments are not a tuple")
    scan.push(rule.call(scan, args))


def _newobj(scan: _Scan, arg: Any) -> None:
    scan.pop()  # args
    _instantiate(scan, scan.pop())


def _newobj_ex(scan: _Scan, arg: Any) -> None:
    scan.pop()  # kwargs
    scan.pop()  # args
    _instantiate(scan, scan.pop())


def _instantiate(scan: _Scan, cls: object) -> None:
    rule = ALLOWED_GLOBALS.get(cls.name) if isinstance(cls, _Global) else None
    if rule is None or not rule.instantiate:
        what = cls.name if isinstance(cls, _Global) else "a non-global object"
        raise _Unsafe(f"instantiates {what} (NEWOBJ), which a state dict never needs")
    scan.push(_Dict(ordered=True))


def _build(scan: _Scan, arg: Any) -> None:
    scan.pop()  # the state
    target = scan.top()
    if not (isinstance(target, _Dict) and target.ordered):
        what = target.name if isinstance(target, _Global) else type(target).__name__
        raise _Unsafe(f"sets the state of {what.lstrip('_')} (BUILD)")


def _persistent_storage(scan: _Scan, arg: Any) -> None:
    """torch.save's persistent id of a storage: ('storage', class, key, location, numel)."""
    pid = scan.pop()
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
    scan.storages[record.value] = (storage_cls.name, count.value)
    scan.push(_Storage(storage_cls.name, record.value, count.value))


# ---- the opcode tables ---------------------------------------------------------------------


@dataclass(frozen=True)
class OpRule:
    """An opcode the scan follows: its effect (what it pops -> what it pushes), and the step."""

    effect: str
    run: Step


_OTHER_VALUE = OpRule("-> value (None, bool, float or bytes)", _push_other)
_INT = OpRule("-> int", _push_int)
_STR = OpRule("-> str", _push_str)
_PUT = OpRule("value -> value; memo[arg] = value", _memo_put)
_GET = OpRule("-> memo[arg]", _memo_get)
# Every opcode the scan follows, and nothing else.
OPCODES: dict[str, OpRule] = {
    # framing
    "PROTO": OpRule("(protocol version)", _protocol),
    "FRAME": OpRule("(frame length: no effect)", _no_effect),
    "STOP": OpRule("value -> (the pickle's value)", _stop),
    # constants
    **dict.fromkeys(
        ("NONE", "NEWTRUE", "NEWFALSE", "FLOAT", "BINFLOAT", "BINBYTES", "SHORT_BINBYTES",
         "BINBYTES8", "BYTEARRAY8"),
        _OTHER_VALUE,
    ),
    **dict.fromkeys(("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"), _INT),
    **dict.fromkeys(
        ("UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING",
         "SHORT_BINSTRING"),
        _STR,
    ),
    # the stack and the memo
    "MARK": OpRule("-> mark", _mark),
    "POP": OpRule("value -> (or mark ->)", _pop),
    "POP_MARK": OpRule("mark items ->", _pop_mark),
    "DUP": OpRule("value -> value value", _dup),
    **dict.fromkeys(("PUT", "BINPUT", "LONG_BINPUT"), _PUT),
    "MEMOIZE": OpRule("value -> value; memo[len(memo)] = value", _memoize),
    **dict.fromkeys(("GET", "BINGET", "LONG_BINGET"), _GET),
    # containers: items go only into their own kind
    "EMPTY_TUPLE": OpRule("-> tuple", _tuple_of(0)),
    "TUPLE1": OpRule("a -> tuple", _tuple_of(1)),
    "TUPLE2": OpRule("a b -> tuple", _tuple_of(2)),
    "TUPLE3": OpRule("a b c -> tuple", _tuple_of(3)),
    "TUPLE": OpRule("mark items -> tuple", _tuple_from_mark),
    "EMPTY_LIST": OpRule("-> list", _empty_list),
    "LIST": OpRule("mark items -> list", _list_from_mark),
    "APPEND": OpRule("list value -> list", _append),
    "APPENDS": OpRule("list mark items -> list", _appends),
    "EMPTY_DICT": OpRule("-> dict", _empty_dict),
    "DICT": OpRule("mark key value ... -> dict", _dict_from_mark),
    "SETITEM": OpRule("dict key value -> dict", _setitem),
    "SETITEMS": OpRule("dict mark key value ... -> dict", _setitems),
    "EMPTY_SET": OpRule("-> set", _empty_set),
    "FROZENSET": OpRule("mark items -> set", _set_from_mark),
    "ADDITEMS": OpRule("set mark items -> set", _additems),
    # globals, and the objects they build (as ALLOWED_GLOBALS says)
    "GLOBAL": OpRule("-> global (arg: 'module name')", _global),
    "STACK_GLOBAL": OpRule("module name -> global", _stack_global),
    "REDUCE": OpRule("global args -> what the global's call builds", _reduce),
    "NEWOBJ": OpRule("global args -> OrderedDict", _newobj),
    "NEWOBJ_EX": OpRule("global args kwargs -> OrderedDict", _newobj_ex),
    "BUILD": OpRule("OrderedDict state -> OrderedDict", _build),
    "BINPERSID": OpRule("pid -> storage (pid: a storage record)", _persistent_storage),
}  # fmt: skip

Refusal = Callable[[_Scan, str, Any], str]  # (scan, opcode, argument) -> why, for the message


def _never_needed(scan: _Scan, op: str, arg: Any) -> str:
    return f"uses the {op} opcode, which a state dict never needs"


def _inst(scan: _Scan, op: str, arg: Any) -> str:
    module, _, name = str(arg).partition(" ")
    scan.globals_seen.add(f"{module}.{name}")
    return f"instantiates {module}.{name} with the INST opcode"


def _obj(scan: _Scan, op: str, arg: Any) -> str:
    items = scan.pop_mark()
    cls = items[0] if items else None
    label = cls.name if isinstance(cls, _Global) else "an object"
    return f"instantiates {label} with the OBJ opcode"


def _extension(scan: _Scan, op: str, arg: Any) -> str:
    return f"uses the copyreg extension registry ({op} {arg})"


# Opcodes refused with a reason of their own. Any other opcode missing from OPCODES (PERSID,
# NEXT_BUFFER, READONLY_BUFFER, one a later Python adds) is refused as never needed.
REFUSED_OPCODES: dict[str, Refusal] = {
    "INST": _inst,  # instantiates any class by name
    "OBJ": _obj,  # instantiates any class on the stack
    "EXT1": _extension,  # the copyreg registry: globals by number
    "EXT2": _extension,
    "EXT4": _extension,
}

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
