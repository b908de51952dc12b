"""Model parameter randomization (Adebayo et al. 2018, section 3.1): stages and re-initialization.

Stages are derived from the model's own module tree, never from hard-coded layer names, so any
architecture works:

* a *unit* at granularity ``module`` is one module that owns parameters (Conv, Linear,
  BatchNorm, ...); at granularity ``block`` it is a child of the root module (ResNet's
  ``conv1``, ``layer1`` .. ``layer4``, ``fc``) with all the parameterized modules below it, a
  child holding more than half of the model's modules being split into its own children
  (MobileNet's ``features`` becomes ``features.0`` .. ``features.18``); parameters the root
  module owns itself (a ViT's class token and position embedding) are the unit ``(root)``,
  first, at either granularity;
* ``cascading`` randomizes units from the top (logits) down, keeping earlier randomizations
  (one stage per unit, as in the paper's Figure 2; which stages get maps is the stage plan's
  choice, :mod:`.contract.stage_plan`); ``cascading_bottom_up`` goes the other
  way; ``independent`` randomizes one unit at a time with all others trained.

Re-initialization draws from each module's own default initializer (what ``reset_parameters``
does), seeded per module through a ``torch.Generator`` derived from the audit seed and the
module name only, so a module gets the same random weights at every stage of a cascade and in
every test of an audit (a stage of one test that randomizes the same modules as a stage of
another is the same model, and its maps are computed once), and the caller's global RNG is never
touched. Modules hold no state after a stage: weights are restored from a saved copy.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .spec import Granularity

ModelTest = Literal["cascading", "cascading_bottom_up", "independent"]

# Stated in every result: what happens to normalization layers when their unit is randomized.
NORMALIZATION_HANDLING = (
    "BatchNorm/LayerNorm/GroupNorm layers are reset by their own reset_parameters: weight=1, "
    "bias=0, running_mean=0, running_var=1 (they have no random initializer); so are the "
    "per-channel scale-and-shift layers of converted ONNX graphs (ChannelAffine: a BatchNorm "
    "that the exporter wrote as constant Mul/Add). A BatchNorm the exporter folded into the "
    "preceding conv's weights and bias is re-drawn with that conv. Conv and Linear layers are "
    "re-drawn from their default initializer: kaiming_uniform(a=sqrt(5)) weights and "
    "uniform(+-1/sqrt(fan_in)) biases. Parameters a module owns without an initializer (class "
    "tokens, position embeddings, layer scales, relative-position tables) are drawn from a "
    "normal with std 0.02 truncated at 2 std, as ViT, Swin and ConvNeXt initialize them."
)


FREE_PARAMETER_STD = 0.02


@dataclass(frozen=True)
class Unit:
    """One randomizable unit: a name (a module name) and the parameterized modules it covers."""

    name: str
    modules: tuple[str, ...]


@dataclass(frozen=True)
class Stage:
    """One map set of a test: ``name`` is the unit randomized at this stage; ``randomized`` is
    every module whose weights are random at this stage."""

    index: int
    name: str
    randomized: tuple[str, ...]


# The unit of the parameters the model's root module owns itself: timm's and torchvision's ViT
# keep their class token (and timm its position embedding) there. Its name stands for the root
# wherever the randomization looks a module up (:func:`unit_modules`); the root has no name of
# its own ("" in ``named_modules``) that a report could show.
ROOT = "(root)"


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def parameterized_modules(model: nn.Module) -> list[str]:
    """Modules that own parameters directly, in registration (forward) order; the root's own
    parameters, if any, come first as :data:`ROOT` (embeddings the input side uses)."""
    return [name or ROOT for name, module in model.named_modules() if _owns_parameters(module)]


def unit_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> module, with :data:`ROOT` for the root: what unit members name."""
    return {ROOT: model, **{name: m for name, m in model.named_modules() if name}}


def units(model: nn.Module, granularity: Granularity) -> list[Unit]:
    """The model's randomization units, first (input side) to last (logits)."""
    modules = parameterized_modules(model)
    if not modules:
        raise ValueError("the model has no parameters to randomize")
    if granularity == "module":
        return [Unit(name, (name,)) for name in modules]
    if granularity != "block":
        raise ValueError(f"granularity must be 'module' or 'block', not {granularity!r}")
    return [Unit(name, tuple(members)) for name, members in _blocks("", modules, len(modules))]


