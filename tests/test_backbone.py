"""ResNet body and FPN (models/resnet.py, models/fpn.py): shapes, freezing, names, parameter
counts against torchvision's published figures, gradients, and one block against torch."""

import dataclasses

import numpy as np
import pytest

from minimask import Tensor, gradcheck, nn
from minimask.models.config import MaskRCNNConfig
from minimask.models.fpn import FPN, BackboneWithFPN
from minimask.models.resnet import BasicBlock, Bottleneck, ResNet


def small_cfg(**kw):
    base = dict(depth=18, width=8, norm="bn", freeze_at=0, fpn_out_channels=16)
    base.update(kw)
    return MaskRCNNConfig(**base)


def randomize_norms(module, rng):
    """Give every norm layer non-trivial statistics and affine values (so a test would see a
    norm applied with the wrong channel or in the wrong place)."""
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.FrozenBatchNorm2d)):
            c = m.num_features
            m.running_mean[...] = rng.normal(0, 0.5, c)
            m.running_var[...] = rng.uniform(0.5, 2.0, c)
            w = m.weight.data if isinstance(m.weight, Tensor) else m.weight
            b = m.bias.data if isinstance(m.bias, Tensor) else m.bias
            w[...] = rng.uniform(0.5, 1.5, c)
            b[...] = rng.normal(0, 0.5, c)


# ---- shapes ------------------------------------------------------------------------------
@pytest.mark.parametrize("depth,width", [(18, 8), (50, 16)])
def test_stage_shapes_and_strides(depth, width, rng):
    cfg = small_cfg(depth=depth, width=width)
    model = BackboneWithFPN(cfg)
    x = Tensor(rng.standard_normal((2, 3, 64, 96)).astype(np.float32))
    cs = model.body(x)
    expansion = 4 if depth >= 50 else 1
    for i, (c, stride) in enumerate(zip(cs, (4, 8, 16, 32))):
        assert c.shape == (2, width * 2 ** i * expansion, 64 // stride, 96 // stride)
        assert c.dtype == np.float32
    assert model.body.out_channels == [width * 2 ** i * expansion for i in range(4)]
    ps = model(x)
    assert len(ps) == 5
    for p, stride in zip(ps, model.strides):
        assert p.shape == (2, 16, 64 // stride, -(-96 // stride))  # P6 of width 3 -> 2 (ceil)
    assert model.out_channels == 16


def test_odd_input_sizes_keep_lateral_sizes(rng):
    # 70 x 100 gives C2..C5 of 18x25, 9x13, 5x7, 3x4: the top-down path must upsample to
    # each lateral's own size, not by exactly 2.
    model = BackboneWithFPN(small_cfg())
    x = Tensor(rng.standard_normal((1, 3, 70, 100)).astype(np.float32))
    cs = model.body(x)
    ps = model.fpn(cs)
    assert [c.shape[2:] for c in cs] == [(18, 25), (9, 13), (5, 7), (3, 4)]
    assert [p.shape[2:] for p in ps[:4]] == [c.shape[2:] for c in cs]
    assert ps[4].shape[2:] == (2, 2)


def test_float64_runs_through(rng):
    model = BackboneWithFPN(small_cfg()).astype(np.float64)
    ps = model(Tensor(rng.standard_normal((1, 3, 64, 64))))
    assert all(p.dtype == np.float64 for p in ps)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="depth"):
        ResNet(_Cfg(depth=152))
    with pytest.raises(ValueError, match="freeze_at"):
        ResNet(_Cfg(freeze_at=7))
    with pytest.raises(ValueError, match="norm"):
        ResNet(_Cfg(norm="group"))
    fpn = FPN([8, 16], 4)
    with pytest.raises(ValueError, match="feature map 1"):
        fpn([Tensor(np.zeros((1, 8, 4, 4), np.float32)), Tensor(np.zeros((1, 8, 2, 2), np.float32))])


@dataclasses.dataclass
class _Cfg:
    """A config without MaskRCNNConfig's own checks, to reach the modules' errors."""
    depth: int = 18
    width: int = 4
    norm: str = "bn"
    freeze_at: int = 0


# ---- freezing ----------------------------------------------------------------------------
@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 5])
def test_freeze_at_freezes_exactly_the_bottom_stages(freeze_at):
    body = ResNet(small_cfg(freeze_at=freeze_at))
    frozen_prefixes = (["conv1.", "bn1."] if freeze_at >= 1 else []) + \
        [f"layer{s}." for s in range(1, freeze_at)]
    for name, p in body.named_parameters():
        should_freeze = any(name.startswith(pre) for pre in frozen_prefixes)
        assert p.requires_grad == (not should_freeze), name
    # Frozen stages use FrozenBatchNorm2d even with norm="bn" (no batch statistics there).
    for name, m in body.named_modules():
        if isinstance(m, (nn.BatchNorm2d, nn.FrozenBatchNorm2d)):
            frozen = any((name + ".").startswith(pre) for pre in frozen_prefixes)
            assert isinstance(m, nn.FrozenBatchNorm2d if frozen else nn.BatchNorm2d), name


