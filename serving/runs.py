"""Many runs, one server: the exports a server answers for, by run name.

`slc serve exports/` serves every run the export stage wrote (exports/<run>/); `slc serve
exports/a exports/b` serves those two. One run is the default, answered at the paths of a
one-run server (/v1/model, /v1/classes/{c}/score); every run is under /v1/runs/{run}/... too.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from serving.errors import ExportError, SetupError, UnknownRunError
from serving.manifest import MANIFEST
from serving.model import SingleLogitModel


def export_dirs(sources: Iterable[str | Path]) -> list[Path]:
    """Each source is an export (a directory with a manifest.json) or a directory of exports,
    which gives its runs in name order. A path that is neither is passed on: loading it says why."""
    dirs = []
    for source in map(Path, sources):
        if source.is_dir() and not (source / MANIFEST).exists():
            runs = sorted(child for child in source.iterdir() if (child / MANIFEST).is_file())
            if not runs:
                raise ExportError(f"{source} is neither an export nor a directory of exports: neither it nor any "
                                  f"directory in it has a {MANIFEST}; pass exports/<run> or exports/")
            dirs += runs
        else:
            dirs.append(source)
    return dirs


class Runs:
    """Loaded models by run name; `default` is the first unless named."""

    def __init__(self, models: list[SingleLogitModel], default: str | None = None):
        self.models: dict[str, SingleLogitModel] = {}
        for model in models:
            if model.run_name in self.models:
                raise SetupError(f"two exports are run {model.run_name!r}: {self.models[model.run_name].export_dir} "
                                 f"and {model.export_dir}; serve one of them")
            self.models[model.run_name] = model
        if not self.models:
            raise SetupError("no export to serve: pass at least one export directory")
        self.default = self[default] if default is not None else models[0]

    @classmethod
    def load(cls, sources: Iterable[str | Path], default: str | None = None, **options) -> Runs:
        """Every export of `sources` (see `export_dirs`), loaded and checked with `SingleLogitModel.load`'s options."""
        return cls([SingleLogitModel.load(path, **options) for path in export_dirs(sources)], default)

    def __getitem__(self, run: str) -> SingleLogitModel:
        try:
            return self.models[run]
        except KeyError:
            raise UnknownRunError(f"run {run!r} is not served here; the runs are {', '.join(self.models)} "
                                  f"(GET /v1/runs)") from None

    def __iter__(self) -> Iterator[SingleLogitModel]:
        return iter(self.models.values())
