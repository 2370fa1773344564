"""Signed exports (serving.signing): the export stage signs with a private key, `slc serve`/`slc info`
verify with the public key before loading, and refuse in one line an export changed after signing,
signed by another key, or not signed at all; without a key nothing changes but what `slc info` says."""
import json
import sys

import numpy as np
import pytest

from serving.cli import main
from serving.errors import ExportError, SetupError
from serving.manifest import SIGNATURE
from serving.model import SingleLogitModel
from serving.signing import PUBLIC_KEY_ENV, SIGNING_KEY_ENV, configured_key, sign_export
from tests.serving.conftest import edit_manifest, write_key_pair


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_signed_export_loads_with_its_public_key_and_scores_as_the_unsigned_one(signed_exports, export_dir, keys, pixels):
    signed = SingleLogitModel.load(signed_exports / "ce-s0", public_key=keys[1])
    assert (signed_exports / "ce-s0" / SIGNATURE).is_file() and not (export_dir / SIGNATURE).exists()
    np.testing.assert_array_equal(signed.score(pixels, 2), SingleLogitModel.load(export_dir).score(pixels, 2))


def test_a_threshold_edited_in_a_signed_manifest_is_refused_naming_the_manifest(signed_copy, keys):
    edit_manifest(signed_copy, lambda m: m["thresholds"]["0.99"].__setitem__(1, 9.0))
    with pytest.raises(ExportError, match=r"the files differ from what model.sig signed \(changed manifest.json\)"):
        SingleLogitModel.load(signed_copy, public_key=keys[1])


def test_slc_serve_refuses_a_changed_threshold_in_one_line_before_serving(capsys, signed_copy, keys):
    edit_manifest(signed_copy, lambda m: m["thresholds"]["0.99"].__setitem__(1, 9.0))
    code, _, err = run(capsys, "serve", signed_copy, "--public-key", keys[1])
    assert code == 3 and err.count("\n") == 1 and "changed manifest.json" in err


def test_a_file_added_to_a_signed_export_is_refused(signed_copy, keys):
    (signed_copy / "notes.txt").write_text("added after signing")
    with pytest.raises(ExportError, match="notes.txt"):
        SingleLogitModel.load(signed_copy, public_key=keys[1])


def test_an_export_signed_by_another_key_is_refused(signed_copy, tmp_path):
    _, other = write_key_pair(tmp_path, "other")
    with pytest.raises(ExportError, match=r"model.sig was made with another key than the one .*other.pub belongs to"):
        SingleLogitModel.load(signed_copy, public_key=other)


def test_an_unsigned_export_is_refused_when_a_public_key_is_given(export_dir, keys):
    with pytest.raises(ExportError, match=r"is not signed \(no model.sig\) but a public key is given"):
        SingleLogitModel.load(export_dir, public_key=keys[1])


def test_a_missing_public_key_file_is_a_setting_error(signed_exports, tmp_path):
    with pytest.raises(SetupError, match=r"the public key .*absent.pub is not a readable file"):
        SingleLogitModel.load(signed_exports / "ce-s0", public_key=tmp_path / "absent.pub")


def test_rotating_the_key_is_signing_again_with_the_new_one(signed_copy, keys, tmp_path):
    new_private, new_public = write_key_pair(tmp_path, "2027")
    sign_export(signed_copy, new_private)
    assert SingleLogitModel.load(signed_copy, public_key=new_public).run_name == "ce-s0"
    with pytest.raises(ExportError, match="another key"):
        SingleLogitModel.load(signed_copy, public_key=keys[1])


def test_a_key_that_is_not_an_elliptic_curve_pem_is_refused_at_export(signed_copy, tmp_path):
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ExportError, match=r"cannot sign with .*key.pem: .*elliptic-curve private key in PEM"):
        sign_export(signed_copy, tmp_path / "key.pem")


@pytest.mark.parametrize("environ, configured, expected", [
    ({}, None, None), ({}, "params.pem", "params.pem"), ({SIGNING_KEY_ENV: "env.pem"}, "params.pem", "env.pem"),
    ({SIGNING_KEY_ENV: ""}, "params.pem", "params.pem"),
])
def test_the_environment_names_the_key_before_params(environ, configured, expected):
    got = configured_key(configured, SIGNING_KEY_ENV, environ)
    assert (None if got is None else str(got)) == expected


@pytest.mark.parametrize("signed, key, line", [
    (False, False, "signature    unsigned: its manifest vouches for the other files, nothing vouches for the manifest"),
    (True, False, "signature    signed (model.sig) but not verified: give the public key"),
    (True, True, "signature    signed (model.sig), verified with "),
])
def test_slc_info_says_whether_the_export_is_signed_and_verified(capsys, export_dir, signed_exports, keys, signed,
                                                                 key, line):
    export = signed_exports / "ce-s0" if signed else export_dir
    code, out, _ = run(capsys, "info", export, *(["--public-key", keys[1]] if key else []))
    assert code == 0 and line in out, out


def test_slc_info_takes_the_public_key_from_the_environment(capsys, monkeypatch, signed_copy, keys):
    monkeypatch.setenv(PUBLIC_KEY_ENV, str(keys[1]))
    code, out, _ = run(capsys, "info", signed_copy, "--json")
    assert code == 0 and json.loads(out)["signature"].startswith("signed (model.sig), verified with")
    edit_manifest(signed_copy, lambda m: m["thresholds"]["0.9"].__setitem__(0, 1.0))
    code, _, err = run(capsys, "info", signed_copy)
    assert code == 3 and "changed manifest.json" in err


def test_without_model_signing_installed_it_says_what_to_install(monkeypatch, signed_exports, keys):
    monkeypatch.setitem(sys.modules, "model_signing", None)  # `import model_signing` now raises ImportError
    with pytest.raises(SetupError, match=r"needs model-signing, .*pip install 'slc-pipeline\[serve\]'"):
        SingleLogitModel.load(signed_exports / "ce-s0", public_key=keys[1])