def test_frozen_stem_and_layer1_get_no_gradient(rng):
    model = BackboneWithFPN(small_cfg(freeze_at=2))
    x = Tensor(rng.standard_normal((2, 3, 32, 32)).astype(np.float32))
    loss = sum((p * Tensor(rng.standard_normal(p.shape).astype(np.float32))).sum() for p in model(x))
    loss.backward()
    for name, p in model.named_parameters():
        frozen = name.startswith(("body.conv1.", "body.bn1.", "body.layer1."))
        assert (p.grad is None) == frozen, name


def test_frozen_bn_has_no_parameters():
    body = ResNet(small_cfg(norm="frozen_bn", depth=50, width=4))
    assert all(".bn" not in n and "downsample.1" not in n for n, _ in body.named_parameters())
    assert all(isinstance(m, nn.FrozenBatchNorm2d) for m in body.modules()
               if isinstance(m, (nn.BatchNorm2d, nn.FrozenBatchNorm2d)))


# ---- torchvision's names -----------------------------------------------------------------
def test_state_dict_names_match_torchvision_bottleneck():
    body = ResNet(small_cfg(depth=50, width=4, norm="frozen_bn"))
    sd = body.state_dict()
    w = 4
    expected_shapes = {
        "conv1.weight": (w, 3, 7, 7),
        "bn1.running_mean": (w,),
        "layer1.0.conv1.weight": (w, w, 1, 1),
        "layer1.0.conv2.weight": (w, w, 3, 3),
        "layer1.0.conv3.weight": (4 * w, w, 1, 1),
        "layer1.0.downsample.0.weight": (4 * w, w, 1, 1),
        "layer1.0.downsample.1.weight": (4 * w,),
        "layer1.0.downsample.1.running_mean": (4 * w,),
        "layer1.0.downsample.1.running_var": (4 * w,),
        "layer2.0.downsample.0.weight": (8 * w, 4 * w, 1, 1),
        "layer3.5.bn3.bias": (16 * w,),
        "layer4.2.conv3.weight": (32 * w, 8 * w, 1, 1),
    }
    for k, shape in expected_shapes.items():
        assert sd[k].shape == shape, k
    assert "layer1.1.downsample.0.weight" not in sd
    assert "layer3.6.conv1.weight" not in sd          # depth 50 has 6 blocks in layer3
    assert "fc.weight" not in sd
    # v1.5: the stride sits on the 3x3 conv, and on the shortcut.
    block = body.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)


def test_state_dict_names_basic_block_and_depth_101():
    sd = ResNet(small_cfg(depth=18, width=4)).state_dict()
    assert "layer1.0.downsample.0.weight" not in sd   # 4 -> 4 channels, stride 1: identity
    assert sd["layer2.0.downsample.0.weight"].shape == (8, 4, 1, 1)
    assert sd["layer2.0.downsample.1.num_batches_tracked"].shape == ()
    assert "layer1.0.conv3.weight" not in sd and "layer1.1.conv2.weight" in sd
    assert "layer3.22.conv1.weight" in ResNet(small_cfg(depth=101, width=2)).state_dict()
    assert "layer3.5.conv1.weight" in ResNet(small_cfg(depth=34, width=2)).state_dict()


