"""Where the bearer token comes from: the environment wins over the file; empty or unreadable is an error."""
import pytest

from serving.auth import ENV, read_token
from serving.errors import SetupError


def test_no_token_anywhere_means_none(tmp_path):
    assert read_token(None, {}) is None


def test_the_file_gives_its_first_line(tmp_path):
    (tmp_path / "token").write_text("  abc123 \nnot this\n")
    assert read_token(tmp_path / "token", {}) == "abc123"


def test_the_environment_wins_over_the_file(tmp_path):
    (tmp_path / "token").write_text("from-file\n")
    assert read_token(tmp_path / "token", {ENV: "from-env"}) == "from-env"


@pytest.mark.parametrize("environ, content, message", [
    ({ENV: "  "}, None, "SLC_API_TOKEN in the environment is empty"),
    ({}, "\n", "the token file .*token is empty"),
    ({}, "", "the token file .*token is empty"),
])
def test_an_empty_token_is_an_error_not_no_token(tmp_path, environ, content, message):
    if content is not None:
        (tmp_path / "token").write_text(content)
    with pytest.raises(SetupError, match=message):
        read_token(tmp_path / "token", environ)


def test_an_unreadable_token_file_says_which_and_how_to_go_on(tmp_path):
    with pytest.raises(SetupError, match=r"cannot read the token file .*absent: No such file.*token_file to null"):
        read_token(tmp_path / "absent", {})
