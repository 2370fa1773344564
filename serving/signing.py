"""Who vouches for an export's manifest: its signature, or the digest the registry recorded.

manifest.json holds every other file's sha256, so whatever covers the manifest covers the export.
Two things can:
- a signature, `model.sig` beside the manifest: the export stage signs each export with an
  elliptic-curve private key (params.yaml's `export.signing_key`, or SLC_SIGNING_KEY) using OpenSSF
  model-signing (a Sigstore bundle over every file's sha256, made offline: no transparency log,
  no certificate); a server given the public key (`--public-key`, SLC_PUBLIC_KEY) verifies it before
  loading, and refuses an unsigned export, one signed by another key, or any file changed, added
  or removed since;
- the registry: the export stage records the manifest's sha256 on the model version it registers
  (the tag `manifest_sha256`), and `slc serve models:/...` checks the downloaded (or cached) manifest
  against it before loading.
Without a public key and outside the registry an export is served as before, its files checked
against its manifest only; `slc info` says whether it is signed and whether that was verified.
model-signing is imported only to sign or verify, so reading an unsigned export does not need it.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from serving.errors import ExportError, SetupError
from serving.manifest import MANIFEST, REEXPORT, SIGNATURE, plain_files

SIGNING_KEY_ENV = "SLC_SIGNING_KEY"
PUBLIC_KEY_ENV = "SLC_PUBLIC_KEY"
DIGEST_TAG = "manifest_sha256"  # the model version's tag that holds sha256(manifest.json)


def configured_key(configured: str | Path | None, env: str, environ: Mapping[str, str] = os.environ) -> Path | None:
    """A key's path: the environment variable `env` wins over the configured one, as the token's does;
    an empty variable counts as unset."""
    value = environ.get(env) or configured
    return None if value is None else Path(value)


def sign_export(export_dir: Path, private_key: Path) -> Path:
    """Sign every file of `export_dir` (the manifest included) into export_dir/model.sig."""
    hashing, signing, _ = _model_signing()
    _check_readable(private_key, "signing key", "export.signing_key or SLC_SIGNING_KEY", ExportError)
    try:
        config = signing.Config().use_elliptic_key_signer(private_key=private_key)
    except Exception as error:  # cryptography's key loading: a wrong format, a password, an RSA key
        raise ExportError(f"cannot sign with {private_key}: {_first_line(error)}; the signing key must be an unencrypted "
                          f"elliptic-curve private key in PEM (P-256, P-384 or P-521)") from None
    config.set_hashing_config(hashing.Config().set_ignored_paths(paths=[SIGNATURE]))
    config.sign(export_dir, export_dir / SIGNATURE)
    return export_dir / SIGNATURE


def verify_signature(export_dir: Path, public_key: Path) -> None:
    """Refuse, in one line, an export that `public_key`'s private key did not sign as it is now."""
    _, _, verifying = _model_signing()
    _check_readable(public_key, "public key", f"--public-key or {PUBLIC_KEY_ENV}", SetupError)
    plain_files(export_dir)  # a symlink is refused with its own message before the signature is read
    if not (export_dir / SIGNATURE).is_file():
        raise ExportError(f"{export_dir} is not signed (no {SIGNATURE}) but a public key is given ({public_key}): "
                          f"export it with a signing key (export.signing_key or {SIGNING_KEY_ENV}), or serve it "
                          f"without a public key")
    try:
        config = verifying.Config().use_elliptic_key_verifier(public_key=public_key)
    except Exception as error:
        raise SetupError(f"cannot read the public key {public_key}: {_first_line(error)}; give the PEM public key of "
                         f"the elliptic-curve key pair the exports are signed with") from None
    try:
        config.verify(export_dir, export_dir / SIGNATURE)
    except Exception as error:  # model-signing raises ValueError for a mismatch, others for a malformed bundle
        raise ExportError(f"{export_dir}: {_why_unverified(export_dir, str(error), public_key)}; serve the export as it was "
                          f"signed, or {REEXPORT}") from None


def manifest_digest(export_dir: Path) -> str:
    """sha256 of the export's manifest.json: what the registry records on the model version."""
    return _sha256(Path(export_dir) / MANIFEST)


def check_manifest_digest(export_dir: Path, expected: str | None, source: str) -> None:
    """The downloaded (or cached) export's manifest is the one the registry recorded for `source`."""
    if expected is None:
        raise ExportError(f"{source} has no {DIGEST_TAG} tag, so its files cannot be checked against the registry: "
                          f"register it again (`dvc repro --force export`), or serve its export directory")
    try:
        digest = manifest_digest(export_dir)
    except OSError as error:
        raise ExportError(f"cannot read {Path(export_dir) / MANIFEST} of {source} ({error.strerror}); delete "
                          f"{export_dir} to download it again") from None
    if digest != expected:
        raise ExportError(f"{Path(export_dir) / MANIFEST} has sha256 {digest[:12]}..., the registry records "
                          f"{expected[:12]}... for {source}: the copy was changed after download; delete {export_dir} "
                          f"to download it again")


def describe(export_dir: Path, public_key: Path | None) -> str:
    """`slc info`'s line on the signature (the export was verified already when a key was given)."""
    if public_key is not None:
        return f"signed ({SIGNATURE}), verified with {public_key}"
    if (Path(export_dir) / SIGNATURE).is_file():
        return f"signed ({SIGNATURE}) but not verified: give the public key (--public-key or {PUBLIC_KEY_ENV})"
    return "unsigned: its manifest vouches for the other files, nothing vouches for the manifest"


def _why_unverified(export_dir: Path, message: str, public_key: Path) -> str:
    """model-signing's refusal as a short reason: for a mismatch, the files that differ from the
    signed list of (name, sha256) in the signature's payload (its report prints every digest)."""
    if message.startswith("Key mismatch"):
        return (f"{SIGNATURE} was made with another key than the one {public_key} belongs to (a rotated key? "
                f"sign the export again, or give the public key it was signed with)")
    if not message.startswith("Signature mismatch"):
        return f"{SIGNATURE} cannot be verified ({_first_line(message)[:200]})"
    bundle = json.loads((export_dir / SIGNATURE).read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    signed = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    present = plain_files(export_dir) - {SIGNATURE}
    changed = sorted(name for name in present & set(signed) if _sha256(export_dir / name) != signed[name])
    parts = [f"{what} {', '.join(names)}" for what, names in (("changed", changed), ("added", sorted(present - set(signed))),
                                                               ("removed", sorted(set(signed) - present))) if names]
    return f"the files differ from what {SIGNATURE} signed ({'; '.join(parts) or 'their digests'})"


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _model_signing():
    """model-signing's hashing, signing and verifying modules, imported only to sign or verify (0.7 s,
    and not in a bare `pip install .`)."""
    try:
        from model_signing import hashing, signing, verifying
    except ImportError as error:
        raise SetupError(f"signing and verifying exports needs model-signing, which cannot be imported ({error}): "
                         f"pip install 'slc-pipeline[serve]'") from None
    return hashing, signing, verifying


def _check_readable(path: Path, what: str, setting: str, error: type[Exception]) -> None:
    if not Path(path).is_file():
        raise error(f"the {what} {path} is not a readable file: check {setting}")


def _first_line(error) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
