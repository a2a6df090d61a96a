import pytest
import torch

from models import CLASSIFIER, DECODER, ENCODER, build_model, is_batchnorm_key, part_of, select_state


@pytest.mark.parametrize("arch", ["bottleneck", "unet"])
@pytest.mark.parametrize(("channels", "size", "classes"), [(1, 28, 2), (3, 28, 8), (3, 64, 5)])
def test_fused_model_shapes(arch, channels, size, classes):
    model = build_model(fused=True, in_channels=channels, num_classes=classes, image_size=size, ae_arch=arch, dz=16)
    x = torch.rand(4, channels, size, size)
    assert model.reconstruct(x).shape == x.shape
    assert model(x).shape == (4, classes)


def test_bottleneck_latent_has_dz_units():
    model = build_model(fused=True, in_channels=1, num_classes=2, image_size=28, dz=7)
    (z,) = model.encoder(torch.rand(3, 1, 28, 28))
    assert z.shape == (3, 7)


def test_classifier_is_preact_resnet20():
    model = build_model(fused=False, in_channels=3, num_classes=8, image_size=28)
    convs = [m for m in model.classifier.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 19  # stem + 9 blocks x 2 convs; with the linear head: 20 weighted layers
    assert model.classifier.head.out_features == 8
    assert model.encoder is None and model.decoder is None


@pytest.mark.parametrize("arch", ["bottleneck", "unet"])
def test_key_split_covers_every_key_once(arch):
    model = build_model(fused=True, in_channels=3, num_classes=4, image_size=28, ae_arch=arch)
    state = model.state_dict()
    parts = {part_of(k) for k in state}
    assert parts == {ENCODER, DECODER, CLASSIFIER}
    split = [select_state(state, [p]) for p in (ENCODER, DECODER, CLASSIFIER)]
    assert sum(len(s) for s in split) == len(state)
    assert all(k.startswith("encoder.") for k in split[0])
    if arch == "unet":  # the reference code's decoder modules are the up/dec/final ones
        assert {k.split(".")[1] for k in split[1]} == {"up2", "dec2", "up1", "dec1", "final"}


def test_batchnorm_keys_are_detected():
    model = build_model(fused=False, in_channels=1, num_classes=2, image_size=28)
    bn = [k for k in model.state_dict() if is_batchnorm_key(model, k)]
    assert any(k.endswith("running_mean") for k in bn) and any(k.endswith("num_batches_tracked") for k in bn)
    assert not any(is_batchnorm_key(model, k) for k in model.state_dict() if "conv" in k)


def test_bad_model_arguments_are_clear():
    with pytest.raises(ValueError, match="ae-arch"):
        build_model(fused=True, in_channels=1, num_classes=2, image_size=28, ae_arch="vae")
    with pytest.raises(ValueError, match="divisible by 4"):
        build_model(fused=True, in_channels=1, num_classes=2, image_size=30, ae_arch="unet")
    with pytest.raises(KeyError, match="no known model part"):
        part_of("head.weight")
