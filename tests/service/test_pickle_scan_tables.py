"""The pickle scanner allows what its tables list and nothing else.

:mod:`saliency_audit.service.uploads.pickle_scan` follows only the opcodes of ``OPCODES``, names
only the
globals of ``ALLOWED_GLOBALS`` and calls or instantiates only those the table lets it. These
tests spell the tables out, so widening one is a visible change to review, and show that a
refusal comes from the table: take an entry out and a pickle that passed is refused. The
pickles are written opcode by opcode and never loaded; torch is not needed.
"""

from __future__ import annotations

import pickletools

import pytest

from saliency_audit.service.uploads import UploadRejected, scan_state_dict_pickle
from saliency_audit.service.uploads.pickle_scan import (
    ALLOWED_GLOBALS,
    ALLOWED_PICKLE_GLOBALS,
    OPCODES,
    REFUSED_OPCODES,
    STORAGE_ITEMSIZE,
    TORCH_DTYPES,
    TORCH_OPCODES,
    GlobalRule,
)
from tests.service.hostile import state_dict_pickle

EVERY_OPCODE = {op.name for op in pickletools.opcodes}
REBUILD_TENSOR = {"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3"}
REBUILD_PARAMETER = {
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
}
STATE_DICT = state_dict_pickle([("fc.weight", "0", (3, 2)), ("fc.bias", "1", (3,))])


def _refusal(data: bytes) -> UploadRejected:
    with pytest.raises(UploadRejected) as caught:
        scan_state_dict_pickle(data)
    assert (caught.value.status, caught.value.code) == (422, "unsafe_pickle")
    return caught.value


def test_the_opcode_tables_list_every_pickle_opcode_at_most_once() -> None:
    followed, refused = set(OPCODES), set(REFUSED_OPCODES)
    assert followed <= EVERY_OPCODE and refused <= EVERY_OPCODE
    assert not followed & refused
    assert refused == {"INST", "OBJ", "EXT1", "EXT2", "EXT4"}
    # in neither table: refused as never needed
    assert EVERY_OPCODE - followed - refused == {"PERSID", "NEXT_BUFFER", "READONLY_BUFFER"}
    # the worker's loader reads no opcode the scan would not follow
    assert followed >= TORCH_OPCODES
    for name, rule in OPCODES.items():
        assert rule.effect and callable(rule.run), name


def test_the_globals_table_says_what_each_global_may_build() -> None:
    callable_globals = {name for name, rule in ALLOWED_GLOBALS.items() if rule.call}
    instantiable = {name for name, rule in ALLOWED_GLOBALS.items() if rule.instantiate}
    assert callable_globals == {"collections.OrderedDict", *REBUILD_TENSOR, *REBUILD_PARAMETER}
    assert instantiable == {"collections.OrderedDict"}
    named_only = set(ALLOWED_GLOBALS) - callable_globals - instantiable
    assert named_only == set(STORAGE_ITEMSIZE) | TORCH_DTYPES
    assert set(ALLOWED_GLOBALS) == ALLOWED_PICKLE_GLOBALS
    assert all(rule.role for rule in ALLOWED_GLOBALS.values())


def test_a_state_dict_written_opcode_by_opcode_passes_every_table() -> None:
    scan = scan_state_dict_pickle(STATE_DICT)
    assert scan.tensors == {"fc.weight": (3, 2), "fc.bias": (3,)}
    assert (scan.n_tensors, scan.parameters, scan.protocol) == (2, 9, 2)
    assert scan.storages == {"0": ("torch.FloatStorage", 6), "1": ("torch.FloatStorage", 3)}
    assert scan.globals == {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch.FloatStorage",
    }
    assert scan.unsupported_opcodes == frozenset()


def test_an_opcode_taken_out_of_the_table_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(OPCODES, "BININT1")
    refused = _refusal(STATE_DICT)
    assert "uses the BININT1 opcode, which a state dict never needs" in refused.detail


@pytest.mark.parametrize(
    ("op", "data"),
    [
        ("PERSID", b"\x80\x02P0\n."),
        ("NEXT_BUFFER", b"\x80\x05\x97."),
        ("READONLY_BUFFER", b"\x80\x05N\x98."),
    ],
)
def test_an_opcode_in_neither_table_is_refused_as_never_needed(op: str, data: bytes) -> None:
    assert op not in OPCODES and op not in REFUSED_OPCODES
    assert f"uses the {op} opcode, which a state dict never needs" in _refusal(data).detail


def test_the_refused_opcodes_say_what_they_would_do() -> None:
    inst = _refusal(b"(ios\nsystem\n.")
    assert "instantiates os.system with the INST opcode" in inst.detail
    assert inst.extra["globals"] == ["os.system"]
    assert "instantiates an object with the OBJ opcode" in _refusal(b"(No.").detail
    assert "uses the copyreg extension registry (EXT1 1)" in _refusal(b"\x80\x02\x82\x01.").detail


def test_a_global_missing_from_the_table_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = _refusal(b"\x80\x02cos\nsystem\n)R.")
    assert "references the global os.system, which a state dict never needs" in refused.detail
    assert refused.extra["globals"] == ["os.system"]

    monkeypatch.delitem(ALLOWED_GLOBALS, "torch.FloatStorage")
    refused = _refusal(STATE_DICT)
    assert "references the global torch.FloatStorage" in refused.detail
    assert refused.extra["globals"] == ["torch.FloatStorage"]


def test_a_global_is_called_or_instantiated_only_where_the_table_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    called = _refusal(b"\x80\x02ctorch\nFloatStorage\n)R.")
    assert "calls torch.FloatStorage (REDUCE), which a state dict never needs" in called.detail
    built = _refusal(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)\x81.")
    assert "instantiates torch._utils._rebuild_tensor_v2 (NEWOBJ)" in built.detail

    monkeypatch.setitem(ALLOWED_GLOBALS, "collections.OrderedDict", GlobalRule("named only"))
    refused = _refusal(STATE_DICT)
    assert "calls collections.OrderedDict (REDUCE), which a state dict never needs" in (
        refused.detail
    )
    assert refused.extra["globals"] == []
