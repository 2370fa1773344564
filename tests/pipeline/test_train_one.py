"""One training run: it learns, it is reproducible, it resumes, and it fails softly."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from slc.core.config import RunConfig
from slc.core.errors import ConfigError
from slc.data.preparation import prepare
from slc.data.prepared import PreparedData
from slc.evaluate.metrics import slc_metrics
from slc.nn import losses
from slc.nn.models import predict_logits
from slc.nn.trained import load_trained, save_trained, trained_info
from slc.train import training
from slc.train.training import train_one
from tests.conftest import prepared_synthetic
from tests.pipeline.conftest import Crash, assert_same_weights, crash_after_first_epoch, weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, params) -> PreparedData:
    """Seeded synthetic data: 5 classes of 8x8 prototypes plus noise, 180 training images."""
    return prepared_synthetic(params, tmp_path_factory.mktemp("synthetic"), num_classes=5, train_per_class=40,
                              test_per_class=10, image_size=8)


def test_a_seeded_run_is_reproducible(tiny, tmp_path, tiny_run):
    first = train_one(tiny_run("nce"), tiny, tmp_path / "a", progress=False)
    second = train_one(tiny_run("nce"), tiny, tmp_path / "b", progress=False)
    assert first.status == second.status == "finished"
    assert_same_weights(weights(first.model), weights(second.model))
    assert [r.train_loss for r in first.history] == [r.train_loss for r in second.history]


def test_each_epoch_is_reported_with_its_metrics_and_checkpoint(tiny, tmp_path, tiny_run):
    reports = []
    result = train_one(tiny_run(epochs=3), tiny, tmp_path, on_epoch=reports.append, progress=False)
    assert [r.epoch for r in reports] == [1, 2, 3] and reports == result.history
    assert all(0 <= r.val_accuracy <= 1 and 0 <= r.val_mean_auprc <= 1 and r.samples_per_s > 0 for r in reports)
    assert (tmp_path / "epoch-0003" / "checkpoint.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0003"], "only the latest checkpoint is kept"


@pytest.mark.parametrize("loss", ["ce", "nce"])
def test_a_restarted_run_resumes_from_its_last_checkpoint_exactly(tiny, tmp_path, loss, tiny_run):
    """nce draws noise from the training generator: its state must come back too."""
    uninterrupted = train_one(tiny_run(loss), tiny, tmp_path / "straight", progress=False)
    with pytest.raises(Crash):
        train_one(tiny_run(loss), tiny, tmp_path / "crashy", on_epoch=crash_after_first_epoch, progress=False)
    epochs_run = []
    resumed = train_one(tiny_run(loss), tiny, tmp_path / "crashy", on_epoch=epochs_run.append, progress=False)
    assert [r.epoch for r in epochs_run] == [2], "epoch 1 came from the checkpoint"
    assert resumed.epochs_completed == 2 and resumed.history[0].train_loss == uninterrupted.history[0].train_loss
    assert_same_weights(weights(resumed.model), weights(uninterrupted.model))


def test_a_finished_run_can_be_extended_but_not_resumed_with_other_settings(tiny, tmp_path, tiny_run):
    train_one(tiny_run(epochs=1), tiny, tmp_path, progress=False)
    extended = train_one(tiny_run(epochs=2), tiny, tmp_path, progress=False)
    assert [r.epoch for r in extended.history] == [1, 2]
    with pytest.raises(ValueError, match="another configuration"):
        train_one(tiny_run(epochs=3, lr=0.1), tiny, tmp_path, progress=False)


def test_a_non_finite_loss_ends_the_run_as_failed_without_raising(tiny, tmp_path, monkeypatch, tiny_run):
    calls = []

    def explodes_in_epoch_two(logits, targets):
        calls.append(1)
        value = losses.ce(logits, targets)
        return value * float("nan") if len(calls) > 5 else value  # 180 images / 32 = 5 steps an epoch

    monkeypatch.setitem(losses.LOSSES, "explodes", explodes_in_epoch_two)
    result = train_one(tiny_run("explodes", epochs=3), tiny, tmp_path, progress=False)
    assert result.status == "failed" and result.epochs_completed == 1
    assert "epoch 2" in result.error and "nan" in result.error and "step 1 of 5" in result.error
    assert (tmp_path / "epoch-0001" / "checkpoint.pt").exists(), "the last good checkpoint stays"


def test_it_trains_under_distributed_data_parallel(tiny, tmp_path, tiny_run):
    """The hooks a Ray Train worker passes: DDP around the model, a DistributedSampler in the loader."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        def shard(loader):
            sampler = DistributedSampler(loader.dataset, shuffle=True, seed=0)
            return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler)

        result = train_one(tiny_run(), tiny, tmp_path / "work", wrap_model=DistributedDataParallel,
                           wrap_loader=shard, progress=False)
    finally:
        dist.destroy_process_group()
    assert result.status == "finished" and not isinstance(result.model, DistributedDataParallel)
    assert result.history[-1].checkpoint_dir is not None


