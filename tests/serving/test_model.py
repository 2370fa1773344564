"""SingleLogitModel on a real export: the logits are PyTorch's, decisions follow the calibrated
thresholds, and a damaged export is refused before anything is served."""
import os
import subprocess
import sys

import numpy as np
import pytest

from serving import sessions
from serving.errors import ExportError, InputError, NonFiniteLogitError, ThresholdError, UnknownClassError
from serving.model import SingleLogitModel
from serving.sessions import choose_providers
from tests.serving.conftest import CLASSES, THRESHOLDS, edit_manifest, overflowing_input, reference_logits

GRAPH_NAMES = ["single_logit", "full"]


@pytest.fixture(scope="module", params=GRAPH_NAMES)
def model(request, export_dir):
    return SingleLogitModel.load(export_dir, graph=request.param)


def test_a_batch_with_one_class_gives_that_class_logit_of_each_image(model, trained, pixels):
    expected = reference_logits(trained, pixels)
    for c in range(len(CLASSES)):
        np.testing.assert_allclose(model.score(pixels, c), expected[:, c], atol=1e-5)


def test_one_image_with_several_classes_gives_one_logit_per_class(model, trained, pixels):
    np.testing.assert_allclose(model.score(pixels[2], [4, 0, 2]), reference_logits(trained, pixels)[2, [4, 0, 2]],
                               atol=1e-5)


def test_images_and_classes_pair_up_one_to_one(model, trained, pixels):
    ids = [0, 1, 2, 3, 4, 0]
    np.testing.assert_allclose(model.score(pixels, ids), reference_logits(trained, pixels)[np.arange(6), ids],
                               atol=1e-5)


def test_both_graphs_agree(export_dir, pixels):
    single, full = (SingleLogitModel.load(export_dir, graph=g) for g in GRAPH_NAMES)
    np.testing.assert_allclose(single.score(pixels, 1), full.score(pixels, 1), atol=1e-6)


def test_decide_compares_the_logit_with_the_threshold_calibrated_for_the_recall(model, pixels):
    for recall in (0.9, 0.99):
        logits = model.score(pixels, 1)
        threshold = THRESHOLDS[f"{recall:g}"][1]
        np.testing.assert_array_equal(model.decide(pixels, 1, recall=recall), logits >= threshold)


def test_classify_reports_threshold_and_recall(model, pixels):
    result = model.classify(pixels, 2, recall=0.9)
    assert result.recall == 0.9 and (result.thresholds == THRESHOLDS["0.9"][2]).all()
    np.testing.assert_array_equal(result.decisions, result.logits >= THRESHOLDS["0.9"][2])


def test_a_recall_without_thresholds_is_refused_listing_the_calibrated_ones(model, pixels):
    with pytest.raises(ThresholdError, match=r"recall 0.5.* 0.9, 0.99"):
        model.decide(pixels, 1, recall=0.5)


def test_a_class_without_a_threshold_cannot_be_decided_but_can_be_scored(model, pixels):
    with pytest.raises(ThresholdError, match="class 3 has no threshold at recall 0.99"):
        model.decide(pixels, 3)
    result = model.classify(pixels, 3)
    assert np.isnan(result.thresholds).all() and not result.decisions.any()


@pytest.mark.parametrize("class_id", [5, -1, [0, 9], True, 1.5, "2", []])
def test_unknown_class_ids_are_refused(model, pixels, class_id):
    with pytest.raises(UnknownClassError, match=r"0\.\.4"):
        model.score(pixels, class_id)


def test_class_ids_that_cannot_pair_with_the_images_are_refused(model, pixels):
    with pytest.raises(InputError, match="6 images and 2 class ids"):
        model.score(pixels, [0, 1])


def test_describe_lists_what_a_client_needs(model):
    description = model.describe()
    assert description["class_names"] == CLASSES and description["input"]["shape"] == [1, 8, 8]
    assert description["recalls"] == [0.9, 0.99] and description["providers"] == ["CPUExecutionProvider"]
    assert description["graph_file"] == {"single_logit": "single_logit.onnx", "full": "model.onnx"}[model.graph]


