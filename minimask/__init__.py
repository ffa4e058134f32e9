"""minimask: Mask R-CNN (He, Gkioxari, Dollar, Girshick, ICCV 2017) from scratch on NumPy and CuPy.

Start with ``lessons/`` or read the package next to the paper: ``tensor.py`` (autograd),
``functional/`` (layer ops with their gradients), ``kernels/`` (RoIAlign, NMS loops),
``ops/`` (box geometry), ``models/`` (the network), ``engine/`` (training and evaluation).
"""

from . import functional
from .backend import get_array_module, gpu_available, to_device
from .gradcheck import gradcheck
from .tensor import Function, Tensor, no_grad

F = functional

__all__ = ["Tensor", "Function", "no_grad", "gradcheck", "functional", "F",
           "get_array_module", "to_device", "gpu_available"]
__version__ = "0.1.0"
