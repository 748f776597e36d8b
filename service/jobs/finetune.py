"""Fine-tune jobs: DeepLabCut labelled data (a zip) + a base zoo model -> a new model version,
registered in the catalog of the API key that asked for it.

At submission (the request waits, so that bad data is a 4xx): the zip is extracted safely
(:mod:`service.jobs.archive`), the labelled data is loaded and validated with
:mod:`posezoo.labelled` against the base model's card (keypoints, frame size, a held-out
split). In the training pool (one job at a time): ``validating`` again (cheap; the data may
come back from a restart), ``training`` and ``evaluating`` in a child process that runs
:func:`posezoo.training.train_model` (which trains, exports to ONNX, checks parity and
evaluates on the held-out frames with :mod:`posezoo.evaluate`), then ``registering``: the card
and its files move into ``DATA_DIR/catalogs/<key>/<name>/<version>/`` (the ONNX and checkpoint
go to S3 under ``RESULTS_S3_URI/models/<key>/`` when results live in S3).

Why a child process: PyTorch stays out of the API server (hundreds of MB, seconds of import);
a cancel or a shutdown kills the run at once instead of at the next step; a crash in training
cannot take the server down; the memory of a run is returned when it ends.

Nothing here imports PyTorch; :func:`unavailable_reason` checks for it with ``find_spec``.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from posezoo.errors import InputError, PosezooError

from .archive import ZipLimits, extract_zip
from .models import FinetuneOptions, JobRecord, ResultFile
from .uploads import UploadError

log = logging.getLogger("posezoo.jobs")

CATALOGS = "catalogs"


def unavailable_reason(settings=None) -> str | None:
    """Why fine-tune jobs cannot run on this server, or ``None``. Never imports PyTorch."""
    if settings is not None and not settings.finetune_enabled:
        return "fine-tuning is unavailable on this server: it is disabled (POSEZOO_SERVICE_FINETUNE_ENABLED=false)"
    if importlib.util.find_spec("torch") is None:
        return "fine-tuning is unavailable on this server: PyTorch is not installed (pip install 'posezoo[train]')"
    if importlib.util.find_spec("posezoo.training") is None:
        return "fine-tuning is unavailable on this server: posezoo's training package is not installed"
    return None


def owner_slug(owner: str) -> str:
    """A directory name for an API key's name (never the key)."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", owner) and owner not in (".", ".."):
        return owner
    import hashlib

    return "k-" + hashlib.sha256(owner.encode()).hexdigest()[:24]


def zip_limits(settings) -> ZipLimits:
    return ZipLimits(max_bytes=settings.max_finetune_unzipped_bytes, max_members=settings.max_finetune_members,
                     max_ratio=settings.max_finetune_ratio)


def _bad_data(exc: Exception, root: Path) -> UploadError:
    """A labelled-data error as a 422 whose message names the file inside the zip (not the server's path)."""
    text = str(exc)
    for r in {str(root) + "/", str(root.resolve()) + "/"}:
        text = text.replace(r, "")
    return UploadError(text, 422, "invalid_labelled_data")


@dataclass
class Plan:
    """What validation decided; everything the training run needs."""

    label_file: str  # relative to the extracted root
    keypoints: list[str]
    frames: int
    train_frames: int
    test_frames: list[str]  # file names of the held-out frames
    image_size: tuple[int, int]
    init: str  # "base" (the card's checkpoint) or "imagenet"
    input_hw: tuple[int, int]
    steps: int
    batch_size: int
    head_width: int | None


def find_label_file(root: Path) -> Path:
    """The one ``CollectedData_*.csv`` of the extracted archive."""
    csvs = sorted(p for p in root.rglob("CollectedData_*.csv") if p.is_file())
    h5s = sorted(p for p in root.rglob("CollectedData_*.h5") if p.is_file())
    if not csvs:
        if h5s:
            raise UploadError(
                f"{h5s[0].relative_to(root)}: send the CollectedData_<scorer>.csv that DeepLabCut writes beside the "
                ".h5; HDF5 label files are not read from uploads (PyTables may unpickle objects stored in them)",
                422, "invalid_labelled_data")
        raise UploadError("the zip holds no CollectedData_<scorer>.csv: zip a DeepLabCut labeled-data/<video>/ "
                          "folder (the label table and its PNG frames)", 422, "no_labelled_data")
    if len(csvs) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in csvs[:5])
        raise UploadError(f"the zip holds several label tables ({names}); send one labelled-data folder per job",
                          422, "invalid_labelled_data")
    return csvs[0]