def test_backbone_with_fpn_names():
    sd = BackboneWithFPN(small_cfg()).state_dict()
    for k in ("body.layer1.0.conv1.weight", "fpn.inner_blocks.0.weight", "fpn.inner_blocks.3.bias",
              "fpn.layer_blocks.0.weight", "fpn.layer_blocks.3.bias"):
        assert k in sd, k
    assert sd["fpn.inner_blocks.3.weight"].shape == (16, 64, 1, 1)
    assert sd["fpn.layer_blocks.2.weight"].shape == (16, 16, 3, 3)


# ---- parameter counts --------------------------------------------------------------------
def expected_resnet_conv_params(depth, w=64):
    """Conv weights of the ResNet body, from He et al. 2016 Table 1, counted by hand."""
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    bottleneck = depth >= 50
    total = 3 * w * 7 * 7  # stem
    c_in = w
    for i, n in enumerate(blocks):
        width = w * 2 ** i
        c_out = 4 * width if bottleneck else width
        for j in range(n):
            if bottleneck:
                total += c_in * width + width * width * 9 + width * c_out
            else:
                total += c_in * width * 9 + width * width * 9
            if c_in != c_out or (i > 0 and j == 0):
                total += c_in * c_out  # 1x1 projection shortcut
            c_in = c_out
    return total


def test_parameter_counts_full_width_r50_fpn():
    # torchvision's published sizes: resnet50 has 25,557,032 parameters, of which the fc layer
    # has 2048*1000 + 1000 and the 53 batch norms 2 * (sum of their channels).
    r50_norm_channels = 64 + sum(
        n * (w + w + 4 * w) + 4 * w for n, w in zip((3, 4, 6, 3), (64, 128, 256, 512)))
    torchvision_r50_convs = 25_557_032 - (2048 * 1000 + 1000) - 2 * r50_norm_channels
    assert expected_resnet_conv_params(50) == torchvision_r50_convs == 23_454_912

    model = BackboneWithFPN(MaskRCNNConfig())  # the paper's R50-FPN, frozen BN, freeze_at=2
    n_body = sum(p.size for p in model.body.parameters())
    n_fpn = sum(p.size for p in model.fpn.parameters())
    assert n_body == torchvision_r50_convs
    fpn_expected = sum(c * 256 + 256 for c in (256, 512, 1024, 2048)) + 4 * (256 * 256 * 9 + 256)
    assert n_fpn == fpn_expected == 3_344_384

    # torchvision's maskrcnn_resnet50_fpn has 44,401,393 parameters (its BNs are frozen, so
    # buffers); the rest are the RPN and RoI heads, counted from the paper's Fig. 4 here.
    rpn = (256 * 256 * 9 + 256) + (256 * 3 + 3) + (256 * 12 + 12)
    box_head = (256 * 7 * 7 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 91 + 91) + (1024 * 364 + 364)
    mask_head = 4 * (256 * 256 * 9 + 256) + (256 * 256 * 4 + 256) + (256 * 91 + 91)
    assert n_body + n_fpn + rpn + box_head + mask_head == 44_401_393
    n_trainable = sum(p.size for p in model.parameters() if p.requires_grad)
    frozen = 3 * 64 * 49 + sum(p.size for p in model.body.layer1.parameters())
    assert n_trainable == n_body + n_fpn - frozen


@pytest.mark.parametrize("depth", [18, 34, 101])
def test_parameter_counts_other_depths(depth):
    # narrow width keeps construction fast; the formula is width-generic
    body = ResNet(small_cfg(depth=depth, width=8, norm="frozen_bn"))
    assert sum(p.size for p in body.parameters()) == expected_resnet_conv_params(depth, 8)


