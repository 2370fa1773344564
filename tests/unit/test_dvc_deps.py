"""dvc.yaml's deps tell the truth: every project file a stage imports is a dep (so editing it reruns
the stage), no project file it does not import is one, and every dep exists or is a stage's out."""
import re

import pytest
import yaml

from slc.core.closure import PROJECT_PACKAGES, ROOT, UnresolvedImport, import_closure

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def stage_module(stage: str) -> str:
    match = re.match(r"python -m ([\w.]+)", STAGES[stage]["cmd"])
    assert match, f"dvc.yaml: stage {stage}'s cmd {STAGES[stage]['cmd']!r} is not `python -m <module> ...`"
    return match.group(1)


def paths(entries: list) -> set[str]:
    """dvc.yaml lists a dep or out as a path, or as {path: options}."""
    return {entry if isinstance(entry, str) else next(iter(entry)) for entry in entries}


def is_project_code(path: str) -> bool:
    return path.endswith(".py") and path.split("/")[0] in PROJECT_PACKAGES


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_project_file_the_stage_imports_is_a_dep(stage):
    imported = {path.as_posix() for path in import_closure(stage_module(stage))}
    missing = sorted(imported - paths(STAGES[stage]["deps"]))
    assert not missing, f"dvc.yaml: stage {stage} imports {', '.join(missing)} but its deps lack them: add them"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_project_file_the_stage_does_not_import_is_a_dep(stage):
    imported = {path.as_posix() for path in import_closure(stage_module(stage))}
    extra = sorted(path for path in paths(STAGES[stage]["deps"]) if is_project_code(path) and path not in imported)
    assert not extra, f"dvc.yaml: stage {stage} lists {', '.join(extra)} in deps but never imports them: remove them"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_dep_exists_or_is_a_stage_output(stage):
    outs = set().union(*(paths(s.get("outs", [])) | paths(s.get("metrics", [])) for s in STAGES.values()))
    absent = sorted(path for path in paths(STAGES[stage]["deps"]) if not (ROOT / path).exists() and path not in outs)
    assert not absent, f"dvc.yaml: stage {stage} depends on {', '.join(absent)}, which no longer exist: remove them"


def write(root, path: str, text: str = "") -> None:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(text)


def test_the_closure_follows_imports_inside_functions_and_from_package_import_module(tmp_path):
    write(tmp_path, "pipeline/__init__.py")
    write(tmp_path, "pipeline/stage.py", "import json\nfrom slc import report\n"
                                         "def main():\n    from slc.late import run\n")
    write(tmp_path, "slc/__init__.py")
    write(tmp_path, "slc/report.py", "from serving.errors import Oops\n")
    write(tmp_path, "slc/late.py", "def run(): pass\n")
    write(tmp_path, "slc/unused.py")
    write(tmp_path, "serving/__init__.py")
    write(tmp_path, "serving/errors.py", "class Oops(Exception): pass\n")
    assert [p.as_posix() for p in import_closure("pipeline.stage", tmp_path)] == [
        "pipeline/__init__.py", "pipeline/stage.py", "serving/__init__.py", "serving/errors.py",
        "slc/__init__.py", "slc/late.py", "slc/report.py"]


@pytest.mark.parametrize("line, named", [("from slc import gone", "'gone' from slc"),
                                         ("from slc.real import gone", "'gone' from slc.real"),
                                         ("import slc.gone", "slc.gone")])
def test_an_import_of_nothing_is_named_with_its_line(tmp_path, line, named):
    write(tmp_path, "slc/__init__.py")
    write(tmp_path, "slc/real.py", "x = 1\n")
    write(tmp_path, "slc/stage.py", f"def main():\n    {line}\n")
    with pytest.raises(UnresolvedImport, match=f"stage.py:2 imports {named}"):
        import_closure("slc.stage", tmp_path)
