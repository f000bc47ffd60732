import pytest
import torch

from common.config import ModelSettings, RunSettings
from common.errors import ConfigError
from common.model import build_model, pick_device


@pytest.mark.parametrize(
    ("dims", "shape"), [(2, (2, 1, 64, 48)), (3, (1, 1, 32, 32, 16))]
)
def test_unet_output_keeps_spatial_shape_with_two_class_logits(dims, shape):
    model = build_model(ModelSettings(spatial_dims=dims, channels=(8, 16, 32)))
    out = model(torch.zeros(shape))
    assert out.shape == (shape[0], 2, *shape[2:])


def test_default_unet_is_the_documented_size():
    model = build_model(ModelSettings())
    assert sum(p.numel() for p in model.parameters()) == 1_625_161
    # instance norm keeps no running statistics: the state is all float weights
    assert all(v.is_floating_point() for v in model.state_dict().values())


def test_rgb_input_channels_come_from_run_config():
    settings = RunSettings.from_run_config({"input-channels": "rgb"})
    model = build_model(settings.model)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2, 32, 32)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"model-spatial-dims": 4}, "model-spatial-dims"),
        ({"patch-size": 50}, "multiple of 16"),
        ({"model-channels": "16,x"}, "comma-separated"),
        ({"num-rounds": 0}, "num-rounds"),
        ({"run-name": "../elsewhere"}, "not a path"),
        ({"resume": "maybe"}, "true or false"),
    ],
)
def test_bad_settings_say_what_is_wrong(cfg, message):
    with pytest.raises(ConfigError, match=message):
        RunSettings.from_run_config(cfg)


def test_run_config_round_trips():
    settings = RunSettings.from_run_config({"num-rounds": 7, "model-channels": "8,16,32",
                                            "patch-size": 32})
    assert RunSettings.from_run_config(settings.to_run_config()) == settings


def test_auto_device_is_cuda_exactly_when_available():
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            pick_device("cuda")


def test_few_channel_3d_convolutions_run_channels_last_on_a_cpu_with_the_same_results():
    """The preset's 3D U-Net: only its last convolution (3 classes to 3) takes
    channels-last input (the 1-channel input convolutions gain nothing); the
    weights, the state dict and the output are those of the plain U-Net."""
    settings = RunSettings.from_run_config({
        "model-spatial-dims": 3, "structures": "Anterior,Posterior",
        "model-channels": "16,32,64,128", "model-res-units": 1})
    torch.manual_seed(0)
    plain = build_model(settings.model, few_channel_layout=False)
    torch.manual_seed(0)
    model = build_model(settings.model)
    hooked = [(m.in_channels, m.out_channels) for m in model.modules()
              if isinstance(m, torch.nn.Conv3d) and m._forward_pre_hooks]
    assert hooked == [(3, 3)]
    seen = []
    last = next(m for m in model.modules() if m._forward_pre_hooks)
    last.register_forward_pre_hook(lambda m, args: seen.append(
        args[0].is_contiguous(memory_format=torch.channels_last_3d)))
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        out, reference = model(x), plain(x)
    assert seen == [True] and out.is_contiguous()  # in channels-last, out in the usual order
    assert torch.allclose(out, reference, atol=1e-5)
    assert model.state_dict().keys() == plain.state_dict().keys()
    out.sum().backward() if out.requires_grad else model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    two_d = build_model(RunSettings.from_run_config({"structures": "a,b"}).model)
    assert not any(m._forward_pre_hooks for m in two_d.modules())  # 2D: as it comes
