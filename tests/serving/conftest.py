"""A small real export (pipeline.export on a tiny MLP), made once per test session.

Five classes of 8x8 grey images; class 0 gets its own file; class 3 has no threshold at recall
0.99 (NaN, as evaluate writes for a class without validation examples).
"""
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slc.core.config import ModelConfig
from slc.export.exporting import export_model
from slc.nn.models import build_model

SHAPE = (1, 8, 8)
CLASSES = ["ant", "bee", "cat", "dog", "eel"]
NORMALISATION = {"mean": [0.3], "std": [0.4]}
THRESHOLDS = {"0.9": [0.1, -0.2, 0.0, 0.3, -0.1], "0.99": [-0.5, -0.6, -0.4, float("nan"), -0.7]}


MLP = ModelConfig(name="mlp", hidden=16, channels=4, weights=None, head="linear", scale=None)


@pytest.fixture(scope="session")
def trained():
    """A randomly initialised MLP stands in for a trained one: serving only needs it to be fixed."""
    torch.manual_seed(0)
    return build_model(MLP, SHAPE, len(CLASSES)).eval()


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory, trained) -> Path:
    info = {"run_name": "ce-s0", "loss": "ce", "dataset": "synthetic", "class_names": CLASSES,
            "input_shape": list(SHAPE), "normalisation": NORMALISATION, "pixel_scale": 255.0}
    images = torch.randn(4, *SHAPE)
    out = tmp_path_factory.mktemp("exports") / "ce-s0"
    export_model(trained, out, info, THRESHOLDS, images, classes=[0])
    return out


@pytest.fixture(scope="session")
def exports(export_dir) -> Path:
    """The directory of two runs, as the export stage lays them out: ce-s0 and a differently seeded
    bce-s1 with classes of other names and no thresholds."""
    torch.manual_seed(1)
    other = build_model(MLP, SHAPE, len(CLASSES)).eval()
    info = {"run_name": "bce-s1", "loss": "bce", "dataset": "synthetic", "class_names": [f"c{i}" for i in range(5)],
            "input_shape": list(SHAPE), "normalisation": NORMALISATION, "pixel_scale": 255.0}
    export_model(other, export_dir.parent / "bce-s1", info, None, torch.randn(4, *SHAPE), classes=[])
    return export_dir.parent


@pytest.fixture
def export_copy(export_dir, tmp_path) -> Path:
    """A private copy of the export, for tests that damage it."""
    return Path(shutil.copytree(export_dir, tmp_path / "ce-s0"))


@pytest.fixture
def pixels() -> np.ndarray:
    """Six raw uint8 grey images (N, H, W)."""
    return np.random.default_rng(1).integers(0, 256, size=(6, *SHAPE[1:]), dtype=np.uint8)


def reference_logits(trained, pixels: np.ndarray) -> np.ndarray:
    """PyTorch logits (N, k) of raw pixels normalised as prepare does."""
    x = (pixels[:, None].astype(np.float32) / 255.0 - np.float32(NORMALISATION["mean"][0])) / np.float32(
        NORMALISATION["std"][0])
    with torch.inference_mode():
        return trained(torch.from_numpy(x)).numpy()


def edit_manifest(export: Path, change) -> None:
    manifest = json.loads((export / "manifest.json").read_text())
    change(manifest)
    (export / "manifest.json").write_text(json.dumps(manifest))


def failing_at(call: int, write, error: BaseException):
    """`write`, but its call number `call` raises `error` (a disk that fills, a crash); `.calls` counts the calls."""
    def failing(*args, **kwargs):
        failing.calls += 1
        if failing.calls == call:
            raise error
        return write(*args, **kwargs)
    failing.calls = 0
    return failing


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(*parts: bytes) -> list:
    """Multipart `files` fields, one a part, as the score routes take them."""
    return [("files", (f"part{i}", data)) for i, data in enumerate(parts)]


def write_key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """An elliptic-curve (P-256) key pair as PEM files: <name>.pem (private) and <name>.pub."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = directory / f"{name}.pem", directory / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    return write_key_pair(tmp_path_factory.mktemp("keys"), "exports")


@pytest.fixture(scope="session")
def signed_exports(tmp_path_factory, trained, keys) -> Path:
    """ce-s0 exported as export_dir is, signed with `keys`: a directory holding that one run."""
    info = {"run_name": "ce-s0", "loss": "ce", "dataset": "synthetic", "class_names": CLASSES,
            "input_shape": list(SHAPE), "normalisation": NORMALISATION, "pixel_scale": 255.0}
    out = tmp_path_factory.mktemp("signed")
    export_model(trained, out / "ce-s0", info, THRESHOLDS, torch.randn(4, *SHAPE), classes=[0], signing_key=keys[0])
    return out


@pytest.fixture
def signed_copy(signed_exports, tmp_path) -> Path:
    """A private copy of the signed export, for tests that change it."""
    return Path(shutil.copytree(signed_exports / "ce-s0", tmp_path / "ce-s0"))


def overflowing_input(trained) -> np.ndarray:
    """One finite float32 (1, C, H, W) input whose first hidden unit overflows to inf: 3e38 times the
    sign of each of its weights (then its logits are inf or NaN)."""
    weights = trained.backbone[1].weight[0].detach().numpy()
    return (np.sign(weights) * np.float32(3e38)).astype(np.float32).reshape(1, *SHAPE)


def npy_claiming(shape: tuple, descr: str = "|u1", body: bytes = b"\0" * 16) -> bytes:
    """An .npy file whose header claims `shape` of `descr`, followed by `body` whatever it claims; by
    default issue #23's: 144 bytes claiming 10^6 x 10^6 uint8 when given (10**6, 10**6)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + body
