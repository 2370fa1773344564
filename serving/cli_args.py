"""What the `slc` commands share: argparse types of positive numbers, the public key every command
takes, images read from files, and a class named by id or name."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from serving.errors import InputError, UnknownClassError
from serving.images import decode
from serving.model import SingleLogitModel
from serving.signing import PUBLIC_KEY_ENV, configured_key


def positive(text: str) -> int:
    """argparse type of counts: a usage error (exit 2) names the flag and the value."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def positive_ms(text: str) -> float:
    """argparse type of a wait: 0 would be no wait, so leave the flag out for that."""
    return _positive_float(text, "milliseconds (leave the flag out to serve without batching)")


def positive_s(text: str) -> float:
    return _positive_float(text, "seconds")


def _positive_float(text: str, unit: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of {unit}")
    return value


def public_key(args) -> Path | None:
    return configured_key(args.public_key, PUBLIC_KEY_ENV)


def read_images(model: SingleLogitModel, paths: list[Path]) -> tuple[np.ndarray, list[str]]:
    """Image files and .npy batches -> one network input batch and a name per image (`batch.npy[3]`)."""
    names, parts = [], []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as error:
            raise InputError(f"cannot read {path}: {error.strerror}") from None
        part = model.prepare(decode(data, str(path), model.input_shape[1:]))
        names += [str(path)] if len(part) == 1 else [f"{path}[{i}]" for i in range(len(part))]
        parts.append(part)
    return np.concatenate(parts), names


def class_id_of(model: SingleLogitModel, text: str) -> int:
    """A class given by id or by exact name (`--class 3` or `--class Dress`)."""
    if text.lstrip("-").isdigit():
        class_id = int(text)
        model.class_ids(class_id, 1)
        return class_id
    if text in model.class_names:
        return model.class_names.index(text)
    raise UnknownClassError(f"no class named {text!r}: pass an id 0..{model.num_classes - 1} or one of "
                            f"{', '.join(map(repr, model.class_names[:10]))}{', ...' if model.num_classes > 10 else ''}")