def test_the_trained_model_saves_and_loads_with_its_config(tiny, tmp_path, tiny_run):
    config = tiny_run(epochs=1)
    result = train_one(config, tiny, tmp_path / "work", progress=False)
    save_trained(result.model, tmp_path / config.run_name, trained_info(config, tiny))
    loaded, info = load_trained(tmp_path / config.run_name)
    assert info["run_name"] == "ce-s0" and info["class_names"] == tiny.class_names
    test = tiny.split("test")
    np.testing.assert_array_equal(predict_logits(loaded, test), predict_logits(result.model, test))


@pytest.fixture(scope="module")
def fashion_5000(tmp_path_factory, params) -> PreparedData:
    """5,000 real Fashion-MNIST training images (4,500 train + 500 val) and the full test set."""
    root = tmp_path_factory.mktemp("fashion")
    prepare(dataclasses.replace(params.data, name="fashion_mnist", root=str(root / "raw"), train_limit=5000),
            root / "prepared")
    return PreparedData(root / "prepared")


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "batch_ce"])
def test_the_paper_mlp_learns_fashion_mnist_from_5000_images_in_two_epochs(fashion_5000, tmp_path, loss, params):
    run = RunConfig(loss, 0, dataclasses.replace(params.model, name="mlp"), dataclasses.replace(params.train, epochs=2))
    result = train_one(run, fashion_5000, tmp_path, progress=False)
    test = fashion_5000.split("test")
    metrics = slc_metrics(predict_logits(result.model, test), test.labels)
    assert result.status == "finished"
    assert metrics["accuracy"] > 0.75


# ---------- sampled training (train.candidates) ----------

def test_a_seeded_sampled_run_is_reproducible(tiny, tmp_path, tiny_run):
    runs = [train_one(tiny_run("bce", candidates=2), tiny, tmp_path / name, progress=False) for name in "ab"]
    assert runs[0].status == "finished"
    assert_same_weights(weights(runs[0].model), weights(runs[1].model))


