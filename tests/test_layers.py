"""Trunk/head split at named layers: exact composition and clear errors."""

from __future__ import annotations

import subprocess
import sys

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
    with pytest.raises(ConfigError, match="unknown architecture 'vgg99'; similar names: vgg19, .*; valid names: alexnet"):
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


@pytest.mark.parametrize(
    ("arch", "classifier", "layer"),
    [
        ("resnet101", "fc", "layer3.22.add"),  # ResNet: layer3's last residual sum
        ("wide_resnet50_2", "fc", "layer3.5.add"),
        ("vgg19_bn", "classifier.6", "features.36"),  # VGG: block 4's last conv (conv4-4 for VGG-19) before BN
        ("convnext_tiny", "classifier.2", "features.5.8.add"),  # ConvNeXt: stage 3's last residual sum
        ("efficientnet_b0", "classifier.1", "features.5.1.add"),  # others: a residual sum about 2/3 through
        ("mobilenet_v3_small", "classifier.3", "features.6.add"),
        ("swin_t", "head", "features.5.3.add"),
    ],
)
def test_any_torchvision_classifier_resolves_through_its_registry(arch, classifier, layer):
    spec = get_arch(arch)
    assert (spec.classifier, spec.default_layer, spec.input_size) == (classifier, layer, (3, 224, 224))
    assert arch in list_archs()  # registered on first use


def test_torchvision_model_splits_exactly_and_unsupported_ones_say_why():
    model = create_model("mobilenet_v3_small", 4).eval()
    trunk, head = split_model(model, get_arch("mobilenet_v3_small").default_layer)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(head(trunk(x)), model(x), atol=1e-5)
    with pytest.raises(ConfigError, match=r"no clean default split layer found in torchvision's 'googlenet'.*refiner layers --arch googlenet"):
        get_arch("googlenet")
    with pytest.raises(ConfigError, match=r"any torchvision.models classification model .*, or timm/<name> for any timm model"):
        get_arch("resnet_9000")