def plan(root: Path, opts: FinetuneOptions, card, settings) -> Plan:
    """Validate the extracted labelled data against the base ``card`` and the server's limits.

    Raises :class:`UploadError` (4xx) naming the file (inside the zip) and the row.
    """
    from posezoo.labelled import check_keypoints, load_labelled, split_indices

    label = find_label_file(root)
    try:
        data = load_labelled(label)
    except InputError as exc:
        raise _bad_data(exc, root) from None
    if len(data) > settings.max_finetune_frames:
        raise UploadError(f"{label.relative_to(root)}: {len(data)} labelled frames, over this server's limit of "
                          f"{settings.max_finetune_frames}", 413, "too_large")
    ckpt = (card.training or {}).get("checkpoint")
    init = opts.init
    if init == "auto":
        init = "base" if ckpt else "imagenet"
    # From ImageNet weights the new model may keep a subset of the base's keypoints (those the
    # labels have, in the base's order; e.g. 4 of SuperAnimal's 27); from the base's own
    # checkpoint its head needs them all.
    unknown = [k for k in data.keypoints if k not in card.keypoints]
    try:
        if init == "base" or unknown:  # raises, naming what the card lacks or the labels miss
            data = check_keypoints(data, card.keypoints)
        else:
            data = data.select_keypoints([k for k in card.keypoints if k in data.keypoints])
    except InputError as exc:
        raise _bad_data(exc, root) from None
    labelled = int(data.visible.any(axis=1).sum())
    if labelled < 2:
        raise UploadError(f"{label.relative_to(root)}: {labelled} labelled frame(s); at least 2 are needed (one is "
                          "held out to evaluate the new model)", 422, "invalid_labelled_data")
    if init == "base" and not ckpt:
        raise UploadError(f"{card.ref}: its card records no training checkpoint, so it cannot be fine-tuned; "
                          "pass init=imagenet to train from ImageNet weights with its keypoints", 422,
                          "model_not_finetunable")
    if init == "base":
        if opts.head_width is not None:
            raise UploadError("head_width applies to an ImageNet start only (init=imagenet); fine-tuning keeps "
                              f"{card.ref}'s architecture", 422, "bad_options")
        cfg = (card.training or {}).get("config") or {}
        input_hw = tuple(cfg.get("input_hw") or (240, 320))
    else:
        input_hw = tuple(card.input.size) if card.input.size != "any" else (240, 320)
    w, h = data.image_size
    sw, sh = w / input_hw[1], h / input_hw[0]
    # a top-down model trains on crops of its input size around each animal: any frame size
    if card.task != "top_down" and abs(sw - sh) > 1e-6 * sw:
        raise UploadError(f"{label.relative_to(root)}: frames of {w}x{h} do not have the aspect ratio of "
                          f"{card.ref}'s {input_hw[1]}x{input_hw[0]} input", 422, "invalid_labelled_data")
    steps = opts.steps or settings.finetune_steps
    batch = opts.batch_size or settings.finetune_batch_size
    if steps > settings.max_finetune_steps:
        raise UploadError(f"steps={steps} is over this server's limit of {settings.max_finetune_steps}", 422,
                          "bad_options")
    if batch > settings.max_finetune_batch_size:
        raise UploadError(f"batch_size={batch} is over this server's limit of {settings.max_finetune_batch_size}",
                          422, "bad_options")
    fraction = max(opts.test_fraction, 0.6 / labelled)  # at least one held-out frame
    try:
        train, test = split_indices(data, test=opts.test, test_fraction=fraction, seed=opts.seed)
    except InputError as exc:
        raise _bad_data(exc, root) from None
    if len(test) == 0:
        raise UploadError("the held-out split is empty: every frame would be trained on", 422, "invalid_labelled_data")
    return Plan(str(label.relative_to(root)), list(data.keypoints), len(data), len(train),
                [data.paths[i].name for i in test], data.image_size, init, input_hw, steps, batch, opts.head_width)


# -- the training run (child process) ---------------------------------------------------------
class TrainingFailed(PosezooError):
    status = 422

    def __init__(self, message: str, code: str = "training_failed"):
        super().__init__(message)
        self.code = code


