"""The load test stops by itself within its budgets and reports every graph and concurrency."""
import pytest

from serving import loadtest


@pytest.mark.slow
def test_a_tiny_load_test_reports_each_level_without_errors(export_dir, tmp_path):
    out, figures = tmp_path / "serving.md", tmp_path / "serving.json"
    code = loadtest.main([str(export_dir), "--out", str(out), "--json", str(figures), "--concurrency", "1", "3",
                          "--requests", "12", "--duration", "10", "--warmup", "2",
                          "--server-args", "--onnx-threads 1 --request-threads 2"])
    table = [line for line in out.read_text().splitlines() if line.startswith("| single_logit") or
             line.startswith("| full")]
    assert code == 0 and len(table) == 4
    for line in table:
        graph, concurrency, requests, errors, rps, p50, p99, server_cpu, client_cpu = \
            [cell.strip() for cell in line.strip("|").split("|")]
        assert int(requests) == 12 and int(errors) == 0 and float(rps) > 0 and 0 < float(p50) <= float(p99)
        assert float(server_cpu) > 0 and float(client_cpu) > 0
