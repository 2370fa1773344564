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
from serving.errors import ExportError, InputError, SetupError, UnknownClassError
from serving.images import decode
from serving.limits import Limits
from serving.model import GRAPHS, SingleLogitModel
from serving.signing import PUBLIC_KEY_ENV, configured_key, describe

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


def search_parsers(commands) -> list[argparse.ArgumentParser]:
    """`slc index build|add` and `slc search` (serving.search): find every stored image of a class."""
    index = commands.add_parser("index", help="build or add to an image search index of an export's features")
    steps = index.add_subparsers(dest="step", required=True)
    build = steps.add_parser("build", help="index every image of SOURCE (resumes a stopped build)")
    build.add_argument("export_dir", type=Path)
    build.add_argument("source", type=Path, help="a folder of PNG/JPEG images, or an .npy/.npz of images (N first), "
                                                 "such as data/prepared/test_images.npy")
    build.add_argument("--out", type=Path, required=True, help="the index directory")
    build.add_argument("--index", default="flat", choices=["flat", "sq8"],
                       help="flat: exact float32 features (default); sq8: a byte a feature, logits approximate")
    build.add_argument("--batch-size", type=positive, default=256, help="images per backbone call")
    build.add_argument("--chunk-images", type=positive, default=8192,
                       help="images committed at a time: what a stopped build keeps")
    build.add_argument("--ray", action="store_true",
                       help="compute the features with Ray Data on the cluster at RAY_ADDRESS (default: a new local "
                            "one); the export and SOURCE must be at the same path on every node")
    build.add_argument("--actors", type=positive, default=None,
                       help="with --ray: Ray actors at most, one backbone and one CPU each (default: one per CPU but "
                            "one, which Ray Data's reads need)")
    build.set_defaults(run=run_index_build)
    add = steps.add_parser("add", help="add images to an index, all or none; searchable when it returns")
    add.add_argument("index_dir", type=Path)
    add.add_argument("images", nargs="+", type=Path, help="PNG/JPEG images or .npy arrays of images")
    add.set_defaults(run=run_index_add)
    search = commands.add_parser("search", help="every indexed image whose logit for a class reaches a threshold")
    search.add_argument("index_dir", type=Path)
    search.add_argument("--class", dest="class_", required=True, metavar="C", help="class id (0..k-1) or exact name")
    rule = search.add_mutually_exclusive_group()
    rule.add_argument("--recall", type=float, default=None, help="the class's threshold calibrated for this recall")
    rule.add_argument("--threshold", type=float, default=None, help="a logit threshold of your own")
    search.add_argument("--limit", type=positive, default=None,
                        help="at most N images (alone: the N best, whatever their logits)")
    search.add_argument("--offset", type=int, default=0, help="skip the N best first (paging)")
    search.add_argument("--json", action="store_true", help="print one JSON object for machines")
    search.set_defaults(run=run_search)
    return [build, add, search]


def positive(text: str) -> int:
    """argparse type of counts: a usage error (exit 2) names the flag and the value."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def positive_ms(text: str) -> float:
    """argparse type of a wait: 0 would be no wait, so leave the flag out for that."""
    return _positive_float(text, "milliseconds (leave the flag out to serve without batching)")


def positive_s(text: str) -> float:
    return _positive_float(text, "seconds")


def _positive_float(text: str, unit: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of {unit}")
    return value


def public_key(args) -> Path | None:
    return configured_key(args.public_key, PUBLIC_KEY_ENV)


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


def read_images(model: SingleLogitModel, paths: list[Path]) -> tuple[np.ndarray, list[str]]:
    """Image files and .npy batches -> one network input batch and a name per image (`batch.npy[3]`)."""
    names, parts = [], []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as error:
            raise InputError(f"cannot read {path}: {error.strerror}") from None
        part = model.prepare(decode(data, str(path), model.input_shape[1:]))
        names += [str(path)] if len(part) == 1 else [f"{path}[{i}]" for i in range(len(part))]
        parts.append(part)
    return np.concatenate(parts), names


def run_index_build(args) -> int:
    from serving.index_build import build

    manifest = build(args.export_dir, args.source, args.out, index=args.index, batch_size=args.batch_size,
                     chunk_images=args.chunk_images, on_ray=args.ray, actors=args.actors, public_key=public_key(args))
    print(f"{args.out}: {manifest.count} images of {manifest.build['source']} indexed ({manifest.kind}, "
          f"{manifest.feature_dim} features each) for {manifest.export['run_name']}")
    return 0


def run_index_add(args) -> int:
    from serving.search import SearchIndex

    index = SearchIndex.open(args.index_dir, public_key=public_key(args))
    images, names = read_images(index.model, args.images)
    ids = index.add(images, paths=names)
    print(f"{args.index_dir}: added {len(ids)} images as ids {ids.start}..{ids.stop - 1}; {len(index)} in all")
    return 0


def run_search(args) -> int:
    from serving.search import SearchIndex

    index = SearchIndex.open(args.index_dir, public_key=public_key(args))
    class_id = class_id_of(index.model, args.class_)
    hits = index.search(class_id, recall=args.recall, threshold=args.threshold, limit=args.limit, offset=args.offset)
    report = {"run_name": index.model.run_name, "class_id": class_id, "class_name": index.model.class_names[class_id],
              "recall": hits.recall, "threshold": hits.threshold, "total": hits.total, "offset": args.offset,
              "results": [{"id": int(i), "path": path, "logit": float(logit)}
                          for i, path, logit in zip(hits.ids, hits.paths, hits.logits)]}
    print(json.dumps(report, indent=2) if args.json else _search_text(report))
    return 0


def _search_text(report: dict) -> str:
    rule = (f"the best of {report['total']} images" if report["threshold"] is None else
            f"{report['total']} images with logit >= {report['threshold']:.6g}"
            + (f" (recall {report['recall']:g} on validation)" if report["recall"] is not None else ""))
    lines = [f"class {report['class_id']} ({report['class_name']}) of {report['run_name']}: {rule}; "
             f"showing {len(report['results'])} from {report['offset']}"]
    lines += [f"{r['id']:>10}  {r['logit']:>12.6g}  {r['path'] or ''}".rstrip() for r in report["results"]]
    return "\n".join(lines)


def _score_text(report: dict) -> str:
    rule = (f"decision: logit >= {report['threshold']:.6g} (recall {report['recall']:g} on validation)"
            if report["threshold"] is not None else "no calibrated threshold: logits only")
    lines = [f"class {report['class_id']} ({report['class_name']}) of {report['run_name']}; {rule}"]
    width = max(len(r["image"]) for r in report["results"])
    for r in report["results"]:
        decision = {True: "yes", False: "no", None: "-"}[r["decision"]]
        lines.append(f"{r['image']:<{width}}  {r['logit']:>12.6g}  {decision}")
    return "\n".join(lines)


def class_id_of(model: SingleLogitModel, text: str) -> int:
    """A class given by id or by exact name (`--class 3` or `--class Dress`)."""
    if text.lstrip("-").isdigit():
        class_id = int(text)
        model.class_ids(class_id, 1)
        return class_id
    if text in model.class_names:
        return model.class_names.index(text)
    raise UnknownClassError(f"no class named {text!r}: pass an id 0..{model.num_classes - 1} or one of "
                            f"{', '.join(map(repr, model.class_names[:10]))}{', ...' if model.num_classes > 10 else ''}")


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
