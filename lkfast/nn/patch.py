"""Swap a model's depthwise ``nn.Conv2d`` layers for ``DepthwiseConv2d`` (the fast op) and its
``nn.Linear`` layers for ``PointwiseLinear`` (linears on CPU activations as 1x1 convolutions where
measured faster), in place."""
from __future__ import annotations

import itertools

import torch.nn as nn
from torch.nn.utils import parametrize

from lkfast.nn.depthwise import DEFAULT_MIN_KERNEL_SIZE, DepthwiseConv2d, fast_op_computes
from lkfast.nn.pointwise import PointwiseLinear

# The plain PyTorch layer each fast layer stands in for (same state, only forward differs).
_FAST_OF = {nn.Conv2d: DepthwiseConv2d, nn.Linear: PointwiseLinear}
_PLAIN_OF = {fast: plain for plain, fast in _FAST_OF.items()}

# What torch.nn.utils.parametrize puts in the class it generates for a parametrized module, besides
# one property per parametrized tensor (torch 2.x: _inject_new_class and _inject_property), and
# what copyreg caches there when the module is deep-copied (__slotnames__).
_PARAMETRIZE_CLASS_ENTRIES = frozenset({"__module__", "__doc__", "__getstate__", "__deepcopy__", "__slotnames__"})


def _parametrized(module: nn.Module, base: type) -> bool:
    """True for a plain ``base`` layer (``nn.Conv2d``, ``nn.Linear``) under
    ``torch.nn.utils.parametrize``: its class is the one parametrize generated directly over
    ``base``, holding nothing but parametrize's entries and the properties of the parametrized
    tensors (a parametrized ``Conv2dSame`` is not one)."""
    cls = type(module)
    if cls.__bases__ != (base,) or cls.__module__ != parametrize.__name__ or not parametrize.is_parametrized(module):
        return False
    own = set(vars(cls)) - _PARAMETRIZE_CLASS_ENTRIES
    return own <= set(module.parametrizations) and all(isinstance(vars(cls)[name], property) for name in own)


def _weight_is_floating_point(module: nn.Module) -> bool:
    if not parametrize.is_parametrized(module, "weight"):
        return module.weight.is_floating_point()
    # Not computed here (spectral_norm's would run a power iteration): a parametrization keeps the
    # dtype of the tensors it is computed from, which it holds as original, original0, original1...
    chain = module.parametrizations.weight
    tensors = itertools.chain(chain.named_parameters(recurse=False), chain.named_buffers(recurse=False))
    return all(t.is_floating_point() for name, t in tensors if name.startswith("original"))


def is_eligible(module: nn.Module, min_kernel_size: int = DEFAULT_MIN_KERNEL_SIZE) -> bool:
    """True for a plain ``nn.Conv2d``, or one under ``torch.nn.utils.parametrize`` (e.g.
    ``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm``), with floating-point
    weights for which ``fast_op_computes`` holds (depthwise, stride 1, dilation 1, zero padding of
    k // 2 on each side, odd kernel with its larger side at least ``min_kernel_size``): the same
    rule ``make_conv2d`` applies.

    Other subclasses of ``nn.Conv2d`` are not touched: their forward may differ from the plain
    convolution (e.g. timm's ``Conv2dSame`` with its dynamic padding, parametrized or not).
    """
    if type(module) is not nn.Conv2d and not _parametrized(module, nn.Conv2d):
        return False
    if not _weight_is_floating_point(module):
        return False
    return fast_op_computes(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                            module.padding, module.dilation, module.groups, module.padding_mode, min_kernel_size)


def is_linear_eligible(module: nn.Module) -> bool:
    """True for a plain ``nn.Linear``, or one under ``torch.nn.utils.parametrize``, with a
    floating-point weight: what ``patch_model`` makes a ``PointwiseLinear`` (which computes
    ``F.linear`` for every input but contiguous 2-D to 4-D CPU ones the calibration measured faster
    as a 1x1 convolution). Subclasses of ``nn.Linear`` (e.g. ``NonDynamicallyQuantizableLinear`` inside
    ``nn.MultiheadAttention``, which reads its weight directly) are not touched."""
    if type(module) is not nn.Linear and not _parametrized(module, nn.Linear):
        return False
    return _weight_is_floating_point(module)


def _fast_class(module: nn.Module) -> type:
    """The class an eligible layer becomes: DepthwiseConv2d for a conv, PointwiseLinear for a
    linear, or for a parametrized layer a subclass of it carrying what parametrize's generated class
    carries (the properties that compute the parametrized tensors on each read, its __getstate__
    and __deepcopy__). One per module, as parametrize makes one per module:
    ``remove_parametrizations`` deletes a property from the module's class, then sets the class to
    its first base, here the fast class."""
    cls = type(module)
    if cls in _FAST_OF:
        return _FAST_OF[cls]
    return _parametrized_over(_FAST_OF[cls.__bases__[0]], cls)


