"""The serving load test's report: its table, the paired rounds' full / single_logit ratios, and the
summary the README shows, all from the figures `serving.loadtest` writes as JSON (so the README is
rendered from that JSON, and nothing reads the Markdown back).
"""
from __future__ import annotations

import numpy as np
from tabulate import tabulate

TITLE = "Serving load test"
COLUMNS = ("graph", "batch_wait_ms", "concurrency", "requests", "errors", "rps", "p50_ms", "p99_ms",
           "images_per_call", "server_cpu_ms", "client_cpu_ms")
HEADER = ("graph", "batching", "concurrency", "requests", "errors", "req/s", "p50 ms", "p99 ms",
          "images/call", "server CPU ms/req", "client CPU ms/req")
NEWER = {"batch_wait_ms", "images_per_call"}  # columns that figures from before batching lack (it was off)
RATIOS = ("rps", "p50_ms")  # the per-round figures whose full / single_logit ratio is reported


def paired_ratios(rows: list[dict]) -> list[dict]:
    """full / single_logit of req/s and of p50 within each round, per batching setting and concurrency:
    both figures of a ratio share the round's state of the machine. Where only one graph was served, none."""
    by = {(row["graph"], row["batch_wait_ms"], row["concurrency"]): row for row in rows}
    ratios = []
    for (graph, wait, concurrency), full in by.items():
        single = by.get(("single_logit", wait, concurrency))
        if graph == "full" and single is not None:
            ratios.append({"batch_wait_ms": wait, "concurrency": concurrency, **{
                figure: ratio_spread([f[figure] / s[figure] if f[figure] and s[figure] else None
                                for f, s in zip(full["rounds"], single["rounds"])]) for figure in RATIOS}})
    return ratios


def ratio_spread(per_round: list[float | None]) -> dict:
    """Median, min and max over the rounds with a ratio (a round that answered nothing has none), and every round's."""
    kept = [x for x in per_round if x is not None]
    summary = {"median": float(np.median(kept)), "min": min(kept), "max": max(kept)} if kept else dict.fromkeys(
        ("median", "min", "max"))
    return {name: None if x is None else round(x, 3) for name, x in summary.items()} | {
        "rounds": [None if x is None else round(x, 3) for x in per_round]}


def table_markdown(rows: list[dict]) -> str:
    """One row per graph, batching and concurrency; numparse off, so figures print as measured."""
    return tabulate([[cell(row, column) for column in COLUMNS] for row in rows], HEADER, tablefmt="github",
                    disable_numparse=True)


def cell(row: dict, column: str):
    if column not in NEWER:
        return row[column]
    value = row.get(column)
    if column == "batch_wait_ms":
        return "off" if value is None else f"{value:g} ms wait"
    return "" if value is None else value


def rounds_markdown(ratios: list[dict]) -> str:
    """full / single_logit per batching setting and concurrency: median (min–max) and every round."""
    def figures(ratio: dict) -> list[str]:
        if ratio["median"] is None:
            return ["none answered", ""]
        return [f"{ratio['median']:.3f} ({ratio['min']:.3f}–{ratio['max']:.3f})",
                " ".join("–" if x is None else f"{x:.3f}" for x in ratio["rounds"])]
    table = [[cell(r, "batch_wait_ms"), r["concurrency"], *figures(r["rps"]), *figures(r["p50_ms"])] for r in ratios]
    return tabulate(table, ["batching", "concurrency", "req/s full / single_logit", "per round",
                            "p50 full / single_logit", "per round"], tablefmt="github", disable_numparse=True)


def summary_markdown(figures: dict) -> str:
    """What was measured, where and how, then the table and the paired rounds: the part the README shows too.

    `figures` is what `main` writes as JSON: settings, model, machine, rows, ratios. Figures from before
    the rounds (no `rounds` setting, no ratios) render as they were measured, one server after another.
    """
    s, m, model = figures["settings"], figures["machine"], figures["model"]
    c, h, w = model["input_shape"]
    command = f"python -m serving.loadtest {s['export_dir']}" + (
        f" --server-args {s['server_args']!r}" if s["server_args"] else "") + (
        f" --batch-wait-ms {s['batch_wait_ms']:g}" if s.get("batch_wait_ms") is not None else "") + (
        f" --rounds {s['rounds']} --seed {s['seed']}" if "rounds" in s else "")
    if "rounds" in s:
        budgets = (f"All servers are up at once; at each level they are driven in {s['rounds']} rounds, each server "
                   f"once a round for 1/{s['rounds']} of the budgets (in all at most {s['requests']} timed requests "
                   f"or {s['duration']:g} s per server), in a new order each round (seed {s['seed']}), after "
                   f"{s['warmup']} untimed warm-up requests per server.")
    else:
        budgets = (f"Per level: at most {s['requests']} timed requests or {s['duration']:g} s, after {s['warmup']} "
                   "untimed warm-up requests per server.")
    lines = [
        f"`{command}` on {m['platform']}, {m['cores']} CPUs (1-min load average {m['load_average'][0]:.2f} at "
        f"the end), Python {m['python']}, onnxruntime {m['onnxruntime']} ({', '.join(model['providers'])}).",
        f"Model: run {model['run_name']} ({model['dataset']}, {model['num_classes']} classes, input [{c}, {h}, {w}]); "
        f"each request uploads one {h}x{w} PNG to `POST /v1/classes/0/score` of `slc serve` (uvicorn, one process).",
        f"{budgets} Client (httpx, asyncio) and server share the machine over loopback.",
        *([] if s.get("batch_wait_ms") is None else [  # figures from before batching have no such setting
            f"Each graph is served without batching, and with `--batch-wait-ms {s['batch_wait_ms']:g}`: concurrent "
            f"requests share one onnxruntime call, each waiting at most {s['batch_wait_ms']:g} ms for others; "
            f"images/call is the mean the server's /metrics counted."]),
        "",
        table_markdown(figures["rows"])]
    if figures.get("ratios"):
        lines += ["", "Rounds: full / single_logit within each round, whose two figures are seconds apart (req/s "
                  "below 1 or p50 above 1: the full graph is slower); the median (min–max) over the rounds, then "
                  "each round's.", "", rounds_markdown(figures["ratios"])]
    return "\n".join(lines)


def render(figures: dict) -> str:
    lines = [f"# {TITLE}", "", summary_markdown(figures), ""]
    failed = [row for row in figures["rows"] if row["errors"]]
    if failed:
        lines += [f"First error ({failed[0]['graph']}, concurrency {failed[0]['concurrency']}): "
                  f"{failed[0]['first_error']}", ""]
    return "\n".join(lines)