def test_init_statistics():
    body = ResNet(small_cfg(depth=50, width=16, norm="frozen_bn"))
    w = body.layer3[0].conv3.weight.data  # (256, 64, 1, 1): fan_out 256 (fan_in would be 64)
    assert abs(w.std() - np.sqrt(2.0 / 256)) < 0.05 * np.sqrt(2.0 / 256)
    fpn = FPN([32, 64], 16)
    w = fpn.inner_blocks[1].weight.data  # fan_in 64: uniform in +-sqrt(3/64)
    bound = np.sqrt(3.0 / 64)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    assert np.all(fpn.layer_blocks[0].bias.data == 0)


# ---- gradients ---------------------------------------------------------------------------
def test_backward_reaches_every_trainable_parameter(rng):
    model = BackboneWithFPN(small_cfg(depth=18, width=8, norm="bn"))
    x = Tensor(rng.standard_normal((2, 3, 64, 96)).astype(np.float32), requires_grad=True)
    loss = sum((p * Tensor(rng.standard_normal(p.shape).astype(np.float32))).sum() for p in model(x))
    loss.backward()
    params = list(model.named_parameters())
    # ResNet-18: 20 convs (stem, 16 in blocks, 3 shortcuts) each with a BatchNorm2d (weight,
    # bias); FPN: 8 convs with bias.
    assert len(params) == 20 + 2 * 20 + 2 * 8
    for name, p in params:
        assert p.grad is not None, name
        assert p.grad.shape == p.shape
        assert np.all(np.isfinite(p.grad)), name
        assert np.abs(p.grad).max() > 0, name
    assert np.abs(x.grad).max() > 0


@pytest.mark.parametrize("block_cls,stride", [(Bottleneck, 2), (BasicBlock, 1)])
def test_block_gradcheck_float64(block_cls, stride, rng):
    in_ch = 3
    block = block_cls(in_ch, 2, stride=stride, norm=nn.BatchNorm2d).astype(np.float64)
    randomize_norms(block, rng)
    for p in block.parameters():
        p.data[...] = rng.normal(0, 0.7, p.shape)
    x = Tensor(rng.standard_normal((2, in_ch, 5, 5)), requires_grad=True)
    params = list(block.parameters())
    assert gradcheck(lambda x, *ps: block(x), [x] + params, directions=4)


def test_fpn_gradcheck_float64(rng):
    fpn = FPN([2, 3, 4], 2).astype(np.float64)
    cs = [Tensor(rng.standard_normal((1, c, s, s + 1)), requires_grad=True)
          for c, s in zip((2, 3, 4), (7, 4, 2))]
    outs = lambda *args: tuple(fpn(list(args[:3])))  # noqa: E731
    assert gradcheck(outs, cs + list(fpn.parameters()), directions=4)


# ---- against torch -----------------------------------------------------------------------
def _torch():
    return pytest.importorskip("torch", reason="torch is not installed: comparison skipped")


def _t_bn(tf, x, bn, torch):
    T = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
    w = bn.weight.data if isinstance(bn.weight, Tensor) else bn.weight
    b = bn.bias.data if isinstance(bn.bias, Tensor) else bn.bias
    return tf.batch_norm(x, T(bn.running_mean).clone(), T(bn.running_var).clone(), T(w), T(b),
                         training=False, eps=bn.eps)


def torch_bottleneck(x, block, torch):
    """torchvision's Bottleneck.forward, written with torch.nn.functional, on our weights."""
    tf = torch.nn.functional
    T = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
    s = block.conv2.stride[0]
    y = tf.relu(_t_bn(tf, tf.conv2d(x, T(block.conv1.weight.data)), block.bn1, torch))
    y = tf.relu(_t_bn(tf, tf.conv2d(y, T(block.conv2.weight.data), stride=s, padding=1), block.bn2, torch))
    y = _t_bn(tf, tf.conv2d(y, T(block.conv3.weight.data)), block.bn3, torch)
    short = x
    if block.downsample is not None:
        short = _t_bn(tf, tf.conv2d(x, T(block.downsample[0].weight.data), stride=s),
                      block.downsample[1], torch)
    return tf.relu(y + short)