def _parametrized_over(base: type, cls: type) -> type:
    """A class over ``base`` carrying what the parametrized class ``cls`` carries (parametrize's
    properties, __getstate__, __deepcopy__), named as parametrize names its classes."""
    carried = {name: value for name, value in vars(cls).items() if name != "__slotnames__"}  # (copyreg's cache)
    return type(f"Parametrized{base.__name__}", (base,), carried)


def patch_model(model: nn.Module, min_kernel_size: int = DEFAULT_MIN_KERNEL_SIZE, linear: bool = True) -> int:
    """Make every eligible depthwise ``nn.Conv2d`` of ``model`` (see ``is_eligible``) a
    ``DepthwiseConv2d`` and, with ``linear`` (the default), every eligible ``nn.Linear`` (see
    ``is_linear_eligible``) a ``PointwiseLinear``, in place: the module object itself changes class
    (as ``torch.nn.utils.parametrize`` does), so it keeps its parameter tensors (same device, dtype,
    requires_grad; optimizers keep tracking them), its hooks (forward, backward, state_dict, and
    those of ``weight_norm``, ``spectral_norm`` and ``torch.nn.utils.prune``, which compute
    ``weight`` before each call), any other attribute, and its identity (a layer shared by two
    parents, or held elsewhere, is patched everywhere). Outputs are unchanged within floating-point
    tolerance.

    A ``PointwiseLinear`` computes ``F.linear`` for every input except contiguous 2-D to 4-D CPU
    fp32/fp64 ones (NHWC activations as in ConvNeXt's MLPs, a ViT's tokens, features) for which this
    machine's calibration measured the same product, with the backward the call will run, faster as
    a 1x1 convolution of a channels_last view of the same memory (``lkfast.nn.pointwise``);
    ``linear=False`` leaves the linears alone.

    A layer under ``torch.nn.utils.parametrize`` (``torch.nn.utils.parametrizations.weight_norm``,
    ``spectral_norm``, ``register_parametrization``) becomes a subclass of the fast class with
    parametrize's properties: its weight is still computed from the parametrization on each
    forward, gradients reach the original tensors, the state_dict keys stay the same,
    ``remove_parametrizations`` leaves the fast class, and deepcopy and pickling behave as
    parametrize makes them (deepcopy works; pickling refuses, pointing at state_dict).

    Returns the number of layers patched, convs and linears together (0 when none is eligible, e.g.
    a model already patched).
    """
    eligible = [module for module in model.modules()
                if is_eligible(module, min_kernel_size) or (linear and is_linear_eligible(module))]
    for layer in eligible:
        # The plain layer and its fast class hold the same state (DepthwiseConv2d only narrows which
        # arguments its constructor accepts, all of which is_eligible checked): only forward differs.
        layer.__class__ = _fast_class(layer)
    return len(eligible)


def _plain_class(module: nn.Module) -> type | None:
    """The class a fast layer goes back to: nn.Conv2d for a DepthwiseConv2d, nn.Linear for a
    PointwiseLinear, for the parametrized subclass ``_fast_class`` made a class over the plain layer
    carrying the same entries (as parametrize would have made for it); None for anything else
    (user subclasses included)."""
    cls = type(module)
    if cls in _PLAIN_OF:
        return _PLAIN_OF[cls]
    base = cls.__bases__[0] if len(cls.__bases__) == 1 else None
    if base in _PLAIN_OF and cls.__name__ == f"Parametrized{base.__name__}" and parametrize.is_parametrized(module):
        return _parametrized_over(_PLAIN_OF[base], cls)
    return None


def unpatch_model(model: nn.Module) -> int:
    """The inverse of ``patch_model``, in place: every ``DepthwiseConv2d`` of ``model`` (patched, or
    built as one, as RepLKNet's are) becomes the plain ``nn.Conv2d`` it is equivalent to, every
    ``PointwiseLinear`` an ``nn.Linear``, and a parametrized one a parametrized plain layer;
    parameters, hooks, parametrizations, other attributes and the modules' identity are kept, as
    ``patch_model`` keeps them. For what needs PyTorch's own layers: ``torch.jit.script``,
    exporters, code that checks ``type(m) is nn.Conv2d``. Subclasses of the fast classes other than
    patch_model's are left as they are. Returns the number of layers changed; ``patch_model`` swaps
    them back."""
    changed = 0
    for module in model.modules():
        plain = _plain_class(module)
        if plain is not None:
            module.__class__ = plain
            changed += 1
    return changed

