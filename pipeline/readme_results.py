"""Write the README's results section from the pipeline's own outputs, so it cannot drift from them.

`python -m pipeline.readme_results` replaces what lies between the two markers in README.md with
the head of `results/table1.md`, `results/speedup.md` and `results/serving.md` (each up to the
end of its first table, with a link to the whole file) and the plots beside them. Run it after
`make run` (and `python -m serving.loadtest`) when the figures should be published.
"""
from __future__ import annotations

import argparse
from pathlib import Path

BEGIN = "<!-- results: written by `python -m pipeline.readme_results` from the files below; edit those, not this -->"
END = "<!-- end of results -->"
TABLES = {"results/table1.md": "`make run`", "results/speedup.md": "`make run`",  # report -> what writes it
          "results/serving.md": "`python -m serving.loadtest exports/<run> --out results/serving.md`"}
PLOTS = ("plots/logit_hist.png", "plots/pr_curves.png", "plots/speedup.png")


def _head(markdown: str) -> tuple[str, str]:
    """A report's title, and its text up to the end of its first table (sub-headings demoted
    to fit under the README's)."""
    title, _, body = markdown.strip().partition("\n")
    lines = body.strip().splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    head = [f"##{line}" if line.startswith("## ") else line for line in lines[:end]]
    return title.lstrip("# ").strip(), "\n".join(head).strip()


def results_section(root: Path) -> str:
    """The generated section: one sub-section per report that exists, then the plots."""
    parts = []
    for name, maker in TABLES.items():
        path = root / name
        if path.is_file():
            title, body = _head(path.read_text())
            parts.append(f"### {title}\n\n{body}\n\nThe whole report: [`{name}`]({name}).")
        else:
            parts.append(f"`{name}` is not there yet: {maker} writes it.")
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