def test_with_every_class_a_candidate_sampled_training_follows_exact_training(tiny, tmp_path, tiny_run):
    """One epoch (the shuffle is drawn before any candidate): the same losses and gradients, RowAdam (a step count per row)
    on the head instead of Adam, which is the same update when every row takes part in every step."""
    exact = train_one(tiny_run("batch_ce", epochs=1), tiny, tmp_path / "exact", progress=False)
    every = train_one(tiny_run("batch_ce", epochs=1, candidates=5), tiny, tmp_path / "every", progress=False)
    assert every.history[0].train_loss == pytest.approx(exact.history[0].train_loss, abs=1e-6)
    for name, value in weights(exact.model).items():
        torch.testing.assert_close(weights(every.model)[name], value, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("loss, train, message", [
    ("ce", {"candidates": 6}, "train.candidates = 6 is above the 5 classes"),
    ("nce", {"candidates": 2, "nce_noise": "frequency"}, "set train.nce_noise: uniform"),
    ("ce", {"candidates": 2, "weight_decay": 0.1}, "set train.weight_decay: 0"),
    ("smooth_top5", {"candidates": 2}, "smooth_top5 has no sampled form .* set train.candidates: null"),
])
def test_sampled_settings_that_cannot_train_are_refused_before_any_work(tiny, tmp_path, tiny_run, loss, train, message):
    with pytest.raises(ConfigError, match=message):
        train_one(tiny_run(loss, **train), tiny, tmp_path, progress=False)
    assert not list(tmp_path.iterdir()), "nothing was written"


def test_a_head_too_big_for_memory_is_refused_with_the_estimate(tiny, tmp_path, tiny_run, monkeypatch):
    monkeypatch.setattr(training.psutil, "virtual_memory", lambda: SimpleNamespace(available=1000))
    with pytest.raises(ConfigError, match=r"16-wide head over 5 classes needs ~.* GiB .* set train.candidates"):
        train_one(tiny_run(), tiny, tmp_path, progress=False)


def test_validation_over_a_sample_of_classes(tiny, tmp_path, tiny_run):
    result = train_one(tiny_run("bce", epochs=1, val_classes=2), tiny, tmp_path, progress=False)
    assert 0 <= result.history[0].val_accuracy <= 1 and 0 < result.history[0].val_mean_auprc <= 1


def cosine(run: RunConfig, **model) -> RunConfig:
    return dataclasses.replace(run, model=dataclasses.replace(run.model, head="cosine", **model))


@pytest.mark.parametrize("candidates", [None, 3])
def test_a_cosine_head_from_class_means_learns_and_its_start_is_timed(tiny, tmp_path, tiny_run, candidates):
    run = cosine(tiny_run("batch_ce", epochs=2, head_init="class_mean", head_lr=0.05, candidates=candidates))
    result = train_one(run, tiny, tmp_path, progress=False)
    assert result.status == "finished" and result.head_init_s > 0
    assert result.history[-1].val_accuracy > 0.9


def test_a_resumed_run_keeps_its_head_start_and_does_not_redo_it(tiny, tmp_path, tiny_run, monkeypatch):
    run = tiny_run("ce", head_init="class_mean")
    uninterrupted = train_one(run, tiny, tmp_path / "straight", progress=False)
    with pytest.raises(Crash):
        train_one(run, tiny, tmp_path / "crashy", on_epoch=crash_after_first_epoch, progress=False)
    monkeypatch.setattr(training, "class_mean_rows", lambda *args: pytest.fail("the rows were set again"))
    resumed = train_one(run, tiny, tmp_path / "crashy", progress=False)
    assert resumed.head_init_s > 0
    assert_same_weights(weights(resumed.model), weights(uninterrupted.model))


def test_a_margin_a_cosine_head_cannot_reach_is_refused_before_any_work(tiny, tmp_path, tiny_run):
    with pytest.raises(ConfigError, match=r"logits lie within 2 x scale = 4 .* train.margin = 10 .* below 4"):
        train_one(cosine(tiny_run("batch_max_margin", margin=10.0), scale=2.0), tiny, tmp_path, progress=False)
    assert not list(tmp_path.iterdir()), "nothing was written"
    assert train_one(cosine(tiny_run("max_margin", epochs=1, margin=1.0)), tiny, tmp_path, progress=False).status \
        == "finished"


@pytest.mark.parametrize("loss", ["cosface", "arcface", "sphereface2", "uniface"])
def test_a_head_loss_trains_a_cosine_head_at_its_scale_with_its_papers_bias(tiny, tmp_path, tiny_run, loss):
    """CosFace and ArcFace have no bias (held at 0); SphereFace2's and UniFace's threshold starts where
    their papers start it and trains."""
    plain = tiny_run(loss, epochs=2, head_init="class_mean")
    run = training.run_of(loss, 0, plain.model, plain.train)
    assert (run.model.head, run.model.scale) == ("cosine", getattr(plain.train, loss).scale)
    assert training.run_of("ce", 0, plain.model, plain.train).model == plain.model
    result = train_one(run, tiny, tmp_path, progress=False)
    assert result.status == "finished" and result.history[-1].val_accuracy > 0.9
    bias = result.model.head.bias.detach()
    start, trains = losses.HEAD_BIASES[loss](getattr(plain.train, loss), tiny.num_classes)
    assert trains == (loss in losses.POLS_ALIGNED)
    assert (bias != start).all() if trains else not bias.any()
