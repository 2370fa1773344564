"""The README's results section is made from the pipeline's report files, and only that part changes."""
import pytest

from pipeline.readme_results import BEGIN, END, main, results_section, update_readme


def write(root, name, text):
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)


def test_each_report_contributes_up_to_its_first_table_and_a_link(tmp_path):
    write(tmp_path, "results/table1.md", "# Table 1 on fashion_mnist\n\n- settings\n\n| loss |\n| --- |\n| ce |\n\n"
                                         "## Thresholds\n\n| run |\n| --- |")
    write(tmp_path, "results/speedup.md", "# Speedup\n\nMachine: 2 cores\n\n## Full / single\n\n| k |\n| --- |\n"
                                          "| 1 |\n\n## Goals\n\n- met")
    write(tmp_path, "plots/speedup.png", "png")
    section = results_section(tmp_path)
    assert "### Table 1 on fashion_mnist\n\n- settings\n\n| loss |\n| --- |\n| ce |\n" in section
    assert "Thresholds" not in section and "| run |" not in section
    assert "### Speedup\n\nMachine: 2 cores\n\n#### Full / single\n\n| k |\n| --- |\n| 1 |\n" in section
    assert "Goals" not in section
    assert "[`results/table1.md`](results/table1.md)" in section
    assert "`results/serving.md` is not there yet: `python -m serving.loadtest" in section
    assert section.endswith("![speedup](plots/speedup.png)")


def test_only_the_marked_part_of_the_readme_is_replaced_and_twice_is_once(tmp_path):
    write(tmp_path, "README.md", f"intro\n{BEGIN}\nold figures\n{END}\nafter\n")
    write(tmp_path, "results/serving.md", "# Serving\n\n| concurrency |\n")
    main(["--root", str(tmp_path)])
    once = (tmp_path / "README.md").read_text()
    assert once.startswith(f"intro\n{BEGIN}\n") and once.endswith(f"\n{END}\nafter\n")
    assert "old figures" not in once and "### Serving" in once
    main(["--root", str(tmp_path)])
    assert (tmp_path / "README.md").read_text() == once


@pytest.mark.parametrize("readme", ["no markers", f"{END}\n{BEGIN}", f"{BEGIN}\n{BEGIN}\n{END}"])
def test_a_readme_without_its_markers_in_order_is_refused(readme):
    with pytest.raises(ValueError, match="needs the two markers once each"):
        update_readme(readme, "section")