def child_spec(p: Plan, root: Path, card, name: str, version: str, work: Path, zoo, threads: int | None,
               seed: int, job_id: str, s3_store: str | None = None, s3_endpoint: str | None = None) -> dict:
    return {
        "job_id": job_id, "s3_store": s3_store, "s3_endpoint": s3_endpoint,
        "label_file": str(root / p.label_file),
        "keypoints": p.keypoints,
        "test": [glob.escape(n) for n in p.test_frames],
        "info": {"name": name, "version": version, "species": list(card.species), "view": card.view,
                 "description": f"{name}@{version}: fine-tuned from {card.ref} by a posezoo service job "
                                f"({p.train_frames} training frames, {p.steps} steps).",
                 "skeleton": [list(e) for e in card.skeleton if set(e) <= set(p.keypoints)],
                 "flip_pairs": [list(e) for e in card.flip_pairs if set(e) <= set(p.keypoints)],
                 "licence": card.licence or "Apache-2.0", "citation": card.citation or ""},
        "init": p.init, "base": card.ref,
        # the new model is decoded as its base is (test-time flip, one place per body part)
        "decoding": {"test_time_flip": bool(card.test_time_flip),
                     "exclusive_radius": card.outputs.exclusive_radius},
        # a top-down base: the new model's pose network is trained on crops, for the base's detector
        "top_down": ({"detector": card.detector, "max_individuals": card.max_individuals,
                      "crop": (card.top_down.model_dump() if card.top_down else {})}
                     if card.task == "top_down" else None),
        "zoo": {"catalogs": [str(c) for c in zoo.catalogs], "cache_dir": str(zoo.cache_dir),
                "s3_endpoint": zoo.s3_endpoint, "hf_cache_dir": zoo.hf_cache_dir},
        "config": (card.training or {}).get("config") if p.init == "base" else None,
        "overrides": {"steps": p.steps, "batch_size": p.batch_size, "threads": threads, "seed": seed,
                      "input_hw": list(p.input_hw), **({"head_width": p.head_width} if p.head_width else {})},
        "store": str(work / "stage"),
        "publish": str(work / "publish"),
        "workdir": str(work / "train"),
    }


def run_child(spec: dict, work: Path, on_event, cancelled, poll_s: float = 0.2) -> dict:
    """Run one training in ``python -m service.jobs.finetune_child``; ``on_event(dict)`` gets its
    progress; ``cancelled()`` is polled and kills the child when true (then ``on_event`` is told
    nothing more and the caller's own check raises). Returns the child's ``done`` event."""
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    err_path = work / "train.log"
    # the child imports service.jobs from the directory that holds service/, whatever its cwd
    here = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "PYTHONPATH": path}
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "service.jobs.finetune_child", str(spec_path)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=env,
                                cwd=str(work))
    lines: queue.Queue = queue.Queue()

    def reader():
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.put(raw)
        lines.put(None)

    t = threading.Thread(target=reader, name="posezoo-finetune-reader", daemon=True)
    t.start()
    done, failure = None, None
    try:
        while True:
            if cancelled():
                return {}
            try:
                raw = lines.get(timeout=poll_s)
            except queue.Empty:
                continue
            if raw is None:
                break
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            if ev.get("event") == "done":
                done = ev
            elif ev.get("event") == "error":
                failure = ev
            else:
                on_event(ev)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        t.join(timeout=5)
    if failure is not None:
        raise TrainingFailed(failure.get("detail") or "training failed", failure.get("code") or "training_failed")
    if done is None or proc.returncode != 0:
        tail = err_path.read_text(errors="replace").strip().splitlines()[-3:] if err_path.exists() else []
        log.error("fine-tune child exited with %s:\n%s", proc.returncode,
                  err_path.read_text(errors="replace")[-4000:] if err_path.exists() else "")
        raise TrainingFailed(f"the training process ended with status {proc.returncode}"
                             + (f": {tail[-1][:300]}" if tail else ""), "internal_error")
    return done


# -- registering ------------------------------------------------------------------------------
def next_version(zoo, name: str) -> str:
    """``1.0.N`` with the first N free for ``name`` in ``zoo``."""
    taken = {c.version for c in zoo.cards(all_versions=True) if c.name == name}
    n = 0
    while f"1.0.{n}" in taken:
        n += 1
    return f"1.0.{n}"


def publish(card_dir: Path, catalog: Path) -> Path:
    """Move the model directory the child prepared (card, and the ONNX and checkpoint unless they
    went to S3) into the key's ``catalog``; it appears all at once. Returns the card path."""
    from posezoo.cards import ModelCard

    card = ModelCard.from_yaml(card_dir / "card.yaml")
    dest = catalog / card.name / card.version
    if dest.exists():
        raise UploadError(f"{card.ref} already exists for this API key", 409, "conflict")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(card_dir, dest)
    return dest / "card.yaml"


