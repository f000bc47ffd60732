import numpy as np
import pytest
import torch

from common.config import RunSettings
from common.data.site import load_site
from common.errors import ConfigError
from common.model import build_model
from common.training import (
    cpu_has_bf16,
    evaluate,
    learning_rate_at,
    low_precision,
    make_optimizer,
    predict,
    train,
    training_items,
)


@pytest.fixture(scope="module")
def site(synthetic_sites):
    return load_site(synthetic_sites[0], "training"), load_site(synthetic_sites[0], "test")


def test_local_training_improves_the_test_dice(site):
    train_cases, test_cases = site
    settings = RunSettings.from_run_config({"local-epochs": 3})
    torch.manual_seed(0)
    model = build_model(settings.model)
    cpu = torch.device("cpu")
    before = evaluate(model, test_cases, settings, cpu).summary["dice"]
    result = train(model, train_cases, settings, cpu, seed=0)
    after = evaluate(model, test_cases, settings, cpu).summary["dice"]
    assert result.num_cases == len(train_cases)  # FedAvg's weight is cases
    assert result.steps > result.num_cases  # slices and patches, not cases
    assert np.isfinite(result.mean_loss)
    assert after > before + 0.2


def test_2d_model_segments_a_volume_slice_by_slice(site):
    case = site[1][0]
    settings = RunSettings()
    out = predict(build_model(settings.model), case.image, settings, torch.device("cpu"))
    assert out.shape == case.label.shape and out.dtype == np.uint8


def test_3d_model_trains_on_volumes(site):
    settings = RunSettings.from_run_config(
        {"model-spatial-dims": 3, "model-channels": "8,16", "patch-size": 16, "batch-size": 2})
    model = build_model(settings.model)
    result = train(model, site[0][:2], settings, torch.device("cpu"))
    assert result.num_cases == 2 and np.isfinite(result.mean_loss)
    pred = predict(model, site[1][0].image, settings, torch.device("cpu"))
    assert pred.shape == site[1][0].label.shape


def test_rgb_retina_image_trains_in_grey_and_rgb(retina_dir):
    cases = load_site(retina_dir / "stare", "training")[:1]
    for channels in ("grey", "rgb", "green"):
        settings = RunSettings.from_run_config(
            {"input-channels": channels, "model-channels": "8,16", "patch-size": 32,
             "batch-size": 2})
        result = train(build_model(settings.model), cases, settings, torch.device("cpu"))
        assert np.isfinite(result.mean_loss)


def test_learning_rate_follows_one_cosine_over_the_whole_run():
    cosine = RunSettings.from_run_config({"learning-rate": 0.01, "lr-min-ratio": 0.1})
    assert learning_rate_at(0.0, cosine) == pytest.approx(0.01)
    assert learning_rate_at(0.5, cosine) == pytest.approx(0.01 * (0.1 + 0.9 * 0.5))
    assert learning_rate_at(1.0, cosine) == pytest.approx(0.001)
    constant = RunSettings.from_run_config({"learning-rate": 0.01, "lr-schedule": "constant"})
    assert learning_rate_at(0.9, constant) == 0.01


def test_training_at_the_end_of_the_schedule_uses_the_final_rate(site):
    """A call told it runs at the very end of a schedule that decays to zero
    leaves the weights where they are; the same call with a constant rate does not."""
    train_cases, _ = site
    cpu = torch.device("cpu")
    moved = {}
    for schedule in ("cosine", "constant"):
        settings = RunSettings.from_run_config({"lr-schedule": schedule, "lr-min-ratio": 0.0,
                                                "model-channels": "8,16"})
        torch.manual_seed(0)
        model = build_model(settings.model)
        before = [p.detach().clone() for p in model.parameters()]
        train(model, train_cases, settings, cpu, seed=0, progress=(1.0, 1.0))
        moved[schedule] = max(float((p.detach() - b).abs().max())
                              for p, b in zip(model.parameters(), before, strict=True))
    assert moved["cosine"] == 0.0
    assert moved["constant"] > 1e-4


