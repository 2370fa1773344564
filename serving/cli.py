"""`slc`: score images, describe an export, or serve it over HTTP, from the command line.

    slc score EXPORT_DIR --class 3 shirt.png boot.jpg batch.npy [--json]
    slc info EXPORT_DIR [--json]
    slc index build EXPORT_DIR SOURCE --out DIR [--index flat|sq8] [--batch-size N] [--chunk-images N]
                    [--ray [--actors N]]
    slc index add DIR image.png batch.npy ...
    slc search DIR --class C [--recall 0.9 | --threshold T] [--limit N] [--offset N] [--json]
    slc serve EXPORT_DIR [EXPORT_DIR ...] [--default-run RUN] [--host 127.0.0.1] [--port 8000] [--max-batch 256]
              [--request-threads N] [--onnx-threads N] [--batch-wait-ms MS] [--token-file PATH]
              [--max-header-bytes 16384] [--max-headers 100] [--request-timeout-s 60]
    (each with [--public-key PEM]: refuse an export its private key did not sign; SLC_PUBLIC_KEY too)

`slc serve` takes exports (exports/<run>), directories of them (exports/) or registered exports of the
MLflow Model Registry (models:/slc@champion, serving.registry) and serves every run; `slc info` takes
one of either.
Exit codes: 0 done, 2 bad arguments or settings, 3 a missing or tampered export (`EXIT_CODES`),
4 images, a class or a run that cannot be scored. The `serve` defaults are those of params.yaml's
`serving` section; `make serve` passes that section's values explicitly.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from pathlib import Path

import numpy as np

from serving.auth import ENV as TOKEN_ENV
from serving.auth import read_token
from serving.cli_args import class_id_of, positive, positive_ms, positive_s, public_key, read_images
from serving.errors import ExportError, InputError, SetupError
from serving.limits import Limits
from serving.model import GRAPHS, SingleLogitModel
from serving.search_cli import search_parsers
from serving.signing import PUBLIC_KEY_ENV, describe

# Error type -> exit status, most specific first (argparse itself exits with 2).
EXIT_CODES: dict[type[Exception], int] = {SetupError: 2, ExportError: 3, InputError: 4}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except tuple(EXIT_CODES) as error:
        print(f"slc {args.command}: {error}", file=sys.stderr)
        return next(code for cls, code in EXIT_CODES.items() if isinstance(error, cls))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="slc", description="Single logit classification with an exported model "
                                                          "(exports/<run_name>/ from `dvc repro`).")
    commands = top.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="the logit and decision of one class for each image")
    score.add_argument("export_dir", type=Path)
    score.add_argument("--class", dest="class_", required=True, metavar="C",
                       help="class id (0..k-1) or exact class name")
    score.add_argument("images", nargs="+", type=Path, help="PNG/JPEG images or .npy arrays of images")
    score.add_argument("--recall", type=float, default=None,
                       help="recall target whose calibrated threshold decides (default 0.99)")
    score.add_argument("--json", action="store_true", help="print one JSON object for machines")
    score.set_defaults(run=run_score)
    info = commands.add_parser("info", help="what the export holds (after checking every file)")
    info.add_argument("export_dir", help="an export directory, or models:/<name>@<alias> or models:/<name>/<version>")
    info.add_argument("--json", action="store_true", help="print the full description as JSON")
    info.set_defaults(run=run_info)
    serve = commands.add_parser("serve", help="serve exports over HTTP with uvicorn (OpenAPI docs at /docs)")
    serve.add_argument("sources", nargs="+", metavar="EXPORT_DIR",
                       help="an export (exports/<run>), a directory of them (exports/), or a registered one "
                            "(models:/<name>@<alias> or models:/<name>/<version>); each run is served")
    serve.add_argument("--default-run", default=None, metavar="RUN",
                       help="the run answered at /v1/classes/... (default: the first)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=positive, default=8000)
    serve.add_argument("--max-batch", type=positive, default=256, help="images taken per request at most")
    serve.add_argument("--request-threads", type=positive, default=None,
                       help="requests decoded and scored at once (default: one per CPU)")
    serve.add_argument("--onnx-threads", type=positive, default=None,
                       help="onnxruntime intra-op threads per inference, and with --index the threads (shards) "
                            "of a search (default: one per core)")
    serve.add_argument("--batch-wait-ms", type=positive_ms, default=None, metavar="MS",
                       help="share onnxruntime calls between concurrent requests, each waiting at most MS ms "
                            "for others (default: no batching)")
    serve.add_argument("--token-file", default=None, metavar="PATH",
                       help=f"require the bearer token in this file's first line ({TOKEN_ENV} wins over it)")
    serve.add_argument("--max-header-bytes", type=positive, default=Limits.max_header_bytes,
                       help="request line and header fields together, at most (431 beyond)")
    serve.add_argument("--max-headers", type=positive, default=Limits.max_headers,
                       help="header fields per request, at most (431 beyond)")
    serve.add_argument("--request-timeout-s", type=positive_s, default=Limits.request_timeout_s, metavar="S",
                       help="a request head must arrive within S s, its body and answer within S s more (408/503)")
    serve.add_argument("--index", type=Path, default=None, metavar="DIR",
                       help="also serve this search index of the default run (slc index build): "
                            "GET /v1/classes/{class_id}/search, POST /v1/index/images")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(run=run_serve)
    for command in (score, info, serve):
        command.add_argument("--graph", default="single_logit", choices=list(GRAPHS),
                             help="single_logit.onnx (default) or the full model.onnx")
    for command in (score, info, serve, *search_parsers(commands)):
        command.add_argument("--public-key", default=None, metavar="PEM",
                             help=f"refuse an export this elliptic-curve public key's private key did not sign "
                                  f"as it is ({PUBLIC_KEY_ENV} wins over it; default: signatures are not checked)")
    return top


def run_score(args) -> int:
    model = SingleLogitModel.load(args.export_dir, graph=args.graph, public_key=public_key(args))
    class_id = class_id_of(model, args.class_)
    images, names = read_images(model, args.images)
    result = model.classify(images, class_id, model.default_recall if args.recall is None else args.recall)
    threshold = None if np.isnan(result.thresholds[0]) else float(result.thresholds[0])
    decisions = result.decisions.tolist() if threshold is not None else [None] * len(names)
    report = {"run_name": model.run_name, "class_id": class_id, "class_name": model.class_names[class_id],
              "graph": model.graph, "recall": result.recall, "threshold": threshold,
              "results": [{"image": name, "logit": float(logit), "decision": decision}
                          for name, logit, decision in zip(names, result.logits, decisions)]}
    print(json.dumps(report, indent=2) if args.json else _score_text(report))
    return 0


def _score_text(report: dict) -> str:
    rule = (f"decision: logit >= {report['threshold']:.6g} (recall {report['recall']:g} on validation)"
            if report["threshold"] is not None else "no calibrated threshold: logits only")
    lines = [f"class {report['class_id']} ({report['class_name']}) of {report['run_name']}; {rule}"]
    width = max(len(r["image"]) for r in report["results"])
    for r in report["results"]:
        decision = {True: "yes", False: "no", None: "-"}[r["decision"]]
        lines.append(f"{r['image']:<{width}}  {r['logit']:>12.6g}  {decision}")
    return "\n".join(lines)


def run_info(args) -> int:
    from serving.registry import resolve

    key = public_key(args)
    export_dir = resolve(args.export_dir)  # a models:/ source: downloaded, its manifest checked against the registry
    model = SingleLogitModel.load(export_dir, graph=args.graph, public_key=key)
    description = model.describe()
    signature = describe(model.export_dir, key)
    if args.json:
        print(json.dumps({**description, "signature": signature}, indent=2))
        return 0
    names = description["class_names"]
    worst = max(description["max_abs_diff"].values(), default=float("nan"))
    print("\n".join([
        f"run          {description['run_name']} (loss {description['loss']}, dataset {description['dataset']})",
        f"input        image {description['input']['shape']} float32, normalisation {description['normalisation']}",
        f"classes      {description['num_classes']}: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}",
        f"thresholds   recall {', '.join(f'{r:g}' for r in description['recalls']) or 'none'}",
        f"graph        {description['graph_file']} (opset {description['opset']}) on {', '.join(description['providers'])}",
        f"verified     {len(model.manifest.files)} files match their sha256; max |ORT - PyTorch| at export {worst:.2e}",
        f"signature    {signature}",
    ]))
    return 0


def run_serve(args) -> int:
    import uvicorn

    from serving.batching import Batching
    from serving.bounded import bounded_h11
    from serving.http import create_app
    from serving.metrics import PrometheusMetrics
    from serving.registry import resolve
    from serving.runs import Runs

    token = read_token(args.token_file)  # a bad token file stops the server before anything is downloaded or loaded
    limits = Limits(args.max_header_bytes, args.max_headers, args.request_timeout_s)
    # models:/ sources downloaded (serving.registry); export directories, or directories of them (serving.runs.export_dirs)
    sources = [resolve(source) for source in args.sources]
    runs = Runs.load(sources, args.default_run, graph=args.graph, max_batch=args.max_batch, threads=args.onnx_threads,
                     public_key=public_key(args))
    others = f" and {len(runs.models) - 1} more run(s) at /v1/runs/<run>" if len(runs.models) > 1 else ""
    print(f"slc: serving {runs.default.run_name} ({args.graph}){others} on http://{args.host}:{args.port} "
          f"(docs at /docs)", file=sys.stderr)
    if token is None and not is_loopback(args.host):
        print(f"slc: WARNING: serving on {args.host}, which other machines can reach, without a token: anyone who "
              f"reaches port {args.port} can score images and read /metrics. Set {TOKEN_ENV} or --token-file "
              f"(params.yaml: serving.token_file) to require `Authorization: Bearer <token>`.", file=sys.stderr)
    index = None
    if args.index is not None:
        from serving.search import SearchIndex

        index = SearchIndex.open(args.index, runs.default, threads=args.onnx_threads)  # refused if another export's
    metrics = PrometheusMetrics()
    score = None if args.batch_wait_ms is None else Batching(metrics, args.batch_wait_ms)
    app = create_app(runs, request_threads=args.request_threads, score=score, token=token, metrics=metrics, limits=limits,
                     index=index)
    # h11, whose head limit BoundedH11 answers with 431 (httptools, uvicorn's default, reads a head of any size)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, http=bounded_h11(limits),
                h11_max_incomplete_event_size=limits.max_header_bytes)
    return 0


def is_loopback(host: str) -> bool:
    """Only this machine can reach the host (localhost, 127.0.0.0/8, ::1); 0.0.0.0 and names are reachable."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