def meta_document(card, job_id: str, base_ref: str, p: Plan) -> dict:
    tr = card.training or {}
    return {"model": card.ref, "base_model": base_ref, "job": job_id, "init": p.init, "plan": asdict(p),
            "metrics": card.metrics, "history": tr.get("history"), "seconds": tr.get("seconds"),
            "split": tr.get("split"), "card": card.model_dump(mode="json", exclude_none=True)}


def write_meta(doc: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "finetune.meta.json"
    path.write_text(json.dumps(doc, indent=2, default=str))
    return {"meta": path}


__all__ = ["Plan", "TrainingFailed", "child_spec", "extract_zip", "find_label_file", "meta_document", "next_version",
           "owner_slug", "plan", "publish", "run_child", "unavailable_reason", "write_meta", "zip_limits"]


# -- the job ----------------------------------------------------------------------------------
def default_name(card) -> str:
    return f"{card.name}-ft"[:64]


def check_target(zoo, name: str, version: str | None) -> None:
    """409 when ``name@version`` exists already for the key (its own models or the server's)."""
    if version is None:
        return
    if any(c.name == name and c.version == version for c in zoo.cards(all_versions=True)):
        raise UploadError(f"model {name}@{version} exists already; choose another name or version", 409, "conflict")


def run_job(m, rec: JobRecord, work: Path, tracker) -> dict[str, ResultFile]:
    """The worker's side of a fine-tune job (``m`` is the :class:`~service.jobs.JobManager`)."""
    from posezoo.cards import ModelCard

    opts = rec.finetune or FinetuneOptions()
    root = m.job_input(rec, work)
    if not root.is_dir():
        raise InputError("the uploaded labelled data is missing on the server; upload it again")
    tracker.stage("validating")
    zoo = m.zoo_for(rec.owner)
    zoo.refresh()
    card = zoo.card(rec.model)
    p = plan(root, opts, card, m.settings)
    name = opts.name or default_name(card)
    version = opts.version or next_version(zoo, name)
    check_target(zoo, name, version)
    s3_store = None
    if m.results.in_s3:
        key = "/".join(x for x in (m.results.prefix, "models", owner_slug(rec.owner)) if x)
        s3_store = f"s3://{m.results.bucket}/{key}"
    spec = child_spec(p, root, card, name, version, work, zoo, m.settings.finetune_threads or os.cpu_count() or 1,
                      opts.seed, rec.id, s3_store, m.settings.resolved_s3_endpoint)
    prog = rec.progress
    prog.step, prog.steps_total, prog.loss = 0, p.steps, None
    tracker.stage("training")
    t0: list[float] = []

    def on_event(ev: dict) -> None:
        tracker.check()
        kind = ev.get("event")
        if kind == "stage":
            prog.stage = ev["stage"]
            prog.fraction = {"training": 0.05, "evaluating": 0.9, "registering": 0.97}.get(ev["stage"], prog.fraction)
            if ev["stage"] != "training":
                prog.eta_s = None
            tracker._save(force=True)
        elif kind == "step":
            step, total = int(ev.get("step") or 0), int(ev.get("total") or p.steps)
            now = time.perf_counter()
            if not t0:
                t0.append(now)
                t0.append(step)
            prog.step, prog.steps_total = step, total
            if ev.get("loss") is not None:
                prog.loss = round(float(ev["loss"]), 6)
            prog.fraction = round(0.05 + 0.85 * min(step / max(total, 1), 1.0), 4)
            done = step - t0[1]
            prog.eta_s = round((total - step) * (now - t0[0]) / done, 1) if done > 0 else None
            tracker._save(force=step >= total)
        elif kind == "eval":
            rec.metrics = {**(rec.metrics or {}), "during_training": ev}
            tracker._save()

    done = run_child(spec, work, on_event, cancelled=tracker.cancel.is_set)
    tracker.check()
    prog.stage, prog.fraction = "registering", 0.97
    tracker._save(force=True)
    card_path = publish(Path(done["card_dir"]), m.owner_catalog(rec.owner))
    if m.shared is not None:  # the other replicas' zoos for this key see it too
        m.shared.push_card(owner_slug(rec.owner), card_path)
    m.forget_owner_zoo(rec.owner)
    final = ModelCard.from_yaml(card_path)
    rec.output_model = final.ref
    rec.metrics = final.metrics
    start = f"fine-tuned from {card.ref}" if p.init == "base" else f"ImageNet start with the keypoints of {card.ref}"
    rec.notes.append(f"registered {final.ref} for this API key ({start}; {p.train_frames} training and "
                     f"{len(p.test_frames)} held-out frames, {p.steps} steps)")
    files = write_meta(meta_document(final, rec.id, card.ref, p), work / "out")
    return m.results.store(rec.id, files)
