"""The ``posezoo`` command line.

Errors a user can fix (a missing file, a bad video, an unknown model...) are printed as
one ``posezoo: error: ...`` line with a non-zero exit status, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import InputError, PosezooError
from .table import FORMATS

#: --device: where ONNX Runtime runs (tensorrt:fp16 lets TensorRT use half precision)
DEVICE_CHOICES = ["auto", "cpu", "cuda", "tensorrt", "tensorrt:fp16"]


def _formats(text: str) -> list[str]:
    fmts = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise argparse.ArgumentTypeError(f"unknown format(s) {bad or text!r}: choose from {','.join(FORMATS)}")
    return fmts


def _extensions(text: str) -> list[str]:
    exts = [e.strip().lower().lstrip(".") for e in text.split(",") if e.strip()]
    if not exts:
        raise argparse.ArgumentTypeError("give extensions like mp4,avi")
    return exts


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

    pr = sub.add_parser("predict", help="predict poses on videos",
                        description="Results are named the DeepLabCut way: <video><scorer>.h5/.csv/_meta.pickle, "
                                    "<video><scorer>_filtered.h5, <video><scorer>_labeled.mp4 (see the README's "
                                    "DeepLabCut section).")
    pr.add_argument("videos", nargs="+", metavar="VIDEO", help="video files, folders of videos or glob patterns")
    pr.add_argument("--video-extensions", type=_extensions, default=None,
                    help="for folders and globs: comma-separated extensions (default: DeepLabCut's video types)")
    pr.add_argument("--model", default="default", help="name[@version], alias, or card.yaml (default: the bundled model)")
    pr.add_argument("--species", default=None, help="instead of --model: the zoo's recommended ready model for this "
                                                    "species (mouse, dog, horse, primate, ...)")
    pr.add_argument("--view", default=None, help="with --species: camera view (top, side, face)")
    pr.add_argument("--precision", default="fp32", choices=["fp32", "int8"],
                    help="the model's fp32 artefact or its INT8 (static-quantised, CPU) variant")
    pr.add_argument("--out", default=None,
                    help="output directory (default: beside each video, where DeepLabCut's tools look)")
    pr.add_argument("--format", type=_formats, default=["h5", "csv"], help=f"comma-separated: {','.join(FORMATS)}")
    pr.add_argument("--labeled-video", action="store_true", help="also write <video><scorer>_labeled.mp4 (H.264)")
    pr.add_argument("--overwrite", action="store_true",
                    help="analyse again videos whose results exist (default: skip them, as DeepLabCut does)")
    pr.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    pr.add_argument("--batch-size", type=_positive, default=16)
    pr.add_argument("--threads", type=_positive, default=None, help="ONNX Runtime threads (default: all cores)")
    pr.add_argument("--filter", choices=["median", "savgol"], default=None,
                    help="also write <video><scorer>_filtered.h5 (temporally filtered positions) beside the raw table")
    pr.add_argument("--filter-window", type=_positive, default=5)
    pr.add_argument("--pcutoff", type=float, default=None, help="hide points below this likelihood in the video")
    pr.add_argument("--trail", type=int, default=0, help="draw trails of this many frames")
    pr.add_argument("--no-progress", action="store_true")
    pr.add_argument("--max-frames", type=_positive, default=None,
                    help="only the first N frames (the labelled video too)")
    pr.add_argument("--detector-every", type=_positive, default=1,
                    help="top-down models: run the detector every N frames, boxes carried from poses in between")
    pr.add_argument("--max-individuals", type=_positive, default=None, help="top-down models: animals per frame")
    pr.add_argument("--draw-boxes", action="store_true", help="top-down models: draw each animal's box in the video")

    def precisions(text: str) -> list[str]:  # bench --precision fp32,int8
        wanted = [p.strip().lower() for p in text.split(",") if p.strip()]
        if not wanted or len(set(wanted)) != len(wanted) or not set(wanted) <= {"fp32", "int8"}:
            raise argparse.ArgumentTypeError(f"give fp32, int8 or fp32,int8; got {text!r}")
        return wanted

    be = sub.add_parser("bench", help="throughput, pipeline efficiency and memory on one video")
    be.add_argument("--model", default="default")
    be.add_argument("--video", required=True)
    be.add_argument("--batch-size", type=_positive, default=16)
    be.add_argument("--threads", type=_positive, default=None)
    be.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    be.add_argument("--precision", type=precisions, default=["fp32"],
                    help="fp32, int8 (the model's static-quantised CPU variant) or both, comma-separated "
                         "(fp32,int8: measured in one run, with the speed-up)")
    be.add_argument("--frames", type=_positive, default=None, help="only the first N frames")
    be.add_argument("--no-rss", action="store_true", help="skip the two peak-RSS subprocess runs")
    be.add_argument("--json", action="store_true")

    dv = sub.add_parser("demo-video", help="write a synthetic top-view mouse clip (with its ground truth)")
    dv.add_argument("out", help="output .mp4")
    dv.add_argument("--frames", type=_positive, default=150)
    dv.add_argument("--size", default="640x480", help="WIDTHxHEIGHT")
    dv.add_argument("--fps", type=float, default=30.0)
    dv.add_argument("--seed", type=int, default=0)
    _add_training_commands(sub)
    _add_remote_parser(sub)
    return parser


def _zoo_cmd(args) -> int:
    from .zoo import default_zoo

    zoo = default_zoo()
    if args.zoo_command == "list":
        cards = zoo.cards(all_versions=args.all)
        if args.json:
            print(json.dumps([{"name": c.name, "version": c.version, "species": c.species, "view": c.view,
                               "task": c.task, "keypoints": c.n_keypoints, "speed": c.speed,
                               "published": c.artefact.published, "ready": zoo.ready(c), "aliases": c.aliases}
                              for c in cards], indent=2))
            return 0
        width = max([len(c.name) for c in cards] + [4])
        print(f"{'name':{width}s} {'version':9s} {'task':13s} {'species':18s} {'view':5s} {'kp':>3s} {'speed':6s} status")
        for c in cards:
            status = "ready" if zoo.ready(c) else ("not published yet" if not c.artefact.published
                                                   else "detector not published yet")
            kp = str(c.n_keypoints) if c.keypoints else ("-" if c.task == "detector" else "?")
            print(f"{c.name:{width}s} {c.version:9s} {c.task:13s} {','.join(c.species)[:18]:18s} {c.view:5s} "
                  f"{kp:>3s} {c.speed or '-':6s} {status}")
        return 0
    if args.zoo_command == "show":
        import yaml

        print(yaml.safe_dump(zoo.card(args.name).model_dump(mode="json", exclude_none=True), sort_keys=False), end="")
        return 0
    for resolved in zoo.pull(args.name):  # converts unpublished SuperAnimal models with posezoo[conversion]
        print(f"{resolved.card.ref}: {resolved.path} (from {resolved.source}, sha256 verified)")
    return 0


def _predict_cmd(args) -> int:
    from .filtering import check_filter
    from .predictor import load
    from .video import VIDEO_EXTENSIONS, collect_videos
    from .zoo import default_zoo

    if args.filter:
        check_filter(args.filter, args.filter_window)
    videos = collect_videos(args.videos, args.video_extensions or VIDEO_EXTENSIONS)
    model = args.model
    if args.species:
        if args.model != "default":
            raise InputError("give --model or --species, not both")
        card = default_zoo().recommend(args.species, args.view)
        model = card.ref
        print(f"posezoo: {args.species}{f' ({args.view} view)' if args.view else ''}: using {card.ref} "
              f"({card.view} view, {card.n_keypoints} keypoints, {card.speed or '?'})", file=sys.stderr)
    elif args.view:
        raise InputError("--view goes with --species")
    predictor = load(model, device=args.device, threads=args.threads, precision=args.precision)
    failures = 0
    for video in videos:
        out = Path(args.out) if args.out else video.parent
        try:
            failures += _predict_one(args, predictor, video, out)
        except PosezooError as exc:
            print(f"posezoo: error: {exc}", file=sys.stderr)
            failures += 1
    return 1 if failures else 0


def _predict_one(args, predictor, video: Path, out: Path) -> int:
    """Analyse one video as DeepLabCut's analyze_videos (+ filterpredictions, create_labeled_video)
    would; returns 1 when its results are incomplete (a truncated video), else 0."""
    import time
    from dataclasses import replace

    from .dlc import output_stem, scorer_name
    from .filtering import filter_poses
    from .predictor import _progress, fit_warning
    from .render import render_labeled_video
    from .table import PoseTable

    card = predictor.card
    scorer = scorer_name(card, getattr(getattr(predictor, "detector", None), "card", None))
    stem = output_stem(video, scorer)
    first = out / f"{stem}.{args.format[0]}"
    wanted = [out / f"{stem}.{f}" for f in args.format] + ([out / f"{stem}_filtered.h5"] if args.filter else [])
    if not args.overwrite and all(p.exists() for p in wanted):
        print(f"{video}: already analysed ({first}); --overwrite analyses it again")
        if not args.labeled_video or (out / _labeled_name(stem, args.filter)).exists():
            return 0
        if first.suffix not in (".h5", ".csv"):
            raise InputError(f"{video}: its labelled video needs the h5 or csv table; add h5 to --format")
        table = PoseTable.load(out / f"{stem}_filtered.h5" if args.filter else first)
        paths: dict[str, Path] = {}
    else:
        top_down = {"detector_every": args.detector_every, "max_individuals": args.max_individuals} \
            if card.task == "top_down" else {}
        table = predictor.predict_video(
            video, batch_size=args.batch_size, progress=not args.no_progress, allow_truncated=True,
            max_frames=args.max_frames, **top_down,
        )
        paths = table.save(out, args.format, stem=stem)
        if args.filter:
            filtered = replace(table, data=filter_poses(table.data, args.filter, args.filter_window)).with_metadata(
                filter={"method": args.filter, "window": args.filter_window})
            paths["filtered"] = filtered.save(out, ["h5"] + (["csv"] if "csv" in args.format else []),
                                              stem=f"{stem}_filtered", dlc_meta=False)["h5"]
            table = filtered
        t = table.metadata["timings"]
        print(f"{video}: {table.n_frames} frames, {t['fps']:.1f} frames/s, providers {','.join(predictor.providers)}"
              f" -> {', '.join(str(p) for k, p in paths.items() if k not in ('meta', 'dlc_meta'))}")
    if args.labeled_video:
        pcut = args.pcutoff if args.pcutoff is not None else card.pcutoff
        bar, update = _progress(not args.no_progress, min(table.n_frames, args.max_frames or table.n_frames),
                                "labelled video")
        start = time.perf_counter()
        try:
            target = render_labeled_video(
                video, table, out / _labeled_name(stem, args.filter), skeleton=card.skeleton, pcutoff=pcut,
                trail_length=args.trail, draw_boxes=args.draw_boxes, progress=update,
                max_frames=args.max_frames if args.max_frames is not None else table.n_frames,
            )
        finally:
            if bar is not None:
                bar.close()
        took = time.perf_counter() - start
        print(f"{video}: labelled video {target}: {table.n_frames} frames in {took:.1f} s "
              f"({table.n_frames / max(took, 1e-9):.1f} frames/s)")
    if not paths:
        return 0
    warning = fit_warning(card, table.metadata.get("fit", {}))
    if warning:
        print(f"posezoo: warning: {video}: {warning}", file=sys.stderr)
    if "truncated" in table.metadata:
        print(f"posezoo: error: {table.metadata['truncated']['error']}; results cover the "
              f"{table.n_frames} frames that decoded", file=sys.stderr)
        return 1
    return 0


def _labeled_name(stem: str, filtered: str | None) -> str:
    return f"{stem}_filtered_labeled.mp4" if filtered else f"{stem}_labeled.mp4"


def _bench_cmd(args) -> int:
    from .bench import format_bench, run_bench
    from .predictor import DEFAULT_MODEL, load

    model = DEFAULT_MODEL if args.model == "default" else args.model
    predictors = {p: load(model, device=args.device, threads=args.threads, precision=p) for p in args.precision}
    if len(predictors) > 1:
        from .bench import format_bench_precisions, run_bench_precisions

        result = run_bench_precisions(predictors, args.video, batch_size=args.batch_size, max_frames=args.frames,
                                      rss=not args.no_rss, threads=args.threads)
        print(json.dumps(result, indent=2) if args.json else format_bench_precisions(result))
        return 0
    predictor = predictors[args.precision[0]]
    if args.precision[0] != "fp32":
        model = predictor.card.ref
    if predictor.card.task == "top_down":  # crops/s, detector, end-to-end with the detector every N frames
        from .topdown import bench_top_down, format_top_down_bench

        result = bench_top_down(predictor, args.video, frames=args.frames or 32, batch_size=args.batch_size)
        print(json.dumps(result, indent=2) if args.json else format_top_down_bench(result))
        return 0
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


# -- training and evaluation (posezoo[train] for `train`; `evaluate` is torch-free) ----------
def _pairs(text: str) -> list[tuple[str, str]]:
    """``"a-b,c-d"`` -> ``[("a", "b"), ("c", "d")]``."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        a, sep, b = item.partition("-")
        if not sep or not a.strip() or not b.strip():
            raise argparse.ArgumentTypeError(f"pairs look like a-b,c-d; got {item!r}")
        out.append((a.strip(), b.strip()))
    return out


