"""The README's results section is rendered from the stages' JSON by the reports' own functions,
never from the Markdown reports, and only that part of the README changes."""
import json
import shutil
from pathlib import Path

import pytest

from pipeline.readme_results import BEGIN, END, main, results_section, update_readme

REPO = Path(__file__).resolve().parents[2]
EARLIER_RUN = REPO / "tests/fixtures/earlier_run"  # an earlier run's real figures, frozen for these tests
FIGURES = ("metrics/slc.json", "metrics/speedup.json", "results/serving.json")
SETTINGS = {"dataset": "fashion_mnist", "evaluated_on": "data/prepared (fashion_mnist)", "model": "mlp",
            "epochs": 5, "seeds": [0, 1, 2], "recalls": [0.9, 0.99], "test_size": 10000}


def copy_figures(root: Path, names=FIGURES) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(EARLIER_RUN / name, root / name)


def write(root: Path, name: str, text: str) -> None:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)


def test_each_report_contributes_its_head_from_json_and_a_link(tmp_path):
    copy_figures(tmp_path)
    write(tmp_path, "plots/speedup.png", "png")
    section = results_section(tmp_path)
    assert "### Single-logit speedup: the paper's Table 2 in onnxruntime\n\nMachine: AMD EPYC, 2 cores" in section
    assert "#### Full k-class model time / single-logit time" in section and "x2.92" in section
    assert "## Goals" not in section and "Every measurement" not in section
    assert "### Serving load test" in section and "1504.88" in section and "converted" in section
    assert "0.109 ± 0.003" in section and "**relative improvement**" in section and "22.1%" in section
    assert "Thresholds calibrated" not in section
    for report in ("results/table1.md", "results/speedup.md", "results/serving.md"):
        assert f"The whole report: [`{report}`]({report})." in section
    assert section.endswith("![speedup](plots/speedup.png)")


def test_the_markdown_reports_are_not_read(tmp_path):
    copy_figures(tmp_path)
    before = results_section(tmp_path)
    for report in ("results/table1.md", "results/speedup.md", "results/serving.md"):
        write(tmp_path, report, "# Something else\n\n| x |\n| --- |\n| 1 |\n")
    assert results_section(tmp_path) == before


def test_table1_with_settings_states_them_and_sets_the_papers_row_beside_ours(tmp_path):
    slc = json.loads((EARLIER_RUN / "metrics/slc.json").read_text())
    write(tmp_path, "metrics/slc.json", json.dumps({**slc, "settings": SETTINGS}))
    section = results_section(tmp_path)
    assert "### Table 1 on fashion_mnist: single-logit errors (lower is better)" in section
    assert "- model: mlp; epochs: 5; seeds: [0, 1, 2]" in section
    assert "paper MNIST" in section and "80.0% / 90.9% / 88.4%" in section


def test_table1_without_settings_still_gives_our_errors_and_says_what_is_missing(tmp_path):
    copy_figures(tmp_path, ["metrics/slc.json"])
    figures = json.loads((tmp_path / "metrics/slc.json").read_text())
    del figures["settings"]  # as evaluate wrote it before it recorded its settings
    (tmp_path / "metrics/slc.json").write_text(json.dumps(figures))
    section = results_section(tmp_path)
    assert "### Table 1: single-logit errors" in section and "0.458 ± 0.006" in section
    assert "holds no `settings`" in section and "paper MNIST" not in section


def test_serving_figures_taken_in_rounds_show_full_over_single_logit_per_round(tmp_path):
    figures = json.loads((EARLIER_RUN / "results/serving.json").read_text())  # before rounds: none shown above
    figures["settings"] |= {"batch_wait_ms": 2.0, "rounds": 2, "seed": 0}
    ratio = {"median": 1.05, "min": 1.0, "max": 1.1, "rounds": [1.1, 1.0]}
    figures["ratios"] = [{"batch_wait_ms": 2.0, "concurrency": 8, "rps": ratio, "p50_ms": ratio}]
    write(tmp_path, "results/serving.json", json.dumps(figures))
    section = results_section(tmp_path)
    assert "--rounds 2 --seed 0` on" in section and "Rounds: full / single_logit within each round" in section
    row = next(line for line in section.splitlines() if line.startswith("| 2 ms wait"))
    assert [cell.strip() for cell in row.strip("|").split("|")] == ["2 ms wait", "8", *["1.050 (1.000–1.100)", "1.100 1.000"] * 2]
    assert "1504.88" in section  # the table over all rounds as before


def test_missing_figures_say_what_writes_them(tmp_path):
    section = results_section(tmp_path)
    assert "`metrics/slc.json` is not there yet: `make run` writes it." in section
    assert "`results/serving.json` is not there yet: `python -m serving.loadtest" in section


def test_only_the_marked_part_of_the_readme_is_replaced_and_twice_is_once(tmp_path):
    write(tmp_path, "README.md", f"intro\n{BEGIN}\nold figures\n{END}\nafter\n")
    copy_figures(tmp_path, ["results/serving.json"])
    main(["--root", str(tmp_path)])
    once = (tmp_path / "README.md").read_text()
    assert once.startswith(f"intro\n{BEGIN}\n") and once.endswith(f"\n{END}\nafter\n")
    assert "old figures" not in once and "### Serving load test" in once
    main(["--root", str(tmp_path)])
    assert (tmp_path / "README.md").read_text() == once


@pytest.mark.parametrize("readme", ["no markers", f"{END}\n{BEGIN}", f"{BEGIN}\n{BEGIN}\n{END}"])
def test_a_readme_without_its_markers_in_order_is_refused(readme):
    with pytest.raises(ValueError, match="needs the two markers once each"):
        update_readme(readme, "section")
