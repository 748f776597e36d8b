"""The ``posezoo`` command line.

Errors a user can fix (a missing file, a bad video, an unknown model...) are printed as
one ``posezoo: error: ...`` line with a non-zero exit status, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import PosezooError
from .table import FORMATS


def _formats(text: str) -> list[str]:
    fmts = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise argparse.ArgumentTypeError(f"unknown format(s) {bad or text!r}: choose from {','.join(FORMATS)}")
    return fmts


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posezoo", description="Animal pose estimation from a model zoo (ONNX Runtime).")
    sub = parser.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="list, show and pull zoo models").add_subparsers(dest="zoo_command", required=True)
    zl = zoo.add_parser("list", help="list the models of the catalog")
    zl.add_argument("--all", action="store_true", help="every version, not only the newest")
    zl.add_argument("--json", action="store_true")
    zs = zoo.add_parser("show", help="show a model card")
    zs.add_argument("name")
    zp = zoo.add_parser("pull", help="fetch and verify a model's artefact into the local cache")
    zp.add_argument("name")

    pr = sub.add_parser("predict", help="predict poses on videos")
    pr.add_argument("videos", nargs="+", metavar="VIDEO")
    pr.add_argument("--model", default="default", help="name[@version], alias, or card.yaml (default: the bundled model)")
    pr.add_argument("--out", default=".", help="output directory (default: current)")
    pr.add_argument("--format", type=_formats, default=["h5", "csv"], help=f"comma-separated: {','.join(FORMATS)}")
    pr.add_argument("--labeled-video", action="store_true", help="also write <video>_labeled.mp4 (H.264)")
    pr.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "tensorrt"])
    pr.add_argument("--batch-size", type=_positive, default=16)
    pr.add_argument("--threads", type=_positive, default=None, help="ONNX Runtime threads (default: all cores)")
    pr.add_argument("--filter", choices=["median", "savgol"], default=None, help="temporal filter of positions")
    pr.add_argument("--filter-window", type=_positive, default=5)
    pr.add_argument("--pcutoff", type=float, default=None, help="hide points below this likelihood in the video")
    pr.add_argument("--trail", type=int, default=0, help="draw trails of this many frames")
    pr.add_argument("--no-progress", action="store_true")

    be = sub.add_parser("bench", help="throughput, pipeline efficiency and memory on one video")
    be.add_argument("--model", default="default")
    be.add_argument("--video", required=True)
    be.add_argument("--batch-size", type=_positive, default=16)
    be.add_argument("--threads", type=_positive, default=None)
    be.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "tensorrt"])
    be.add_argument("--frames", type=_positive, default=None, help="only the first N frames")
    be.add_argument("--no-rss", action="store_true", help="skip the two peak-RSS subprocess runs")
    be.add_argument("--json", action="store_true")

    dv = sub.add_parser("demo-video", help="write a synthetic top-view mouse clip (with its ground truth)")
    dv.add_argument("out", help="output .mp4")
    dv.add_argument("--frames", type=_positive, default=150)
    dv.add_argument("--size", default="640x480", help="WIDTHxHEIGHT")
    dv.add_argument("--fps", type=float, default=30.0)
    dv.add_argument("--seed", type=int, default=0)
    return parser


def _zoo_cmd(args) -> int:
    from .zoo import default_zoo

    zoo = default_zoo()
    if args.zoo_command == "list":
        cards = zoo.cards(all_versions=args.all)
        if args.json:
            print(json.dumps([{"name": c.name, "version": c.version, "species": c.species, "task": c.task,
                               "keypoints": c.n_keypoints, "published": c.artefact.published,
                               "aliases": c.aliases} for c in cards], indent=2))
            return 0
        width = max([len(c.name) for c in cards] + [4])
        print(f"{'name':{width}s} {'version':9s} {'task':13s} {'kp':>3s}  {'species':22s} status")
        for c in cards:
            status = "ready" if c.artefact.published else "not published yet"
            kp = str(c.n_keypoints) if c.keypoints else ("-" if c.task == "detector" else "?")
            print(f"{c.name:{width}s} {c.version:9s} {c.task:13s} {kp:>3s}  {','.join(c.species)[:22]:22s} {status}")
        return 0
    if args.zoo_command == "show":
        import yaml

        print(yaml.safe_dump(zoo.card(args.name).model_dump(mode="json", exclude_none=True), sort_keys=False), end="")
        return 0
    resolved = zoo.resolve(args.name)
    print(f"{resolved.card.ref}: {resolved.path} (from {resolved.source}, sha256 verified)")
    return 0


def _predict_cmd(args) -> int:
    from .predictor import load
    from .render import render_labeled_video

    predictor = load(args.model, device=args.device, threads=args.threads)
    out = Path(args.out)
    failures = 0
    for video in args.videos:
        name = Path(video).stem
        try:
            table = predictor.predict_video(
                video, batch_size=args.batch_size, progress=not args.no_progress,
                filter=args.filter, filter_window=args.filter_window, allow_truncated=True,
            )
        except PosezooError as exc:
            print(f"posezoo: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        stem = f"{name}_{predictor.card.name}"
        paths = table.save(out, args.format, stem=stem)
        if args.labeled_video:
            pcut = args.pcutoff if args.pcutoff is not None else predictor.card.pcutoff
            paths["labeled_video"] = render_labeled_video(
                video, table, out / f"{name}_labeled.mp4", skeleton=predictor.card.skeleton,
                pcutoff=pcut, trail_length=args.trail,
            )
        t = table.metadata["timings"]
        print(f"{video}: {table.n_frames} frames, {t['fps']:.1f} frames/s, providers {','.join(predictor.providers)}"
              f" -> {', '.join(str(p) for k, p in paths.items() if k != 'meta')}")
        if "truncated" in table.metadata:
            print(f"posezoo: error: {table.metadata['truncated']['error']}; results cover the "
                  f"{table.n_frames} frames that decoded", file=sys.stderr)
            failures += 1
    return 1 if failures else 0


def _bench_cmd(args) -> int:
    from .bench import format_bench, run_bench
    from .predictor import DEFAULT_MODEL, load

    model = DEFAULT_MODEL if args.model == "default" else args.model
    predictor = load(model, device=args.device, threads=args.threads)
    result = run_bench(predictor, model, args.video, batch_size=args.batch_size, max_frames=args.frames,
                       rss=not args.no_rss, threads=args.threads)
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


def _demo_cmd(args) -> int:
    from .synthetic import make_mouse_video

    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise PosezooError(f"--size must look like 640x480, got {args.size!r}") from None
    truth = make_mouse_video(args.out, args.frames, w, h, args.fps, seed=args.seed)
    print(f"{args.out}: {len(truth)} frames of a synthetic mouse, {w}x{h} at {args.fps:g} fps")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"zoo": _zoo_cmd, "predict": _predict_cmd, "bench": _bench_cmd, "demo-video": _demo_cmd}
    try:
        return handlers[args.command](args)
    except PosezooError as exc:
        print(f"posezoo: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # output directory not writable, disk full...
        print(f"posezoo: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("posezoo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