def test_test_time_flips_give_a_mirror_consistent_prediction():
    """With flips averaged, segmenting a mirrored image gives the mirrored
    segmentation (one window covers the image, so only the flips differ)."""
    settings = RunSettings.from_run_config({"model-channels": "8,16", "patch-size": 64})
    torch.manual_seed(0)
    model = build_model(settings.model)
    image = np.random.default_rng(0).normal(size=(1, 64, 64)).astype(np.float32)
    cpu = torch.device("cpu")
    pred = predict(model, image, settings, cpu)
    mirrored = predict(model, np.ascontiguousarray(image[:, ::-1]), settings, cpu)[:, ::-1]
    assert np.mean(pred != mirrored) < 1e-3
    plain = RunSettings.from_run_config({"model-channels": "8,16", "patch-size": 64,
                                         "test-time-flips": False})
    single = predict(model, image, plain, cpu)
    assert np.mean(single != predict(model, np.ascontiguousarray(image[:, ::-1]), plain,
                                     cpu)[:, ::-1]) > 0.01  # an untrained net is not symmetric


def test_mirrored_copies_in_groups_give_the_same_prediction(monkeypatch):
    """Large volumes run their mirrored copies a few at a time; the blended
    prediction must not depend on how they were grouped."""
    import common.training

    settings = RunSettings.from_run_config({"model-channels": "8,16", "patch-size": 32})
    torch.manual_seed(0)
    model = build_model(settings.model)
    image = np.random.default_rng(2).normal(size=(1, 72, 56)).astype(np.float32)
    together = predict(model, image, settings, torch.device("cpu"))
    monkeypatch.setattr(common.training, "MAX_BATCH_VOXELS", image.size)  # one copy a pass
    apart = predict(model, image, settings, torch.device("cpu"))
    assert np.array_equal(together, apart)


def test_sw_overlap_sets_how_far_the_sliding_windows_overlap():
    base = {"model-channels": "8,16", "patch-size": 32, "test-time-flips": False}
    torch.manual_seed(0)
    model = build_model(RunSettings.from_run_config(base).model)
    image = np.random.default_rng(1).normal(size=(1, 80, 80)).astype(np.float32)
    cpu = torch.device("cpu")
    apart = predict(model, image, RunSettings.from_run_config({**base, "sw-overlap": 0.0}), cpu)
    half = predict(model, image, RunSettings.from_run_config({**base, "sw-overlap": 0.5}), cpu)
    assert apart.shape == half.shape == (1, 80, 80)
    assert np.mean(apart != half) > 0.01  # windows blended differently
    with pytest.raises(ConfigError, match="'sw-overlap' must be in"):
        RunSettings.from_run_config({**base, "sw-overlap": 1.0})


def test_optimiser_state_round_trips_and_a_misfit_is_refused():
    """Adam's moments survive the flat-array form a node keeps them in; state
    saved for another model (other channel widths) is refused, not half-loaded."""
    import dataclasses

    from common.training import load_optimizer_arrays, optimizer_arrays

    settings = RunSettings.from_run_config({})
    model = build_model(settings.model)
    adam = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 1, 32, 32)).sum().backward()
    adam.step()
    saved = optimizer_arrays(adam)
    again = torch.optim.Adam(model.parameters())
    assert load_optimizer_arrays(again, saved)
    first = next(model.parameters())
    assert torch.equal(again.state[first]["exp_avg"], adam.state[first]["exp_avg"])

    other = build_model(dataclasses.replace(settings.model, channels=(8, 16, 32, 64, 128)))
    fresh = torch.optim.Adam(other.parameters())
    assert not load_optimizer_arrays(fresh, saved)
    assert not fresh.state


