"""Load test of `slc serve` on loopback: requests/s and latency for single_logit.onnx vs model.onnx,
each without and with dynamic batching, measured in paired rounds.

    python -m serving.loadtest exports/batch_ce-s0 --out results/serving.md   # and results/serving.json

Every graph and batching setting gets a server in its own process, and all of them are up at once.
At each concurrency they are driven in `--rounds` rounds, each server once per round for a slice of
the request and time budgets, in a new seeded order each round: the figures of one round are seconds
apart, so full / single_logit is taken within a round and a drift of this shared machine's speed
between rounds does not look like the cost of a graph (a fixed order would charge whatever one
server leaves behind to the next). Every request is a real upload (one PNG of the model's input
size) through the whole HTTP path. Client and server share this machine's CPUs, so besides wall
time the CPU time each side spent per request is reported: it says where the time went even when
other work competes for the cores (the load average is printed too). The server's own /metrics say
how many images each onnxruntime call took, which is what batching changes.
The figures are written as JSON beside the Markdown (`serving.loadtest_report` renders both, and
the README's results section from that JSON).
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
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from serving.cli_args import positive_ms
from serving.loadtest_report import COLUMNS, paired_ratios, render
from serving.machine import machine_info
from serving.metrics import BATCH
from serving.model import GRAPHS, SingleLogitModel
from serving.probe import NotUp, wait_until_answers

POOL = 32            # distinct images sent in turn
STARTUP_TIMEOUT = 60.0
KEEPALIVE_EXPIRY_S = 2.0  # below uvicorn's timeout_keep_alive of 5 s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("results/serving.md"))
    parser.add_argument("--json", type=Path, default=None,
                        help="where the figures go as JSON (default: --out with .json, which the README reads)")
    parser.add_argument("--graphs", nargs="+", default=list(GRAPHS), choices=list(GRAPHS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=1000, help="timed requests per level and server at most")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per level and server at most")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds per level: each server gets 1/rounds of the budgets per round")
    parser.add_argument("--seed", type=int, default=0, help="seeds the order of the servers in each round")
    parser.add_argument("--warmup", type=int, default=50, help="untimed requests to each server before the levels")
    parser.add_argument("--server-args", default="", help="extra `slc serve` flags, e.g. '--onnx-threads 1'")
    parser.add_argument("--batch-wait-ms", type=positive_ms, default=2.0,
                        help="the batching setting measured beside no batching (`slc serve --batch-wait-ms`)")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= args.requests:
        parser.error(f"--rounds {args.rounds}: each round needs a request, so 1 <= rounds <= --requests "
                     f"({args.requests})")
    if len(set(args.concurrency)) != len(args.concurrency):
        parser.error(f"--concurrency {' '.join(map(str, args.concurrency))}: name each level once")
    model = SingleLogitModel.load(args.export_dir)
    pool = png_pool(model.input_shape)
    settings = [(graph, wait) for graph in args.graphs for wait in (None, args.batch_wait_ms)]
    orders = schedule(len(settings), args.concurrency, args.rounds, args.seed)
    levels = {}
    with ExitStack() as stack:  # every server up at once, so that each round drives them all
        servers = [stack.enter_context(Server(args.export_dir, graph, options=[
            *args.server_args.split(), *([] if wait is None else ["--batch-wait-ms", str(wait)])]))
            for graph, wait in settings]
        asyncio.run(warm_up(servers, pool, args.warmup, args.duration))
        for concurrency in args.concurrency:
            levels[concurrency] = [combine(rounds) for rounds in asyncio.run(drive_rounds(
                servers, pool, concurrency, orders[concurrency], budgets(args.requests, args.rounds),
                args.duration / args.rounds))]
            for (graph, wait), row in zip(settings, levels[concurrency]):
                print(f"graph={graph} batch_wait_ms={wait} concurrency={concurrency} "
                      + " ".join(f"{column}={row[column]}" for column in COLUMNS[3:]), file=sys.stderr)
    rows = [{"graph": graph, "batch_wait_ms": wait, "concurrency": concurrency, **levels[concurrency][i]}
            for i, (graph, wait) in enumerate(settings) for concurrency in args.concurrency]
    figures = {"settings": {"export_dir": str(args.export_dir), "server_args": args.server_args,
                            "batch_wait_ms": args.batch_wait_ms, "requests": args.requests,
                            "duration": args.duration, "rounds": args.rounds, "seed": args.seed,
                            "warmup": args.warmup},
               "model": {"run_name": model.run_name, "dataset": model.manifest.dataset,
                         "num_classes": model.num_classes, "input_shape": list(model.input_shape),
                         "providers": list(model.providers)},
               "machine": {**machine_info(), "httpx": httpx.__version__},  # after the load: its load average
               "rows": rows, "ratios": paired_ratios(rows)}
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


def schedule(servers: int, concurrencies: list[int], rounds: int, seed: int) -> dict[int, list[list[int]]]:
    """Per concurrency, each round's order of the servers (their indices): seeded, and never the order of
    the round before, so that no server always follows the same one."""
    rng = np.random.default_rng(seed)
    orders = {}
    for concurrency in concurrencies:
        orders[concurrency] = []
        for _ in range(rounds):
            order = rng.permutation(servers).tolist()
            while servers > 1 and orders[concurrency] and order == orders[concurrency][-1]:
                order = rng.permutation(servers).tolist()
            orders[concurrency].append(order)
    return orders


def budgets(requests: int, rounds: int) -> list[int]:
    """The request budget cut into `rounds` slices that differ by one at most and add up to it."""
    return [requests // rounds + (i < requests % rounds) for i in range(rounds)]


def client(server: Server, concurrency: int) -> httpx.AsyncClient:
    """A client whose idle connections close well before uvicorn's (5 s keep-alive): a connection idle
    while the other servers had their turn was otherwise reused just as the server closed it (ReadError)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency,
                          keepalive_expiry=KEEPALIVE_EXPIRY_S)
    return httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60.0)


