"""The data-loading benchmark: its measurement, its data, its report, and a whole (tiny) run of every kind."""
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys

import onnxruntime
import psutil
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from pipeline import dataloading as entry
from pipeline.presets import preset_params
from serving.machine import cpu_model
from slc.core.errors import ConfigError
from slc.data.preparation import prepare
from slc.data.prepared import PreparedData
from slc.studies import dataloading
from slc.studies.dataloading import (
    KINDS,
    PHOTO_CLASSES,
    kinds_named,
    measure,
    time_pass,
    tuples_source,
    write_cifar_shaped,
    write_photo_folder,
)
from tests.conftest import PARAMS_YAML
from tests.formats import write_idx_gz

WORKERS = ["0", "1"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Every kind at 40 source images, batches of 8, 0 and 1 workers, one short pass each."""
    folder = tmp_path_factory.mktemp("dataloading")
    write_idx_gz(folder / "raw" / "FashionMNIST" / "raw", n_train=60, n_test=20)
    raw = yaml.safe_load(PARAMS_YAML.read_text())
    raw["data"]["root"] = str(folder / "raw")
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    out = {"metrics": folder / "dataloading.json", "table": folder / "dataloading.md", "plot": folder / "dataloading.png"}
    entry.main(["--params", str(folder / "params.yaml"), "--images", "40", "--batch-size", "8", "--workers", *WORKERS,
                "--repeats", "1", "--budget-s", "0.2", *[arg for key, path in out.items() for arg in (f"--{key}", str(path))]])
    return {"json": json.loads(out["metrics"].read_text()), "table": out["table"].read_text(), "plot": out["plot"]}


@pytest.fixture
def arrays(tmp_path, params):
    """A prepared CIFAR-shaped dataset of 50 source images (45 in train)."""
    path = write_cifar_shaped(tmp_path / "source.npz", train=50, test=10, seed=0)
    prepare(dataclasses.replace(params.data, name="npz", npz_path=str(path)), tmp_path / "prepared")
    return PreparedData(tmp_path / "prepared").split("train")


def test_the_json_has_every_kind_with_a_positive_rate_and_start_up_at_every_worker_count(study):
    assert set(study["json"]) == {*KINDS, "machine"}
    for name in KINDS:
        figures = study["json"][name]
        for key in ("images_per_s", "images_per_s_min", "images_per_s_max", "startup_s"):
            assert list(figures[key]) == WORKERS, (name, key)
            assert all(isinstance(v, float) and v > 0 for v in figures[key].values()), (name, key)


def test_each_kind_records_its_presets_settings(study):
    for name, kind in KINDS.items():
        settings = study["json"][name]["settings"]
        assert settings["preset"] == kind.preset and settings["batch_size"] == 8 and settings["images"] > 0
        assert settings["augment"] == preset_params(kind.preset).train.augment
    assert study["json"]["folder"]["settings"]["input_shape"] == [3, 299, 299]  # imagenet_inception_v3's image size
    assert study["json"]["cifar10"]["settings"]["input_shape"] == [3, 32, 32]


def test_the_machine_recorded_is_the_one_it_ran_on(study):
    machine = study["json"]["machine"]
    assert machine["cores"] == len(os.sched_getaffinity(0))  # the CPUs it may use, not the host's
    assert (machine["torch"], machine["python"]) == (torch.__version__, platform.python_version())
    assert machine["memory_gb"] == round(psutil.virtual_memory().total / 1e9, 1)
    assert machine["cpu"] == cpu_model() and machine["onnxruntime"] == onnxruntime.__version__
    for key in ("load_average", "load_average_end"):  # 1, 5 and 15 minutes, at the start and at the end
        assert len(machine[key]) == 3 and all(isinstance(x, float) and x >= 0 for x in machine[key]), key


def test_the_report_names_the_machine_and_its_load(study):
    m = study["json"]["machine"]
    load = lambda values: ", ".join(f"{x:.2f}" for x in values)
    assert (f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, torch {m['torch']}, Python {m['python']}."
            in study["table"])
    assert f"load average was {load(m['load_average'])} at the start and {load(m['load_average_end'])} at the end" \
        in study["table"]


def test_the_table_shows_the_jsons_figures(study):
    rows = {(cells[0], cells[1]): cells[2:] for cells in
            (re.split(r"\s*\|\s*", line.strip("| ")) for line in study["table"].splitlines() if line.startswith("| "))}
    for name in KINDS:
        figures = study["json"][name]
        for w in WORKERS:
            median, low, high, _, startup = rows[(name, w)]
            assert median == f"{figures['images_per_s'][w]:,.1f}" and startup == f"{figures['startup_s'][w] * 1000:.1f}"
            assert (low, high) == (f"{figures['images_per_s_min'][w]:,.1f}", f"{figures['images_per_s_max'][w]:,.1f}")
    assert "CIFAR-shaped, not CIFAR-10" in study["table"] and "machine shared with other work" in study["table"]


def test_the_plot_is_written(study):
    assert study["plot"].stat().st_size > 10_000


def test_the_folder_kind_writes_500x375_jpegs_that_pil_opens(tmp_path):
    write_photo_folder(tmp_path, train=8, test=4, seed=0)
    files = sorted(tmp_path.rglob("*.jpg"))
    assert len(files) == 12 and len({f.parent.name for f in files}) == PHOTO_CLASSES
    pixels = set()
    for path in files:
        with Image.open(path) as image:
            assert (image.format, image.size, image.mode) == ("JPEG", (500, 375), "RGB")
            pixels.add(image.tobytes()[:3000])
    assert len(pixels) == len(files)  # seeded random windows, not one picture copied


def test_images_per_s_counts_the_images_the_loader_delivered(arrays):
    loader = DataLoader(arrays, batch_size=8)  # 45 images: five batches of 8, then one of 5
    result = time_pass(loader, warmup=1, budget_s=60)
    assert result["images"] == 45 - 8
    assert result["images_per_s"] == pytest.approx(result["images"] / result["seconds"])
    assert result["startup_s"] > 0


def test_a_pass_stops_at_the_first_batch_past_its_time_budget(arrays):
    assert time_pass(DataLoader(arrays, batch_size=8), warmup=2, budget_s=0)["images"] == 8


def test_in_process_loading_runs_on_the_threads_asked_for_and_leaves_torchs_count_as_it_was(arrays, monkeypatch):
    seen = []
    monkeypatch.setattr(dataloading, "time_pass", lambda *args: seen.append(torch.get_num_threads()) or {})
    before = torch.get_num_threads()
    measure(arrays, 8, [0, 1], repeats=2, budget_s=1, threads=1)
    assert seen == [1, 1, 1, 1] and torch.get_num_threads() == before


def test_a_loader_with_no_batch_past_the_untimed_ones_is_an_error(arrays):
    with pytest.raises(ConfigError, match="smaller batch size"):
        time_pass(DataLoader(arrays, batch_size=64), warmup=1, budget_s=1)


def test_tuples_keep_the_presets_class_count_so_images_are_as_wide_as_at_its_k(params):
    data = dataclasses.replace(params.data, tuples=dataclasses.replace(params.data.tuples, num_classes=400_000))
    assert tuples_source(data, None, 400_000, 0).tuples.num_classes == 400_000
    assert tuples_source(data, None, 30, 0).tuples.num_classes == 30  # tiny runs: fewer, shorter tuples


def test_an_unknown_kind_is_an_error_naming_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown data-loading kind 'imagenet'; known: fashion_mnist, cifar10"):
        kinds_named(["cifar10", "imagenet"])


def test_the_command_line_refuses_an_unknown_kind_in_one_line():
    done = subprocess.run([sys.executable, "-m", "pipeline.dataloading", "--kinds", "mnsit"], capture_output=True,
                          text=True)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: unknown data-loading kind 'mnsit'; known: ") and "Traceback" not in done.stderr


@pytest.mark.parametrize("args", [["--workers", "-1"], ["--images", "0"], ["--batch-size", "0"], ["--budget-s", "0"],
                                  ["--threads", "0"]])
def test_nonsense_sizes_are_refused_before_any_work(args):
    with pytest.raises(ConfigError, match=re.escape(args[0])):
        entry.main(["--kinds", "cifar10", *args])
