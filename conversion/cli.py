"""``python -m conversion``: convert DeepLabCut checkpoints (SuperAnimal, TF model zoo), publish them, benchmark.

    python -m conversion superanimal --dataset topviewmouse --pose-model hrnet_w32 \\
        --detector fasterrcnn_resnet50_fpn_v2 --out converted/ [--pose-checkpoint F.pt] \\
        [--detector-checkpoint F.pt] [--publish hf://org/repo | s3://bucket/prefix] [--catalog models] [--fp16]
    python -m conversion bench --video V.mp4 --catalog converted/ --pose-checkpoint F.pt ...
    python -m conversion modelzoo --name primate_face --out converted/ [--tarball F.tar.gz]
    python -m conversion bench-modelzoo --name primate_face --tarball F.tar.gz --catalog converted/ --video V.mp4
    python -m conversion publish-zoo --to hf://org/repo | s3://bucket/prefix [--catalog models] [--checkpoints DIR]
    python -m conversion quantize --model posezoo_mouse --labels CollectedData_Pranav.csv --store models
"""

from __future__ import annotations

import argparse
import json
import sys

from posezoo.errors import PosezooError

from .modelzoo import MODELS
from .superanimal import DATASETS, DETECTORS, POSE_MODELS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m conversion", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sa = sub.add_parser("superanimal", help="convert a SuperAnimal pose model and its detector to ONNX + cards")
    sa.add_argument("--dataset", required=True, choices=DATASETS)
    sa.add_argument("--pose-model", required=True, choices=POSE_MODELS)
    sa.add_argument("--detector", required=True, choices=DETECTORS)
    sa.add_argument("--out", required=True, help="catalog directory for <name>/1.0.0/{card.yaml, *.onnx}")
    sa.add_argument("--pose-checkpoint", default=None, help="local .pt (default: fetch from DeepLabCut's HF repo)")
    sa.add_argument("--detector-checkpoint", default=None, help="local .pt (default: fetch from DeepLabCut's HF repo)")
    sa.add_argument("--fp16", action="store_true", help="also write a float16 pose model (<name>_fp16)")
    sa.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    sa.add_argument("--publish", default=None, metavar="hf://org/repo | s3://bucket/prefix")
    sa.add_argument("--catalog", default=None, help="catalog whose entries get the published sha256/revision")
    sa.add_argument("--layout-dir", default=None, help="hf://: lay the repository out here")
    sa.add_argument("--no-upload", action="store_true", help="hf://: lay out only (needs --layout-dir)")
    sa.add_argument("--revision", default=None, help="revision to record with --no-upload")

    mz = sub.add_parser("modelzoo", help="convert a DeepLabCut 2.x TensorFlow model-zoo tarball to ONNX + card")
    mz.add_argument("--name", required=True, choices=MODELS)
    mz.add_argument("--tarball", default=None, help="local .tar.gz (default: fetch from DeepLabCut's HF repo)")
    mz.add_argument("--out", required=True, help="catalog directory for <name>/1.0.0/{card.yaml, <name>.onnx}")
    mz.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs DeepLabCut TF check")

    pz = sub.add_parser("publish-zoo", help="convert, verify and publish every catalog entry with an upstream "
                        "DeepLabCut checkpoint, with a Hugging Face model card; rewrites the catalog")
    pz.add_argument("--to", required=True, metavar="hf://org/repo | s3://bucket/prefix")
    pz.add_argument("--catalog", default="models", help="the catalog to publish and rewrite (default: models)")
    pz.add_argument("--checkpoints", default=None,
                    help="directory of upstream files under their upstream names (default: fetch from the Hub)")
    pz.add_argument("--work", default=None, help="keep the converted catalog here (default: a temporary directory)")
    pz.add_argument("--only", default=None, help="comma-separated entry names (a top-down model brings its detector)")
    pz.add_argument("--no-verify", action="store_true", help="skip the checks against DeepLabCut")
    pz.add_argument("--layout-dir", default=None, help="hf://: lay the repository out here")
    pz.add_argument("--no-upload", action="store_true", help="hf://: lay out only (needs --layout-dir)")
    pz.add_argument("--revision", default=None, help="revision to record with --no-upload")

    bt = sub.add_parser("bench-modelzoo", help="posezoo (ONNX Runtime) vs DeepLabCut's TF getpose, same network")
    bt.add_argument("--video", required=True)
    bt.add_argument("--name", required=True, choices=MODELS)
    bt.add_argument("--tarball", required=True)
    bt.add_argument("--catalog", required=True, help="the catalog the model was converted into")
    bt.add_argument("--frames", type=int, default=16)
    bt.add_argument("--threads", type=int, default=None)
    bt.add_argument("--json", action="store_true")

    qz = sub.add_parser("quantize", help="an INT8 (static QDQ) CPU variant of a posezoo heatmap model, calibrated on "
                        "its training frames, registered as <name>@<version>-int8 (posezoo.quantize)")
    qz.add_argument("--model", required=True, help="the fp32 zoo model, name[@version]")
    qz.add_argument("--labels", required=True, help="the CollectedData_<scorer>.csv/.h5 it was trained on")
    qz.add_argument("--store", default="models", help="catalog directory for <name>/<version>-int8/ (default: models)")
    qz.add_argument("--calibrate", default="minmax", choices=["minmax", "entropy", "percentile"])
    qz.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor (default: per channel)")
    qz.add_argument("--no-rewrite", action="store_true",
                    help="skip the exact fp32 rewrites (BatchNorm folding, ConvTranspose -> Conv + DepthToSpace)")
    qz.add_argument("--float-input", action="store_true", help="keep the float input (default: uint8 pixels in)")
    qz.add_argument("--quantize-head", action="store_true", help="quantise the output convolution too")
    qz.add_argument("--no-evaluate", action="store_true", help="do not evaluate the variant into its card")
    qz.add_argument("--threads", type=int, default=None)

    be = sub.add_parser("bench", help="posezoo (ONNX Runtime) vs DeepLabCut's PyTorch runner, same network and crops")
    be.add_argument("--video", required=True)
    be.add_argument("--dataset", default="topviewmouse", choices=DATASETS)
    be.add_argument("--pose-model", default="hrnet_w32", choices=POSE_MODELS)
    be.add_argument("--pose-checkpoint", required=True)
    be.add_argument("--onnx", required=True, help="the converted pose model")
    be.add_argument("--frames", type=int, default=32)
    be.add_argument("--animals", type=int, default=1, help="boxes (crops) per frame")
    be.add_argument("--batch-size", type=int, default=16, help="crops per network call (both runners)")
    be.add_argument("--threads", type=int, default=None)
    be.add_argument("--json", action="store_true")
    return parser


