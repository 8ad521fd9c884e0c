"""Which condition encoders a model reads, chosen once and recorded everywhere the features travel.

``EncoderSpec`` names the text, semantic-video and sync encoders. Extraction writes it into the features'
``index.json`` (with the feature widths it measured), training copies it into every stage's
``pipeline.json`` and sizes the DiT's input projections from it, and ``Omni2SoundPipeline.from_pretrained``
loads the same encoders from it, so a trained folder generates from raw video with no extra flags.

    text    "minilm"              the packaged all-MiniLM-L6-v2 (384-d tokens; the default)
            "t5:DIR"              a local T5 / Flan-T5 checkpoint's encoder (the paper: flan-t5-base, 768-d,
                                  128 tokens)
            "clap:DIR"            a local CLAP model's (or CLAP text model's) text tower
            "DIR"                 any of these, the kind read from DIR/config.json
    video   "builtin"             FrameSemanticEncoder (272-d, no weights)
            "hf:DIR"              a local transformers CLIP / SigLIP (vision) checkpoint: image embeddings
            "open_clip:ARCH:FILE" an open_clip vision tower: ARCH is open_clip's model name, FILE the local
                                  state dict (the paper's DFN5B-CLIP-ViT-H-14-384 is published as
                                  ``open_clip_pytorch_model.bin`` of ``ViT-H-14-378-quickgelu``; 1024-d)
    sync    "builtin"             MotionSyncEncoder (64-d)
            "synchformer:FILE"    Synchformer's visual features from a local state dict (768-d)

Frames: semantic video at 8 fps, resized (squashed) to the tower's input size (the paper and MMAudio feed
384 px to the DFN5B CLIP), normalised with the model's own mean / std; sync at 25 fps, short side 224 and a
centre crop (Synchformer; the built-in encoders read 64 px squares), giving 24 features per second.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .encoders import FrameSemanticEncoder

TEXT_KINDS = ("minilm", "t5", "clap", "hf")
VIDEO_KINDS = ("builtin", "hf", "open_clip")
SYNC_KINDS = ("builtin", "synchformer")

# CLIP's own normalisation (OpenAI, also DFN5B) and SigLIP's
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
PAPER_VIDEO_SIZE = 384        # the DFN5B CLIP input the paper (and MMAudio) use
SYNCHFORMER_SIZE = 224
BUILTIN_FRAME_SIZE = 64


class EncoderSpecError(ValueError):
    """A spec that names an unknown kind, a missing model folder or file, or features of another spec."""


@dataclass
class TextSpec:
    kind: str = "minilm"                  # TEXT_KINDS
    path: Optional[str] = None            # local model folder (None: the packaged MiniLM)
    max_tokens: int = 128


@dataclass
class VideoSpec:
    kind: str = "builtin"                 # VIDEO_KINDS
    path: Optional[str] = None            # hf: a folder; open_clip: the state-dict file
    arch: Optional[str] = None            # open_clip model name
    image_size: Optional[int] = None      # input pixels (None: the model's own; builtin: 64)
    fps: float = 8.0


@dataclass
class SyncSpec:
    kind: str = "builtin"                 # SYNC_KINDS
    path: Optional[str] = None            # synchformer: the state-dict file
    frame_size: Optional[int] = None      # None: Synchformer's input (224), 64 for the built-in encoder
    fps: float = 25.0
    config: Optional[dict] = None         # SynchformerConfig.to_dict() of a non-released size (None: the released)


@dataclass
class EncoderSpec:
    text: TextSpec = field(default_factory=TextSpec)
    video: VideoSpec = field(default_factory=VideoSpec)
    sync: SyncSpec = field(default_factory=SyncSpec)
    # the feature widths these encoders make, {"text": Dt, "video": Dv, "sync": Ds}; filled by extraction (or
    # `measure_dims`), read by training to size the DiT
    dims: Optional[Dict[str, int]] = None

    # -- (de)serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[dict], where: str = "encoder spec") -> "EncoderSpec":
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise EncoderSpecError(f"{where}: expected an object, got {type(d).__name__}")
        parts = {}
        for name, sub in (("text", TextSpec), ("video", VideoSpec), ("sync", SyncSpec)):
            v = d.get(name) or {}
            known = {f.name for f in fields(sub)}
            if set(v) - known:
                raise EncoderSpecError(f"{where}: unknown {name} field(s) {sorted(set(v) - known)}")
            parts[name] = sub(**v)
        extra = set(d) - {"text", "video", "sync", "dims"}
        if extra:
            raise EncoderSpecError(f"{where}: unknown field(s) {sorted(extra)}")
        spec = cls(**parts, dims=dict(d["dims"]) if d.get("dims") else None)
        spec.validate(where)
        return spec

    def validate(self, where: str = "encoder spec") -> None:
        for name, kind, kinds in (("text", self.text.kind, TEXT_KINDS), ("video", self.video.kind, VIDEO_KINDS),
                                  ("sync", self.sync.kind, SYNC_KINDS)):
            if kind not in kinds:
                raise EncoderSpecError(f"{where}: unknown {name} encoder kind {kind!r}; choose from {kinds}")
        if self.text.kind != "minilm" and not self.text.path:
            raise EncoderSpecError(f"{where}: the {self.text.kind} text encoder needs a local model folder")
        if self.video.kind != "builtin" and not self.video.path:
            raise EncoderSpecError(f"{where}: the {self.video.kind} video encoder needs a local model path")
        if self.video.kind == "open_clip" and not self.video.arch:
            raise EncoderSpecError(f"{where}: the open_clip video encoder needs its architecture name "
                                   "(open_clip:ARCH:FILE, e.g. open_clip:ViT-H-14-378-quickgelu:/models/dfn5b.bin)")
        if self.sync.kind == "synchformer" and not self.sync.path:
            raise EncoderSpecError(f"{where}: the synchformer sync encoder needs its state-dict file")

    def identity(self) -> dict:
        """What makes two specs give the same features (everything but the measured widths)."""
        d = self.to_dict()
        d.pop("dims")
        return d

    def describe(self) -> str:
        v = self.video
        video = v.kind if v.kind == "builtin" else f"{v.kind}:{v.arch + ':' if v.arch else ''}{v.path}"
        return (f"text {self.text.kind}{':' + self.text.path if self.text.path else ''}, video {video}, "
                f"sync {self.sync.kind}{':' + self.sync.path if self.sync.path else ''}")

    # -- from command-line strings ---------------------------------------------------------------------
    @classmethod
    def parse(cls, text: Optional[str] = None, video: Optional[str] = None, sync: Optional[str] = None,
              text_max_tokens: Optional[int] = None, video_size: Optional[int] = None, check: bool = True
              ) -> "EncoderSpec":
        """The spec of the CLI flags --text-encoder / --video-encoder / --sync-encoder (see the module
        docstring); paths are made absolute; with ``check`` model folders and files must exist now (without, they
        must when the encoder loads: extracting released features never loads the video and sync encoders)."""
        spec = cls(text=_parse_text(text, check), video=_parse_video(video, check), sync=_parse_sync(sync, check))
        if text_max_tokens is not None:
            spec.text.max_tokens = int(text_max_tokens)
        if video_size is not None:
            spec.video.image_size = int(video_size)
        spec.validate()
        return spec

    @classmethod
    def paper(cls, flan_t5: str, clip_file: str, synchformer: str,
              clip_arch: str = "ViT-H-14-378-quickgelu") -> "EncoderSpec":
        """The paper's encoders: Flan-T5-base (128 tokens), DFN5B CLIP ViT-H/14 at 384 px, Synchformer."""
        return cls.parse(f"t5:{flan_t5}", f"open_clip:{clip_arch}:{clip_file}", f"synchformer:{synchformer}",
                         text_max_tokens=128, video_size=PAPER_VIDEO_SIZE)

    @classmethod
    def from_pipeline_fields(cls, text_encoder: Optional[str], video_encoder: str = "builtin",
                             sync_encoder: str = "builtin", builtin_frame_size: int = BUILTIN_FRAME_SIZE
                             ) -> "EncoderSpec":
        """The spec of a pipeline.json written before specs were recorded (a text dir, a CLIP dir or 'builtin')."""
        spec = cls(text=_parse_text(text_encoder, check=False), video=_parse_video(video_encoder, check=False),
                   sync=_parse_sync(sync_encoder, check=False))
        if spec.video.kind == "builtin":
            spec.video.image_size = builtin_frame_size
        if spec.sync.kind == "builtin":
            spec.sync.frame_size = builtin_frame_size
        return spec

    # -- loading -----------------------------------------------------------------------------------------
    def load(self, device=None, dtype: Optional[torch.dtype] = None) -> "LoadedEncoders":
        """The three encoders on ``device`` (weights in ``dtype``; default bf16 on a GPU, fp32 on the CPU)."""
        device = torch.device(device or "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return LoadedEncoders(self, load_text(self.text, device, dtype), load_video(self.video, device, dtype),
                              load_sync(self.sync, device, dtype))


