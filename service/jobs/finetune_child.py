"""One fine-tune run, in its own process: ``python -m service.jobs.finetune_child SPEC.json``.

Started by :func:`service.jobs.finetune.run_child` (the server never imports PyTorch itself).
Runs :func:`posezoo.training.train_model` into a staging catalog, records the base model and
the job in the card, publishes the files to S3 when asked, and reports on stdout, one JSON
object a line: ``{"event": "stage", "stage": ...}``, ``{"event": "step", "step", "total",
"loss"}``, ``{"event": "log", "text"}``, then ``{"event": "done", "card_dir"}`` or
``{"event": "error", "code", "detail"}``. Everything else goes to stderr. The process exits
when its parent (the server) dies.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

_OUT = None
_LOCK = threading.Lock()


def emit(**event) -> None:
    with _LOCK:
        _OUT.write(json.dumps(event) + "\n")
        _OUT.flush()


def _watch_parent(ppid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != ppid:
            os._exit(3)


class _StepBar:
    """Stands in for the tqdm bar of :func:`posezoo.training.loop.fit`: reports each step and
    the running loss (throttled to a few lines a second)."""

    def __init__(self, total=None, **_):
        self.total = total or 0
        self.n = 0
        self.loss = None
        self._last = 0.0

    def update(self, n=1):
        self.n += n

    def set_postfix(self, loss=None, **_):
        try:
            self.loss = float(loss) if loss is not None else self.loss
        except (TypeError, ValueError):
            pass
        now = time.monotonic()
        if now - self._last >= 0.25 or self.n >= self.total:
            self._last = now
            emit(event="step", step=self.n, total=self.total, loss=self.loss)

    def close(self):
        emit(event="step", step=self.n, total=self.total, loss=self.loss)
        if self.total and self.n >= self.total:
            emit(event="stage", stage="evaluating")  # export, parity check, registration, evaluation

    def __getattr__(self, name):  # any other tqdm method: a no-op
        return lambda *a, **k: None


def _config(spec: dict):
    import dataclasses

    from posezoo.training import TrainConfig
    from posezoo.training.data import AugmentConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    base = {k: v for k, v in (spec.get("config") or {}).items() if k in fields}
    if isinstance(base.get("augment"), dict):
        afields = {f.name for f in dataclasses.fields(AugmentConfig)}
        base["augment"] = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in base["augment"].items() if k in afields})
    else:
        base.pop("augment", None)
    ov = dict(spec["overrides"])
    base.update(ov)
    base["input_hw"] = tuple(base["input_hw"])
    steps = base["steps"]
    base["warmup_steps"] = max(1, min(int(base.get("warmup_steps", 100)), steps // 10 or 1))
    base["eval_every"] = max(1, steps // 10)
    base["checkpoint_every"] = steps  # one checkpoint, at the end
    if spec["init"] == "base":
        base["pretrained"] = False
    return TrainConfig(**base)


def run(spec: dict) -> Path:
    import tqdm.auto

    from posezoo.training import ModelInfo, train_model
    from posezoo.training.pipeline import resolve_init
    from posezoo.zoo import Zoo

    tqdm.auto.tqdm = _StepBar  # fit() imports its bar from here at call time
    cfg = _config(spec)
    z = spec["zoo"]
    zoo = Zoo([Path(c) for c in z["catalogs"]], include_bundled=False, cache_dir=z["cache_dir"],
              s3_endpoint=z.get("s3_endpoint"), hf_cache_dir=z.get("hf_cache_dir"))
    init = str(resolve_init(spec["base"], zoo)) if spec["init"] == "base" else None
    i = spec["info"]
    info = ModelInfo(name=i["name"], version=i["version"], species=tuple(i["species"]), view=i.get("view", "any"),
                     description=i["description"],
                     skeleton=tuple(tuple(e) for e in i["skeleton"]), flip_pairs=tuple(tuple(e) for e in i["flip_pairs"]),
                     licence=i["licence"], citation=i["citation"])
    emit(event="stage", stage="training")
    emit(event="step", step=0, total=cfg.steps, loss=None)

    def log(text):
        text = str(text)
        try:
            entry = json.loads(text)
        except ValueError:
            entry = None
        if isinstance(entry, dict) and "step" in entry:
            emit(event="eval", **entry)
        else:
            emit(event="log", text=text[:500])
        print(text, file=sys.stderr)

    top_down = None
    if spec.get("top_down"):
        from posezoo.cards import TopDownSpec
        from posezoo.training import TopDownTarget

        t = spec["top_down"]
        top_down = TopDownTarget(detector=t["detector"], crop=TopDownSpec(**t["crop"]),
                                 max_individuals=t["max_individuals"])
    card = train_model(spec["label_file"], info, spec["store"], cfg=cfg, test=spec["test"],
                       keypoints=spec["keypoints"], init=init, workdir=spec["workdir"],
                       command=f"POST /v1/finetune (job {spec['job_id']})", progress=True, log=log,
                       top_down=top_down, **spec.get("decoding", {}))
    emit(event="stage", stage="registering")
    card_dir = Path(spec["store"]) / card.name / card.version
    training = dict(card.training or {})
    training["init"] = spec["base"] if spec["init"] == "base" else f"imagenet (keypoints of {spec['base']})"
    training["base_model"] = spec["base"]
    training["service_job"] = spec["job_id"]
    card = card.model_copy(update={"training": training})
    card.to_yaml(card_dir / "card.yaml")
    if spec.get("s3_store"):
        from posezoo.training.register import register

        files = [card_dir / training["checkpoint"]["filename"]] if training.get("checkpoint") else []
        final = register(card, card_dir / card.artefact.filename, spec["s3_store"], extra_files=files,
                         catalog=spec["publish"], s3_client=Zoo(s3_endpoint=spec.get("s3_endpoint"),
                                                                include_bundled=False).s3_client())
        card_dir = final.parent
    return card_dir


def main(argv: list[str]) -> int:
    global _OUT
    _OUT = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints go to stderr, the protocol keeps stdout
    sys.stdout = sys.stderr
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    spec = json.loads(Path(argv[0]).read_text())
    try:
        from posezoo.errors import PosezooError
    except ImportError:  # pragma: no cover
        PosezooError = Exception  # noqa: N806
    try:
        card_dir = run(spec)
    except PosezooError as exc:
        emit(event="error", code="training_failed", detail=str(exc).replace(str(Path(spec["store"]).parent) + "/", ""))
        return 1
    except Exception as exc:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        emit(event="error", code="internal_error", detail=f"training failed: {type(exc).__name__}: {exc}"[:500])
        return 1
    emit(event="done", card_dir=str(card_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
