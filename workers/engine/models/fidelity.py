"""Fidelity check: the converted torch graph must reproduce ONNX Runtime's logits.

The audit is about the model the user ships, which is the ONNX file as ONNX Runtime runs it.
Saliency methods run on the converted module (they need gradients), so before any map is drawn
the two are run on the same preprocessed batch and compared; the difference goes into the
report, and an audit refuses to start when it exceeds the spec's tolerance.

Like is compared with like. When the graph ends in a softmax head, the converted module stops
before it and returns the pre-softmax scores (what saliency explains), so ONNX Runtime is asked
for that same tensor as an extra output of the file's graph and the two are compared in score
units (comparing probabilities would hide score differences wherever a softmax saturates).
The same run also checks that the graph's own output is the softmax (or log-softmax) of those
scores, so the probabilities reported, softmax of the module's scores, are the model's own.

The tolerance is ``atol + rtol * scale`` per image, with ``scale`` the image's largest absolute
ONNX Runtime logit (numpy's ``allclose`` form, with one scale per image rather than per
element, because a logit near zero is no more precise than its neighbours). float32 rounding
grows with the values summed: two correct implementations differ by a few units in the last
place of the largest logits, measured at 4e-7 to 1.3e-6 of them on resnet18, densenet121,
mobilenet_v3_small, EfficientNet-Lite1 and -Lite2 and a random-weight inception_v3 whose
logits reach 2e12 (where an absolute tolerance alone refuses a faithful conversion). The
default ``rtol`` (``AuditSpec.fidelity_rtol``, 1e-5) leaves 7x room above that.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from ..contract.report import Fidelity
from ..errors import FidelityError, ModelLoadError
from ..spec import AuditSpec
from .base import LoadedModel

DEFAULT_RTOL = AuditSpec.fidelity_rtol

_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"


def ort_providers() -> list[str]:
    """Execution providers to ask for: CUDA first when both ONNX Runtime and torch see a GPU.

    ``onnxruntime-gpu`` lists the CUDA provider even on machines without a GPU (and then logs an
    error while falling back), so torch's view of the device decides; CPU is always last.
    """
    available = ort.get_available_providers()
    providers = []
    if _CUDA in available and torch.cuda.is_available():
        providers.append(_CUDA)
    providers.append(_CPU)
    return providers


def ort_session(onnx_bytes: bytes) -> ort.InferenceSession:
    """An ONNX Runtime session for the file, with explicit providers (CPU last)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: provider fallbacks are reported by provider
    try:
        return ort.InferenceSession(onnx_bytes, sess_options=options, providers=ort_providers())
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise ModelLoadError(f"ONNX Runtime cannot load the model: {exc}") from exc


# one declaration, in the contract: report.json's ``fidelity`` block
FidelityReport = Fidelity


def run_session(
    session: ort.InferenceSession,
    batch: np.ndarray,
    batch_size: int,
    fetch: list[str] | None = None,
) -> list[np.ndarray]:
    """The session's ``fetch`` outputs (default: its first) on ``batch``, ``batch_size`` rows
    per run, or the graph's fixed batch size when its input fixes one (the last chunk padded
    with copies of its last row, whose outputs are dropped). ONNX Runtime's own error log is
    silenced: a failure is raised, with its message, to the caller, which decides what it
    means."""
    graph_input = session.get_inputs()[0]
    fixed = graph_input.shape[0] if graph_input.shape else None
    step = fixed if isinstance(fixed, int) and fixed > 0 else batch_size
    names = fetch or [session.get_outputs()[0].name]
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # fatal only
    outputs: list[list[np.ndarray]] = []
    for start in range(0, batch.shape[0], step):
        chunk = batch[start : start + step]
        short = step - chunk.shape[0] if step == fixed else 0
        if short:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], short, axis=0)])
        out = session.run(names, {graph_input.name: chunk}, quiet)
        outputs.append([np.asarray(o)[: step - short] for o in out])
    return [np.concatenate(parts) for parts in zip(*outputs, strict=True)]