def _abs(path: str, what: str, kind: str, check: bool, want: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    if check and want == "dir" and not os.path.isdir(path):
        raise EncoderSpecError(f"{what} encoder {kind}: no model folder at {path}")
    if check and want == "file" and not os.path.isfile(path):
        raise EncoderSpecError(f"{what} encoder {kind}: no such file: {path}")
    return path


def _model_type(path: str) -> Optional[str]:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError):
        return None


def _parse_text(s: Optional[str], check: bool = True) -> TextSpec:
    if s is None or s in ("", "minilm", "builtin", "default"):
        return TextSpec()
    kind, _, rest = s.partition(":")
    if kind in ("t5", "clap", "hf", "minilm") and rest:
        return TextSpec(kind=kind, path=_abs(rest, "text", kind, check, "dir"))
    path = _abs(s, "text", "folder", check, "dir")
    mt = _model_type(path)
    kind = "t5" if mt in ("t5", "mt5", "umt5") else "clap" if mt in ("clap", "clap_text_model") else "hf"
    return TextSpec(kind=kind, path=path)


def _parse_video(s: Optional[str], check: bool = True) -> VideoSpec:
    if s is None or s in ("", "builtin"):
        return VideoSpec()
    kind, _, rest = s.partition(":")
    if kind == "open_clip":
        arch, sep, path = rest.partition(":")
        if not sep or not arch or not path:
            raise EncoderSpecError(f"video encoder {s!r}: write open_clip:ARCH:FILE, e.g. "
                                   "open_clip:ViT-H-14-378-quickgelu:/models/DFN5B/open_clip_pytorch_model.bin")
        return VideoSpec(kind="open_clip", arch=arch, path=_abs(path, "video", "open_clip", check, "file"))
    if kind in ("hf", "clip", "siglip") and rest:
        return VideoSpec(kind="hf", path=_abs(rest, "video", kind, check, "dir"))
    return VideoSpec(kind="hf", path=_abs(s, "video", "hf", check, "dir"))


