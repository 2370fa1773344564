"""An export's manifest.json as a typed record, and the checks that refuse an export that is
incomplete or has been changed: the one owner of the export format, for the exporter and servers.

A server must not answer with a model other than the one that was evaluated: an export holds plain
files only (a symlink is refused, whatever it points at), each of them listed in the manifest (or
the manifest itself, or its signature), every listed file is checked against its size and sha256
before any of it is loaded, and the manifest's own facts (class names, shapes, thresholds) are
checked against each other. What covers the manifest itself is serving.signing: a signature, or
the digest the registry recorded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from serving.errors import ExportError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "model.sig"  # OpenSSF model-signing's signature of every file, the manifest included (serving.signing)
REEXPORT = "re-create the export (`dvc repro export` or `python -m pipeline.export`)"

# The graphs serving can run; the others (backbone, classes) are checked but not loaded.
REQUIRED_MODELS = ("full", "single_logit")


@dataclass(frozen=True)
class Manifest:
    """manifest.json: written by the export stage (`to_json`), read through `parse_manifest`, which
    checks every field before one is built, so a Manifest in hand is one a server can trust."""
    format_version: int
    run_name: str
    loss: str
    dataset: str
    class_names: list[str]
    num_classes: int
    feature_dim: int
    input: dict                       # name "image", shape [C, H, W], dtype "float32"
    normalisation: dict               # per-channel mean and std, and pixel_scale
    opset: int
    thresholds: dict[str, list]       # recall key ("0.99") -> one threshold per class, null where none
    class_id_range: list[int]
    models: dict                      # full, backbone, single_logit -> file; classes -> {class id: file}
    files: dict[str, dict]            # every file but the manifest -> {sha256, bytes}
    max_abs_diff: dict[str, float]    # each model file -> its largest |onnxruntime - PyTorch| at export

    def to_json(self) -> str:
        # the fields are JSON values already: asdict's deep copy of 400,000 names and thresholds took 0.8 s
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return json.dumps(fields, indent=2, allow_nan=False) + "\n"


# Each field's JSON type, from the record itself (list[str] -> list).
SCHEMA: dict[str, type] = {name: typing.get_origin(hint) or hint
                           for name, hint in typing.get_type_hints(Manifest).items()}


def read_manifest(export_dir: str | Path) -> Manifest:
    """The manifest of `export_dir`, after checking its schema, its consistency and every file's hash."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST
    if not export_dir.is_dir():
        raise ExportError(f"export directory {export_dir} does not exist: pass a directory such as "
                          f"exports/<run_name>, or {REEXPORT}")
    present = plain_files(export_dir)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path} not found: {export_dir} is not an export; {REEXPORT}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{path} is not valid JSON ({error}); {REEXPORT}") from None
    except OSError as error:
        raise ExportError(f"{path} cannot be read ({error.strerror}); check its permissions") from None
    manifest = parse_manifest(raw, path)
    unlisted = sorted(present - set(manifest.files) - {MANIFEST, SIGNATURE})
    if unlisted:
        raise ExportError(f"{export_dir / unlisted[0]} is not listed in {MANIFEST} ({len(unlisted)} unlisted file(s)): "
                          f"an export holds only what its manifest accounts for; remove it, or {REEXPORT}")
    check_files(export_dir, manifest.files)
    return manifest


def plain_files(export_dir: Path) -> set[str]:
    """The export's files, relative POSIX paths, once none of its entries is a symlink (onnxruntime
    and the hashes would follow one out of the export)."""
    files = set()
    for root, dirs, names in os.walk(export_dir):  # does not descend into a symlinked directory: it is refused
        for name in sorted(dirs + names):
            path = Path(root, name)
            if path.is_symlink():
                raise ExportError(f"{path} is a symlink (to {os.readlink(path)}): an export holds plain files only; "
                                  f"remove it, or {REEXPORT}")
            if name in names:
                files.add(path.relative_to(export_dir).as_posix())
    return files


def parse_manifest(raw, path: Path) -> Manifest:
    """The record from manifest.json's parsed JSON, after its schema and the facts a server relies
    on are checked; the files are not read (an exporter has just hashed them itself)."""
    check_schema(raw, path)
    check_consistency(raw, path)
    return Manifest(**raw)


def check_schema(manifest, path: Path) -> None:
    if not isinstance(manifest, dict):
        raise ExportError(f"{path} holds {type(manifest).__name__}, expected a JSON object; {REEXPORT}")
    for key, kind in SCHEMA.items():
        if key not in manifest:
            raise ExportError(f"{path} lacks the key {key!r}; {REEXPORT}")
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise ExportError(f"{path}: {key} = {_summary(manifest[key])} should be a JSON {kind.__name__}; {REEXPORT}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ExportError(f"{path} has format_version {manifest['format_version']}, this server reads "
                          f"version {FORMAT_VERSION}; upgrade the serving package or {REEXPORT}")
    unknown = sorted(set(manifest) - set(SCHEMA))
    if unknown:
        raise ExportError(f"{path} has the unknown key {unknown[0]!r} (a manifest of version {FORMAT_VERSION} has "
                          f"{', '.join(SCHEMA)}); {REEXPORT}")


