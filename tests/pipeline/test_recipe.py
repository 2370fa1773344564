"""The training recipe: learning-rate schedules, augmentation, mixed precision and loader workers."""
import dataclasses
import functools
import math

import numpy as np
import pytest
import torch

from slc.core.errors import ConfigError
from slc.data.prepared import PreparedData, check_augmentation
from slc.train import training
from slc.train.optim import make_schedulers
from slc.train.training import loader_workers, train_one
from tests.conftest import prepared_synthetic
from tests.pipeline.conftest import Crash, assert_same_weights, crash_after_first_epoch, weights


@pytest.fixture(scope="module")
def images16(tmp_path_factory, params) -> PreparedData:
    """Seeded synthetic data big enough to crop: 4 classes of 16x16 prototypes plus noise."""
    return prepared_synthetic(params, tmp_path_factory.mktemp("synthetic16"), num_classes=4, train_per_class=30,
                              test_per_class=5, image_size=16)


@pytest.fixture
def run16(tiny_run):
    return functools.partial(tiny_run, batch_size=16)


def learning_rates(schedule: str, epochs: int, warmup: int, steps_per_epoch: int, params) -> list[float]:
    train = dataclasses.replace(params.train, epochs=epochs, warmup_epochs=warmup, lr_schedule=schedule, lr=1.0)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    (scheduler,) = make_schedulers([optimizer], train, steps_per_epoch)
    rates = []
    for _ in range(epochs * steps_per_epoch):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_constant_keeps_the_learning_rate(params):
    assert set(learning_rates("constant", 3, 0, 10, params)) == {1.0}


def test_cosine_falls_from_the_learning_rate_towards_zero(params):
    rates = learning_rates("cosine", 4, 0, 25, params)
    assert rates[0] == 1.0 and rates[-1] < 0.001
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert rates[50] == pytest.approx(0.5)  # half way: cos(pi / 2)


def test_step_divides_by_ten_at_a_third_and_two_thirds(params):
    rates = learning_rates("step", 9, 0, 10, params)
    assert rates[:30] == [1.0] * 30
    assert rates[30:60] == pytest.approx([0.1] * 30) and rates[60:] == pytest.approx([0.01] * 30)


