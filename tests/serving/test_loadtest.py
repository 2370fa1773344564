"""The load test stops by itself within its budgets, reports every graph, batching setting and
concurrency, and writes its figures as JSON that renders the same report."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from serving import loadtest
from serving.machine import machine_info

COMMITTED = Path(__file__).resolve().parents[1] / "fixtures/earlier_run/results/serving.json"  # real figures


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


@pytest.mark.slow
def test_a_tiny_load_test_reports_each_level_without_errors(export_dir, tmp_path):
    out = tmp_path / "serving.md"
    # 120 requests: the server's CPU time is read in clock ticks (10 ms), and a dozen requests can fit in one
    code = loadtest.main([str(export_dir), "--out", str(out), "--concurrency", "1", "3",
                          "--requests", "120", "--duration", "20", "--warmup", "2", "--batch-wait-ms", "5",
                          "--server-args", "--onnx-threads 1 --request-threads 2"])
    table = [line for line in out.read_text().splitlines() if line.startswith(("| single_logit", "| full"))]
    assert code == 0 and "served without batching, then with `--batch-wait-ms 5`" in out.read_text()
    assert [cells(line)[:3] for line in table] == [[graph, batching, concurrency] for graph in ("single_logit", "full")
                                                   for batching in ("off", "5 ms wait") for concurrency in ("1", "3")]
    for line in table:
        graph, batching, concurrency, requests, errors, rps, p50, p99, per_call, server_cpu, client_cpu = cells(line)
        assert int(requests) == 120 and int(errors) == 0 and float(rps) > 0 and 0 < float(p50) <= float(p99)
        assert float(server_cpu) > 0 and float(client_cpu) > 0
        assert float(per_call) == 1.0 if batching == "off" or concurrency == "1" else 1.0 <= float(per_call) <= 3.0
    figures = json.loads(out.with_suffix(".json").read_text())  # beside the Markdown by default
    assert loadtest.render(figures) == out.read_text() and len(figures["rows"]) == 8


def test_the_report_has_one_row_per_level_with_the_figures_as_measured():
    figures = json.loads(COMMITTED.read_text())  # from before batching: no batching, no images per call
    rows = [cells(line) for line in loadtest.render(figures).splitlines()
            if line.startswith(("| single_logit", "| full"))]
    measured = ("concurrency", "requests", "errors", "rps", "p50_ms", "p99_ms")
    assert rows == [[row["graph"], "off", *(str(row[c]) for c in measured), "", str(row["server_cpu_ms"]),
                     str(row["client_cpu_ms"])] for row in figures["rows"]]
    summary = loadtest.summary_markdown(figures)
    assert "`python -m serving.loadtest exports/bce-s2` on Linux" in summary and "batch-wait" not in summary


def test_a_row_with_batching_shows_its_wait_and_images_per_call():
    row = {"graph": "full", "batch_wait_ms": 2.5, "images_per_call": 3.4}
    assert loadtest.cell(row, "batch_wait_ms") == "2.5 ms wait" and loadtest.cell(row, "images_per_call") == 3.4


def test_a_failed_level_shows_its_first_error():
    figures = json.loads(COMMITTED.read_text())
    figures["rows"][0] |= {"errors": 3, "first_error": "503: busy"}
    assert "First error (single_logit, concurrency 1): 503: busy" in loadtest.render(figures)


def test_machine_info_describes_the_machine_without_torch():
    info = machine_info()
    assert info["cores"] >= 1 and info["memory_gb"] > 0 and len(info["load_average"]) == 3 and info["cpu"]
    code = "import sys, serving.machine; sys.exit('torch' in sys.modules or 'slc' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
