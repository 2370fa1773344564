"""The project files a module runs when it is imported, found by reading imports (`ast`), not by
running them: what a DVC stage's `deps` must list, and what a trial's fingerprint hashes as its code.

A file's imports count wherever they are (module level or inside a function), since a function-level
import runs as soon as the stage calls that function; the packages above a module count too (their
`__init__.py` runs first). Everything outside PROJECT_PACKAGES is external and not followed.
"""
from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PROJECT_PACKAGES = ("pipeline", "slc", "serving")  # pyproject.toml's packages; every other import is external
ROOT = Path(__file__).resolve().parents[2]  # the repository: the folder holding the packages


class UnresolvedImport(ImportError):
    """A project import that names no file or no name: it would fail when that line runs."""


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """`slc.train.grid` -> root/slc/train/grid.py, or root/slc/grid/__init__.py for a package; None if neither exists."""
    base = root.joinpath(*module.split("."))
    return next((path for path in (base.with_suffix(".py"), base / "__init__.py") if path.is_file()), None)


@cache
def import_closure(module: str, root: Path = ROOT) -> tuple[Path, ...]:
    """Every project file that `import module` runs, relative to `root`, sorted."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # the packages above, then the module itself
            path = module_file(".".join(parts[:depth]), root)
            if path is None:
                raise UnresolvedImport(f"no file for module {name!r} under {root}: expected "
                                       f"{Path(*parts)}.py or {Path(*parts, '__init__.py')}")
            if path not in seen:
                seen.add(path)
                todo.extend(project_imports(path, root))
    return tuple(sorted(path.relative_to(root) for path in seen))


@cache
def code_hashes(module: str) -> dict[str, str]:
    """md5 of every project file `import module` runs: that module's code identity (once per process)."""
    return {path.as_posix(): hashlib.md5((ROOT / path).read_bytes()).hexdigest() for path in import_closure(module)}


def project_imports(path: Path, root: Path = ROOT) -> list[str]:
    """The project modules a file imports anywhere in it. `from pkg import x` imports the module
    pkg.x when there is one, else needs `x` defined in pkg; a name that is neither is an error here
    rather than an ImportError when that line first runs."""
    modules = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            pairs = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise UnresolvedImport(f"{path}:{node.lineno}: a relative import is not followed; write "
                                       f"`from <package>.{node.module or ''} import ...` instead")
            pairs = [(node.module, alias.name) for alias in node.names]
        else:
            continue
        for module, name in pairs:
            if module.split(".")[0] not in PROJECT_PACKAGES:
                continue
            if name is not None and module_file(f"{module}.{name}", root) is not None:
                modules.append(f"{module}.{name}")
                continue
            source = module_file(module, root)
            if source is not None and (name is None or _defines(source, name)):
                modules.append(module)
                continue
            what = f"{name!r} from {module}" if name is not None else module
            raise UnresolvedImport(f"{path}:{node.lineno} imports {what}, which is neither a module under "
                                   f"{root} nor a name defined there: fix or remove that import")
    return modules


def _defines(source: Path, name: str) -> bool:
    names = top_level_names(source)
    return name == "*" or name in names or "__getattr__" in names  # a module __getattr__ answers any name


def top_level_names(path: Path) -> set[str]:
    """The names a module defines at its top level, also inside top-level if/try/with blocks."""
    names: set[str] = set()
    body = list(ast.parse(path.read_text(), filename=str(path)).body)
    while body:
        node = body.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            body += [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", []),
                     *(stmt for handler in getattr(node, "handlers", []) for stmt in handler.body)]
    return names
