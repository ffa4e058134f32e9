"""The network (paper Sec. 3): configuration, the input transform, backbone (ResNet + FPN), RPN,
RoI heads, and ``MaskRCNN`` tying them together.  Nothing here imports ``minimask.data``: the
model takes plain arrays, and names of classes come from the data set or the checkpoint.

    from minimask.models import MaskRCNN, preset
    model = MaskRCNN(preset("shapes"))
"""

from .config import MaskRCNNConfig, from_dict, override, preset, to_dict
from .fpn import FPN, BackboneWithFPN
from .mask_rcnn import KEYPOINT_LOSS, LOSS_NAMES, MaskRCNN, build_model
from .poolers import MultiScaleRoIAlign, assign_boxes_to_levels
from .resnet import ResNet
from .roi_heads import RoIHeads
from .rpn import RegionProposalNetwork, RPNHead
from .transform import RCNNTransform

__all__ = ["MaskRCNN", "build_model", "RCNNTransform", "KEYPOINT_LOSS", "MaskRCNNConfig", "preset",
           "override", "to_dict", "from_dict", "LOSS_NAMES", "ResNet", "FPN", "BackboneWithFPN", "RPNHead",
           "RegionProposalNetwork", "RoIHeads", "MultiScaleRoIAlign", "assign_boxes_to_levels"]
