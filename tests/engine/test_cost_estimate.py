"""The cost estimate counts the passes a real audit runs (issue 18, item 1).

The API refuses an audit above the tenant's budget from workers/engine/contract/cost.py's count
alone; here a small real audit's model rows (every forward call, counted by a hook on the
model) are compared with that count, for the stages the policy's rule plans (the default) and
for every stage.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from saliency_audit.workers.engine.contract.cost import FB, FW, audit_passes, stages_of
from saliency_audit.workers.engine.methods import METHODS
from saliency_audit.workers.engine.models.base import LoadedModel
from saliency_audit.workers.engine.policy import load_policy
from saliency_audit.workers.engine.randomization import stages, units
from saliency_audit.workers.engine.runner import run_audit
from saliency_audit.workers.engine.spec import AuditSpec, InputSpec, MethodParams
from tests.engine.nets import images, small_cnn

FAMILIES = {name: info.family for name, info in METHODS.items()}
# the stated factor: the count leaves out the few rows the engine adds around the maps (the
# map checks, target selection); Zennit's LRP hooks (about 2.5 passes each) are not in this spec
FACTOR = 1.1  # measured: 44 rows estimated for 45 run, 224 for 225 (every stage)


def counted_rows(module: torch.nn.Module, spec: AuditSpec, n: int) -> int:
    seen = {"rows": 0}

    def hook(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
        seen["rows"] += int(args[0].shape[0])

    handle = module.register_forward_pre_hook(hook)
    try:
        model = LoadedModel(
            module=module,
            input_spec=InputSpec(height=16, width=16, class_names=tuple("abcde")),
            source="torchvision",
            sha256="0" * 64,
        )
        run_audit(model, images(n, 16), spec)
    finally:
        handle.remove()
    return seen["rows"]


@pytest.mark.parametrize(
    ("methods", "planned"),
    [
        (("gradient", "guided_backprop"), "rule"),
        (("smoothgrad", "integrated_gradients"), "rule"),
        (("gradient", "guided_backprop"), "all"),
    ],
)
def test_the_estimated_rows_match_a_real_audit_within_the_stated_factor(
    methods: tuple[str, ...], planned: str
) -> None:
    module = small_cnn()
    spec = AuditSpec(
        methods=methods,
        tests=("cascading",),
        granularity="module",
        batch_size=4,
        params=MethodParams(noise_samples=6, ig_steps=5),
        stages=planned,  # type: ignore[arg-type]
    )
    n = 4
    real_stages = len(stages(units(module, "module"), "cascading"))
    rules = {t: r.stage for t, r in load_policy(spec.policy).rules.items()}
    count = audit_passes(
        spec, FAMILIES, images=n, stages=real_stages, onnx=False, rule_stages=rules
    )
    totals = count.total_rows()
    estimated = totals[FB] + totals[FW]
    ran = counted_rows(module, spec, n)
    assert ran / FACTOR <= estimated <= ran * FACTOR, (estimated, ran)


def test_stages_from_the_uploaded_tensors_bound_the_real_stages() -> None:
    module = small_cnn()
    tensors = len(list(module.parameters()))
    real = len(stages(units(module, "module"), "cascading"))
    assert real <= stages_of(tensors, "module") <= 2 * real
