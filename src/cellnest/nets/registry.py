"""Name -> builder registry behind :func:`cellnest.nets.build_model`.

A builder is a plain function ``builder(in_channels, out_channels, **cfg) -> nn.Module``
whose keyword arguments (with their defaults) are the recipe keys the network accepts.
Keeping the keys in the signature gives one place for the defaults and lets
:func:`build_model` reject unknown keys with a message that lists the valid ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

Builder = Callable[..., nn.Module]

_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder`` under ``name`` (a recipe's ``model.name``)."""

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorate


def registered_names() -> tuple[str, ...]:
    """Registered model names, in registration order."""
    return tuple(_REGISTRY)


def config_keys(name: str) -> tuple[str, ...]:
    """The cfg keys accepted by model ``name`` (its builder's keyword arguments)."""
    params = inspect.signature(_lookup(name)).parameters
    return tuple(p for p in params if p not in ("in_channels", "out_channels"))


def build_model(name: str, in_channels: int = 3, out_channels: int = 3, **cfg) -> nn.Module:
    """Build the network ``name`` from plain recipe values.

    Parameters
    ----------
    name : a registered model name (see ``MODEL_NAMES``).
    in_channels : image channels C of the (B, C, H, W) float32 input.
    out_channels : classes K of the (B, K, H, W) logits.
    **cfg : the model's recipe keys (plain strings, numbers, lists).

    Returns
    -------
    An ``nn.Module`` whose ``forward(x)`` maps (B, C, H, W) float32 of any H, W to
    (B, K, H, W) logits, and whose ``forward_heads(x)`` returns the list of
    deep-supervision heads (main head first; a one-element list without deep supervision).

    Raises
    ------
    ValueError : unknown ``name`` or a cfg key the model does not accept.
    """
    builder = _lookup(name)
    valid = config_keys(name)
    for key in cfg:
        if key not in valid:
            raise ValueError(
                f"model {name!r}: unknown cfg key {key!r}; valid keys: {', '.join(valid)}"
            )
    return builder(in_channels=in_channels, out_channels=out_channels, **cfg)


# Factories that allocate parameters and buffers. Only these go to the meta device in
# declared_shapes: torch's own meta context also moves linspace/arange, whose .item()
# MONAI's Swin-UNETR reads while building (a few scalars, harmless on the CPU).
_ALLOCATORS = (torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.tensor)


class _MetaParameters(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _ALLOCATORS and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def declared_shapes(name: str, in_channels: int = 3, out_channels: int = 3, **cfg) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes :func:`build_model` would give, without allocating them.

    A model file may declare any size (``base_filters: 4096`` asks for over 100 GB), so
    its shapes are checked against its stored weights before the network is built.
    """
    with _MetaParameters():
        model = build_model(name, in_channels, out_channels, **cfg)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _lookup(name: str) -> Builder:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def layer_spec(value: str | list | tuple) -> str | tuple:
    """A MONAI layer spec from a recipe value: ``"instance"`` or ``["leakyrelu", {...}]``.

    YAML gives lists; MONAI's layer factories take a name or a ``(name, kwargs)`` tuple.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str) \
            and isinstance(value[1], dict):
        return (value[0], dict(value[1]))
    raise ValueError(f"layer spec must be a name or [name, {{kwargs}}], got {value!r}")