def _input_size(text: str) -> tuple[int, int]:
    """``"480x360"`` (width x height) -> ``(360, 480)`` (the card's ``(height, width)``)."""
    w, sep, h = text.lower().partition("x")
    try:
        size = (int(h), int(w))
    except ValueError:
        size = None
    if not sep or size is None or min(size) < 32:
        raise argparse.ArgumentTypeError(f"an input size looks like 480x360 (width x height, at least 32); got {text!r}")
    return size


def _add_training_commands(sub) -> None:
    tr = sub.add_parser("train", help="train a model on DeepLabCut labelled frames (needs posezoo[train])")
    tr.add_argument("labelled", metavar="LABELLED_DATA", help="CollectedData_<scorer>.csv/.h5 or its folder")
    tr.add_argument("--name", required=True, help="model name, e.g. posezoo_mouse")
    tr.add_argument("--version", default="0.1.0")
    tr.add_argument("--store", default="models", help="catalog dir, file:///dir, s3://bucket/prefix or hf://org/repo")
    tr.add_argument("--catalog", default=None, help="where the card goes for a remote store")
    tr.add_argument("--species", default="mouse", help="comma-separated")
    tr.add_argument("--view", default="any", help="camera view of the training frames (top, side, face, ...)")
    tr.add_argument("--priority", type=int, default=0,
                    help="rank among the ready models of its species and view (posezoo predict --species)")
    tr.add_argument("--alias", action="append", default=[], help="alias of the model (repeatable)")
    tr.add_argument("--keypoints", default=None, help="comma-separated subset/order (default: all labelled)")
    tr.add_argument("--skeleton", type=_pairs, default=[], help="edges a-b,c-d")
    tr.add_argument("--flip-pairs", type=_pairs, default=[], help="left/right pairs swapped by mirroring: a-b,...")
    tr.add_argument("--test", action="append", default=None, metavar="GLOB",
                    help="test frames by glob on the image name/path (repeatable), e.g. 'img01[01]*'")
    tr.add_argument("--test-fraction", type=float, default=0.05, help="random test share when --test is not given")
    tr.add_argument("--init", default=None, help="fine-tune from a checkpoint .pt or a zoo model (default: ImageNet)")
    tr.add_argument("--steps", type=_positive, default=None)
    tr.add_argument("--batch-size", type=_positive, default=None)
    tr.add_argument("--lr", type=float, default=None)
    tr.add_argument("--input-size", type=_input_size, default=None, metavar="WxH",
                    help="network input, e.g. 480x360 (default: TrainConfig's 320x240); the frames must have "
                         "its aspect ratio")
    tr.add_argument("--freeze-blocks", type=int, default=None,
                    help="keep the stem and the first N backbone blocks frozen (default: TrainConfig's)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--threads", type=_positive, default=None, help="PyTorch threads (default: all cores)")
    tr.add_argument("--workdir", default=None, help="checkpoints and exports (default: a temporary dir)")
    tr.add_argument("--test-time-flip", action="store_true",
                    help="card: average each frame's outputs with its left/right mirror's (2x network time)")
    tr.add_argument("--exclusive-radius", type=int, default=0, metavar="CELLS",
                    help="card: two keypoints cannot both peak within this many heatmap cells; the one "
                         "lower there moves (default 0: off)")
    tr.add_argument("--pseudo-video", default=None, metavar="VIDEO",
                    help="also train on a teacher model's confident keypoints in frames of this unlabelled "
                         "video (video adaptation)")
    tr.add_argument("--pseudo-teacher", default=None, metavar="MODEL",
                    help="the model that labels --pseudo-video (default: the --init zoo model)")
    tr.add_argument("--pseudo-frames", type=_positive, default=300,
                    help="at most this many frames, evenly spaced over the video (default 300)")
    tr.add_argument("--pseudo-min-likelihood", type=float, default=0.6,
                    help="teacher points under this likelihood are not targets (default 0.6)")
    tr.add_argument("--no-progress", action="store_true")

    cl = sub.add_parser("check-labels", help="find labelled frames whose left/right pairs are swapped "
                                             "(top or bottom views)")
    cl.add_argument("labelled", metavar="LABELLED_DATA", help="CollectedData_<scorer>.csv/.h5 or its folder")
    cl.add_argument("--head", required=True, help="head end of the body axis, e.g. snout")
    cl.add_argument("--tail", required=True, help="tail end of the body axis, e.g. tailbase")
    cl.add_argument("--pairs", type=_pairs, required=True, help="left/right pairs: leftear-rightear,...")

    ev = sub.add_parser("evaluate", help="pixel error, RMSE and PCK of a model on DeepLabCut labelled frames")
    ev.add_argument("model", metavar="MODEL", help="name[@version], alias or card.yaml")
    ev.add_argument("labelled", metavar="LABELLED_DATA", help="CollectedData_<scorer>.csv/.h5 or its folder")
    ev.add_argument("--test", action="append", default=None, metavar="GLOB",
                    help="test frames (default: the split recorded in the model card)")
    ev.add_argument("--out", default=None, help="write evaluation.json and a PNG grid of test frames here")
    ev.add_argument("--threads", type=_positive, default=None)
    ev.add_argument("--device", default="cpu", choices=DEVICE_CHOICES)
    ev.add_argument("--json", action="store_true")


