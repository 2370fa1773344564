"""pyproject's extras and requirements.lock agree with the code: `pip install '.[serve]'` is enough for
serving/, and `make` installs what pyproject asks for."""
import ast
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
FIRST_PARTY = {"serving", "slc", "pipeline"}
# The lock's platform (Makefile, `make lock`): CPython 3.11 on Linux x86_64.
LOCK_PLATFORM = default_environment() | {"platform_system": "Linux", "sys_platform": "linux",
                                         "platform_machine": "x86_64", "python_version": "3.11"}


def requirements(*groups: str) -> list[Requirement]:
    """The core dependencies and the named extras, following an extra that names this project."""
    found, todo, seen = [Requirement(r) for r in PROJECT["dependencies"]], list(groups), set()
    while todo:
        group = todo.pop()
        if group in seen:
            continue
        seen.add(group)
        for req in map(Requirement, PROJECT["optional-dependencies"][group]):
            if canonicalize_name(req.name) == canonicalize_name(PROJECT["name"]):
                todo.extend(req.extras)
            else:
                found.append(req)
    return found


@cache
def module_distributions() -> dict[str, list[str]]:
    """Import name -> distributions (PIL -> Pillow); reading every installed package's files takes seconds."""
    return packages_distributions()


def third_party_imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module.split(".")[0])
    return modules - FIRST_PARTY - set(sys.stdlib_module_names)


# serving modules that only an extra beyond `serve` needs; the others must run with `serve` alone
EXTRAS = {"ray_app.py": "ray-serve", "index_ray.py": "ray-serve", "registry.py": "registry"}


@pytest.mark.parametrize("path", sorted((ROOT / "serving").glob("*.py")), ids=lambda p: p.name)
def test_every_third_party_import_of_serving_is_in_the_serve_extra(path):
    extra = EXTRAS.get(path.name, "serve")
    allowed = {canonicalize_name(req.name) for req in requirements(extra)}
    for module in sorted(third_party_imports(path)):
        dists = {canonicalize_name(d) for d in module_distributions().get(module, [module])}
        assert dists & allowed, (f"serving/{path.name} imports {module} (distribution {sorted(dists)}), which the "
                                 f"'{extra}' extra in pyproject.toml does not bring: add it there, then `make lock`")


def test_the_serve_extra_brings_no_torch():
    names = {canonicalize_name(req.name) for req in requirements("serve", "ray-serve")}
    assert not names & {"torch", "torchvision"}, "serving/ must deploy without torch"


def test_the_lock_pins_every_requirement_of_pyproject_at_an_allowed_version():
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line and not line[0].isspace() and line[0] != "#")
    pins = {canonicalize_name(name): version.strip() for name, version in pins.items()}
    for req in requirements(*PROJECT["optional-dependencies"]):
        if req.marker and not req.marker.evaluate(LOCK_PLATFORM):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"requirements.lock has no {name} ({req}): run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject's {req}: run `make lock`")