def check_consistency(manifest: dict, path: Path) -> None:
    """The facts the server relies on agree with each other (a hand-edited manifest fails here)."""
    k = manifest["num_classes"]
    names = manifest["class_names"]
    _require(k >= 1 and len(names) == k and all(isinstance(n, str) for n in names), path, "class_names",
             names, f"{k} names (strings), one per class")
    _require(manifest["class_id_range"] == [0, k - 1], path, "class_id_range",
             manifest["class_id_range"], f"[0, {k - 1}]")
    shape = manifest["input"].get("shape")
    _require(isinstance(shape, list) and len(shape) == 3 and all(_is_int(s) and s > 0 for s in shape),
             path, "input.shape", shape, "[C, H, W], three positive integers")
    _require(manifest["input"].get("name") == "image" and manifest["input"].get("dtype") == "float32",
             path, "input", manifest["input"], "name 'image' and dtype 'float32'")
    norm = manifest["normalisation"]
    for key in ("mean", "std"):
        values = norm.get(key)
        _require(isinstance(values, list) and len(values) == shape[0] and all(_is_number(v) for v in values)
                 and (key == "mean" or all(v > 0 for v in values)), path, f"normalisation.{key}", values,
                 f"{shape[0]} numbers (one per channel){', all positive' if key == 'std' else ''}")
    _require(_is_number(norm.get("pixel_scale")) and norm["pixel_scale"] > 0, path,
             "normalisation.pixel_scale", norm.get("pixel_scale"), "a positive number such as 255.0")
    for recall, values in manifest["thresholds"].items():
        _require(_recall_value(recall) is not None, path, "thresholds", recall, "recall keys in (0, 1] such as '0.99'")
        _require(isinstance(values, list) and len(values) == k and all(_is_threshold(v) for v in values),
                 path, f"thresholds[{recall!r}]", values, f"{k} numbers (null or NaN where a class has no threshold)")
    for name in REQUIRED_MODELS:
        file = manifest["models"].get(name)
        _require(isinstance(file, str) and file in manifest["files"], path, f"models.{name}", file,
                 "a file listed under 'files'")


def check_files(export_dir: Path, files: dict) -> None:
    """Every listed file is inside the export, present, of its size and sha256."""
    if not files:
        raise ExportError(f"{export_dir / MANIFEST} lists no files; {REEXPORT}")
    for name, record in files.items():
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise ExportError(f"{export_dir / MANIFEST} lists the file {name!r}, which is not inside the "
                              f"export directory; {REEXPORT}")
        if not (isinstance(record, dict) and isinstance(record.get("sha256"), str) and _is_int(record.get("bytes"))):
            raise ExportError(f"{export_dir / MANIFEST}: files[{name!r}] = {record!r} should be "
                              f"{{'sha256': hex, 'bytes': int}}; {REEXPORT}")
        path = export_dir / relative
        if not path.is_file():
            raise ExportError(f"{path} is missing from the export (the manifest lists it); {REEXPORT}")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise ExportError(f"{path} has {size} bytes, the manifest says {record['bytes']}: the file was "
                              f"changed or truncated after export; {REEXPORT}")
        try:
            with path.open("rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError as error:
            raise ExportError(f"{path} cannot be read ({error.strerror}); check its permissions") from None
        if digest != record["sha256"]:
            raise ExportError(f"{path} has sha256 {digest}, the manifest says {record['sha256']}: the file "
                              f"was changed after export; {REEXPORT}")


def recall_keys(thresholds: dict) -> dict[float, str]:
    """Recall target -> its key in the manifest ("0.99"), so 0.99 and "0.99" find the same thresholds."""
    return {_recall_value(key): key for key in thresholds}


def _recall_value(key: str) -> float | None:
    try:
        value = float(key)
    except ValueError:
        return None
    return value if 0.0 < value <= 1.0 else None


def _summary(value) -> str:
    """The value for a message, or its length when it is long (400,000 class names, say)."""
    text = repr(value)
    if len(text) <= 80:
        return text
    return f"{text[:60]}... ({len(value)} items)" if isinstance(value, list) else f"{text[:80]}..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_threshold(value) -> bool:
    """A finite number, or null / NaN for a class that had no validation examples to calibrate on."""
    return value is None or _is_number(value) or (isinstance(value, float) and math.isnan(value))


def _require(ok: bool, path: Path, key: str, value, expected: str) -> None:
    if not ok:
        raise ExportError(f"{path}: {key} = {_summary(value)} is invalid, expected {expected}; {REEXPORT}")
