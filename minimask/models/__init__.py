"""The network (paper Sec. 3): configuration, backbone (ResNet + FPN), RPN, RoI heads, and
``MaskRCNN`` tying them together.

    from minimask.models import MaskRCNN, preset
    model = MaskRCNN(preset("shapes"))
"""

from .config import MaskRCNNConfig, from_dict, override, preset, to_dict
from .fpn import FPN, BackboneWithFPN
from .mask_rcnn import LOSS_NAMES, MaskRCNN
from .poolers import MultiScaleRoIAlign, assign_boxes_to_levels
from .resnet import ResNet
from .roi_heads import RoIHeads
from .rpn import RegionProposalNetwork, RPNHead

__all__ = ["MaskRCNN", "MaskRCNNConfig", "preset", "override", "to_dict", "from_dict", "LOSS_NAMES",
           "ResNet", "FPN", "BackboneWithFPN", "RPNHead", "RegionProposalNetwork", "RoIHeads",
           "MultiScaleRoIAlign", "assign_boxes_to_levels"]