async def warm_up(servers: list[Server], pool: list[bytes], requests: int, duration: float) -> None:
    for server in servers:
        async with client(server, 1) as http:
            await drive(http, pool, 1, requests, duration)


async def drive_rounds(servers: list[Server], pool: list[bytes], concurrency: int, orders: list[list[int]],
                       requests: list[int], duration: float) -> list[list[dict]]:
    """One level: in each round every server in that round's order, for that round's slice of the budgets.
    Each server keeps its own client (and connections) across rounds. Returns each server's rounds."""
    figures: list[list[dict]] = [[] for _ in servers]
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(client(server, concurrency)) for server in servers]
        for order, budget in zip(orders, requests):
            for position, i in enumerate(order):
                figures[i].append({"position": position,
                                   **await measure(servers[i], clients[i], pool, concurrency, budget, duration)})
    return figures


async def measure(server: Server, http: httpx.AsyncClient, pool: list[bytes], concurrency: int, requests: int,
                  duration: float) -> dict:
    """One server for one round: its latencies, and the onnxruntime calls, images and CPU seconds of server
    and client spent meanwhile (the server's /metrics are read outside that window)."""
    (calls, images), server_cpu, client_cpu = server.inference_images(), server.cpu_seconds(), _own_cpu_seconds()
    figures = await drive(http, pool, concurrency, requests, duration)
    figures |= {"server_cpu_s": server.cpu_seconds() - server_cpu, "client_cpu_s": _own_cpu_seconds() - client_cpu}
    calls_after, images_after = server.inference_images()
    return figures | {"calls": calls_after - calls, "images": images_after - images}


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def drive(http: httpx.AsyncClient, pool: list[bytes], concurrency: int, requests: int, duration: float) -> dict:
    """`concurrency` clients in a closed loop until `requests` are sent or `duration` seconds pass."""
    latencies, errors, sent = [], [], 0
    start = time.perf_counter()
    deadline = start + duration

    async def worker() -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            image = pool[sent % len(pool)]
            sent += 1
            began = time.perf_counter()
            try:
                response = await http.post("/v1/classes/0/score", files=[("files", ("x.png", image))])
            except httpx.HTTPError as error:
                errors.append(repr(error))
                continue
            if response.status_code != 200:
                errors.append(f"{response.status_code}: {response.text[:200]}")
                continue
            latencies.append(time.perf_counter() - began)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"latencies": latencies, "errors": errors, "seconds": time.perf_counter() - start}


def combine(rounds: list[dict]) -> dict:
    """A server's row at one level, over all its rounds (latency percentiles of every request, req/s over
    the seconds it was driven, CPU and images over its rounds' sums), then each round's own figures."""
    ms = np.concatenate([r["latencies"] for r in rounds]) * 1e3
    errors = [error for r in rounds for error in r["errors"]]
    answered, seconds = len(ms), sum(r["seconds"] for r in rounds)
    calls, images = sum(r["calls"] for r in rounds), sum(r["images"] for r in rounds)
    return {"requests": answered, "errors": len(errors), "first_error": errors[0] if errors else None,
            "seconds": round(seconds, 3), "rps": round(answered / seconds, 1), **percentiles(ms),
            "server_cpu_ms": round(sum(r["server_cpu_s"] for r in rounds) / max(answered, 1) * 1e3, 2),
            "client_cpu_ms": round(sum(r["client_cpu_s"] for r in rounds) / max(answered, 1) * 1e3, 2),
            "images_per_call": round(images / max(calls, 1), 2),
            "rounds": [{"position": r["position"], "requests": len(r["latencies"]), "seconds": round(r["seconds"], 3),
                        "rps": round(len(r["latencies"]) / r["seconds"], 1),
                        "p50_ms": percentiles(np.asarray(r["latencies"]) * 1e3)["p50_ms"]} for r in rounds]}


def percentiles(ms: np.ndarray) -> dict:
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 2) if len(ms) else None for q in (50, 99)}



if __name__ == "__main__":
    sys.exit(main())