# A block holding more than this share of the model's parameterized modules is split into its
# children: torchvision's MobileNet, EfficientNet, DenseNet and ViT put nearly everything in one
# root child (``features``, ``encoder``), which as one block would leave a cascade of two stages
# (the head, then everything else).
MAX_BLOCK_SHARE = 0.5


def _blocks(prefix: str, members: list[str], total: int) -> list[tuple[str, list[str]]]:
    """The blocks under the container ``prefix`` ("" for the root): its children, in order, each
    with the parameterized modules below it; a container's own parameters are a block of their
    own; a child holding more than :data:`MAX_BLOCK_SHARE` of all ``total`` modules is split
    again (an NHWC adapter or any single wrapper is looked through this way)."""
    groups: dict[str, list[str]] = {}
    for name in members:
        if name == prefix:
            key = prefix
        else:
            head = (name[len(prefix) + 1 :] if prefix else name).split(".")[0]
            key = f"{prefix}.{head}" if prefix else head
        groups.setdefault(key, []).append(name)
    out: list[tuple[str, list[str]]] = []
    for key, group in groups.items():
        splittable = key != prefix and any(name != key for name in group)
        if splittable and len(group) > MAX_BLOCK_SHARE * total:
            out.extend(_blocks(key, group, total))
        else:
            out.append((key, group))
    return out


def stages(unit_list: Sequence[Unit], test: ModelTest) -> list[Stage]:
    """The stages of a test over ``unit_list`` (stage 0, the trained model, is implicit)."""
    if test == "cascading":
        order = list(reversed(unit_list))
    elif test in ("cascading_bottom_up", "independent"):
        order = list(unit_list)
    else:
        raise ValueError(f"unknown model randomization test {test!r}")
    out: list[Stage] = []
    accumulated: list[str] = []
    for i, unit in enumerate(order, start=1):
        if test == "independent":
            out.append(Stage(i, unit.name, unit.modules))
        else:
            accumulated.extend(unit.modules)
            out.append(Stage(i, unit.name, tuple(accumulated)))
    return out


RANDOM_DRAW = "randomized"


