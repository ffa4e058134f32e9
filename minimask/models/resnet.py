"""ResNet, the backbone's bottom-up pathway (Mask R-CNN Sec. 3, "Network Architecture").

Mask R-CNN extracts features with a ResNet (He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016, Table 1) whose stages conv2..conv5 ("res2".."res5" in the paper,
``layer1``..``layer4`` here, as torchvision names them) give maps C2..C5 at strides 4, 8, 16
and 32; the FPN (``fpn.py``) turns them into the pyramid P2..P6 the heads read from.

    stem     7x7/2 conv (no bias), norm, ReLU, 3x3/2 max pool        stride 4
    layer1   blocks at width w       (no stride: the max pool did it) -> C2, stride 4
    layer2   blocks at width 2w, first block stride 2                  -> C3, stride 8
    layer3   blocks at width 4w, first block stride 2                  -> C4, stride 16
    layer4   blocks at width 8w, first block stride 2                  -> C5, stride 32

Two kinds of residual block (He et al. 2016, Fig. 5): ``BasicBlock`` (two 3x3 convs, depths
18 and 34) and ``Bottleneck`` (1x1 reduce, 3x3, 1x1 expand by 4; depths 50 and 101).  As in
torchvision's "ResNet v1.5" the stride of a bottleneck sits on its 3x3 conv, not its first
1x1 conv (a 1x1 conv with stride 2 would simply drop three quarters of its input).  When a
block changes the shape, the shortcut is a 1x1 conv (with the block's stride) and a norm
(the paper's "projection shortcut", option B).

Names (``conv1``, ``bn1``, ``layer1.0.downsample.0`` ...) are torchvision's, so an ImageNet
or COCO checkpoint maps onto ours key by key.
"""

import functools

from .. import nn

DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _norm_layer(norm, frozen, eps=1e-5):
    """The norm class: FrozenBatchNorm2d for a pretrained backbone, BatchNorm2d from scratch.

    A frozen stage always gets FrozenBatchNorm2d (as Detectron2's ``freeze()``): freezing a
    stage means its output must not change, and a BatchNorm2d in training mode would still
    normalise with batch statistics and update its running averages."""
    if norm == "frozen_bn" or frozen:
        # eps: cfg.frozen_bn_eps, that of the checkpoint being loaded (interop.py)
        return functools.partial(nn.FrozenBatchNorm2d, eps=eps)
    if norm == "bn":
        return nn.BatchNorm2d
    raise ValueError(f"resnet: norm={norm!r} is not one of ['frozen_bn', 'bn']")


class BasicBlock(nn.Module):
    """Two 3x3 convs with a shortcut: y = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    expansion = 1

    def __init__(self, in_channels, width, stride=1, norm=nn.FrozenBatchNorm2d):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = nn.Conv2d(width, out_channels, 3, padding=1, bias=False)
        self.bn2 = norm(out_channels)
        self.downsample = _shortcut(in_channels, out_channels, stride, norm)

    def forward(self, x):
        y = nn.conv_norm(self.conv1, self.bn1, x, relu=True)
        # relu(bn2(conv2(y)) + shortcut), at inference in one pass after the conv
        return nn.conv_norm(self.conv2, self.bn2, y, relu=True, residual=_shortcut_of(self, x))


class Bottleneck(nn.Module):
    """1x1 reduce to ``width``, 3x3 (carrying the stride), 1x1 expand to 4 * width, plus shortcut.

    The 1x1 convs make the 3x3 conv cheap: it works on a quarter of the block's channels
    (He et al. 2016, Sec. 4.1, "Deeper Bottleneck Architectures")."""

    expansion = 4

    def __init__(self, in_channels, width, stride=1, norm=nn.FrozenBatchNorm2d):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = norm(out_channels)
        self.downsample = _shortcut(in_channels, out_channels, stride, norm)

    def forward(self, x):
        y = nn.conv_norm(self.conv1, self.bn1, x, relu=True)
        y = nn.conv_norm(self.conv2, self.bn2, y, relu=True)
        # relu(bn3(conv3(y)) + shortcut), at inference in one pass after the conv
        return nn.conv_norm(self.conv3, self.bn3, y, relu=True, residual=_shortcut_of(self, x))


def _shortcut_of(block, x):
    """The block's shortcut applied to x: x itself, or its projection (conv, norm)."""
    if block.downsample is None:
        return x
    conv, norm = block.downsample
    return nn.conv_norm(conv, norm, x)