def _fetch(loaded: LoadedModel) -> list[str] | None:
    """What to ask ONNX Runtime for: the tensor the module returns, then (for a removed softmax
    head) the graph output it feeds; None for the graph's first output."""
    out = loaded.output
    if out is None:
        return None
    return [out.scores or out.name, out.name] if out.head_removed else [out.name]


def _exposing(onnx_bytes: bytes, names: list[str]) -> bytes:
    """The same graph with ``names`` listed among its outputs (ONNX Runtime returns only
    graph outputs); nothing it computes changes."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    listed = {o.name for o in model.graph.output}
    for name in names:
        if name not in listed:
            model.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    return model.SerializeToString()


def _check_head(
    loaded: LoadedModel, scores: np.ndarray, graph_output: np.ndarray, atol: float
) -> None:
    """ONNX Runtime's graph output must be the softmax head of ONNX Runtime's scores."""
    out = loaded.output
    assert out is not None and out.head_removed is not None
    n = scores.shape[0]
    logits = torch.from_numpy(scores.reshape(n, -1).astype(np.float64))
    head = torch.softmax if out.head_removed == "Softmax" else torch.log_softmax
    expected = head(logits, dim=1).numpy()
    got = graph_output.reshape(n, -1).astype(np.float64)
    if expected.shape != got.shape:
        expected = np.full_like(got, np.inf)
    error = np.abs(expected - got)
    error[~(np.isfinite(scores.reshape(n, -1)).all(axis=1))] = 0.0  # non-finite scores fail below
    diff = float(error.max())
    # float32 rounding of large log-probabilities (-1e4 is exact to 1e-3 only) is no misreading
    if not np.all(error <= atol + 1e-5 * np.abs(np.nan_to_num(got, posinf=0.0, neginf=0.0))):
        raise FidelityError(
            f"the graph's output {out.name!r} is not the {out.head_removed} over the classes of "
            f"{out.scores!r} (max difference {diff:.3g}, tolerance {atol:.3g}): its softmax head "
            "cannot be left out, and the model's probabilities cannot be reported",
            max_abs_diff=diff,
            atol=atol,
        )


def _run_ort(
    session: ort.InferenceSession,
    batch: np.ndarray,
    batch_size: int,
    fetch: list[str] | None = None,
) -> list[np.ndarray]:
    try:
        return run_session(session, batch, batch_size, fetch)
    except Exception as exc:  # ORT raises its own types (InvalidArgument, Fail, ...)
        raise FidelityError(f"ONNX Runtime cannot run the model on this batch: {exc}") from exc


def _compare(
    loaded: LoadedModel,
    x: torch.Tensor,
    atol: float,
    rtol: float,
    session: ort.InferenceSession | None,
    batch_size: int,
) -> tuple[FidelityReport, np.ndarray]:
    """The report, and per image whether it is within tolerance."""
    if loaded.onnx_bytes is None:
        raise ValueError("fidelity is defined for models loaded from ONNX")
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty NCHW batch, got shape {tuple(x.shape)}")
    fetch = _fetch(loaded)
    if session is None or not set(fetch or ()) <= {o.name for o in session.get_outputs()}:
        if fetch is not None and len(fetch) > 1:  # the scores are no graph output: list them
            session = ort_session(_exposing(loaded.onnx_bytes, fetch))
        else:
            session = ort_session(loaded.onnx_bytes)
    x = x.detach().to(torch.float32)
    feed = x.permute(0, 2, 3, 1) if loaded.input_spec.layout == "NHWC" else x
    ran = _run_ort(session, np.ascontiguousarray(feed.cpu().numpy()), batch_size, fetch)
    expected = ran[0]

    module = loaded.module
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            actual = np.concatenate(
                [
                    module(x[i : i + batch_size].to(device)).detach().cpu().numpy()
                    for i in range(0, x.shape[0], batch_size)
                ]
            )
    except RuntimeError as exc:
        raise FidelityError(f"the converted model fails on this batch: {exc}") from exc
    finally:
        module.train(was_training)
    if len(ran) > 1:  # a removed softmax head: scores like the module's, and the head checked
        _check_head(loaded, expected, ran[1], atol)
        if expected.size == actual.size:  # shape-only ops after the head reshaped the output
            expected = expected.reshape(actual.shape)
    if actual.shape != expected.shape:
        raise FidelityError(
            f"the converted model's output shape {actual.shape} differs from ONNX Runtime's "
            f"{expected.shape}",
            expected_shape=list(expected.shape),
            actual_shape=list(actual.shape),
        )
    n = actual.shape[0]
    reference = expected.astype(np.float64).reshape(n, -1)
    diff = np.abs(actual.astype(np.float64).reshape(n, -1) - reference)
    per_image = diff.max(axis=1)
    per_image = np.where(np.isfinite(per_image), per_image, np.inf)
    scale = np.abs(reference).max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(per_image == 0, 0.0, per_image / scale)
    relative = np.where(np.isfinite(relative), relative, np.inf)
    within = per_image <= atol + rtol * np.where(np.isfinite(scale), scale, 0.0)
    agree = (actual.reshape(n, -1).argmax(axis=1) == expected.reshape(n, -1).argmax(axis=1)).mean()
    report = FidelityReport(
        max_abs_diff=float(per_image.max()),
        max_rel_diff=float(relative.max()),
        argmax_agreement=float(agree),
        n_images=n,
        atol=float(atol),
        rtol=float(rtol),
        provider=session.get_providers()[0],
        passed=bool(within.all()),
    )
    return report, within


def check_fidelity(
    loaded: LoadedModel,
    x: torch.Tensor,
    atol: float,
    *,
    rtol: float = DEFAULT_RTOL,
    session: ort.InferenceSession | None = None,
    batch_size: int = 32,
) -> FidelityReport:
    """Compare the converted module with ONNX Runtime on ``x`` (preprocessed, NCHW).

    An image passes when its largest logit difference is at most ``atol + rtol`` x its largest
    absolute ONNX Runtime logit. ``session`` reuses an existing
    ``ort_session(loaded.onnx_bytes)`` (one is made when it does not list the pre-softmax
    scores among its outputs); the torch module runs ``batch_size`` images at a time.
    """
    return _compare(loaded, x, atol, rtol, session, batch_size)[0]


def ensure_fidelity(
    loaded: LoadedModel,
    x: torch.Tensor,
    atol: float,
    *,
    rtol: float = DEFAULT_RTOL,
    session: ort.InferenceSession | None = None,
    batch_size: int = 32,
    first_image: int = 0,
) -> FidelityReport:
    """``check_fidelity``, raising ``FidelityError`` when an image is out of tolerance (images
    numbered from ``first_image``: where ``x`` starts in the audit's images)."""
    report, within = _compare(loaded, x, atol, rtol, session, batch_size)
    if not report.passed:
        bad = [first_image + int(i) for i in np.flatnonzero(~within)]
        shown = ", ".join(str(i) for i in bad[:20]) + (", ..." if len(bad) > 20 else "")
        raise FidelityError(
            f"the converted model differs from ONNX Runtime by up to {report.max_abs_diff:.3g} "
            f"({report.max_rel_diff:.3g} of the largest logit; tolerance {atol:.3g} + "
            f"{rtol:.3g} x the largest logit) on {len(bad)} of {report.n_images} images: "
            f"{shown}",
            max_abs_diff=report.max_abs_diff,
            max_rel_diff=report.max_rel_diff,
            atol=atol,
            rtol=rtol,
            image_indices=bad,
            report=report.to_dict(),
        )
    return report


def merge_fidelity(first: FidelityReport, second: FidelityReport) -> FidelityReport:
    """One report over both batches' images (an adaptive audit checks each round's)."""
    n = first.n_images + second.n_images
    agree = first.argmax_agreement * first.n_images + second.argmax_agreement * second.n_images
    return FidelityReport(
        max_abs_diff=max(first.max_abs_diff, second.max_abs_diff),
        max_rel_diff=max(first.max_rel_diff or 0.0, second.max_rel_diff or 0.0),
        argmax_agreement=agree / n,
        n_images=n,
        atol=first.atol,
        rtol=first.rtol,
        provider=first.provider,
        passed=bool(first.passed and second.passed),
    )