def _train_cmd(args) -> int:
    try:
        from .training import ModelInfo, TrainConfig, train_model
    except ImportError as exc:  # torch missing (or broken)
        raise PosezooError(f"`posezoo train` needs PyTorch: install posezoo[train] ({exc})") from None
    import dataclasses

    from .training.pipeline import command_line

    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr),
                                   ("freeze_blocks", args.freeze_blocks), ("input_hw", args.input_size))
                 if v is not None}
    cfg = dataclasses.replace(TrainConfig(), seed=args.seed, threads=args.threads, **overrides)
    pseudo = None
    if args.pseudo_video:
        from .training.pseudo import PseudoLabelSpec

        teacher = args.pseudo_teacher or args.init
        if not teacher or teacher.endswith(".pt"):
            raise InputError("--pseudo-video needs a zoo model to label it: --pseudo-teacher MODEL "
                             "(or --init MODEL)")
        pseudo = PseudoLabelSpec(video=args.pseudo_video, teacher=teacher, n_frames=args.pseudo_frames,
                                 min_likelihood=args.pseudo_min_likelihood)
    info = ModelInfo(name=args.name, version=args.version,
                     species=tuple(s.strip() for s in args.species.split(",") if s.strip()), view=args.view,
                     priority=args.priority,
                     aliases=tuple(args.alias), skeleton=tuple(args.skeleton), flip_pairs=tuple(args.flip_pairs))
    card = train_model(args.labelled, info, args.store, cfg=cfg, test=args.test, test_fraction=args.test_fraction,
                       keypoints=[k.strip() for k in args.keypoints.split(",")] if args.keypoints else None,
                       init=args.init, workdir=args.workdir, catalog=args.catalog,
                       command=command_line(sys.argv[1:] if args.argv is None else args.argv),
                       progress=not args.no_progress, test_time_flip=args.test_time_flip,
                       exclusive_radius=args.exclusive_radius, pseudo=pseudo)
    print(f"{card.ref}: registered in {args.store} (sha256 {card.artefact.sha256[:12]}…)")
    return 0


