"""Write the README's results section from the pipeline's own outputs, so it cannot drift from them.

`python -m pipeline.readme_results` replaces what lies between the two markers in README.md with
the head of each report (Table 1, the speedup, the serving load test), rendered from the JSON the
stage wrote by the same functions that wrote the report, with a link to the whole report, then
the plots. Nothing reads the Markdown reports back: their layout can change freely. Run it after
`make run` (and the load test) when the figures should be published.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from serving import loadtest_report
from slc.bench import report as speedup_report
from slc.bench.results import parse_speedup
from slc.evaluate.table1 import NEAREST_PAPER_DATASET, error_names, errors_markdown, settings_markdown, table1_title
from slc.nn.losses import POLS_ALIGNED

BEGIN = "<!-- results: written by `python -m pipeline.readme_results` from the files below; edit those, not this -->"
END = "<!-- end of results -->"
PLOTS = ("plots/logit_hist.png", "plots/pr_curves.png", "plots/speedup.png")
LOADTEST = "`python -m serving.loadtest exports/<run> --out results/serving.md` (it writes results/serving.json too)"


def table1_head(slc: dict) -> tuple[str, str]:
    """Title and body from metrics/slc.json. Its `settings` (dataset, model, epochs, ...) are
    needed for the settings lines and the paper's row; a file written without them still gives
    our errors, with the columns taken from its keys."""
    if "settings" in slc:
        settings = slc["settings"]
        paper = NEAREST_PAPER_DATASET.get(settings["dataset"])
        return table1_title(settings), (f"{settings_markdown(settings)}\n\n"
                                        + errors_markdown(slc, error_names(settings["recalls"]), POLS_ALIGNED, paper))
    first = next(iter(slc["losses"].values()))
    names = [key.removesuffix("_mean") for key in first if key.startswith("1-") and key.endswith("_mean")]
    return ("Table 1: single-logit errors (lower is better)",
            f"{errors_markdown(slc, names, POLS_ALIGNED, None)}\n\n`metrics/slc.json` holds no `settings`, so the "
            "dataset, model, seeds and the paper's nearest row are in the whole report only.")


def speedup_head(figures: dict) -> tuple[str, str]:
    results = parse_speedup(figures, "metrics/speedup.json")
    return speedup_report.TITLE, speedup_report.summary_markdown(results, heading="####")


def loadtest_head(figures: dict) -> tuple[str, str]:
    note = f"\n\nNote: {figures['note']}." if "note" in figures else ""
    return loadtest_report.TITLE, loadtest_report.summary_markdown(figures) + note


# figures (JSON) -> (the report written beside them, what writes both, their README head)
SOURCES = {"metrics/slc.json": ("results/table1.md", "`make run`", table1_head),
           "metrics/speedup.json": ("results/speedup.md", "`make run`", speedup_head),
           "results/serving.json": ("results/serving.md", LOADTEST, loadtest_head)}


def results_section(root: Path) -> str:
    """The generated section: one sub-section per report whose figures exist, then the plots."""
    parts = []
    for figures, (report, maker, head) in SOURCES.items():
        path = root / figures
        if path.is_file():
            title, body = head(json.loads(path.read_text()))
            parts.append(f"### {title}\n\n{body}\n\nThe whole report: [`{report}`]({report}).")
        else:
            parts.append(f"`{figures}` is not there yet: {maker} writes it.")
    images = [f"![{Path(name).stem}]({name})" for name in PLOTS if (root / name).is_file()]
    return "\n\n".join(parts + ([" ".join(images)] if images else []))


def update_readme(readme: str, section: str) -> str:
    """README text with the part between the markers replaced by `section`."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
        raise ValueError(f"README.md needs the two markers once each, in order:\n{BEGIN}\n{END}")
    before, rest = readme.split(BEGIN)
    return f"{before}{BEGIN}\n{section}\n{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=".", help="the repository root (README.md and the outputs)")
    root = Path(parser.parse_args(argv).root)
    readme = root / "README.md"
    readme.write_text(update_readme(readme.read_text(), results_section(root)))
    print(f"{readme}: results section rewritten")


if __name__ == "__main__":
    main()