def _superanimal(args) -> int:
    from .superanimal import convert

    done = convert(args.dataset, args.pose_model, args.detector, args.out, pose_checkpoint=args.pose_checkpoint,
                   detector_checkpoint=args.detector_checkpoint, fp16=args.fp16, verify=not args.no_verify)
    for c in done:
        print(f"{c.card.ref}: {c.path} ({c.path.stat().st_size / 1e6:.1f} MB, sha256 {c.card.artefact.sha256[:12]}…, "
              f"{c.seconds:.1f} s)")
    if args.publish:
        from .publish import publish

        cards = publish(args.out, args.publish, catalog=args.catalog, layout_dir=args.layout_dir,
                        upload=not args.no_upload, revision=args.revision)
        for card in cards:
            print(f"published {card.ref} -> {card.artefact.locations[0]}@{card.artefact.revision or '-'}")
    return 0


def _bench(args) -> int:
    from .bench import bench_crops, format_result

    r = bench_crops(args.video, args.dataset, args.pose_model, args.pose_checkpoint, args.onnx, frames=args.frames,
                    animals=args.animals, batch_size=args.batch_size, threads=args.threads)
    print(json.dumps(r, indent=2) if args.json else format_result(r))
    return 0


def _modelzoo(args) -> int:
    from .modelzoo import convert
    from .pull import _checkpoint

    tarball = args.tarball
    if tarball is None:
        from posezoo.zoo import Zoo

        tarball = _checkpoint(Zoo().card(args.name), None)
    c = convert(args.name, tarball, args.out, verify_with_dlc=not args.no_verify)
    print(f"{c.card.ref}: {c.path} ({c.path.stat().st_size / 1e6:.1f} MB, {len(c.card.keypoints)} keypoints, "
          f"sha256 {c.card.artefact.sha256[:12]}…, {c.seconds:.1f} s)")
    return 0


def _publish_zoo(args) -> int:
    from .publish import publish_zoo

    cards = publish_zoo(args.to, catalog=args.catalog, checkpoints=args.checkpoints, work=args.work,
                        names=args.only.split(",") if args.only else None, verify=not args.no_verify,
                        upload=not args.no_upload, layout_dir=args.layout_dir, revision=args.revision)
    for card in cards:
        print(f"published {card.ref} -> {card.artefact.locations[0]}/{card.artefact.filename}"
              f"@{card.artefact.revision or '-'} (sha256 {card.artefact.sha256[:12]}…)")
    return 0


def _quantize(args) -> int:
    import shlex

    from posezoo.quantize import QuantRecipe, quantize_model

    recipe = QuantRecipe(per_channel=not args.per_tensor, calibrate_method=args.calibrate, rewrite=not args.no_rewrite,
                         uint8_input=not args.float_input, fp32_head=not args.quantize_head)
    command = "python -m conversion " + shlex.join(sys.argv[1:] if args.argv is None else args.argv)
    card = quantize_model(args.model, args.labels, args.store, recipe=recipe, evaluate=not args.no_evaluate,
                          command=command, threads=args.threads)
    test = (card.metrics or {}).get("test", {}).get("overall")
    base = (card.metrics or {}).get("fp32_test_overall")
    print(f"{card.ref}: {card.artefact.filename} ({card.artefact.bytes / 1e6:.2f} MB, sha256 "
          f"{card.artefact.sha256[:12]}…) in {args.store}/{card.name}/{card.version}"
          + (f"; test mean {test['mean_px']:.3f} px, PCK@5 {test['pck@5']:.1%}" if test else "")
          + (f" (fp32: {base['mean_px']:.3f} px, PCK@5 {base['pck@5']:.1%})" if test and base else ""))
    return 0


def _bench_modelzoo(args) -> int:
    from .bench import bench_modelzoo, format_modelzoo_result

    r = bench_modelzoo(args.video, args.tarball, args.catalog, args.name, frames=args.frames, threads=args.threads)
    print(json.dumps(r, indent=2) if args.json else format_modelzoo_result(r))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return {"superanimal": _superanimal, "bench": _bench, "modelzoo": _modelzoo,
                "bench-modelzoo": _bench_modelzoo, "publish-zoo": _publish_zoo,
                "quantize": _quantize}[args.command](args)
    except (OSError, RuntimeError, ValueError, PosezooError) as exc:
        print(f"conversion: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
