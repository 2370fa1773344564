"""Table 1's layout, on the figures of an earlier run (tests/fixtures/earlier_run/metrics/slc.json)."""
import json
from pathlib import Path
from types import SimpleNamespace

from slc.evaluate.table1 import error_names, errors_markdown, paper_means, table1_markdown
from slc.nn.losses import POLS_ALIGNED

SLC = json.loads((Path(__file__).resolve().parents[1] / "fixtures/earlier_run/metrics/slc.json").read_text())
SETTINGS = {"dataset": "fashion_mnist", "evaluated_on": "data/prepared (fashion_mnist)", "model": "mlp",
            "epochs": 5, "seeds": [0, 1, 2], "recalls": [0.9, 0.99], "test_size": 10000}


def rows(markdown: str) -> dict[str, list[str]]:
    """Table rows by their first cell."""
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]
    return {row[0]: row[1:] for row in cells}


def test_each_loss_has_its_mean_and_spread_and_the_summary_is_bold_beside_the_paper():
    table = rows(table1_markdown(SLC, SETTINGS, [], POLS_ALIGNED))
    assert table["ce"] == ["no", "0.109 ± 0.003", "0.242 ± 0.011", "0.470 ± 0.013", ""]
    assert table["bce"][0] == "yes"
    assert table["**relative improvement**"] == ["", "22.1%", "22.7%", "14.4%", "80.0% / 90.9% / 88.4%"]
    assert table["bce-s2"] == ["0.99", "0.644", "0.984", "0.966"]  # thresholds table: last seed, last recall


def test_failed_trials_are_listed_with_the_last_line_of_their_error():
    failed = [SimpleNamespace(run_name="nce-s0", error="Traceback\nNonFiniteLoss: loss became nan | at step 3")]
    table = rows(table1_markdown(SLC, SETTINGS, failed, POLS_ALIGNED))
    assert table["nce-s0"] == ["NonFiniteLoss: loss became nan / at step 3"]


def test_without_a_pols_summary_the_table_says_why():
    text = errors_markdown({**SLC, "summary": {}}, error_names([0.9, 0.99]), POLS_ALIGNED, None)
    assert "No PoLS summary" in text and "**mean PoLS**" not in text


def test_the_absolute_improvement_sits_beside_the_relative_one():
    table = rows(table1_markdown(SLC, SETTINGS, [], POLS_ALIGNED))
    errors = SLC["summary"]["1-auprc"]
    assert table["**absolute improvement**"][1] == f"{errors['non_pols'] - errors['pols']:.3f}"
    assert table["**absolute improvement**"][-1] == ""  # the paper gives none


def test_a_relative_improvement_over_a_tiny_error_is_n_a_with_the_reason():
    summary = {name: {"non_pols": 0.001, "pols": 0.889, "relative_improvement": None} for name in SLC["summary"]}
    text = errors_markdown({**SLC, "summary": summary}, error_names([0.9, 0.99]), POLS_ALIGNED, None)
    assert rows(text)["**relative improvement**"] == ["", "n/a", "n/a", "n/a"]
    assert rows(text)["**absolute improvement**"] == ["", "-0.888", "-0.888", "-0.888"]
    assert "too small to divide by" in text


def test_the_settings_say_when_errors_are_over_a_sample_of_classes():
    sampled = {**SETTINGS, "num_classes": 400000, "scored_classes": 1000}
    assert "a seeded sample of 1,000 of the 400,000 classes" in table1_markdown(SLC, sampled, [], POLS_ALIGNED)
    every = {**SETTINGS, "num_classes": 10, "scored_classes": 10}
    assert "averaged over classes;" in table1_markdown(SLC, every, [], POLS_ALIGNED)


def test_the_related_losses_stand_beside_the_paper_means_which_stay_over_the_seven():
    related = {**SLC, "losses": {**SLC["losses"], "cosface": SLC["losses"]["ce"], "uniface": SLC["losses"]["bce"]}}
    text = errors_markdown(related, error_names([0.9, 0.99]), POLS_ALIGNED, None)
    table = rows(text)
    assert table["cosface (cosine head)"][0] == "no" and table["uniface (cosine head)"][0] == "yes"
    assert "The means are over the paper's losses in the grid" in text and "cosface, uniface" in text
    assert "The means are over" not in errors_markdown(SLC, error_names([0.9, 0.99]), POLS_ALIGNED, None)


def test_the_summary_averages_the_papers_losses_when_it_has_both_kinds_else_every_loss():
    means = {"ce": 1, "bce": 2, "uniface": 3, "cosface": 4}
    assert set(paper_means(means, POLS_ALIGNED)) == {"ce", "bce"}
    assert set(paper_means({"ce": 1, "uniface": 3, "cosface": 4}, POLS_ALIGNED)) == {"ce", "uniface", "cosface"}