def test_sgd_trains_with_nesterov_momentum_carried_between_rounds(site):
    """``optimizer = sgd``: SGD with Nesterov momentum (nnU-Net's), whose
    momentum a site keeps between rounds as it keeps Adam's moments; the loss
    falls and the weights stay finite."""
    settings = RunSettings.from_run_config({"model-channels": "8,16", "patch-size": 32,
                                            "batch-size": 4, "optimizer": "sgd",
                                            "learning-rate": 0.01, "sgd-momentum": 0.9,
                                            "local-epochs": 3, "mixed-precision": False})
    optimizer = make_optimizer(build_model(settings.model), settings)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9
    torch.manual_seed(0)
    model = build_model(settings.model)
    first = train(model, site[0], settings, torch.device("cpu"), seed=0)
    buffers = {k: v for k, v in first.optimizer_state.items() if k.endswith("momentum_buffer")}
    assert buffers and all(np.isfinite(v).all() and np.abs(v).sum() > 0
                           for v in buffers.values())
    second = train(model, site[0], settings, torch.device("cpu"), seed=1,
                   optimizer_state=first.optimizer_state)
    assert second.mean_loss < first.mean_loss
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ConfigError, match="'optimizer' must be one of"):
        RunSettings.from_run_config({"optimizer": "adagrad"})