def _shortcut(in_channels, out_channels, stride, norm):
    """Identity (None) when the shape is kept, else a strided 1x1 conv + norm (projection)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                         norm(out_channels))


class ResNet(nn.Module):
    """The ResNet body of ``cfg.depth`` (18/34/50/101) and base width ``cfg.width`` (64 is the
    standard network), without the classifier; ``forward(x)`` returns [C2, C3, C4, C5].

    ``cfg.freeze_at`` stops training at the bottom: 0 trains everything, 1 freezes the stem,
    2 the stem and layer1 (the paper's and Detectron2's default, FREEZE_AT=2: the first
    layers learn generic edges and colours that ImageNet pretraining already gives), up to 5
    (everything).  Frozen parameters get ``requires_grad=False`` and frozen stages use
    FrozenBatchNorm2d whatever ``cfg.norm`` says.
    """

    def __init__(self, cfg):
        super().__init__()
        if cfg.depth not in DEPTHS:
            raise ValueError(f"resnet: depth={cfg.depth} is not one of {sorted(DEPTHS)}")
        if not 0 <= cfg.freeze_at <= 5:
            raise ValueError(f"resnet: freeze_at={cfg.freeze_at} must be in 0..5")
        block = Bottleneck if cfg.depth >= 50 else BasicBlock
        w = cfg.width

        # Stage 1 is the stem, stages 2..5 are layer1..layer4 (C2..C5): stage s is frozen when
        # s <= freeze_at.
        self.conv1 = nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
        eps = getattr(cfg, "frozen_bn_eps", 1e-5)
        self.bn1 = _norm_layer(cfg.norm, cfg.freeze_at >= 1, eps)(w)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        in_channels = w
        self.out_channels = []
        for i, n_blocks in enumerate(DEPTHS[cfg.depth]):
            norm = _norm_layer(cfg.norm, cfg.freeze_at >= i + 2, eps)
            width = w * 2 ** i
            blocks = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1  # layer1 keeps the max pool's stride 4
                blocks.append(block(in_channels, width, stride, norm))
                in_channels = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.out_channels.append(in_channels)

        self._init_weights(cfg.backbone_init)
        self._freeze(cfg.freeze_at)

    def _init_weights(self, how="kaiming_fan_out"):
        """How the convs start when the backbone trains from scratch (``cfg.backbone_init``):

        - ``"kaiming_fan_out"``: as torchvision's ``ResNet.__init__`` and Detectron2's
          ``c2_msra_fill``: He normal with fan_out, std sqrt(2 / (k^2 C_out)) (keeps the
          gradients' scale steady through ReLUs, He et al. 2015);
        - ``"pytorch_default"``: what ``nn.Conv2d`` starts with anyway (kaiming-uniform with
          a = sqrt(5): U(+-1/sqrt(k^2 C_in)), a std about 2.5 times smaller for 3x3 convs of
          equal widths).  Behind batch norm the scale of a conv's weights does not change the
          function, but it sets the effective learning rate: the gradient of a normalised
          layer scales as 1 / |w|, so smaller weights move faster at the same lr.

        Norms start at weight 1 and bias 0 either way.  Pretrained weights (``backbone_weights``)
        replace all of this."""
        if how == "pytorch_default":
            return  # each nn.Conv2d already drew PyTorch's default (nn.init.default_weight_bias_)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _freeze(self, freeze_at):
        frozen = [self.conv1, self.bn1] + [getattr(self, f"layer{s}") for s in range(1, freeze_at)]
        if freeze_at == 0:
            frozen = []
        for m in frozen:
            for p in m.parameters():
                p.requires_grad = False

    def forward(self, x):
        x = self.maxpool(nn.conv_norm(self.conv1, self.bn1, x, relu=True))
        features = []
        for s in range(1, 5):
            x = getattr(self, f"layer{s}")(x)
            features.append(x)
        return features