def torch_basic_block(x, block, torch):
    """torchvision's BasicBlock.forward, written with torch.nn.functional, on our weights."""
    tf = torch.nn.functional
    T = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
    s = block.conv1.stride[0]
    y = tf.relu(_t_bn(tf, tf.conv2d(x, T(block.conv1.weight.data), stride=s, padding=1), block.bn1, torch))
    y = _t_bn(tf, tf.conv2d(y, T(block.conv2.weight.data), padding=1), block.bn2, torch)
    short = x
    if block.downsample is not None:
        short = _t_bn(tf, tf.conv2d(x, T(block.downsample[0].weight.data), stride=s),
                      block.downsample[1], torch)
    return tf.relu(y + short)


@pytest.mark.parametrize("in_ch,width,stride", [(8, 16, 2), (8, 8, 1)])
def test_basic_block_matches_torch(in_ch, width, stride, rng):
    torch = _torch()
    block = BasicBlock(in_ch, width, stride=stride, norm=nn.FrozenBatchNorm2d)
    randomize_norms(block, rng)
    x = rng.standard_normal((2, in_ch, 13, 10)).astype(np.float32)
    ours = block(Tensor(x)).data
    ref = torch_basic_block(torch.from_numpy(x), block, torch).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("in_ch,width,stride", [(16, 8, 2), (32, 8, 1), (16, 8, 1)])
def test_bottleneck_matches_torch(in_ch, width, stride, rng):
    torch = _torch()
    block = Bottleneck(in_ch, width, stride=stride, norm=nn.FrozenBatchNorm2d)
    randomize_norms(block, rng)
    assert (block.downsample is None) == (in_ch == 4 * width and stride == 1)
    x = rng.standard_normal((2, in_ch, 13, 10)).astype(np.float32)
    ours = block(Tensor(x)).data
    ref = torch_bottleneck(torch.from_numpy(x), block, torch).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_fpn_matches_torch(rng):
    torch = _torch()
    tf = torch.nn.functional
    fpn = FPN([4, 8, 16, 32], 8)
    cs = [rng.standard_normal((2, c, h, w)).astype(np.float32)
          for c, (h, w) in zip((4, 8, 16, 32), [(18, 25), (9, 13), (5, 7), (3, 4)])]
    ours = [p.data for p in fpn([Tensor(c) for c in cs])]

    # torchvision's FeaturePyramidNetwork.forward + LastLevelMaxPool, with our weights
    T = torch.from_numpy
    conv = lambda x, m, pad: tf.conv2d(x, T(m.weight.data), T(m.bias.data), padding=pad)  # noqa: E731
    last = conv(T(cs[-1]), fpn.inner_blocks[3], 0)
    ref = [conv(last, fpn.layer_blocks[3], 1)]
    for i in (2, 1, 0):
        lateral = conv(T(cs[i]), fpn.inner_blocks[i], 0)
        last = lateral + tf.interpolate(last, size=lateral.shape[-2:], mode="nearest")
        ref.insert(0, conv(last, fpn.layer_blocks[i], 1))
    ref.append(tf.max_pool2d(ref[-1], 1, 2, 0))
    for o, r in zip(ours, ref):
        np.testing.assert_allclose(o, r.numpy(), rtol=1e-4, atol=1e-5)


def test_resnet_stem_and_training_bn_match_torch(rng):
    # The stem (7x7/2 conv, batch norm in training mode, ReLU, 3x3/2 max pool with padding)
    torch = _torch()
    tf = torch.nn.functional
    body = ResNet(small_cfg(depth=18, width=8, norm="bn"))
    x = rng.standard_normal((2, 3, 33, 30)).astype(np.float32)
    ours = body.maxpool(nn.ReLU()(body.bn1(body.conv1(Tensor(x))))).data
    y = tf.conv2d(torch.from_numpy(x), torch.from_numpy(body.conv1.weight.data), stride=2, padding=3)
    y = tf.batch_norm(y, None, None, training=True, eps=1e-5)
    ref = tf.max_pool2d(tf.relu(y), 3, 2, 1).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
