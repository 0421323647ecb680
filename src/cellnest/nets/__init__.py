"""Segmentation networks, chosen by name from a recipe.

>>> from cellnest.nets import build_model
>>> model = build_model("attn_unetpp", gates=["2,1", "0,3"], deep_supervision=True)

Every model maps (B, C, H, W) float32 of any H, W to logits (B, K, H, W) with
``model(x)``, in train and eval mode; ``model.forward_heads(x)`` returns the
deep-supervision heads (main first; a one-element list without deep supervision) and
``model.num_heads`` their number. See docs/networks.md for sizes and timings.
"""

# Importing the network modules registers them; this order is the order of MODEL_NAMES.
from cellnest.nets import unet  # noqa: F401  isort: skip
from cellnest.nets import unetpp  # noqa: F401  isort: skip
from cellnest.nets import transformers  # noqa: F401  isort: skip
from cellnest.nets import generic_unet  # noqa: F401  isort: skip
from cellnest.nets.attention import AttentionGate
from cellnest.nets.profile import ModelProfile, count_flops, count_parameters, profile_model
from cellnest.nets.registry import build_model, config_keys, register, registered_names
from cellnest.nets.wrapper import PadCrop

MODEL_NAMES: tuple[str, ...] = registered_names()

__all__ = [
    "MODEL_NAMES",
    "AttentionGate",
    "ModelProfile",
    "PadCrop",
    "build_model",
    "config_keys",
    "count_flops",
    "count_parameters",
    "profile_model",
    "register",
]
