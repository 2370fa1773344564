"""`slc index build|add` and `slc search`: an image search index of an export's features, and the
images of a class found in it (serving.index_build, serving.search)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from serving.cli_args import class_id_of, positive, public_key, read_images


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
