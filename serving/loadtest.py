"""Load test of `slc serve` on loopback: requests/s and latency for single_logit.onnx vs model.onnx,
each without and with dynamic batching.

    python -m serving.loadtest exports/batch_ce-s0 --out results/serving.md   # and results/serving.json

For each graph and batching setting a server is started in its own process, warmed up, then
driven by an asyncio client at each concurrency until a request budget or a time budget runs
out, whichever is first, so the test always stops by itself. Every request is a real upload (one
PNG of the model's input size) through the whole HTTP path. Client and server share this
machine's CPUs, so besides wall time the CPU time each side spent per request is reported: it
says where the time went even when other work competes for the cores (the load average is
printed too). The server's own /metrics say how many images each onnxruntime call took, which is
what batching changes.
The figures are written as JSON beside the Markdown: the README's results section is rendered
from that JSON with `summary_markdown`, so nothing reads the Markdown back.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tabulate import tabulate

from serving.cli import positive_ms
from serving.machine import machine_info
from serving.metrics import BATCH
from serving.model import GRAPHS, SingleLogitModel
from serving.probe import NotUp, wait_until_answers

TITLE = "Serving load test"
POOL = 32            # distinct images sent in turn
STARTUP_TIMEOUT = 60.0
COLUMNS = ("graph", "batch_wait_ms", "concurrency", "requests", "errors", "rps", "p50_ms", "p99_ms",
           "images_per_call", "server_cpu_ms", "client_cpu_ms")
HEADER = ("graph", "batching", "concurrency", "requests", "errors", "req/s", "p50 ms", "p99 ms",
          "images/call", "server CPU ms/req", "client CPU ms/req")
NEWER = {"batch_wait_ms", "images_per_call"}  # columns that figures from before batching lack (it was off)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("results/serving.md"))
    parser.add_argument("--json", type=Path, default=None,
                        help="where the figures go as JSON (default: --out with .json, which the README reads)")
    parser.add_argument("--graphs", nargs="+", default=list(GRAPHS), choices=list(GRAPHS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=1000, help="timed requests per level at most")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per level at most")
    parser.add_argument("--warmup", type=int, default=50, help="untimed requests before each graph")
    parser.add_argument("--server-args", default="", help="extra `slc serve` flags, e.g. '--onnx-threads 1'")
    parser.add_argument("--batch-wait-ms", type=positive_ms, default=2.0,
                        help="the batching setting measured beside no batching (`slc serve --batch-wait-ms`)")
    args = parser.parse_args(argv)
    model = SingleLogitModel.load(args.export_dir)
    pool = png_pool(model.input_shape)
    rows = []
    for graph in args.graphs:
        for wait in (None, args.batch_wait_ms):
            batching = [] if wait is None else ["--batch-wait-ms", str(wait)]
            with Server(args.export_dir, graph, options=[*args.server_args.split(), *batching]) as server:
                asyncio.run(drive(server.url, pool, concurrency=1, requests=args.warmup, duration=args.duration))
                for concurrency in args.concurrency:
                    rows.append({"graph": graph, "batch_wait_ms": wait, "concurrency": concurrency,
                                 **measure(server, pool, concurrency, args.requests, args.duration)})
                    print(" ".join(f"{column}={rows[-1][column]}" for column in COLUMNS), file=sys.stderr)
    figures = {"settings": {"export_dir": str(args.export_dir), "server_args": args.server_args,
                            "batch_wait_ms": args.batch_wait_ms, "requests": args.requests,
                            "duration": args.duration, "warmup": args.warmup},
               "model": {"run_name": model.run_name, "dataset": model.manifest.dataset,
                         "num_classes": model.num_classes, "input_shape": list(model.input_shape),
                         "providers": list(model.providers)},
               "machine": {**machine_info(), "httpx": httpx.__version__},  # after the load: its load average
               "rows": rows}
    report = render(figures)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    (args.json or args.out.with_suffix(".json")).write_text(json.dumps(figures, indent=2) + "\n")
    print(report)
    return 1 if any(row["errors"] for row in rows) else 0


def png_pool(input_shape) -> list[bytes]:
    """Random-pixel PNGs of the model's size and channels (the answer does not matter, the path does)."""
    c, h, w = input_shape
    rng = np.random.default_rng(0)
    pool = []
    for _ in range(POOL):
        pixels = rng.integers(0, 256, size=(h, w) if c == 1 else (h, w, c), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        pool.append(buffer.getvalue())
    return pool


class Server:
    """`slc serve` on a free loopback port in a child process; stopped on exit, whatever happened."""

    def __init__(self, export_dir: Path, graph: str = "single_logit", max_batch: int = 256,
                 options: list[str] = ()):
        port = free_port()
        self.command = [sys.executable, "-m", "serving.cli", "serve", str(export_dir), "--graph", graph,
                        "--host", "127.0.0.1", "--port", str(port), "--max-batch", str(max_batch),
                        "--log-level", "warning", *options]
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> Server:
        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty server never blocks on it
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        try:
            self.wait_until_up()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def wait_until_up(self, timeout: float = STARTUP_TIMEOUT) -> None:
        try:
            wait_until_answers(f"{self.url}/healthz", self.process, timeout)
        except NotUp as error:
            self.log.seek(0)
            raise RuntimeError(f"{error}: {self.log.read()[-2000:]}") from None

    def cpu_seconds(self) -> float:
        """Counted in clock ticks (10 ms): a level needs enough requests to span several."""
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def inference_images(self) -> tuple[float, float]:
        """onnxruntime calls so far and the images they took, from the server's /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=10.0).text
        family = next(f for f in text_string_to_metric_families(text) if f.name == BATCH.name)
        total = {suffix: sum(s.value for s in family.samples if s.name == BATCH.name + suffix) for suffix in ("_count", "_sum")}
        return total["_count"], total["_sum"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(server: Server, pool: list[bytes], concurrency: int, requests: int, duration: float) -> dict:
    """One level: latency figures, the images per onnxruntime call, and the CPU time server and client
    spent per answered request."""
    (calls_before, images_before), server_before, client_before = (server.inference_images(), server.cpu_seconds(),
                                                                   _own_cpu_seconds())
    row = asyncio.run(drive(server.url, pool, concurrency, requests, duration))
    answered = max(row["requests"], 1)
    row["server_cpu_ms"] = round((server.cpu_seconds() - server_before) / answered * 1e3, 2)
    row["client_cpu_ms"] = round((_own_cpu_seconds() - client_before) / answered * 1e3, 2)
    calls, images = server.inference_images()
    row["images_per_call"] = round((images - images_before) / max(calls - calls_before, 1), 2)
    return row


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def drive(url: str, pool: list[bytes], concurrency: int, requests: int, duration: float) -> dict:
    """`concurrency` clients in a closed loop until `requests` are sent or `duration` seconds pass."""
    latencies, errors, sent = [], [], 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0) as client:
        start = time.perf_counter()
        deadline = start + duration

        async def worker() -> None:
            nonlocal sent
            while sent < requests and time.perf_counter() < deadline:
                image = pool[sent % len(pool)]
                sent += 1
                began = time.perf_counter()
                try:
                    response = await client.post("/v1/classes/0/score", files=[("files", ("x.png", image))])
                except httpx.HTTPError as error:
                    errors.append(repr(error))
                    continue
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
                    continue
                latencies.append(time.perf_counter() - began)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ms = np.asarray(latencies) * 1e3
    return {"requests": len(latencies), "errors": len(errors), "first_error": errors[0] if errors else None,
            "seconds": round(elapsed, 3), "rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None}


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


def summary_markdown(figures: dict) -> str:
    """What was measured, where and how, then the table: the part the README shows too.

    `figures` is what `main` writes as JSON: settings, model, machine, rows.
    """
    s, m, model = figures["settings"], figures["machine"], figures["model"]
    c, h, w = model["input_shape"]
    command = f"python -m serving.loadtest {s['export_dir']}" + (
        f" --server-args {s['server_args']!r}" if s["server_args"] else "") + (
        f" --batch-wait-ms {s['batch_wait_ms']:g}" if s.get("batch_wait_ms") is not None else "")
    return "\n".join([
        f"`{command}` on {m['platform']}, {m['cores']} CPUs (1-min load average {m['load_average'][0]:.2f} at "
        f"the end), Python {m['python']}, onnxruntime {m['onnxruntime']} ({', '.join(model['providers'])}).",
        f"Model: run {model['run_name']} ({model['dataset']}, {model['num_classes']} classes, input [{c}, {h}, {w}]); "
        f"each request uploads one {h}x{w} PNG to `POST /v1/classes/0/score` of `slc serve` (uvicorn, one process).",
        f"Per level: at most {s['requests']} timed requests or {s['duration']:g} s, after {s['warmup']} untimed "
        f"warm-up requests per server. Client (httpx, asyncio) and server share the machine over loopback.",
        *([] if s.get("batch_wait_ms") is None else [  # figures from before batching have no such setting
            f"Each graph is served without batching, then with `--batch-wait-ms {s['batch_wait_ms']:g}`: concurrent "
            f"requests share one onnxruntime call, each waiting at most {s['batch_wait_ms']:g} ms for others; "
            f"images/call is the mean the server's /metrics counted."]),
        "",
        table_markdown(figures["rows"])])


def render(figures: dict) -> str:
    lines = [f"# {TITLE}", "", summary_markdown(figures), ""]
    failed = [row for row in figures["rows"] if row["errors"]]
    if failed:
        lines += [f"First error ({failed[0]['graph']}, concurrency {failed[0]['concurrency']}): "
                  f"{failed[0]['first_error']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