def test_fedprox_term_is_half_mu_times_the_squared_distance_to_the_start(site, monkeypatch):
    """``proximal_mu`` must train as if mu/2 ||w - w_start||^2 were added to
    the loss, w_start being the weights the round began with (Li et al. 2020)."""
    import copy

    import common.training

    settings = RunSettings.from_run_config({"model-channels": "8,16", "patch-size": 32,
                                            "batch-size": 4, "learning-rate": 0.01,
                                            "local-epochs": 2})
    torch.manual_seed(0)
    start = build_model(settings.model)
    mu = 5.0
    fedprox, reference, plain = (copy.deepcopy(start) for _ in range(3))
    train(fedprox, site[0], settings, torch.device("cpu"), seed=3, proximal_mu=mu)
    train(plain, site[0], settings, torch.device("cpu"), seed=3)

    anchor = [p.detach().clone() for p in reference.parameters()]
    data_loss = common.training.DiceCELoss

    class ProximalLoss(data_loss):
        def forward(self, logits, label):
            return super().forward(logits, label) + mu / 2 * sum(
                (p - p0).pow(2).sum() for p, p0 in zip(reference.parameters(), anchor,
                                                       strict=True))

    monkeypatch.setattr(common.training, "DiceCELoss", ProximalLoss)
    result = train(reference, site[0], settings, torch.device("cpu"), seed=3)
    assert result.steps > 2  # the term is zero at the first step; later ones tell
    for a, b in zip(fedprox.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert not all(torch.allclose(a, c, atol=1e-5) for a, c in
                   zip(fedprox.parameters(), plain.parameters(), strict=True))


def test_training_draws_the_same_patches_without_metadata_and_restores_tracking(site):
    """Training switches MONAI's metadata tracking off for speed: the patches
    must be the same values, and the global switch must come back afterwards,
    also when training fails."""
    import contextlib

    from monai.data import get_track_meta
    from monai.utils import set_determinism

    from common.data.transforms import training_items, training_transform
    from common.training import _plain_tensors

    items = training_items(site[0][:2], 2, "grey")
    patches = []
    for plain in (False, True):
        set_determinism(seed=3)
        transform = training_transform(32, 2, 4)
        with _plain_tensors() if plain else contextlib.nullcontext():
            patches.append([torch.as_tensor(p[k]).clone() for item in items
                            for p in transform(item) for k in ("image", "label")])
    assert len(patches[0]) == len(patches[1]) > 0
    assert all(torch.equal(a.as_tensor() if hasattr(a, "as_tensor") else a, b)
               for a, b in zip(*patches, strict=True))
    assert type(patches[1][0]) is torch.Tensor  # no MetaTensor while plain
    assert get_track_meta()

    settings = RunSettings.from_run_config({"model-channels": "8,16", "patch-size": 16})
    with pytest.raises(RuntimeError):  # 3-channel model, 1-channel cases
        train(build_model(RunSettings.from_run_config(
            {"input-channels": "rgb", "model-channels": "8,16"}).model), site[0][:1],
            settings, torch.device("cpu"))
    assert get_track_meta()


def test_mixed_precision_takes_the_type_the_hardware_multiplies_fast(monkeypatch):
    """fp16 on a GPU, bf16 on a CPU with native bf16, fp32 on any other CPU
    (where torch would emulate bf16, slower than fp32) and when switched off."""
    import common.training

    on = RunSettings.from_run_config({})
    off = RunSettings.from_run_config({"mixed-precision": False})
    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # a device name needs no GPU
    assert low_precision(gpu, on) is torch.float16
    assert low_precision(gpu, off) is None and low_precision(cpu, off) is None
    monkeypatch.setattr(common.training, "cpu_has_bf16", lambda: True)
    assert low_precision(cpu, on) is torch.bfloat16
    # a 3D model's bf16 updates held NaN on a bf16 CPU (issue 27): fp32 there
    on_3d = RunSettings.from_run_config({"model-spatial-dims": 3, "patch-size": 32})
    assert low_precision(cpu, on_3d) is None and low_precision(gpu, on_3d) is torch.float16
    monkeypatch.setattr(common.training, "cpu_has_bf16", lambda: False)
    assert low_precision(cpu, on) is None


bf16_cpu_only = pytest.mark.skipif(not cpu_has_bf16(), reason="needs a CPU with native bf16")


@bf16_cpu_only
def test_mixed_precision_on_a_bf16_cpu_convolves_in_bf16_and_keeps_fp32_weights(site):
    """Training and inference run the convolutions in bf16 while the weights
    and Adam's moments stay fp32; switched off, the same call convolves in
    fp32 and ends on other weights."""
    import copy

    cpu = torch.device("cpu")
    seen: dict[str, set[torch.dtype]] = {}
    weights = {}
    for mode in (True, False):
        settings = RunSettings.from_run_config({"model-channels": "8,16", "patch-size": 32,
                                                "batch-size": 4, "mixed-precision": mode})
        torch.manual_seed(0)
        model = build_model(settings.model)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        dtypes = seen.setdefault(str(mode), set())
        hook = conv.register_forward_hook(lambda _m, _i, out, d=dtypes: d.add(out.dtype))
        result = train(model, site[0][:2], settings, cpu, seed=0)
        predict(model, site[1][0].image[..., :1], settings, cpu)
        hook.remove()
        assert np.isfinite(result.mean_loss)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(v.dtype == np.float32 for k, v in result.optimizer_state.items()
                   if not k.endswith(".step"))
        weights[mode] = copy.deepcopy(model.state_dict())
    assert seen == {"True": {torch.bfloat16}, "False": {torch.float32}}
    assert any(not torch.equal(weights[True][k], weights[False][k]) for k in weights[True])


@bf16_cpu_only
def test_bf16_and_fp32_inference_label_the_same_pixels_from_the_same_weights(site):
    """bf16 scoring may flip only pixels on the decision boundary (on the
    retina sites: 99.98% of pixels and Dice equal to 4 digits, docs/performance.md;
    this barely trained model has more pixels near it)."""
    cpu = torch.device("cpu")
    fp32 = RunSettings.from_run_config({"local-epochs": 2, "mixed-precision": False})
    bf16 = RunSettings.from_run_config({"local-epochs": 2})
    torch.manual_seed(0)
    model = build_model(fp32.model)
    train(model, site[0], fp32, cpu, seed=0)
    for case in site[1]:
        assert (predict(model, case.image, fp32, cpu) ==
                predict(model, case.image, bf16, cpu)).mean() > 0.995
    dice = [evaluate(model, site[1], s, cpu).summary["dice"] for s in (fp32, bf16)]
    assert dice[0] > 0.2 and abs(dice[0] - dice[1]) < 0.005, dice  # it segments something


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda_only
def test_a_site_with_a_gpu_trains_on_it_and_keeps_its_state_on_the_host(site):
    """``auto`` takes the GPU; training runs there in mixed precision; what a
    node keeps between rounds (Adam's moments) comes back as host arrays, and
    the next round continues from them on the GPU."""
    from common.model import pick_device

    device = pick_device("auto")
    assert device.type == "cuda"
    settings = RunSettings.from_run_config({"local-epochs": 1})
    torch.manual_seed(0)
    model = build_model(settings.model)
    first = train(model, site[0], settings, device, seed=0)
    assert next(model.parameters()).is_cuda and np.isfinite(first.mean_loss)
    assert first.optimizer_state and all(isinstance(v, np.ndarray)
                                         for v in first.optimizer_state.values())
    second = train(model, site[0], settings, device, seed=1,
                   optimizer_state=first.optimizer_state)
    steps = [v for k, v in second.optimizer_state.items() if k.endswith(".step")]
    assert steps and float(steps[0]) == first.steps + second.steps  # continued, not restarted


@cuda_only
def test_gpu_and_cpu_label_the_same_pixels_from_the_same_weights(site):
    """Half-precision inference on the GPU against float32 on the CPU: the
    labels may differ only where a pixel sits on the decision boundary."""
    settings = RunSettings.from_run_config({"local-epochs": 2})
    fp32 = RunSettings.from_run_config({"local-epochs": 2, "mixed-precision": False})
    torch.manual_seed(0)
    model = build_model(settings.model)
    train(model, site[0], fp32, torch.device("cpu"), seed=0)
    cpu = evaluate(model, site[1], fp32, torch.device("cpu"))
    gpu = evaluate(model, site[1], settings, torch.device("cuda"))
    for case in site[1]:
        a = predict(model, case.image, fp32, torch.device("cpu"))
        b = predict(model, case.image, settings, torch.device("cuda"))
        assert (a == b).mean() > 0.999
    assert abs(cpu.summary["dice"] - gpu.summary["dice"]) < 0.005


def test_a_3d_model_trains_with_the_default_settings(site, monkeypatch):
    """Issue 27: 3D with every other setting at its default (mixed precision
    on, here on a CPU that claims native bf16) ends on finite weights, its
    loss falling."""
    import common.training

    monkeypatch.setattr(common.training, "cpu_has_bf16", lambda: True)
    settings = RunSettings.from_run_config({"model-spatial-dims": 3})
    torch.manual_seed(0)
    model = build_model(settings.model)
    cpu = torch.device("cpu")
    losses = [train(model, site[0][:2], settings, cpu, seed=epoch,
                    progress=(epoch / 4, (epoch + 1) / 4)).mean_loss for epoch in range(4)]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.05, losses


class _NaNInLowPrecision(torch.nn.Module):
    """A U-Net whose output is NaN whenever it runs under autocast, as the
    3D bf16 convolutions of issue 27 gave; exact in fp32."""

    def __init__(self, net: torch.nn.Module, always: bool = False) -> None:
        super().__init__()
        self.net, self.always = net, always

    def forward(self, x):
        out = self.net(x)
        low = torch.is_autocast_enabled(x.device.type)
        return out * float("nan") if low or self.always else out


def test_low_precision_that_gives_nan_is_dropped_for_fp32_without_a_nan_step(site, monkeypatch,
                                                                                caplog):
    import common.training

    monkeypatch.setattr(common.training, "low_precision", lambda *_: torch.bfloat16)
    settings = RunSettings.from_run_config({"model-channels": "8,16", "patch-size": 32,
                                            "local-epochs": 2})
    torch.manual_seed(0)
    model = _NaNInLowPrecision(build_model(settings.model))
    with caplog.at_level("WARNING", logger="common.training"):
        result = train(model, site[0][:2], settings, torch.device("cpu"), seed=0)
    assert "training goes on in fp32" in caplog.text
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert np.isfinite(result.mean_loss) and result.steps > 3


def test_training_that_diverges_in_fp32_stops_with_a_clear_error_and_unharmed_weights(site):
    from common.training import TrainingDivergedError

    settings = RunSettings.from_run_config({"model-channels": "8,16", "patch-size": 32,
                                            "mixed-precision": False})
    torch.manual_seed(0)
    model = _NaNInLowPrecision(build_model(settings.model), always=True)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TrainingDivergedError, match="3 steps in a row gave a non-finite loss"):
        train(model, site[0], settings, torch.device("cpu"), seed=0)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("dims", [2, 3])
