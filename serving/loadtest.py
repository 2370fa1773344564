"""Load test of `slc serve` on loopback: requests/s and latency for single_logit.onnx vs model.onnx.

    python -m serving.loadtest exports/batch_ce-s0 --out results/serving.md

For each graph a server is started in its own process, warmed up, then driven by an asyncio
client at each concurrency until a request budget or a time budget runs out, whichever is first,
so the test always stops by itself. Every request is a real upload (one PNG of the model's input
size) through the whole HTTP path. Client and server share this machine's CPUs, so besides wall
time the CPU time each side spent per request is reported: it says where the time went even
when other work competes for the cores (the load average is printed too).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import psutil
from PIL import Image

from serving.model import GRAPHS, SingleLogitModel

POOL = 32            # distinct images sent in turn
STARTUP_TIMEOUT = 60.0
COLUMNS = ("graph", "concurrency", "requests", "errors", "rps", "p50_ms", "p99_ms", "server_cpu_ms", "client_cpu_ms")
HEADER = ("graph", "concurrency", "requests", "errors", "req/s", "p50 ms", "p99 ms",
          "server CPU ms/req", "client CPU ms/req")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("results/serving.md"))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument("--graphs", nargs="+", default=list(GRAPHS), choices=list(GRAPHS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=1000, help="timed requests per level at most")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per level at most")
    parser.add_argument("--warmup", type=int, default=50, help="untimed requests before each graph")
    parser.add_argument("--server-args", default="", help="extra `slc serve` flags, e.g. '--onnx-threads 1'")
    args = parser.parse_args(argv)
    model = SingleLogitModel.load(args.export_dir)
    pool = png_pool(model.input_shape)
    rows = []
    for graph in args.graphs:
        with Server(args.export_dir, graph, options=args.server_args.split()) as server:
            asyncio.run(drive(server.url, pool, concurrency=1, requests=args.warmup, duration=args.duration))
            for concurrency in args.concurrency:
                rows.append({"graph": graph, "concurrency": concurrency,
                             **measure(server, pool, concurrency, args.requests, args.duration)})
                print(format_row(rows[-1]), file=sys.stderr)
    report = render(model, args, rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
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

    def __enter__(self) -> "Server":
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"the server exited with status {self.process.returncode}: "
                                   f"{self.log.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server at {self.url} did not answer /healthz within {timeout:.0f} s")

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(server: Server, pool: list[bytes], concurrency: int, requests: int, duration: float) -> dict:
    """One level: latency figures plus the CPU time server and client spent per answered request."""
    server_before, client_before = server.cpu_seconds(), _own_cpu_seconds()
    row = asyncio.run(drive(server.url, pool, concurrency, requests, duration))
    answered = max(row["requests"], 1)
    row["server_cpu_ms"] = round((server.cpu_seconds() - server_before) / answered * 1e3, 2)
    row["client_cpu_ms"] = round((_own_cpu_seconds() - client_before) / answered * 1e3, 2)
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


def machine() -> dict:
    """Where the figures come from; the load average says whether other work shared the CPUs."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "httpx": httpx.__version__,
            "load_average_1min": round(os.getloadavg()[0], 2)}


def format_row(row: dict) -> str:
    return "| " + " | ".join(str(row[column]) for column in COLUMNS) + " |"


def render(model: SingleLogitModel, args, rows: list[dict]) -> str:
    m = machine()
    c, h, w = model.input_shape
    lines = [
        "# Serving load test",
        "",
        f"`python -m serving.loadtest {args.export_dir}{' --server-args ' + repr(args.server_args) if args.server_args else ''}` "
        f"on {m['platform']}, {m['cpus']} CPUs (1-min load average {m['load_average_1min']} at the end), "
        f"Python {m['python']}, onnxruntime {m['onnxruntime']} ({', '.join(model.providers)}).",
        f"Model: run {model.run_name} ({model.manifest['dataset']}, {model.num_classes} classes, input [{c}, {h}, {w}]); "
        f"each request uploads one {h}x{w} PNG to `POST /v1/classes/0/score` of `slc serve` (uvicorn, one process).",
        f"Per level: at most {args.requests} timed requests or {args.duration:g} s, after {args.warmup} untimed "
        f"warm-up requests per server. Client (httpx, asyncio) and server share the machine over loopback.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + " --- |" * len(HEADER),
        *(format_row(row) for row in rows),
        "",
    ]
    failed = [row for row in rows if row["errors"]]
    if failed:
        lines += [f"First error ({failed[0]['graph']}, concurrency {failed[0]['concurrency']}): "
                  f"{failed[0]['first_error']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