def _check_labels_cmd(args) -> int:
    """Exit status 0 when no frame has a pair swapped; 1 when one has (listed) or on bad input."""
    from .checks import left_right_check
    from .labelled import load_labelled

    data = load_labelled(args.labelled, check_images=False)
    report = left_right_check(data.coords, data.keypoints, head=args.head, tail=args.tail, pairs=args.pairs)
    print(f"{data.source}: {report.n_checked} of {len(data)} frames checked")
    for left, right in args.pairs:
        frames = [data.names[i] for i in report.swapped[left]]
        print(f"{left}/{right} swapped in {len(frames)} frame(s){': ' + ', '.join(frames) if frames else ''}")
    return 0 if report.ok else 1


def _evaluate_cmd(args) -> int:
    from .evaluate import evaluate_model, format_evaluation, write_report

    ev = evaluate_model(args.model, args.labelled, test=args.test, device=args.device, threads=args.threads)
    print(json.dumps(ev.as_dict(), indent=2) if args.json else format_evaluation(ev))
    if args.out:
        paths = write_report(ev, args.out)
        print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


# -- posezoo remote: the hosted service through posezoo.client --------------------------------
def _add_remote_parser(sub) -> None:
    rem = sub.add_parser("remote", help="use a posezoo server (the hosted service)").add_subparsers(
        dest="remote_command", required=True)

    def common(p):
        p.add_argument("--url", required=True, help="the server, e.g. http://localhost:3000")
        p.add_argument("--api-key", default=None, help="API key (default: $POSEZOO_API_KEY)")
        p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (not per job)")

    rp = rem.add_parser("predict", help="predict poses on a video on the server")
    rp.add_argument("video", metavar="VIDEO", help="a local video (uploaded) or s3://bucket/key")
    common(rp)
    rp.add_argument("--model", default=None, help="zoo model (default: the server's)")
    rp.add_argument("--out", default=".", help="output directory (default: current)")
    rp.add_argument("--format", type=_formats, default=["h5", "csv"], help=f"comma-separated: {','.join(FORMATS)}")
    rp.add_argument("--labeled-video", action="store_true", help="also download an H.264 labelled video")
    rp.add_argument("--batch-size", type=_positive, default=None)
    rp.add_argument("--filter", choices=["median", "savgol"], default=None)
    rp.add_argument("--pcutoff", type=float, default=None)
    rp.add_argument("--no-progress", action="store_true")
    rm = rem.add_parser("models", help="list the server's models")
    common(rm)
    rj = rem.add_parser("job", help="show a job")
    rj.add_argument("job_id")
    common(rj)
    rf = rem.add_parser("finetune", help="fine-tune a model on the server from a zip of DeepLabCut labelled data")
    rf.add_argument("zip", metavar="ZIP", help="a zip of labeled-data/<video>/ (CollectedData_<scorer>.csv + frames)")
    common(rf)
    rf.add_argument("--base-model", default=None, help="zoo model with the same keypoints (default: the server's)")
    rf.add_argument("--steps", type=_positive, default=None)
    rf.add_argument("--batch-size", type=_positive, default=None)
    rf.add_argument("--name", default=None)
    rf.add_argument("--version", default=None)
    rf.add_argument("--init", choices=["auto", "base", "imagenet"], default=None)
    rf.add_argument("--no-progress", action="store_true")
    rh = rem.add_parser("hash-key", help="print the sha256 of an API key, as the server configuration stores it")
    rh.add_argument("key")


