"""Forward-only passes through ONNX Runtime, for methods that need thousands of them.

Score-CAM runs one forward pass per (image, channel) and nothing else, so its cost is the
forward speed. On this project's CPU machine ONNX Runtime runs resnet18 at 224 px, batch 64,
2.2x faster than PyTorch eager (1.48 s vs 3.28 s; bench/RESULTS.md has the method-level
numbers). The module is exported *as it is at call time* (so a randomization stage's weights are
the ones that run), and the exported graph is used only if it reproduces the PyTorch logits on
the call's own images; otherwise, or on a GPU, PyTorch runs the passes.

A converted ONNX graph that only runs one batch size (``fixed_batch``, on the module or on any
module inside a wrapper) is exported at that batch size and run in groups of it, padded like
the fidelity check pads (``models.fidelity.run_session``); a dynamic-batch export is checked
on more than one row, so a batch size baked in where no one declared it fails the check
instead of a later call. A module whose export fails its check is not exported again (every
call would pay the export to fail the same way): its passes run in PyTorch. ONNX Runtime's
error log is silenced for these runs; a failure only means "use PyTorch".
"""

from __future__ import annotations

import io
import warnings
import weakref
from collections.abc import Callable, Hashable

import numpy as np
import torch
from torch import nn

from ..errors import stops_the_audit

# Below this much work (masked passes x pixels) the export (~0.5 s for resnet18) is not worth it.
MIN_WORK_PIXELS = 1 << 24
# Logit agreement required between the exported graph and PyTorch, relative to the logit scale.
RTOL = 1e-4

Forward = Callable[[torch.Tensor], torch.Tensor]

# One checked session per module, reused while its weights are the same tensors, unmodified:
# every in-place write (a randomization stage, load_state_dict) bumps a tensor's version counter
# and so invalidates the entry, so a stale graph can never run.
_SESSIONS: weakref.WeakKeyDictionary[nn.Module, tuple[Hashable, Forward]] = (
    weakref.WeakKeyDictionary()
)
# Modules whose export failed its check, per input shape: not tried again with other weights.
_FAILED: weakref.WeakKeyDictionary[nn.Module, set[Hashable]] = weakref.WeakKeyDictionary()


def fixed_batch(model: nn.Module) -> int | None:
    """The batch size the model must run with: a converted graph's ``fixed_batch``, found on
    the model or on any module inside it (a wrapper does not hide it)."""
    for module in model.modules():
        fixed = getattr(module, "fixed_batch", None)
        if isinstance(fixed, int) and fixed > 0:
            return fixed
    return None


def _weights_key(model: nn.Module, x: torch.Tensor) -> Hashable:
    tensors = [*model.parameters(), *model.buffers()]
    return (
        tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors),
        tuple(x.shape[1:]),
        x.dtype,
        torch.get_num_threads(),
    )


def ort_forward(model: nn.Module, x: torch.Tensor, logits: torch.Tensor) -> Forward | None:
    """A forward function backed by ONNX Runtime, or None where it cannot be trusted.

    ``logits`` is the PyTorch output for ``x``; the exported graph must reproduce it to
    ``RTOL`` x max|logits|, with a batch size other than the export's (which also proves the
    batch axis is truly dynamic) unless the model runs one fixed batch size.
    """
    if x.device.type != "cpu":
        return None
    shape_key = (tuple(x.shape[1:]), x.dtype)
    if shape_key in _FAILED.get(model, ()):
        return None
    key = _weights_key(model, x)
    cached = _SESSIONS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    forward, runs = _export_and_check(model, x, logits, fixed_batch(model))
    if forward is not None:
        _SESSIONS[model] = (key, forward)
    elif not runs:  # the same model with other weights would fail alike: do not try again
        _FAILED.setdefault(model, set()).add(shape_key)
    return forward


def checked_forward(model: nn.Module, x: torch.Tensor) -> Forward | None:
    """The ONNX Runtime forward already exported and checked for ``model`` as it is now (same
    weights, same input shape), or None. Free to use however small the job: the layers analysis
    exports once for its metrics, and Score-CAM at every layer reuses that export."""
    if x.device.type != "cpu":
        return None
    cached = _SESSIONS.get(model)
    if cached is not None and cached[0] == _weights_key(model, x):
        return cached[1]
    return None


def _export_and_check(
    model: nn.Module, x: torch.Tensor, logits: torch.Tensor, fixed: int | None
) -> tuple[Forward | None, bool]:
    """The checked forward function (or None), and whether the export runs at all: one that
    fails to export or load, or refuses the check's batch, is not worth another try; one that
    runs but computes other logits is tried again with other weights."""
    try:
        import onnxruntime as ort

        from ..models.fidelity import run_session

        buffer = io.BytesIO()
        rows = fixed or 1
        example = x[:rows].detach().clone()
        if example.shape[0] < rows:  # fewer images than the fixed batch: repeat the last one
            extra = example[-1:].expand(rows - example.shape[0], *example.shape[1:])
            example = torch.cat([example, extra])
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                buffer,  # type: ignore[arg-type]  # the legacy exporter writes to file objects
                dynamo=False,
                opset_version=17,
                input_names=["x"],
                output_names=["logits"],
                dynamic_axes=None if fixed else {"x": {0: "batch"}, "logits": {0: "batch"}},
            )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(
            buffer.getvalue(), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # any export or load failure: PyTorch runs the passes instead
        if stops_the_audit(exc):
            raise
        return None, False

    def forward(batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        (out,) = run_session(session, array, max(len(array), 1))
        return torch.from_numpy(out).to(dtype=batch.dtype)

    check_rows = min(len(x), 4) if len(x) > 1 else 1
    if check_rows == 1:  # a batch of one cannot prove the batch axis: check with two copies
        probe, expected = torch.cat([x[:1], x[:1]]), torch.cat([logits[:1], logits[:1]])
    else:
        probe, expected = x[:check_rows], logits[:check_rows]
    try:
        got = forward(probe)
    except Exception as exc:  # e.g. a batch size baked into a reshape: ORT refuses the run
        if stops_the_audit(exc):
            raise
        return None, False
    if got.shape != expected.shape:
        return None, False
    scale = max(float(expected.abs().max()), 1.0)
    if float((got - expected).abs().max()) > RTOL * scale:
        return None, True
    return forward, True


def worth_exporting(n_passes: int, x: torch.Tensor) -> bool:
    return n_passes * x.shape[-1] * x.shape[-2] >= MIN_WORK_PIXELS
