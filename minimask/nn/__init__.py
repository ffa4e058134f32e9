"""Modules: layers that hold their weights, as ``torch.nn`` (``from minimask import nn``).

``module.py`` has Module, Parameter, Sequential, ModuleList and atomic ``.npz`` saving;
``layers.py`` the layers Mask R-CNN uses; ``init.py`` the weight initialisations.
"""

from . import init
from .layers import (
           BatchNorm2d,
           Conv2d,
           ConvTranspose2d,
           FrozenBatchNorm2d,
           Linear,
           MaxPool2d,
           ReLU,
           conv_norm,
           conv_relu,
)
from .module import (
           Module,
           ModuleList,
           Parameter,
           Sequential,
           atomic_write,
           load_npz,
           save_npz,
           state_dict_problems,
)

__all__ = ["Module", "Parameter", "Sequential", "ModuleList", "Conv2d", "ConvTranspose2d", "Linear",
           "BatchNorm2d", "FrozenBatchNorm2d", "conv_norm", "conv_relu", "ReLU", "MaxPool2d", "init",
           "save_npz", "load_npz", "atomic_write", "state_dict_problems"]
