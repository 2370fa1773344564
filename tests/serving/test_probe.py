import subprocess
import sys
import time

import pytest

from serving.probe import NotUp, wait_until_answers


def test_a_server_whose_process_ended_is_reported_at_once_with_its_status():
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait()
    started = time.monotonic()
    with pytest.raises(NotUp, match="exited with status 3"):
        wait_until_answers("http://127.0.0.1:9/health", process, timeout_s=30)
    assert time.monotonic() - started < 5


def test_a_server_that_never_answers_is_reported_at_the_deadline():
    with pytest.raises(NotUp, match="did not answer within 1 s"):
        wait_until_answers("http://127.0.0.1:9/health", None, timeout_s=1, every_s=0.1)


def test_a_server_that_answers_returns(tmp_path):
    (tmp_path / "health").write_text("ok")
    server = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"], cwd=tmp_path,
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().split("port ")[1].split()[0])
        wait_until_answers(f"http://127.0.0.1:{port}/health", server, timeout_s=30)
    finally:
        server.terminate()
        server.wait()
