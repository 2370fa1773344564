"""Which exports a server serves, by run name, and the default one."""
import shutil

import pytest

from serving.errors import ExportError, SetupError, UnknownRunError
from serving.runs import Runs, export_dirs
from tests.serving.conftest import edit_manifest


def test_a_directory_of_exports_gives_its_runs_in_name_order(exports, tmp_path):
    copy = shutil.copytree(exports, tmp_path / "exports")
    (copy / "notes").mkdir()  # a directory without manifest.json is no run
    assert export_dirs([copy]) == [copy / "bce-s1", copy / "ce-s0"]
    assert export_dirs([copy / "ce-s0", copy]) == [copy / "ce-s0", copy / "bce-s1", copy / "ce-s0"]


def test_a_path_that_is_no_export_is_passed_on_for_loading_to_explain(tmp_path):
    assert export_dirs([tmp_path / "absent"]) == [tmp_path / "absent"]
    with pytest.raises(ExportError, match="neither an export nor a directory of exports"):
        export_dirs([tmp_path])


def test_the_default_run_is_the_first_unless_named(exports):
    assert Runs.load([exports]).default.run_name == "bce-s1"
    runs = Runs.load([exports], "ce-s0")
    assert runs.default.run_name == "ce-s0" and [m.run_name for m in runs] == ["bce-s1", "ce-s0"]


def test_an_unknown_run_lists_the_served_ones(exports):
    with pytest.raises(UnknownRunError, match=r"^run 'ce-s9' is not served here; the runs are bce-s1, ce-s0"):
        Runs.load([exports], "ce-s9")


def test_two_exports_of_one_run_are_refused(export_dir, tmp_path):
    twin = shutil.copytree(export_dir, tmp_path / "copy")
    with pytest.raises(SetupError, match="two exports are run 'ce-s0'.*serve one of them"):
        Runs.load([export_dir, twin])


def test_a_tampered_export_among_them_fails_the_load(exports, tmp_path):
    copy = shutil.copytree(exports, tmp_path / "exports")
    edit_manifest(copy / "bce-s1", lambda manifest: manifest.update(num_classes=7))
    with pytest.raises(ExportError, match="bce-s1"):
        Runs.load([copy])