def module_seed(seed: int, draw: str, module_name: str) -> int:
    """A stable 63-bit seed per (audit seed, draw, module), independent of Python's hash."""
    digest = hashlib.sha256(f"{seed}/{draw}/{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def reinitialize(module: nn.Module, generator: torch.Generator) -> None:
    """Re-draw a module's parameters from its default initializer using ``generator``.

    Conv and Linear follow their ``reset_parameters`` distribution exactly (drawn here so the
    generator, not the global RNG, decides the numbers); anything else with a
    ``reset_parameters`` runs it inside a forked, seeded global RNG, so no caller state changes.
    """
    if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
        weight = module.weight
        # Drawn on the CPU from the CPU generator, then copied: same numbers on every device.
        fresh = torch.empty(weight.shape, dtype=weight.dtype)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
        weight.copy_(fresh)
        if module.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(fresh)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            bias = torch.empty(module.bias.shape, dtype=module.bias.dtype)
            nn.init.uniform_(bias, -bound, bound, generator=generator)
            module.bias.copy_(bias)
        return
    reset = getattr(module, "reset_parameters", None)
    if reset is None:
        draw_own_parameters(module, generator)
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    device = module_device(module)
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            reset()
        return
    # On another device the reset runs on a CPU copy, so a reset that draws at random draws the
    # CPU numbers (the same weights on every device) and no GPU's RNG state changes.
    cpu_copy = copy.deepcopy(module)
    try:
        cpu_copy = cpu_copy.to("cpu")
    except NotImplementedError:  # tensors without data (the "meta" device): the reset fills them
        cpu_copy = cpu_copy.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cpu_copy.reset_parameters()  # type: ignore[operator]
    for name, value in cpu_copy.state_dict().items():
        module.state_dict()[name].copy_(value)


@torch.no_grad()
def draw_own_parameters(module: nn.Module, generator: torch.Generator) -> None:
    """Re-draw the parameters a module owns with no initializer of its own: a class token, a
    position embedding, a layer scale, a relative-position table (ViT, Swin, ConvNeXt draw
    those from a normal with std 0.02, truncated at 2 std); children are units of their own."""
    for parameter in module.parameters(recurse=False):
        fresh = torch.empty(parameter.shape, dtype=parameter.dtype)
        nn.init.trunc_normal_(
            fresh,
            std=FREE_PARAMETER_STD,
            a=-2 * FREE_PARAMETER_STD,
            b=2 * FREE_PARAMETER_STD,
            generator=generator,
        )
        parameter.copy_(fresh)


def redraw(name: str, module: nn.Module, generator: torch.Generator) -> None:
    """Re-initialize unit member ``name``: :func:`reinitialize`, except for :data:`ROOT`, whose
    own parameters alone are drawn (a root's ``reset_parameters`` may reset its children)."""
    if name == ROOT:
        draw_own_parameters(module, generator)
    else:
        reinitialize(module, generator)


def _saved_state(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """What :func:`redraw` may change, copied: the module's state dict (a ``reset_parameters``
    may touch a child, as MultiheadAttention's does its output projection's bias), or for
    :data:`ROOT` its own parameters only (its state dict is the whole model's)."""
    own = module.named_parameters(recurse=False) if name == ROOT else module.state_dict().items()
    return {k: v.detach().clone() for k, v in own}


@torch.no_grad()
def _restore_state(name: str, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if name == ROOT:
        for key, parameter in module.named_parameters(recurse=False):
            parameter.copy_(state[key])
    else:
        module.load_state_dict(state)


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters(recurse=False):
        return p.device
    return torch.device("cpu")


@contextmanager
def randomized(
    model: nn.Module, module_names: Sequence[str], *, seed: int, draw: str = RANDOM_DRAW
) -> Iterator[nn.Module]:
    """Temporarily re-initialize ``module_names`` in place; restore the trained weights after.

    ``draw`` names the family of random weights: every test of an audit uses the default one,
    so a module is re-drawn identically wherever it is randomized."""
    modules = unit_modules(model)
    saved = {name: _saved_state(name, modules[name]) for name in module_names}
    try:
        for name in module_names:
            g = torch.Generator().manual_seed(module_seed(seed, draw, name))
            redraw(name, modules[name], g)
        yield model
    finally:
        for name, state in saved.items():
            _restore_state(name, modules[name], state)


class Randomizer:
    """Holds a model in one randomized state at a time and moves between states touching only
    the modules that differ.

    ``set(names)`` leaves exactly ``names`` randomized, with the weights :func:`randomized`
    would give them (each module's draw depends only on the seed and its name), so a cascade
    re-draws one unit per stage instead of every unit randomized so far, and restores nothing
    in between. ``restore()`` puts every trained weight back; call it before anything that
    needs the trained model.
    """

    def __init__(self, model: nn.Module, *, seed: int, draw: str = RANDOM_DRAW) -> None:
        self.model = model
        self.seed = seed
        self.draw = draw
        self._modules = unit_modules(model)
        self._saved: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def randomized(self) -> frozenset[str]:
        return frozenset(self._saved)

    def set(self, module_names: Sequence[str]) -> None:
        wanted = list(dict.fromkeys(module_names))
        unknown = [n for n in wanted if n not in self._modules]
        if unknown:
            raise KeyError(f"no module named {unknown[0]!r}")
        keep = set(wanted)
        self._restore([n for n in self._saved if n not in keep])
        for name in wanted:
            if name in self._saved:
                continue
            module = self._modules[name]
            self._saved[name] = _saved_state(name, module)
            g = torch.Generator().manual_seed(module_seed(self.seed, self.draw, name))
            redraw(name, module, g)

    def restore(self) -> None:
        self._restore(list(self._saved))

    def _restore(self, names: Sequence[str]) -> None:
        for name in names:
            _restore_state(name, self._modules[name], self._saved.pop(name))