def test_an_export_without_thresholds_scores_but_has_no_default_recall(export_copy, pixels):
    edit_manifest(export_copy, lambda m: m.update(thresholds={}))
    model = SingleLogitModel.load(export_copy)
    assert model.recalls == [] and model.default_recall is None
    assert not model.classify(pixels, 0, recall=None).decisions.any()
    with pytest.raises(ThresholdError, match="none"):
        model.decide(pixels, 0)


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda d: flip_a_byte(d / "head.weights"), r"head.weights has sha256 .* changed after export"),
    (lambda d: flip_a_byte(d / "single_logit.onnx"), r"single_logit.onnx has sha256"),
    (lambda d: (d / "backbone.weights").write_bytes(b"short"), r"backbone.weights has 5 bytes"),
    (lambda d: (d / "model.onnx").unlink(), r"model.onnx is missing"),
    (lambda d: (d / "manifest.json").unlink(), r"manifest.json not found"),
    (lambda d: (d / "manifest.json").write_text("{not json"), r"not valid JSON"),
    (lambda d: edit_manifest(d, lambda m: m.pop("opset")), r"lacks the key 'opset'"),
    (lambda d: edit_manifest(d, lambda m: m.update(format_version=2)), r"format_version 2"),
    (lambda d: edit_manifest(d, lambda m: m.update(lables=[])), r"unknown key 'lables'"),
    (lambda d: edit_manifest(d, lambda m: m.update(class_names=["a"])), r"class_names .* 5 names"),
    (lambda d: edit_manifest(d, lambda m: m["thresholds"].update({"0.9": [0.0]})), r"thresholds\['0.9'\]"),
    (lambda d: edit_manifest(d, lambda m: m["normalisation"].update(std=[0.0])), r"normalisation.std"),
    (lambda d: edit_manifest(d, lambda m: m["files"].update({"../outside": {"sha256": "0", "bytes": 0}})),
     r"not inside the export"),
    (lambda d: edit_manifest(d, lambda m: m["models"].update(single_logit="unlisted.onnx")),
     r"models.single_logit = 'unlisted.onnx'"),
])
def test_a_damaged_export_is_refused(export_copy, damage, message):
    damage(export_copy)
    with pytest.raises(ExportError, match=message):
        SingleLogitModel.load(export_copy)


def move_out_and_link(export, name: str) -> None:
    """The file moved out of the export, a symlink to it in its place: same bytes, same sha256."""
    outside = export.parent / f"outside-{name}"
    os.replace(export / name, outside)
    (export / name).symlink_to(outside)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "passwd").symlink_to("/etc/passwd"), r"passwd is a symlink \(to /etc/passwd\): an export holds plain files"),
    (lambda d: move_out_and_link(d, "head.weights"), r"head.weights is a symlink \(to .*outside-head.weights\)"),
    (lambda d: move_out_and_link(d, "manifest.json"), r"manifest.json is a symlink"),
    (lambda d: (d / "sub").symlink_to(d.parent, target_is_directory=True), r"sub is a symlink"),
    (lambda d: (d / "notes.txt").write_text("hello"), r"notes.txt is not listed in manifest.json \(1 unlisted file"),
    (lambda d: (d / "sub").mkdir() or (d / "sub" / "x.onnx").write_bytes(b"x"), r"sub/x.onnx is not listed"),
])
def test_a_symlink_or_an_unlisted_file_in_an_export_is_refused(export_copy, damage, message):
    damage(export_copy)
    with pytest.raises(ExportError, match=message):
        SingleLogitModel.load(export_copy)


def test_input_that_overflows_the_network_is_refused_not_decided_no(model, trained):
    images = np.concatenate([np.zeros((1, 1, 8, 8), np.float32), overflowing_input(trained)])  # finite float32
    assert np.isfinite(images).all()
    with pytest.raises(NonFiniteLogitError, match=r"image 1 gives the logit (-?inf|nan) for class 2 \(1 of 2 images"):
        model.classify(images, 2)


def test_a_graph_swapped_for_another_listed_file_is_refused_by_its_signature(export_copy):
    edit_manifest(export_copy, lambda m: m["models"].update(single_logit="model.onnx"))
    with pytest.raises(ExportError, match=r"model.onnx has inputs \['image'\], expected \['class_id', 'image'\]"):
        SingleLogitModel.load(export_copy)


def test_a_missing_export_directory_is_refused(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        SingleLogitModel.load(tmp_path / "nowhere")


def test_auto_providers_take_cuda_only_when_a_device_answers(monkeypatch):
    monkeypatch.setattr(sessions.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(sessions, "cuda_device_count", lambda: 0)
    assert choose_providers("auto") == ["CPUExecutionProvider"]
    monkeypatch.setattr(sessions, "cuda_device_count", lambda: 1)
    assert choose_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_an_unavailable_provider_is_refused_listing_the_available_ones():
    with pytest.raises(ValueError, match="'NoSuchExecutionProvider' is not available here; available: .*CPU"):
        choose_providers(["NoSuchExecutionProvider"])


def test_an_empty_provider_list_is_refused_rather_than_left_to_onnxruntimes_default():
    with pytest.raises(ValueError, match="no onnxruntime provider named; available: .*CPU"):
        choose_providers([])


def test_serving_imports_neither_torch_nor_pipeline():
    code = ("import sys, serving.model, serving.images, serving.http, serving.cli, serving.loadtest, serving.ray_app; "
            "print(sorted(m for m in ('torch', 'pipeline') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.getcwd()).stdout
    assert out.strip() == "[]"
