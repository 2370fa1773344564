"""The load test stops by itself within its budgets, keeps every server up at once and drives each in
every round in a seeded order, reports every graph, batching setting and concurrency over all rounds
and full / single_logit within each round, and writes its figures as JSON that renders the same report
(serving.loadtest_report)."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from serving import loadtest, loadtest_report
from serving.machine import machine_info

COMMITTED = Path(__file__).resolve().parents[1] / "fixtures/earlier_run/results/serving.json"  # real figures


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table_lines(markdown: str, starts=("| single_logit", "| full")) -> list[list[str]]:
    return [cells(line) for line in markdown.splitlines() if line.startswith(starts)]


@pytest.mark.slow
def test_a_tiny_load_test_drives_every_server_in_every_round_without_errors(export_dir, tmp_path):
    out = tmp_path / "serving.md"
    # 120 requests: the server's CPU time is read in clock ticks (10 ms), and a dozen requests can fit in one
    code = loadtest.main([str(export_dir), "--out", str(out), "--concurrency", "1", "3", "--rounds", "3",
                          "--seed", "7", "--requests", "120", "--duration", "20", "--warmup", "2",
                          "--batch-wait-ms", "5", "--server-args", "--onnx-threads 1 --request-threads 2"])
    report = out.read_text()
    assert code == 0 and "served without batching, and with `--batch-wait-ms 5`" in report
    assert "driven in 3 rounds" in report and "--rounds 3 --seed 7" in report
    table = table_lines(report)
    assert [line[:3] for line in table] == [[graph, batching, concurrency] for graph in ("single_logit", "full")
                                            for batching in ("off", "5 ms wait") for concurrency in ("1", "3")]
    for line in table:
        graph, batching, concurrency, requests, errors, rps, p50, p99, per_call, server_cpu, client_cpu = line
        assert int(requests) == 120 and int(errors) == 0 and float(rps) > 0 and 0 < float(p50) <= float(p99)
        assert float(server_cpu) > 0 and float(client_cpu) > 0
        assert float(per_call) == 1.0 if batching == "off" or concurrency == "1" else 1.0 <= float(per_call) <= 3.0
    figures = json.loads(out.with_suffix(".json").read_text())  # beside the Markdown by default
    assert loadtest_report.render(figures) == report and len(figures["rows"]) == 8
    orders = loadtest.schedule(4, [1, 3], 3, seed=7)
    for concurrency in (1, 3):
        level = [row for row in figures["rows"] if row["concurrency"] == concurrency]  # the servers' order
        for row in level:  # the budgets in slices, all answered, and the row's figures over every round
            assert [r["requests"] for r in row["rounds"]] == [40, 40, 40]
            assert row["seconds"] == pytest.approx(sum(r["seconds"] for r in row["rounds"]), abs=0.01)
            assert min(r["p50_ms"] for r in row["rounds"]) <= row["p50_ms"] <= max(r["p50_ms"] for r in row["rounds"])
        for i in range(3):  # every server in every round, in the order the seed gives
            assert sorted(range(4), key=lambda server: level[server]["rounds"][i]["position"]) == orders[concurrency][i]
    ratios = figures["ratios"]
    assert [(r["batch_wait_ms"], r["concurrency"]) for r in ratios] == [(None, 1), (None, 3), (5.0, 1), (5.0, 3)]
    for ratio in ratios:
        full, single = ([row for row in figures["rows"] if (row["graph"], row["batch_wait_ms"], row["concurrency"])
                         == (graph, ratio["batch_wait_ms"], ratio["concurrency"])][0] for graph in ("full", "single_logit"))
        for figure in ("rps", "p50_ms"):
            per_round = [f[figure] / s[figure] for f, s in zip(full["rounds"], single["rounds"])]
            assert ratio[figure]["rounds"] == pytest.approx(per_round, abs=5e-4)
            assert ratio[figure]["median"] == pytest.approx(np.median(per_round), abs=5e-4)
            assert (ratio[figure]["min"], ratio[figure]["max"]) == pytest.approx((min(per_round), max(per_round)), abs=5e-4)
    assert [line[:2] for line in table_lines(report, ("| off", "| 5 ms wait"))] == [
        ["off", "1"], ["off", "3"], ["5 ms wait", "1"], ["5 ms wait", "3"]]


@pytest.mark.parametrize("servers", [2, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_round_has_every_server_in_a_seeded_order_unlike_the_round_before(servers, seed):
    orders = loadtest.schedule(servers, [1, 8], rounds=6, seed=seed)
    assert orders == loadtest.schedule(servers, [1, 8], rounds=6, seed=seed)
    for level in orders.values():
        assert len(level) == 6 and all(sorted(order) == list(range(servers)) for order in level)
        assert all(before != after for before, after in zip(level, level[1:]))
    assert any(loadtest.schedule(servers, [1, 8], 6, seed=other) != orders for other in range(seed + 1, seed + 4))


@pytest.mark.parametrize("requests, rounds", [(120, 3), (1000, 5), (7, 3), (5, 5)])
def test_the_request_budget_is_cut_into_nearly_equal_slices_that_add_up(requests, rounds):
    slices = loadtest.budgets(requests, rounds)
    assert len(slices) == rounds and sum(slices) == requests and max(slices) - min(slices) <= 1


def test_a_row_is_computed_over_all_its_rounds():
    rounds = [{"position": 0, "latencies": [0.001, 0.002, 0.003], "errors": [], "seconds": 0.5,
               "server_cpu_s": 0.004, "client_cpu_s": 0.002, "calls": 3, "images": 3},
              {"position": 1, "latencies": [0.010], "errors": ["503: busy"], "seconds": 1.5,
               "server_cpu_s": 0.004, "client_cpu_s": 0.006, "calls": 1, "images": 2}]
    row = loadtest.combine(rounds)
    assert row["requests"] == 4 and row["errors"] == 1 and row["first_error"] == "503: busy"
    assert row["rps"] == 2.0 and row["p50_ms"] == 2.5 and row["server_cpu_ms"] == 2.0 and row["client_cpu_ms"] == 2.0
    assert row["images_per_call"] == 1.25
    assert row["rounds"] == [{"position": 0, "requests": 3, "seconds": 0.5, "rps": 6.0, "p50_ms": 2.0},
                             {"position": 1, "requests": 1, "seconds": 1.5, "rps": 0.7, "p50_ms": 10.0}]


def with_rounds(graph, wait, concurrency, rps, p50):
    return {"graph": graph, "batch_wait_ms": wait, "concurrency": concurrency,
            "rounds": [{"rps": r, "p50_ms": p} for r, p in zip(rps, p50)]}


def test_full_over_single_logit_is_taken_within_each_round():
    rows = [with_rounds("single_logit", None, 1, [100.0, 200.0, 100.0], [2.0, 1.0, 2.0]),
            with_rounds("full", None, 1, [90.0, 220.0, 80.0], [2.2, 1.0, None]),
            with_rounds("single_logit", 2.0, 1, [100.0, 100.0, 0.0], [2.0, 2.0, None]),
            with_rounds("full", 2.0, 1, [50.0, 100.0, 10.0], [4.0, 2.0, 3.0])]
    off, batching = loadtest_report.paired_ratios(rows)
    # the drift of round 2 (both twice as fast) does not move its ratio
    assert off["rps"] == {"median": 0.9, "min": 0.8, "max": 1.1, "rounds": [0.9, 1.1, 0.8]}
    assert off["p50_ms"] == {"median": 1.05, "min": 1.0, "max": 1.1, "rounds": [1.1, 1.0, None]}  # round 3 answered none
    assert batching["batch_wait_ms"] == 2.0 and batching["rps"]["rounds"] == [0.5, 1.0, None]
    assert loadtest_report.paired_ratios(rows[:1] + rows[2:3]) == []  # a single graph has nothing to compare


def test_figures_in_rounds_show_each_rounds_ratio():
    figures = json.loads(COMMITTED.read_text())
    figures["settings"] |= {"rounds": 2, "seed": 0, "batch_wait_ms": 2.0}
    figures["ratios"] = [{"batch_wait_ms": None, "concurrency": 8,
                          "rps": {"median": 0.95, "min": 0.9, "max": 1.0, "rounds": [0.9, 1.0]},
                          "p50_ms": {"median": None, "min": None, "max": None, "rounds": [None, None]}}]
    summary = loadtest_report.summary_markdown(figures)
    assert "--batch-wait-ms 2 --rounds 2 --seed 0` on Linux" in summary and "driven in 2 rounds" in summary
    assert table_lines(summary, ("| off",)) == [["off", "8", "0.950 (0.900–1.000)", "0.900 1.000", "none answered", ""]]


def test_the_report_has_one_row_per_level_with_the_figures_as_measured():
    figures = json.loads(COMMITTED.read_text())  # from before batching and rounds: one server after another
    rows = table_lines(loadtest_report.render(figures))
    measured = ("concurrency", "requests", "errors", "rps", "p50_ms", "p99_ms")
    assert rows == [[row["graph"], "off", *(str(row[c]) for c in measured), "", str(row["server_cpu_ms"]),
                     str(row["client_cpu_ms"])] for row in figures["rows"]]
    summary = loadtest_report.summary_markdown(figures)
    assert "`python -m serving.loadtest exports/bce-s2` on Linux" in summary and "batch-wait" not in summary
    assert "Per level: at most 1000 timed requests or 20 s" in summary and "Rounds" not in summary


def test_a_row_with_batching_shows_its_wait_and_images_per_call():
    row = {"graph": "full", "batch_wait_ms": 2.5, "images_per_call": 3.4}
    assert loadtest_report.cell(row, "batch_wait_ms") == "2.5 ms wait" and loadtest_report.cell(row, "images_per_call") == 3.4


def test_a_failed_level_shows_its_first_error():
    figures = json.loads(COMMITTED.read_text())
    figures["rows"][0] |= {"errors": 3, "first_error": "503: busy"}
    assert "First error (single_logit, concurrency 1): 503: busy" in loadtest_report.render(figures)


@pytest.mark.parametrize("flags, message", [(["--rounds", "6", "--requests", "5"], "1 <= rounds <= --requests"),
                                            (["--rounds", "0"], "1 <= rounds"),
                                            (["--concurrency", "1", "1"], "name each level once")])
def test_rounds_without_a_request_each_and_a_level_named_twice_are_refused(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        loadtest.main([str(tmp_path), *flags])
    assert message in capsys.readouterr().err


def test_machine_info_describes_the_machine_without_torch():
    info = machine_info()
    assert info["cores"] >= 1 and info["memory_gb"] > 0 and len(info["load_average"]) == 3 and info["cpu"]
    code = "import sys, serving.machine; sys.exit('torch' in sys.modules or 'slc' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_clients_idle_connections_close_before_uvicorn_closes_them():
    """Between rounds a server's connections sit idle while the others are driven; reused as uvicorn
    closed them, a request failed with ReadError (1 of 12,000 in a real run)."""
    import uvicorn

    http = loadtest.client(SimpleNamespace(url="http://127.0.0.1:9"), 8)
    assert http._transport._pool._keepalive_expiry == loadtest.KEEPALIVE_EXPIRY_S
    assert loadtest.KEEPALIVE_EXPIRY_S < uvicorn.Config(app=None).timeout_keep_alive
