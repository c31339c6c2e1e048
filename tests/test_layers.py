"""Trunk/head split at named layers: exact composition and clear errors."""

from __future__ import annotations

import pytest
import torch

from refiner.errors import ConfigError, LayerError
from refiner.models.architectures import create_model, get_arch, list_archs
from refiner.models.layers import feature_shape, list_layers, split_model


@pytest.mark.parametrize("arch", ["tiny_vgg", "tiny_resnet", "small_vgg", "cifar_resnet20"])
def test_head_of_trunk_equals_model(arch):
    model = create_model(arch, 5).eval()
    trunk, head = split_model(model, get_arch(arch).default_layer)
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(head(trunk(x)), model(x), atol=1e-6)
    head.train()  # the cut survives a switch to training mode
    assert head(trunk(x)).shape == (3, 5)


def test_bad_layer_lists_valid_names():
    model = create_model("tiny_vgg", 3)
    with pytest.raises(LayerError, match=r"'conv9' is not a node of SmallVGG; valid names: x, features.0"):
        split_model(model, "conv9")
    with pytest.raises(LayerError, match="input or output"):
        split_model(model, "classifier.4")


def test_mid_block_is_not_a_clean_cut():
    model = create_model("tiny_resnet", 3)
    with pytest.raises(LayerError, match="not a clean cut point"):
        split_model(model, "layer1.0.conv1")


def test_feature_shape_and_registry_errors():
    trunk, _ = split_model(create_model("tiny_vgg", 3), "features.5")
    assert feature_shape(trunk, (3, 16, 16)) == (16, 8, 8)
    with pytest.raises(ConfigError, match="unknown architecture 'vgg99'; valid names: alexnet"):
        create_model("vgg99", 3)
    assert {"alexnet", "vgg16", "vgg16_bn", "resnet50", "small_vgg", "cifar_resnet20"} <= set(list_archs())


@pytest.mark.parametrize("arch", list_archs())
def test_default_layer_is_before_bn_and_activation(arch):
    """As the authors take them: a conv's output (before BN/ReLU) or a residual sum (before its ReLU)."""
    with torch.device("meta"):  # the graph only: no weights allocated for VGG-16 and friends
        model = create_model(arch, 5)
    layer = get_arch(arch).default_layer
    assert layer in list_layers(model)
    if layer.endswith(".add"):
        block = model.get_submodule(layer.removesuffix(".add"))
        assert hasattr(block, "downsample") or hasattr(block, "shortcut"), f"{layer} is not a residual block's sum"
    else:
        assert isinstance(model.get_submodule(layer), torch.nn.Conv2d)
