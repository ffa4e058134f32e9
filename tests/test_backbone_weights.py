"""ImageNet backbones (issue 17): torchvision's classification ResNets converted and loaded.

``minimask convert-weights --backbone resnet50.pth backbone.npz`` keeps the ResNet body of
torchvision's ImageNet classifier (``fc`` dropped) and ``minimask train --backbone-weights``
loads it before training.  The tests use torchvision's own ``resnet18/34/50/101(weights=None)``
with random weights and random batch-norm statistics (nothing is downloaded), and check that
minimask's ResNet with the file loaded computes what torchvision's ResNet computes: the
statistics become the frozen batch norms' as they are.  torch and torchvision are the oracle;
without them those tests skip, saying why.
"""

import dataclasses
import json

import numpy as np
import pytest

from minimask.cli import main
from minimask.interop import (
    backbone_state,
    convert_backbone,
    load_backbone_weights,
    read_backbone,
    resnet_architecture,
)
from minimask.models import MaskRCNN, ResNet, preset
from minimask.tensor import Tensor, no_grad

try:
    import torch
except ImportError:
    torch = None

from tv_shim import import_torchvision


def torchvision_or_skip():
    if torch is None:
        pytest.skip("torch is not installed: no torchvision ResNets to convert")
    try:
        return import_torchvision()
    except ImportError as e:
        pytest.skip(f"torchvision unavailable: {e}")


def random_resnet(depth, seed=0):
    """torchvision's ImageNet ResNet of ``depth``, random weights and random BN statistics."""
    torchvision = torchvision_or_skip()
    torch.manual_seed(seed)
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                # The last norm of each residual branch small, so that deep stacks stay in range.
                low, high = (0.2, 0.5) if name.endswith(("bn2", "bn3", "downsample.1")) else (0.5, 1.5)
                m.weight.copy_(torch.empty(n).uniform_(low, high, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=g))
                m.num_batches_tracked.fill_(1000)
    return net.eval()


def torchvision_stages(net, x):
    """C2..C5 of torchvision's ResNet (eval mode: batch norms on their running statistics)."""
    with torch.no_grad():
        y = net.maxpool(net.relu(net.bn1(net.conv1(torch.from_numpy(x)))))
        out = []
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            y = stage(y)
            out.append(y.numpy())
    return out


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_converted_imagenet_resnet_computes_what_torchvisions_computes(depth, tmp_path):
    net = random_resnet(depth)
    summary = convert_backbone({k: v for k, v in net.state_dict().items()}, tmp_path / "backbone.npz")
    assert (summary["depth"], summary["width"]) == (depth, 64)
    assert {"fc.weight", "fc.bias"} <= set(summary["dropped"])
    assert all(k.startswith("fc.") or k.endswith("num_batches_tracked") for k in summary["dropped"])
    tensors, meta = read_backbone(tmp_path / "backbone.npz")
    assert (meta["depth"], meta["width"], meta["format"]) == (depth, 64, 1)
    assert not any(k.startswith("fc.") for k in tensors)

    ours = ResNet(dataclasses.replace(preset("r50_fpn"), depth=depth))  # frozen batch norms
    done = load_backbone_weights(ours, tmp_path / "backbone.npz")
    assert done["tensors"] == len(ours.state_dict()) == len(tensors)
    x = np.random.default_rng(depth).normal(size=(2, 3, 64, 96)).astype(np.float32)
    with no_grad():
        features = ours(Tensor(x))
    for level, (a, b) in enumerate(zip(features, torchvision_stages(net, x))):
        assert a.shape == b.shape
        err = np.abs(a.data - b).max() / np.abs(b).max()
        assert err < 1e-4, f"ResNet-{depth} C{level + 2}: relative error {err:.2e}"


def test_mask_rcnn_loads_into_its_body_and_names_what_does_not_fit(tmp_path):
    net = random_resnet(18, seed=1)
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    convert_backbone(state, tmp_path / "r18.npz")

    # The shapes preset's ResNet-18 is 16 wide: refused, saying how to get a model that fits.
    with pytest.raises(ValueError, match=r"ResNet-18 of width 64.*ResNet-18 of width 16.*--set width=64"):
        load_backbone_weights(MaskRCNN(preset("shapes")), tmp_path / "r18.npz")

    # A 64-wide one with trainable batch norms: weights, biases and statistics all in place.
    model = MaskRCNN(dataclasses.replace(preset("shapes"), width=64))
    counter = model.backbone.body.bn1.num_batches_tracked.copy()
    fpn_before = model.backbone.fpn.state_dict()
    load_backbone_weights(model, tmp_path / "r18.npz")
    body = model.backbone.body
    np.testing.assert_array_equal(body.bn1.weight.data, state["bn1.weight"])
    np.testing.assert_array_equal(body.layer3[1].bn2.running_var, state["layer3.1.bn2.running_var"])
    np.testing.assert_array_equal(body.layer4[0].downsample[0].weight.data,
                                  state["layer4.0.downsample.0.weight"])
    np.testing.assert_array_equal(body.bn1.num_batches_tracked, counter)  # the model's own counter
    for k, v in model.backbone.fpn.state_dict().items():  # nothing outside the body is touched
        np.testing.assert_array_equal(v, fpn_before[k])

    # A tensor missing, one too many, one of the wrong shape: each named.
    bad = dict(state)
    del bad["layer1.0.bn1.running_var"]
    bad["layer1.0.conv9.weight"] = np.zeros((3, 3), np.float32)
    bad["layer2.0.conv1.weight"] = np.zeros((128, 64, 1, 1), np.float32)
    convert_backbone(bad, tmp_path / "bad.npz")
    with pytest.raises(ValueError) as e:
        load_backbone_weights(model, tmp_path / "bad.npz")
    text = str(e.value)
    assert "bad.npz" in text
    assert "found no place in the ResNet: layer1.0.conv9.weight" in text
    assert "missing from the file: backbone.body.layer1.0.bn1.running_var" in text
    assert "layer2.0.conv1.weight: file (128, 64, 1, 1), model (128, 64, 3, 3)" in text