@pytest.mark.parametrize(
    ("arch", "classifier", "layer", "interpolation"),
    [
        ("timm/test_resnet", "fc", "layer3.0.add", "bilinear"),  # ResNet: the stride-16 stage's residual sum
        ("timm/test_convnext", "head.fc", "stages.2.blocks.3.add", "bicubic"),  # ConvNeXt: stage 3's last residual sum
        ("timm/test_efficientnet", "classifier", "blocks.3", "bicubic"),  # the stride-16 stage's output
        ("timm/test_vit", "head", "blocks.3.add_1", "bicubic"),  # ViT: a block's output, two thirds through, as tokens
    ],
)
def test_timm_models_split_exactly_with_their_pretrained_preprocessing(arch, classifier, layer, interpolation):
    spec = get_arch(arch)
    assert (spec.classifier, spec.default_layer, spec.input_size) == (classifier, layer, (3, 160, 160))
    # timm's pretrained config: crop_pct 0.95 -> shorter side floor(160 / 0.95) = 168, then the 160 x 160 centre crop
    assert (spec.preprocess.resize_size, spec.preprocess.interpolation) == (168, interpolation)
    model = create_model(arch, 4).eval()
    trunk, head = split_model(model, layer, spec.input_size)
    x = torch.randn(2, *spec.input_size)
    with torch.no_grad():
        feat = trunk(x)
        assert torch.allclose(head(feat), model(x), atol=1e-5)
    assert feat.dim() == 4  # a map for g: (N, C, H, W), or for ViT tokens (N, C, L, 1)
    if arch.endswith("vit"):
        assert feature_shape(trunk, spec.input_size) == (model.embed_dim, 1 + (160 // 16) ** 2, 1)


def test_token_maps_keep_every_token_in_order():
    from refiner.models.layers import MapToTokens, TokensToMap

    tokens = torch.randn(2, 5, 3)
    as_map = TokensToMap(torch.nn.Identity())(tokens)
    assert as_map.shape == (2, 3, 5, 1) and torch.equal(as_map[:, :, 4, 0], tokens[:, 4])
    assert torch.equal(MapToTokens(torch.nn.Identity())(as_map), tokens)


def test_torchvision_vit_splits_as_tokens_and_unknown_timm_names_are_refused():
    spec = get_arch("vit_b_16")
    with torch.device("meta"):
        model = create_model("vit_b_16", 3)
    trunk, _ = split_model(model, spec.default_layer)
    assert spec.default_layer.startswith("encoder.layers.") and spec.preprocess.resize_size == 256
    with pytest.raises(ConfigError, match=r"unknown timm model 'convnxt_atto'; similar timm names: convnext_atto"):
        get_arch("timm/convnxt_atto")


def test_listed_layers_are_activations_not_constants_arguments_or_shape_checks():
    layers = list_layers(create_model("timm/test_vit", 3))
    assert "blocks.3.add_1" in layers and layers[0] == "x"
    for name in ("attn_mask", "is_causal", "cls_token", "getattr", "patch_embed._assert", "patch_embed.getitem", "patch_embed.mod"):
        assert name not in layers
    resnet = list_layers(create_model("tiny_resnet", 3))
    assert resnet[0] == "x" and "layer1.0.add" in resnet and resnet[-1] == "fc"


def test_tokens_pair_only_with_tokens_of_the_same_count(tmp_path):
    from refiner.data.tasks import TaskData
    from refiner.engine.comparison import CompareConfig, compare
    from refiner.models.checkpoints import CheckpointMeta, Classifier
    from refiner.models.architectures import get_arch

    def net(arch):
        spec = get_arch(arch)
        meta = CheckpointMeta(arch=arch, num_classes=3, class_names=list("abc"), preprocess=spec.preprocess)
        return Classifier(model=create_model(arch, 3).eval(), meta=meta, sha256="0" * 64, path=tmp_path / f"{arch.replace('/', '_')}.pt")

    data = TaskData(task="imagefolder", classes=list("abc"), train=[], val=[], test=[], preprocess=get_arch("timm/test_vit").preprocess)
    with pytest.raises(ConfigError, match=r"A gives 101 tokens and layer 'layer3.0.add' of B 10x10 map: .*pair token layers with token layers"):
        compare(net("timm/test_vit"), net("timm/test_resnet"), data, CompareConfig())
    with pytest.raises(ConfigError, match=r"of A gives 10x10 map and layer 'blocks.3.add_1' of B 101 tokens"):
        compare(net("timm/test_resnet"), net("timm/test_vit"), data, CompareConfig())


@pytest.mark.parametrize(("arch", "layer"), [("vgg11", "features.3"), ("resnet18", "layer3.1.add")])
def test_head_leaves_its_input_as_it_was(arch, layer):
    """VGG and ResNet heads start with ReLU(inplace=True): head(f) and a refined model's forward_head must not overwrite f."""
    from refiner.engine.isomorphism import IsomorphismNet
    from refiner.refine.refined import RefinedModel

    model = create_model(arch, 4).eval()
    trunk, head = split_model(model, layer, (3, 64, 64))
    with torch.no_grad():
        f = trunk(torch.randn(2, 3, 64, 64))
        assert (f < 0).any()  # pre-activation values an in-place ReLU would zero
        kept = f.clone()
        head(f)
        assert torch.equal(f, kept)
        shape = tuple(f.shape[1:])
        refined = RefinedModel(trunk, IsomorphismNet(shape, shape), head).eval()
        refined.forward_head(f)
        assert torch.equal(f, kept)


def test_layer_shapes_on_the_meta_device_match_the_trunks_real_output():
    """`refiner layers` computes shapes without weights; they are what the split trunk really outputs."""
    from refiner.models.layers import layer_shapes

    with torch.device("meta"):
        shapes = layer_shapes(create_model("tiny_resnet", 3), (3, 20, 20))
    model = create_model("tiny_resnet", 3)
    assert list(shapes) == list_layers(model)
    for layer in ("layer1.0.add", "avgpool"):
        assert shapes[layer] == feature_shape(split_model(model, layer)[0], (3, 20, 20))
    assert shapes["fc"] == (3,) and shapes["x"] == (3, 20, 20)



def test_the_builtin_names_the_command_line_shows_are_the_registered_ones():
    """refiner.models.registry lists the built-in names without torch; they are exactly what architectures registers."""
    code = ("import sys; from refiner.models import registry; names = registry.list_archs(); assert 'torch' not in sys.modules; "
            "from refiner.models import architectures; print(sorted(registry._REGISTRY) == sorted(registry.BUILTIN_ARCHS) == names)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "True"


def test_the_torchvision_names_checked_without_torch_are_the_installed_torchvisions():
    """registry.TORCHVISION_CLASSIFIERS lets a misspelt --arch fail before torch loads; it must list what torchvision offers."""
    import torchvision

    from refiner.models.registry import TORCHVISION_CLASSIFIERS

    assert sorted(TORCHVISION_CLASSIFIERS) == sorted(torchvision.models.list_models(module=torchvision.models))


def test_channels_last_nodes_are_marked_under_the_c_h_w_header(capsys):
    """Issue 26: inside a ConvNeXt block the map is permuted to H x W x C; the listing says so instead of reading it as C x H x W."""
    from refiner.cli.main import main

    assert main(["layers", "--arch", "convnext_tiny", "--img-size", "64"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines["features.1.0.block.0"].split()[1:] == ["96x16x16"]  # the depthwise conv: C x H x W
    assert lines["features.1.0.block.1"].split()[1:] == ["16x16x96", "(H", "x", "W", "x", "C)"]  # the permute
    assert lines["features.1.0.block.3"].split()[1:] == ["16x16x384", "(H", "x", "W", "x", "C)"]  # the Linear, channels last
    assert lines["features.1.0.block.6"].split()[1:] == ["96x16x16"]  # permuted back
    assert not any("(H x W x C)" in line for name, line in lines.items() if name.startswith("features.0"))


def test_layers_of_a_bare_checkpoint_names_its_own_arch_flag(tmp_path, capsys):
    from refiner.cli.main import main

    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).state_dict(), tmp_path / "bare.pt")
    assert main(["layers", "--checkpoint", str(tmp_path / "bare.pt")]) == 2
    err = capsys.readouterr().err
    assert "with --arch NAME" in err and "--arch-a" not in err and "--arch-b" not in err