def test_warm_up_rises_linearly_then_the_schedule_starts(params):
    rates = learning_rates("step", 4, 1, 10, params)
    assert rates[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert rates[10] == 1.0 and rates[-1] == pytest.approx(0.01)


def test_warm_up_must_be_shorter_than_training(params):
    with pytest.raises(ConfigError, match=r"train.warmup_epochs = 5 is invalid: expected 0 or more epochs, fewer "
                                          r"than train.epochs \(5\)"):
        dataclasses.replace(params.train, epochs=5, warmup_epochs=5)


@pytest.mark.parametrize("name", ["crop", "crop_flip", "resized_crop_flip"])
def test_augmentation_changes_training_images_only_and_keeps_their_shape(images16, name):
    torch.manual_seed(0)
    plain, augmented = images16.split("train"), images16.split("train", name)
    batch = list(range(16))
    seen = torch.stack([x for x, _ in augmented.__getitems__(batch)])
    original = torch.stack([x for x, _ in plain.__getitems__(batch)])
    assert seen.shape == original.shape and seen.dtype == torch.float32
    assert not torch.equal(seen, original)
    assert [int(y) for _, y in augmented.__getitems__(batch)] == [int(y) for _, y in plain.__getitems__(batch)]


def test_a_crop_keeps_the_pixels_it_shows(images16):
    """A shift of at most 4 pixels: the centre 8x8 of the original is inside every crop, moved."""
    torch.manual_seed(1)
    original = images16.split("train").__getitems__([0])[0][0]
    cropped = images16.split("train", "crop").__getitems__([0])[0][0]
    centre = original[:, 4:12, 4:12]
    found = any(torch.equal(cropped[:, 4 + dy:12 + dy, 4 + dx:12 + dx], centre)
                for dy in range(-4, 5) for dx in range(-4, 5))
    assert found


@pytest.mark.parametrize("dataset", ["mnist", "svhn", "tuples"])
def test_a_flip_is_refused_where_a_mirror_image_is_another_class(dataset):
    with pytest.raises(ConfigError, match=f"flips images, but a mirrored {dataset} image is another class"):
        check_augmentation("crop_flip", dataset, (1, 28, 28))
    check_augmentation("crop", dataset, (1, 28, 28))


def test_a_crop_is_refused_on_images_too_small_to_shift():
    with pytest.raises(ConfigError, match="synthetic images are 8x8 pixels \\(at least 16 needed\\): use none"):
        check_augmentation("crop", "synthetic", (1, 8, 8))


def test_a_wrong_augmentation_is_refused_before_training(images16, tmp_path, run16, monkeypatch):
    monkeypatch.setitem(images16.meta, "dataset", "svhn")
    with pytest.raises(ConfigError, match="mirrored svhn image"):
        train_one(run16(augment="crop_flip"), images16, tmp_path, progress=False)
    assert not any(tmp_path.iterdir()), "nothing was trained"


def test_loader_workers_follow_a_train_workers_cpus_less_one(params):
    assert [loader_workers(params.train, cpus) for cpus in (0.5, 0.99, 2, 4.0, 16)] == [0, 0, 1, 3, 15]
    assert loader_workers(dataclasses.replace(params.train, loader_workers=2), 2) == 2


def test_more_loader_workers_than_cpus_are_refused(params):
    with pytest.raises(ConfigError, match="train.loader_workers = 3 is more than the 2 CPU\\(s\\) a Train worker has"):
        loader_workers(dataclasses.replace(params.train, loader_workers=3), 2)


def test_loader_workers_deliver_the_same_batches_so_training_is_unchanged(images16, tmp_path, run16):
    alone = train_one(run16(loader_workers=0), images16, tmp_path / "alone", progress=False)
    beside = train_one(run16(loader_workers=1), images16, tmp_path / "beside", progress=False)
    assert_same_weights(weights(alone.model), weights(beside.model))


def test_a_run_with_the_whole_recipe_resumes_exactly(images16, tmp_path, run16):
    """Schedules and the loader workers' augmentation come back from the checkpoint too."""
    recipe = dict(lr_schedule="cosine", warmup_epochs=1, augment="crop_flip", loader_workers=1, epochs=3)
    straight = train_one(run16(**recipe), images16, tmp_path / "straight", progress=False)
    with pytest.raises(Crash):
        train_one(run16(**recipe), images16, tmp_path / "crashy", on_epoch=crash_after_first_epoch, progress=False)
    resumed = train_one(run16(**recipe), images16, tmp_path / "crashy", progress=False)
    assert [r.train_loss for r in resumed.history] == [r.train_loss for r in straight.history]
    assert_same_weights(weights(resumed.model), weights(straight.model))


def test_augmented_training_differs_from_plain_training(images16, tmp_path, run16):
    plain = train_one(run16(), images16, tmp_path / "plain", progress=False)
    augmented = train_one(run16(augment="crop"), images16, tmp_path / "augmented", progress=False)
    assert plain.history[-1].train_loss != augmented.history[-1].train_loss


def test_mixed_precision_runs_the_forward_pass_in_bfloat16_and_still_learns(images16, tmp_path, run16, monkeypatch):
    seen = []
    step = training._exact_step

    def spy(model, images, labels, loss_fn):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return step(model, images, labels, loss_fn)
    monkeypatch.setattr(training, "_exact_step", spy)
    full = train_one(run16(epochs=4), images16, tmp_path / "full", progress=False)
    assert set(seen) == {None}
    seen.clear()
    mixed = train_one(run16(epochs=4, amp=True), images16, tmp_path / "mixed", progress=False)
    assert set(seen) == {torch.bfloat16}
    assert mixed.status == "finished" and all(math.isfinite(r.train_loss) for r in mixed.history)
    assert mixed.history[-1].train_loss != full.history[-1].train_loss
    assert mixed.history[-1].train_loss < mixed.history[0].train_loss
    assert mixed.history[-1].val_accuracy >= full.history[-1].val_accuracy - 0.1


def test_the_schedule_reaches_the_optimizer(images16, tmp_path, run16):
    """After a cosine run the optimizer's learning rate is near 0; the checkpoint holds the schedule."""
    result = train_one(run16(lr_schedule="cosine", epochs=2), images16, tmp_path, progress=False)
    state = torch.load(next(tmp_path.glob("epoch-*/checkpoint.pt")), weights_only=False)
    steps = state["schedulers"][0]["last_epoch"]
    assert steps == 2 * math.floor(len(images16.split("train")) / 16)
    assert state["optimizers"][0]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(result.history[-1].train_loss)


@pytest.mark.parametrize("device, pinned", [("cpu", False), ("cuda", True)])
def test_batches_for_a_gpu_come_through_pinned_memory(images16, device, pinned):
    loader = training.train_loader(images16.split("train"), 16, torch.Generator(), 2, device)
    assert loader.pin_memory is pinned and loader.num_workers == 2 and loader.prefetch_factor == 4
    assert not loader.persistent_workers, "started anew each epoch, from the run's generator"