def _remote_cmd(args) -> int:
    if args.remote_command == "hash-key":
        import hashlib  # as service.config.hash_api_key (which needs the service extra)

        print(hashlib.sha256(args.key.encode("utf-8")).hexdigest())
        return 0
    from .client import Client

    with Client(args.url, api_key=args.api_key, timeout=args.timeout,
                progress=not getattr(args, "no_progress", False)) as client:
        if args.remote_command == "models":
            for m in client.models():
                print(f"{m['ref']:45s} {'ready' if m['ready'] else 'not ready':9s} {','.join(m['species'])}")
            return 0
        if args.remote_command == "job":
            print(json.dumps(client.job(args.job_id), indent=2))
            return 0
        if args.remote_command == "finetune":
            job = client.finetune(args.zip, base_model=args.base_model, steps=args.steps, batch_size=args.batch_size,
                                  name=args.name, version=args.version, init=args.init)
            test = ((job.get("metrics") or {}).get("test") or {}).get("overall") or {}
            print(f"{args.zip}: registered {job['output_model']} on {args.url} (job {job['id']}); test mean "
                  f"{test.get('mean_px', float('nan')):.2f} px, PCK@10 {test.get('pck@10') or 0:.1%}")
            return 0
        result = client.predict(args.video, model=args.model, formats=args.format, labeled_video=args.labeled_video,
                                out=args.out, batch_size=args.batch_size, filter=args.filter, pcutoff=args.pcutoff)
    job = result.job
    print(f"{args.video}: {result.table.n_frames} frames on {args.url} (job {job['id']}, model {job['model']})"
          f" -> {', '.join(str(p) for k, p in result.paths.items() if k != 'meta')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    handlers = {"zoo": _zoo_cmd, "predict": _predict_cmd, "bench": _bench_cmd, "demo-video": _demo_cmd,
                "train": _train_cmd, "evaluate": _evaluate_cmd,
                "check-labels": _check_labels_cmd}
    handlers["remote"] = _remote_cmd
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
