"""Model cards: the pydantic schema that describes every zoo model.

A card says what a network expects (input spec), what it returns (output names,
stride, location-refinement scale), how to decode it, which keypoints it predicts
and where its ONNX artefact lives (with its sha256). Cards are plain YAML files; see
``models/`` for the catalog.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InvalidCardError

Task = Literal["single_animal", "top_down", "detector"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class InputSpec(_Strict):
    """How frames are turned into the network's input tensor ``(N, 3, H, W)`` float32.

    ``size`` is ``(height, width)`` or ``"any"`` (fully convolutional: the frame is
    only padded to a multiple of ``pad_to``). ``resize`` says how a frame of another
    size is fitted: ``letterbox`` keeps the aspect ratio and pads bottom/right,
    ``stretch`` scales each axis independently. Pixel values are divided by
    ``pixel_range`` and then normalised channel-wise: ``(x - mean) / std``.

    ``dtype: uint8`` (INT8 variants, see :mod:`posezoo.quantize`): the graph takes the
    resized pixels themselves, ``(N, 3, H, W)`` uint8, and normalises them inside (its
    first ``DequantizeLinear``); ``mean``/``std`` still describe that normalisation and the
    padding is the pixel value ``mean * pixel_range`` (the normalised zero of ``float32``).
    """

    size: tuple[int, int] | Literal["any"] = "any"
    resize: Literal["letterbox", "stretch"] = "letterbox"
    pad_to: int = Field(1, ge=1)
    colour_order: Literal["RGB", "BGR"] = "RGB"
    pixel_range: float = Field(255.0, gt=0)
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    input_name: str = "image"
    dtype: Literal["float32", "uint8"] = "float32"

    @model_validator(mode="after")
    def _uint8_padding(self) -> "InputSpec":
        if self.dtype == "uint8":
            pads = {m * self.pixel_range for m in self.mean}
            if len(pads) != 1 or len({s for s in self.std}) != 1:
                raise ValueError("a uint8 input needs one mean and one std for all channels")
            pad = pads.pop()
            if abs(pad - round(pad)) > 1e-6 or not 0 <= round(pad) <= 255:
                raise ValueError("a uint8 input needs mean * pixel_range to be an integer pixel value")
        return self

    @property
    def pad_value(self) -> int:
        """The uint8 padding pixel (``dtype: uint8``): the normalised zero."""
        return int(round(self.mean[0] * self.pixel_range))


class OutputSpec(_Strict):
    """Names and geometry of the network's outputs.

    ``heatmap``: ``(N, K, h, w)``; ``locref`` (optional): ``(N, 2K, h, w)`` with the
    channels ordered ``dx0, dy0, dx1, dy1, ...`` as in DeepLabCut. ``stride`` is the
    nominal input/heatmap ratio (the decoder uses the measured ratio of the actual
    tensors, which equals it for inputs that are multiples of the stride).
    """

    heatmap: str = "heatmaps"
    locref: str | None = "locref"
    stride: float = Field(8.0, gt=0)
    locref_std: float = 7.2801
    heatmap_activation: Literal["none", "sigmoid"] = "none"
    #: Clip likelihoods to [0, 1] after the argmax (DeepLabCut's ``clip_scores``); the
    #: argmax itself is taken on the raw heatmap, as DeepLabCut does.
    clip_scores: bool = False
    #: Decode with the nominal ``stride`` instead of the measured input/heatmap ratio
    #: (DeepLabCut's PyTorch predictors use the model's stride, e.g. 8 for a ResNet-50
    #: head whose 256 px crop gives 33x33 heatmaps).
    nominal_stride: bool = False
    #: Heatmap cells within which two keypoints of one animal cannot both peak: the one with
    #: the lower heatmap there moves to its best cell elsewhere (0: off; see
    #: ``posezoo.decoding.exclusive_peaks``). For single-animal models whose keypoints are
    #: never that close, e.g. a top-view mouse's snout and tail base.
    exclusive_radius: int = Field(0, ge=0)


class Artefact(_Strict):
    """Where the ONNX file lives and how to verify it.

    ``locations`` are tried in order: ``hf://org/repo`` (Hugging Face Hub, at
    ``revision``), ``s3://bucket/prefix`` (any S3-compatible endpoint), ``file:///dir``,
    or ``local`` (the directory of the card itself). An empty ``sha256`` means the
    artefact is not published yet.
    """

    locations: list[str] = Field(default_factory=list)
    revision: str | None = None
    filename: str
    sha256: str | None = None
    bytes: int | None = None

    @property
    def published(self) -> bool:
        return bool(self.sha256) and bool(self.locations)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and v != "":
            v = v.lower()
            if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
                raise ValueError("sha256 must be 64 hex digits")
        return v or None


class DetectorSpec(_Strict):
    """A box detector's outputs and the pre-processing baked into its ONNX graph.

    The runtime normalises the frame as ``input`` says (DeepLabCut's own normalisation);
    torchvision's ``GeneralizedRCNNTransform`` (a second normalisation with ``graph_mean``
    / ``graph_std`` and a resize so that the short side is ``graph_min_size``, the long
    side at most ``graph_max_size``) runs inside the graph, exactly as in DeepLabCut.
    ``boxes`` are ``x1, y1, x2, y2`` in input pixels, sorted by decreasing score; only
    boxes with a score above ``score_threshold`` are returned by the graph.
    """

    boxes: str = "boxes"
    scores: str = "scores"
    labels: str | None = "labels"
    batch: int | None = Field(1, ge=1)
    score_threshold: float = Field(0.6, ge=0, le=1)
    graph_min_size: int | None = None
    graph_max_size: int | None = None
    graph_mean: tuple[float, float, float] | None = None
    graph_std: tuple[float, float, float] | None = None
    architecture: str | None = None


class SimCCSpec(_Strict):
    """SimCC coordinate classification outputs (RTMPose heads) and how to decode them
    (DeepLabCut's ``SimCCPredictor``; see :func:`posezoo.decoding.decode_simcc`).

    ``x`` / ``y`` name the outputs ``(N, K, W * split_ratio)`` and ``(N, K, H * split_ratio)``;
    the logits are scaled by ``sigma * beta`` (or, with ``normalize``, divided by their
    maximum), soft-maxed per axis when ``apply_softmax``, and each axis's argmax divided by
    ``split_ratio`` is the position in crop pixels.
    """

    x: str = "simcc_x"
    y: str = "simcc_y"
    split_ratio: float = Field(2.0, gt=0)
    sigma: tuple[float, float] = (6.0, 6.0)
    beta: float = Field(150.0, gt=0)
    apply_softmax: bool = True
    normalize: bool = False


class TopDownSpec(_Strict):
    """How a top-down pose model crops detections (DeepLabCut's ``top_down_crop``):
    keep the box centre, grow it to the crop's aspect ratio (``with_context``), add
    ``margin`` pixels, zero-pad outside the frame, resize to ``input.size``
    (cv2 INTER_LINEAR)."""

    margin: int = 0
    with_context: bool = True
    min_box_score: float | None = None


class Upstream(_Strict):
    """The DeepLabCut checkpoint the artefact was converted from (or training data)."""

    kind: Literal["huggingface", "url", "trained"] = "huggingface"
    repo_id: str | None = None
    filename: str | None = None
    url: str | None = None
    notes: str | None = None

    @property
    def is_model_zoo_tarball(self) -> bool:
        """A DeepLabCut 2.x TensorFlow model-zoo tarball (else e.g. a SuperAnimal ``.pt``)."""
        return str(self.filename or "").endswith((".tar.gz", ".tgz", ".tar"))


class ModelCard(_Strict):
    """Everything posezoo needs to know about one version of one model."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]*$")
    version: str = Field(pattern=r"^[0-9A-Za-z.\-+]+$")
    description: str = ""
    species: list[str]
    #: camera view the model was trained for ("top", "side", "face", ...; "any" for detectors)
    view: str = "any"
    #: speed class on a CPU: "fast" (hundreds of frames/s), "medium", "slow" (a few frames/s)
    speed: Literal["fast", "medium", "slow"] | None = None
    #: among the ready models of a species and view, the highest priority is recommended
    priority: int = 0
    aliases: list[str] = Field(default_factory=list)
    task: Task = "single_animal"
    detector: str | None = None
    max_individuals: int = Field(1, ge=1)
    keypoints: list[str] = Field(default_factory=list)
    keypoints_from_artefact: bool = False
    skeleton: list[tuple[str, str]] = Field(default_factory=list)
    flip_pairs: list[tuple[str, str]] = Field(default_factory=list)
    input: InputSpec = Field(default_factory=InputSpec)
    outputs: OutputSpec = Field(default_factory=OutputSpec)
    decoder: Literal["heatmap_argmax_locref", "detector_boxes", "simcc"] = "heatmap_argmax_locref"
    detection: DetectorSpec | None = None
    #: the SimCC outputs and decoding parameters (``decoder: simcc``)
    simcc: SimCCSpec | None = None
    top_down: TopDownSpec | None = None
    artefact: Artefact
    upstream: Upstream | None = None
    licence: str = "unknown"
    citation: str = ""
    training: dict | None = None
    metrics: dict | None = None
    pcutoff: float = Field(0.4, ge=0, le=1)
    #: numeric precision of the artefact: ``fp32`` (as trained or converted) or ``int8``
    #: (a static-quantised CPU variant, :mod:`posezoo.quantize`)
    precision: Literal["fp32", "int8"] = "fp32"
    #: a variant (``precision`` other than fp32) names the card it was made from,
    #: ``name@version``; the zoo offers it as that model's ``precision="int8"``
    variant_of: str | None = None
    #: how an INT8 variant was made (recipe, calibration frames, command)
    quantization: dict | None = None
    #: test-time flip (full-frame heatmap models): each frame also runs mirrored left/right
    #: in the same batch, and the mirrored pass's heatmaps and location refinement, mirrored
    #: back with ``flip_pairs`` swapped and ``dx`` negated, are averaged with the plain pass's
    #: before decoding (twice the network time; :func:`posezoo.predictor.unflip_outputs`).
    #: Unset (None) is off, and is left out of the YAML, so older cards round-trip unchanged.
    test_time_flip: bool | None = None

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    @property
    def n_keypoints(self) -> int:
        return len(self.keypoints)

    @model_validator(mode="after")
    def _consistent(self) -> "ModelCard":
        if (self.precision != "fp32") != (self.variant_of is not None):
            raise ValueError("a card of precision other than fp32 names the card it is a variant_of (and only it)")
        if self.test_time_flip and (self.task != "single_animal" or self.decoder != "heatmap_argmax_locref"):
            raise ValueError("test_time_flip is supported for single_animal heatmap (heatmap_argmax_locref) cards only")
        if self.task == "top_down" and not self.detector:
            raise ValueError("a top_down card must name its detector card")
        if (self.decoder == "simcc") != (self.simcc is not None):
            raise ValueError("decoder 'simcc' needs a simcc section (and only it takes one)")
        if self.decoder == "simcc" and self.task != "top_down":
            raise ValueError("decoder 'simcc' is supported for top_down cards only")
        if self.task != "detector" and not self.keypoints and not self.keypoints_from_artefact:
            raise ValueError("keypoints are required (or set keypoints_from_artefact)")
        if len(set(self.keypoints)) != len(self.keypoints):
            raise ValueError("keypoint names must be unique")
        known = set(self.keypoints)
        for pairs, what in ((self.skeleton, "skeleton"), (self.flip_pairs, "flip_pairs")):
            for a, b in pairs:
                if known and (a not in known or b not in known):
                    raise ValueError(f"{what} names an unknown keypoint: {a}-{b}")
        return self

    # -- files --------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelCard":
        """Load and validate a card; errors name the file and the field."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidCardError(f"{path}: cannot read model card: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidCardError(f"{path}: a model card must be a YAML mapping")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "card"
            raise InvalidCardError(f"{path}: invalid model card at {loc}: {first['msg']}") from exc

    def to_yaml(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.model_dump(mode="json", exclude_none=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        return path