def test_architecture_is_read_from_the_names_and_odd_files_are_refused(tmp_path):
    def fake(blocks, bottleneck, width=64):
        keys = {"conv1.weight": np.zeros((width, 3, 7, 7))}
        for s, n in enumerate(blocks, 1):
            for j in range(n):
                for conv in ("conv1", "conv2") + (("conv3",) if bottleneck else ()):
                    keys[f"layer{s}.{j}.{conv}.weight"] = np.zeros(1)
        return keys

    assert resnet_architecture(fake((2, 2, 2, 2), False)) == (18, 64)
    assert resnet_architecture(fake((3, 4, 6, 3), False, width=32)) == (34, 32)
    assert resnet_architecture(fake((3, 4, 6, 3), True)) == (50, 64)
    assert resnet_architecture(fake((3, 4, 23, 3), True)) == (101, 64)
    with pytest.raises(ValueError, match=r"\[3, 8, 36, 3\] bottleneck blocks"):  # ResNet-152
        resnet_architecture(fake((3, 8, 36, 3), True))
    with pytest.raises(ValueError, match="not a torchvision ResNet"):
        backbone_state({"backbone.body.conv1.weight": np.zeros(1)})
    # DataParallel's "module." prefix is taken off.
    tensors, info = backbone_state({"module." + k: v for k, v in fake((2, 2, 2, 2), False).items()})
    assert info["depth"] == 18 and "conv1.weight" in tensors

    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        load_backbone_weights(ResNet(preset("shapes")), tmp_path / "nothere.npz")
    np.savez(tmp_path / "plain.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="not a converted backbone"):
        read_backbone(tmp_path / "plain.npz")
    (tmp_path / "r.pth").write_text("x")
    with pytest.raises(ValueError, match="convert it first: minimask convert-weights --backbone"):
        read_backbone(tmp_path / "r.pth")


def test_build_training_loads_the_backbone_on_a_fresh_run_only(tmp_path):
    from minimask.engine.trainer import build_training

    net = random_resnet(18, seed=2)
    convert_backbone({k: v for k, v in net.state_dict().items()}, tmp_path / "r18.npz")
    cfg = dataclasses.replace(preset("shapes"), width=64, backbone_weights=str(tmp_path / "r18.npz"))
    said = []
    model, optimizer, scheduler = build_training(cfg, "cpu", log=said.append)
    assert "ResNet-18" in said[0] and "r18.npz" in said[0]
    np.testing.assert_array_equal(model.backbone.body.conv1.weight.data, net.conv1.weight.detach().numpy())
    # Resuming takes every weight from the checkpoint: the file is not read (here it is gone).
    state = {"model": MaskRCNN(dataclasses.replace(cfg, backbone_weights="")).state_dict(),
             "optim": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    (tmp_path / "r18.npz").unlink()
    resumed, _, _ = build_training(cfg, "cpu", state=state, log=said.append)
    np.testing.assert_array_equal(resumed.backbone.body.conv1.weight.data,
                                  state["model"]["backbone.body.conv1.weight"])
    assert len(said) == 1
    with pytest.raises(FileNotFoundError, match="r18.npz"):
        build_training(cfg, "cpu")


def test_convert_and_train_through_the_cli(tmp_path, capsys):
    """A random torchvision ResNet-50 .pth -> convert-weights --backbone -> train 1 iteration of
    a ResNet-50 model on two small shapes images; the frozen body ends as the file began."""
    from minimask.data.shapes import make_split
    from minimask.engine.checkpoint import load_checkpoint

    net = random_resnet(50, seed=3)
    torch.save(net.state_dict(), tmp_path / "resnet50.pth")
    npz = tmp_path / "resnet50_imagenet.npz"
    assert main(["convert-weights", "--backbone", str(tmp_path / "resnet50.pth"), str(npz)]) == 0
    out = capsys.readouterr().out
    assert "ImageNet ResNet-50 (width 64)" in out and "fc.weight" in out

    train_json = make_split(str(tmp_path / "data"), "train", 2, seed=0, size=64)
    run = tmp_path / "run"
    # The shapes model with the paper's backbone: ResNet-50, frozen batch norms, every stage
    # frozen (freeze_at=5) so that the trained checkpoint must still hold the file's body.
    assert main(["train", "--train-ann", train_json, "--iters", "1", "--out", str(run),
                 "--backbone-weights", str(npz), "--set", "depth=50", "--set", "width=64",
                 "--set", "norm=frozen_bn", "--set", "freeze_at=5", "--set", "batch_size=2",
                 "--set", "min_size=64", "--set", "max_size=64"]) == 0
    assert "backbone: ImageNet ResNet-50 weights from" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["backbone_weights"] == str(npz)
    saved = load_checkpoint(run / "model_0000001.npz")["model"]
    tensors, _ = read_backbone(npz)
    for k, v in tensors.items():
        np.testing.assert_array_equal(saved["backbone.body." + k], v)
    state = net.state_dict()
    np.testing.assert_array_equal(saved["backbone.body.layer3.2.bn2.running_mean"],
                                  state["layer3.2.bn2.running_mean"].numpy())