def test_test_time_flips_mirror_only_along_axes_training_mirrors(dims, monkeypatch):
    """Inference must not average over a mirror image the model never saw in
    training (issue 27: flips along all three axes of a model trained on two
    took a hippocampus model's Dice from 0.86 to 0.45)."""
    from monai.transforms import RandFlipd, RandRotate90d

    import common.training
    from common.data.transforms import training_transform

    trained: set[int] = set()
    for t in training_transform(16, dims, 1).transforms:
        if isinstance(t, RandFlipd):
            trained.add(t.flipper.spatial_axis)
        if isinstance(t, RandRotate90d):  # a turn in a plane mirrors within it
            trained.update(t.spatial_axes)
    flipped: list[tuple[int, ...]] = []
    real_flip = torch.flip

    def spy(x, dims_):
        flipped.append(tuple(dims_))
        return real_flip(x, dims_)

    monkeypatch.setattr(common.training.torch, "flip", spy)
    settings = RunSettings.from_run_config({"model-spatial-dims": dims, "model-channels": "4,8",
                                            "patch-size": 16})
    image = np.zeros((1,) + (16,) * dims, np.float32)
    predict(build_model(settings.model), image, settings, torch.device("cpu"))
    used = {a - 2 for axes in flipped for a in axes}  # B x C x spatial
    assert flipped and used <= trained, (used, trained)
    assert len(set(flipped)) == 2 ** len(used) - 1  # every set of those axes, once


