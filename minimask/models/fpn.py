"""Feature Pyramid Network: the ResNet-FPN backbone (Mask R-CNN Sec. 3, "Network Architecture").

Lin et al., "Feature Pyramid Networks for Object Detection" (CVPR 2017), Sec. 3: a ResNet's
deep maps (C5) know *what* is in the image but see it coarsely; its shallow maps (C2) see
finely but know little.  FPN gives every scale both, with a top-down pathway and lateral
connections (FPN Fig. 3):

    lateral_i = 1x1 conv(C_i)                      (all levels to the same ``out_channels``)
    M5 = lateral_5
    M_i = lateral_i + upsample_nearest(M_{i+1})    (to lateral_i's size; i = 4, 3, 2)
    P_i = 3x3 conv(M_i)                            (smooths the upsampling's aliasing)
    P6 = max_pool(P5, kernel 1, stride 2)          (subsampling only: a coarser level for the
                                                    RPN's largest anchors, FPN Sec. 4.1)

Mask R-CNN (Sec. 3) uses this as its backbone: the RPN reads P2..P6, the box and mask heads
pool RoI features from P2..P5, each RoI from the level matching its size.  Names follow
torchvision's ``FeaturePyramidNetwork`` (``inner_blocks`` are the laterals, ``layer_blocks``
the 3x3 output convs; mounted as ``backbone.fpn``; the ResNet is ``backbone.body``).
"""

from .. import functional as F
from .. import nn
from .resnet import ResNet


class FPN(nn.Module):
    """``forward([C2, C3, C4, C5]) -> [P2, P3, P4, P5, P6]``, each with ``out_channels``."""

    def __init__(self, in_channels_list, out_channels):
        super().__init__()
        if any(c <= 0 for c in in_channels_list) or out_channels <= 0:
            raise ValueError(f"fpn: channel counts must be positive, got in_channels_list="
                             f"{list(in_channels_list)}, out_channels={out_channels}")
        self.in_channels_list = list(in_channels_list)
        self.out_channels = out_channels
        self.inner_blocks = nn.ModuleList([nn.Conv2d(c, out_channels, 1) for c in in_channels_list])
        self.layer_blocks = nn.ModuleList([nn.Conv2d(out_channels, out_channels, 3, padding=1)
                                           for _ in in_channels_list])
        # torchvision's (and Detectron's c2_xavier_fill) choice: kaiming-uniform with a = 1,
        # i.e. variance 1 / fan_in (no ReLU follows these convs), and zero biases.
        for m in list(self.inner_blocks) + list(self.layer_blocks):
            nn.init.kaiming_uniform_(m.weight, a=1)
            nn.init.zeros_(m.bias)

    def forward(self, features):
        if len(features) != len(self.inner_blocks):
            raise ValueError(f"fpn: expected {len(self.inner_blocks)} feature maps, got {len(features)}")
        for i, (f, c) in enumerate(zip(features, self.in_channels_list)):
            if f.ndim != 4 or f.shape[1] != c:
                raise ValueError(f"fpn: feature map {i} should be (N, {c}, H, W), got {tuple(f.shape)}")

        # Top-down: start at the coarsest map and walk to the finest.
        merged = self.inner_blocks[-1](features[-1])
        outputs = [self.layer_blocks[-1](merged)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[i](features[i])
            # Upsample to the lateral's exact size (not by 2): with an odd-sized input a
            # level can be one pixel more than twice the next one (FPN uses nearest).
            top_down = F.interpolate(merged, size=tuple(lateral.shape[2:]), mode="nearest")
            merged = lateral + top_down
            outputs.insert(0, self.layer_blocks[i](merged))

        # P6, torchvision's LastLevelMaxPool: a 1x1 max pool with stride 2 just keeps every
        # other pixel of P5.
        outputs.append(F.max_pool2d(outputs[-1], 1, stride=2))
        return outputs


class BackboneWithFPN(nn.Module):
    """ResNet body + FPN: ``forward(images (N, 3, H, W)) -> [P2, P3, P4, P5, P6]`` at
    ``strides`` 4, 8, 16, 32, 64 with ``out_channels`` = ``cfg.fpn_out_channels`` each."""

    strides = (4, 8, 16, 32, 64)

    def __init__(self, cfg):
        super().__init__()
        self.body = ResNet(cfg)
        self.fpn = FPN(self.body.out_channels, cfg.fpn_out_channels)
        self.out_channels = cfg.fpn_out_channels

    def forward(self, x):
        return self.fpn(self.body(x))