def _parse_sync(s: Optional[str], check: bool = True) -> SyncSpec:
    if s is None or s in ("", "builtin"):
        return SyncSpec()
    kind, _, rest = s.partition(":")
    if kind == "synchformer" and rest:
        return SyncSpec(kind="synchformer", path=_abs(rest, "sync", "synchformer", check, "file"))
    raise EncoderSpecError(f"sync encoder {s!r}: choose builtin or synchformer:FILE (a Synchformer state dict)")


# ----------------------------------------------------------------------------------------------------
# Frames for an encoder
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FrameRequest:
    """How an encoder wants its frames decoded: rate, size and whether to keep the aspect ratio (short side
    to ``size``, then a centre crop) or squash to a ``size`` square."""
    fps: float
    size: int
    crop: bool = False


def source_size(path: str) -> Tuple[int, int]:
    """(height, width) of a video's first stream, from its header."""
    import av

    from .video import VideoError
    try:
        with av.open(os.fspath(path)) as c:
            if not c.streams.video:
                raise VideoError(f"{path}: no video stream")
            cc = c.streams.video[0].codec_context
            return int(cc.height), int(cc.width)
    except av.error.FFmpegError as e:
        raise VideoError(f"cannot open {path}: {e}") from e


def read_frames(path: str, req: FrameRequest, start: float = 0.0, max_seconds: Optional[float] = None,
                hw: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Decode ``path`` as ``req`` asks -> uint8 [T, size, size, 3] at req.fps (PyAV; scaling in FFmpeg)."""
    from .video import read_video
    if not req.crop:
        return read_video(path, fps=req.fps, size=req.size, start=start, max_seconds=max_seconds)
    h, w = hw or source_size(path)
    s = req.size / min(h, w)
    oh, ow = max(req.size, int(round(h * s))), max(req.size, int(round(w * s)))
    oh, ow = oh + oh % 2, ow + ow % 2            # even sizes for FFmpeg's scaler
    x = read_video(path, fps=req.fps, size=(oh, ow), start=start, max_seconds=max_seconds)
    y0, x0 = (oh - req.size) // 2, (ow - req.size) // 2
    return np.ascontiguousarray(x[:, y0:y0 + req.size, x0:x0 + req.size])


# ----------------------------------------------------------------------------------------------------
# Encoders the package does not have elsewhere
# ----------------------------------------------------------------------------------------------------
def _to_pixels(frames, size: int, mean, std, device, dtype) -> Tensor:
    """uint8 [T, H, W, 3] -> normalised [T, 3, size, size] on device (bicubic, antialiased; squashed)."""
    from .encoders import _frames_to_float
    x = _frames_to_float(frames, "vision tower")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((x - m) / s).to(device=device, dtype=dtype)


class OpenClipVisionEncoder:
    """An open_clip vision tower from a local state-dict file: frames -> L2-normalised embeddings [T, D]
    (D = the CLIP embedding width, 1024 for ViT-H/14). Loaded without executing pickled code
    (``torch.load(weights_only=True)`` or safetensors), strictly (every tower key present, none extra)."""

    def __init__(self, visual, image_size: int, mean, std, dim: int, batch_size: int = 64):
        self.visual, self.image_size, self.mean, self.std = visual.eval(), image_size, mean, std
        self.dim, self.batch_size = dim, batch_size

    @classmethod
    def from_checkpoint(cls, arch: str, path: str, device=None, dtype: torch.dtype = torch.float32,
                        image_size: Optional[int] = None) -> "OpenClipVisionEncoder":
        try:
            import open_clip
        except ImportError as e:
            raise EncoderSpecError("the open_clip video encoder needs open_clip: pip install 'omni2sound[open-clip]' "
                                   "(open-clip-torch; install it with --no-deps beside your torch)") from e
        if arch not in open_clip.list_models():
            raise EncoderSpecError(f"open_clip has no model {arch!r} (e.g. ViT-H-14-378-quickgelu, ViT-H-14)")
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
        sd = load_state_dict_file(path)
        sd = sd.get("state_dict", sd)
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        visual_sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        if not visual_sd:
            raise EncoderSpecError(f"{path}: no visual.* tensors: not an open_clip CLIP checkpoint")
        try:
            model.visual.load_state_dict(visual_sd, strict=True)
        except RuntimeError as e:
            raise EncoderSpecError(f"{path} does not fit open_clip {arch}: {str(e).splitlines()[0]} ...") from e
        visual = model.visual.requires_grad_(False).to(device=device, dtype=dtype)
        pcfg = getattr(visual, "preprocess_cfg", {}) or {}
        native = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else int(visual.image_size)
        mean = tuple(pcfg.get("mean", CLIP_MEAN))
        std = tuple(pcfg.get("std", CLIP_STD))
        dim = int(getattr(visual, "output_dim", 0) or model.visual.proj.shape[1])
        del model
        return cls(visual, int(image_size or native), mean, std, dim)

    @torch.no_grad()
    def encode(self, frames) -> Tensor:
        p = next(self.visual.parameters())
        x = _to_pixels(frames, self.image_size, self.mean, self.std, p.device, p.dtype)
        outs = [F.normalize(self.visual(chunk).float(), dim=-1) for chunk in x.split(self.batch_size)]
        return torch.cat(outs)                                                    # [T, D]


class SynchformerSyncEncoder:
    """Synchformer's visual features at 24 per second: 25 fps frames -> [S * 8, 768], S = (T - 16) // 8 + 1
    segments of 16 frames with stride 8 (``omni2sound.synchformer``). A clip under 16 frames (0.64 s) has no
    segment and gives [0, 768]. ``encode_many`` runs the segments of several clips in shared batches."""

    def __init__(self, extractor, batch_segments: int = 32):
        self.extractor, self.batch_segments = extractor, batch_segments

    @classmethod
    def from_checkpoint(cls, path: str, device=None, dtype: torch.dtype = torch.float32, config: Optional[dict] = None
                        ) -> "SynchformerSyncEncoder":
        from .synchformer import SyncFeatureExtractor, SynchformerConfig
        cfg = SynchformerConfig.from_dict(config) if config else None
        ex = SyncFeatureExtractor.from_state_dict(path, cfg=cfg, device=device)
        # bf16 on a GPU comes from the extractor's autocast: weights stay fp32 there, as released
        return cls(ex.eval())

    @property
    def dim(self) -> int:
        return int(self.extractor.dim)

    @property
    def image_size(self) -> int:
        return int(self.extractor.cfg.image_size)

    def encode(self, frames) -> Tensor:
        return self.encode_many([frames])[0]

    def encode_many(self, clips: list) -> list:
        """uint8 [T_i, H, W, 3] at 25 fps per clip -> [S_i * 8, D] float32 on the CPU per clip; the segments of
        all clips go through the network ``batch_segments`` at a time (bf16 autocast on a GPU)."""
        from .synchformer import _autocast, segment_video
        cfg, dev = self.extractor.cfg, self.extractor.device
        with torch.inference_mode():
            segs = [segment_video(f, cfg.fps, cfg, device=dev) if len(f) >= cfg.segment_frames else None
                    for f in clips]                                                  # [S_i, 3, 16, s, s]
            real = [s for s in segs if s is not None]
            feats = []
            if real:
                allsegs = torch.cat(real)
                with _autocast(dev):
                    for i in range(0, allsegs.shape[0], self.batch_segments):
                        chunk = allsegs[i:i + self.batch_segments].unsqueeze(0)
                        feats.append(self.extractor(chunk)[0].float())               # [s, 8, D]
                feats = torch.cat(feats).cpu()
            out, at = [], 0
            for s in segs:
                if s is None:
                    out.append(torch.zeros(0, self.dim))
                    continue
                out.append(feats[at:at + s.shape[0]].reshape(-1, self.dim))
                at += s.shape[0]
            return out


def load_state_dict_file(path: str) -> dict:
    """Tensors of a .safetensors or a torch state-dict file, without executing pickled code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:     # pickled code or a corrupt file: say which file
        raise EncoderSpecError(f"cannot load {path} as a plain state dict (weights_only): {e}") from e


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------
def load_text(spec: TextSpec, device, dtype):
    from .encoders import TextEncoder
    return TextEncoder.from_pretrained(spec.path, max_tokens=spec.max_tokens, device=device, dtype=dtype)


def _preprocessor(path: str) -> dict:
    try:
        with open(os.path.join(path, "preprocessor_config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def load_video(spec: VideoSpec, device, dtype):
    if spec.kind == "builtin":
        return FrameSemanticEncoder()
    if spec.kind == "open_clip":
        return OpenClipVisionEncoder.from_checkpoint(spec.arch, spec.path, device, dtype, spec.image_size)
    from .encoders import VisionTowerEncoder
    enc = VisionTowerEncoder.from_pretrained(spec.path, device=device, dtype=dtype)
    pre = _preprocessor(spec.path)          # the model's own normalisation when its folder ships one
    if pre.get("image_mean") and pre.get("image_std"):
        enc.mean, enc.std = tuple(pre["image_mean"]), tuple(pre["image_std"])
    if spec.image_size:
        enc.image_size = int(spec.image_size)
    return enc


def load_sync(spec: SyncSpec, device, dtype):
    if spec.kind == "builtin":
        from .encoders import MotionSyncEncoder
        return MotionSyncEncoder()
    return SynchformerSyncEncoder.from_checkpoint(spec.path, device, dtype, spec.config)


class LoadedEncoders:
    """The spec's encoders, with the frame requests that feed them:
    text.encode(list[str]) -> (tokens [B, L, Dt], lens [B]); video.encode(uint8 [T8, s, s, 3]) -> [T8, Dv];
    sync.encode(uint8 [T25, s, s, 3]) -> [T24, Ds]."""

    def __init__(self, spec: EncoderSpec, text, video, sync):
        self.spec, self.text, self.video, self.sync = spec, text, video, sync

    @property
    def video_request(self) -> FrameRequest:
        v = self.spec.video
        size = v.image_size or getattr(self.video, "image_size", None) or BUILTIN_FRAME_SIZE
        return FrameRequest(v.fps, int(size), crop=False)

    @property
    def sync_request(self) -> FrameRequest:
        s = self.spec.sync
        if s.kind == "synchformer":
            size = s.frame_size or (s.config or {}).get("image_size") or SYNCHFORMER_SIZE
            return FrameRequest(s.fps, int(size), crop=True)
        return FrameRequest(s.fps, int(s.frame_size or BUILTIN_FRAME_SIZE), crop=False)

    def dims(self) -> Dict[str, int]:
        """Feature widths, measured on a blank clip once (what the DiT's input projections must take)."""
        if self.spec.dims is None:
            blank = np.zeros((32, 32, 32, 3), np.uint8)
            vr, sr = self.video_request, self.sync_request
            v = self.video.encode(np.zeros((2, vr.size, vr.size, 3), np.uint8))
            s = self.sync.encode(np.zeros((32, sr.size, sr.size, 3), np.uint8)) if sr.crop else self.sync.encode(blank)
            self.spec.dims = {"text": int(self.text.dim), "video": int(v.shape[-1]), "sync": int(s.shape[-1])}
        return dict(self.spec.dims)


# the widths some encoders make whatever their weights (for checking released features without loading them)
KNOWN_WIDTHS = {("video", "builtin"): 272, ("sync", "builtin"): 64, ("sync", "synchformer"): 768}


# ----------------------------------------------------------------------------------------------------
# Checks between features, specs and the DiT
# ----------------------------------------------------------------------------------------------------
def check_widths(dit_cfg, widths: Dict[str, int], features: str, dit_where: str) -> None:
    """A clear error when features of these widths cannot feed a DiT of ``dit_cfg`` (naming both)."""
    bad = [f"{name} {widths[name]} vs {getattr(dit_cfg, name + '_dim')}" for name in ("text", "video", "sync")
           if name in widths and widths[name] != getattr(dit_cfg, name + "_dim")]
    if bad:
        raise EncoderSpecError(f"the features in {features} do not fit the DiT of {dit_where} (feature width vs "
                               f"DiT input width: {', '.join(bad)}); extract the features with the encoders the "
                               "DiT was built for, or train a new DiT on these features")


def read_index_spec(features_dir: str) -> Optional[EncoderSpec]:
    """The spec recorded in a features folder's index.json (None when it records none)."""
    p = os.path.join(features_dir, "index.json")
    try:
        with open(p) as f:
            d = json.load(f).get("encoders")
    except (OSError, ValueError):
        return None
    return EncoderSpec.from_dict(d, where=p) if d else None


def expected_sync_len(n_frames_25: int) -> int:
    """Synchformer features for n frames at 25 fps: 8 per 16-frame segment of stride 8."""
    return 0 if n_frames_25 < 16 else ((n_frames_25 - 16) // 8 + 1) * 8


def frames_at(duration: float, fps: float) -> int:
    return max(1, int(math.ceil(duration * fps - 1e-6)))