def test_a_patch_is_turned_and_mirrored_into_each_of_the_8_symmetries_alike():
    """The augmentation draws each symmetry of the square in the mirrored
    plane with probability 1/8 (image and label alike), and nothing else."""
    from collections import Counter

    from monai.transforms import Compose

    from common.data.transforms import mirror_transforms

    square = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)  # C x X x Y x Z
    symmetries = set()
    for k in range(4):
        turned = np.rot90(square, k, axes=(1, 2))
        symmetries |= {turned.tobytes(), np.flip(turned, 1).tobytes()}
    assert len(symmetries) == 8
    augment = Compose(mirror_transforms(("image", "label")))
    augment.set_random_state(0)
    drawn: Counter = Counter()
    n = 4000
    for _ in range(n):
        out = augment({"image": torch.as_tensor(square), "label": torch.as_tensor(square)})
        image = np.asarray(out["image"])
        assert np.array_equal(image, np.asarray(out["label"]))
        drawn[image.tobytes()] += 1
    assert set(drawn) == symmetries
    assert all(abs(c / n - 1 / 8) < 0.02 for c in drawn.values()), sorted(drawn.values())


@pytest.mark.parametrize("batch, per_image", [(4, 8), (2, 8), (8, 8), (16, 8), (8, 2)])
def test_a_step_takes_exactly_batch_size_patches(site, batch, per_image):
    """batch-size 4 with 8 patches an image once trained batches of 8 without
    a word (the loader took whole images): now each step holds batch-size
    patches, an image's patches cut in equal parts where they outnumber it."""
    cases = site[0][:4]
    settings = RunSettings.from_run_config({"model-channels": "8,16", "patch-size": 32,
                                            "batch-size": batch,
                                            "patches-per-image": per_image})
    model = build_model(settings.model)
    seen: list[int] = []
    model.register_forward_hook(lambda _m, args, _out: seen.append(len(args[0])))
    result = train(model, cases, settings, torch.device("cpu"), seed=0)
    images = len(training_items(cases, 2, settings.input_channels))  # a volume's slices
    patches = images * per_image
    assert result.steps == len(seen) == -(-patches // batch)
    assert set(seen[:-1]) <= {batch} and sum(seen) == patches


@pytest.mark.parametrize("batch, per_image", [(6, 4), (3, 8), (12, 8)])
def test_a_batch_size_that_cuts_images_unevenly_is_refused(batch, per_image):
    with pytest.raises(ConfigError, match=f"batch-size {batch} must be a multiple or a divisor"
                                          f" of patches-per-image {per_image}"):
        RunSettings.from_run_config({"batch-size": batch, "patches-per-image": per_image})
