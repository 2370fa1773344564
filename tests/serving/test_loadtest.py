"""The load test stops by itself within its budgets, reports every graph and concurrency, and
writes its figures as JSON that renders the same report."""
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
                          "--requests", "120", "--duration", "20", "--warmup", "2",
                          "--server-args", "--onnx-threads 1 --request-threads 2"])
    table = [line for line in out.read_text().splitlines() if line.startswith("| single_logit") or
             line.startswith("| full")]
    assert code == 0 and len(table) == 4
    for line in table:
        graph, concurrency, requests, errors, rps, p50, p99, server_cpu, client_cpu = cells(line)
        assert int(requests) == 120 and int(errors) == 0 and float(rps) > 0 and 0 < float(p50) <= float(p99)
        assert float(server_cpu) > 0 and float(client_cpu) > 0
    figures = json.loads(out.with_suffix(".json").read_text())  # beside the Markdown by default
    assert loadtest.render(figures) == out.read_text() and len(figures["rows"]) == 4


def test_the_report_has_one_row_per_level_with_the_figures_as_measured():
    figures = json.loads(COMMITTED.read_text())
    rows = [cells(line) for line in loadtest.render(figures).splitlines()
            if line.startswith(("| single_logit", "| full"))]
    assert rows == [[str(row[column]) for column in loadtest.COLUMNS] for row in figures["rows"]]
    assert "`python -m serving.loadtest exports/bce-s2` on Linux" in loadtest.summary_markdown(figures)


def test_a_failed_level_shows_its_first_error():
    figures = json.loads(COMMITTED.read_text())
    figures["rows"][0] |= {"errors": 3, "first_error": "503: busy"}
    assert "First error (single_logit, concurrency 1): 503: busy" in loadtest.render(figures)


def test_machine_info_describes_the_machine_without_torch():
    info = machine_info()
    assert info["cores"] >= 1 and info["memory_gb"] > 0 and len(info["load_average"]) == 3 and info["cpu"]
    code = "import sys, serving.machine; sys.exit('torch' in sys.modules or 'slc' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
