"""Serving throughput: requests of different durations batched into duration buckets, one captured CUDA graph per
(bucket, batch size), made at start-up.

    from omni2sound.serving import Request, ServeConfig, Server
    server = Server(pipe, ServeConfig(buckets=(2.5, 5.0, 10.0), batch_sizes=(1, 8, 32)))
    server.warm_up()                                   # captures every (bucket, batch size) graph now
    audio = server.generate([Request(duration=3.2, text_tokens=tok, seed=1), ...])   # [N_i] float32 per request

A request goes to the smallest bucket (seconds) that holds its duration; a bucket's requests are cut into batches of
configured sizes at the least cost, rows run plus ``batch_overhead_rows`` per batch (12 requests with sizes 1, 8, 32:
two batches of 8, not one of 32); a batch's spare rows repeat its last request and are dropped. Every batch of a
bucket and size has the same tensor shapes: video tokens padded to the bucket's 8 / s, sync features to its 24 / s
(each request's last feature repeated, which is what the unpadded request's interpolation reads past its end), text
to the DiT's ``max_text_tokens``, and the condition tokens packed with their padding
(``prepare_conditions(bucketed=True)``). So the graph captured at start-up for that (bucket, size) replays for every
batch, with no capture while serving.

A request sounds as it would alone, unpadded: its initial noise is its own seed's noise at its own length (zeros
after), its duration embedding is its own, its frames past its own duration are left out of every self-attention
(``PreparedConditions.key_mask``; every other op of the DiT works per frame), and its latents are cut to its own
frames before a VAE decode of its own length (requests of equal length decode together).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .conditions import Conditions
from .flow import Guidance
from .pipeline import Omni2SoundPipeline, SamplingOptions


@dataclass
class ServeConfig:
    buckets: Tuple[float, ...] = (2.5, 5.0, 7.5, 10.0)     # seconds; each request runs at the smallest that holds it
    batch_sizes: Tuple[int, ...] = (1, 8, 32)              # one captured graph per (bucket, size)
    steps: int = 25
    guidance: Optional[Guidance] = 4.5
    method: str = "euler"
    fp8: bool = False
    fp8_fused_quant: bool = False                          # with fp8: SamplingOptions.fp8_fused_quant
    # what one more batch costs in rows of work, for cutting a bucket's requests into batches (a small batch of the
    # L model is launch-bound: one batch of 8 costs little more than one of 1)
    batch_overhead_rows: int = 8

    def validate(self, max_duration: float) -> None:
        b, s = tuple(self.buckets), tuple(self.batch_sizes)
        if not b or any(not (x > 0 and math.isfinite(x)) for x in b) or list(b) != sorted(set(b)):
            raise ValueError(f"ServeConfig.buckets must be increasing positive seconds, got {b}")
        if b[-1] > max_duration + 1e-9:
            raise ValueError(f"ServeConfig.buckets: {b[-1]} s is past the DiT's {max_duration} s (DiTConfig."
                             "max_duration); longer audio is made in windows by Omni2SoundPipeline.generate")
        if not s or any(int(x) != x or x < 1 for x in s) or list(s) != sorted(set(s)):
            raise ValueError(f"ServeConfig.batch_sizes must be increasing positive integers, got {s}")
        if self.batch_overhead_rows < 0:
            raise ValueError(f"ServeConfig.batch_overhead_rows must be >= 0, got {self.batch_overhead_rows}")
        if self.steps < 1:
            raise ValueError(f"ServeConfig.steps must be >= 1, got {self.steps}")


@dataclass
class Request:
    duration: float                                   # seconds
    text_tokens: Optional[Tensor] = None              # [L, text_dim] (None: no text)
    video_features: Optional[Tensor] = None           # [Tv, video_dim] at 8 / s (None: no video)
    sync_features: Optional[Tensor] = None            # [Ts, sync_dim] at 24 / s (read only with video)
    seed: int = 0


def choose_bucket(duration: float, buckets: Sequence[float]) -> float:
    """The smallest bucket (seconds) >= duration."""
    if not (duration > 0 and math.isfinite(duration)):
        raise ValueError(f"duration must be positive seconds, got {duration}")
    for b in buckets:
        if duration <= b + 1e-6:
            return b
    raise ValueError(f"duration {duration:g} s is past the largest bucket ({buckets[-1]:g} s); configure a larger "
                     "bucket (up to DiTConfig.max_duration) or generate it with Omni2SoundPipeline.generate")


def choose_batch_size(n: int, batch_sizes: Sequence[int]) -> int:
    """The smallest configured batch size >= n (n at most the largest)."""
    for s in batch_sizes:
        if n <= s:
            return s
    raise ValueError(f"{n} requests are past the largest batch size {batch_sizes[-1]}")


def batch_split(n: int, batch_sizes: Sequence[int], overhead_rows: int = 8) -> List[int]:
    """Batch sizes (largest first) that hold n requests at the least cost, cost = rows run + overhead_rows per
    batch."""
    best: List[Tuple[int, List[int]]] = [(0, [])]                 # best[m]: (cost, sizes) for m requests
    for m in range(1, n + 1):
        options = []
        for s in batch_sizes:
            rest = best[max(0, m - s)]
            options.append((rest[0] + s + overhead_rows, sorted(rest[1] + [s], reverse=True)))
        best.append(min(options))
    return best[n][1]


def plan(durations: Sequence[float], config: ServeConfig) -> List[Tuple[float, int, List[int]]]:
    """(bucket, batch size, request indices) per batch: requests grouped by bucket (in order of arrival within
    one), cut into batches by ``batch_split``."""
    groups: Dict[float, List[int]] = {}
    for i, d in enumerate(durations):
        groups.setdefault(choose_bucket(d, config.buckets), []).append(i)
    out = []
    for bucket in sorted(groups):
        idx = groups[bucket]
        j = 0
        for size in batch_split(len(idx), config.batch_sizes, config.batch_overhead_rows):
            out.append((bucket, size, idx[j:j + size]))
            j += size
    return out


class Server:
    """Batched, bucketed sampling over one pipeline (module docstring)."""

    def __init__(self, pipe: Omni2SoundPipeline, config: Optional[ServeConfig] = None):
        self.pipe = pipe
        self.config = config or ServeConfig()
        self.config.validate(pipe.dit.config.max_duration)
        # room for every start-up graph beside what the pipeline's cache holds already (another server's, say)
        pipe.graphs.max_entries += len(self.config.buckets) * len(self.config.batch_sizes)

    @property
    def options(self) -> SamplingOptions:
        c = self.config
        return SamplingOptions(steps=c.steps, method=c.method, guidance=c.guidance, fp8=c.fp8,
                               fp8_fused_quant=c.fp8_fused_quant, bucketed=True)

    # -- one padded batch ----------------------------------------------------------------------------
    def conditions(self, requests: Sequence[Request], bucket: float, rows: int) -> Conditions:
        """The Conditions of ``requests`` padded to ``bucket`` seconds and ``rows`` rows (the spare rows repeat the
        last request): fixed shapes per (bucket, rows)."""
        cfg = self.pipe.dit.config
        Lv = int(math.ceil(bucket * cfg.video_rate - 1e-6))
        Ls = int(math.ceil(bucket * cfg.sync_rate - 1e-6))
        Lt = cfg.max_text_tokens
        reqs = list(requests) + [requests[-1]] * (rows - len(requests))
        video = torch.zeros(rows, Lv, cfg.video_dim)
        sync = torch.zeros(rows, Ls, cfg.sync_dim)
        text = torch.zeros(rows, Lt, cfg.text_dim)
        vlens = torch.zeros(rows, dtype=torch.long)
        tlens = torch.zeros(rows, dtype=torch.long)
        for i, r in enumerate(reqs):
            if r.video_features is not None:
                v = r.video_features[:int(math.ceil(r.duration * cfg.video_rate - 1e-6))]
                video[i, :len(v)] = v.float()
                vlens[i] = len(v)
                if r.sync_features is not None and len(r.sync_features):
                    s = r.sync_features[:int(math.ceil(r.duration * cfg.sync_rate - 1e-6))].float()
                    sync[i, :len(s)] = s
                    sync[i, len(s):] = s[-1]               # edge: what the unpadded interpolation reads past the end
            if r.text_tokens is not None and len(r.text_tokens):
                if len(r.text_tokens) > Lt:
                    raise ValueError(f"request {i}: {len(r.text_tokens)} text tokens, the DiT takes at most {Lt}")
                text[i, :len(r.text_tokens)] = r.text_tokens.float()
                tlens[i] = len(r.text_tokens)
        cond = Conditions(text_tokens=text, text_lens=tlens, video_tokens=video, video_lens=vlens, sync=sync,
                          duration=torch.tensor([float(r.duration) for r in reqs]))
        cond.validate()
        return cond

    def noise(self, requests: Sequence[Request], num_frames: int, rows: int) -> Tensor:
        """x0 [rows, num_frames, C]: each request's own seed's noise at its own length, zeros after."""
        cfg, pipe = self.pipe.dit.config, self.pipe
        x0 = torch.zeros(rows, num_frames, cfg.latent_dim)
        for i, r in enumerate(requests):
            n = cfg.num_frames(r.duration)
            x0[i, :n] = pipe.flow.noise(1, n, cfg.latent_dim, seed=r.seed)[0]
        return x0.to(pipe.device, pipe.dit.dtype)

    @torch.no_grad()
    def sample_batch(self, requests: Sequence[Request], bucket: float, rows: int,
                     timings: Optional[Dict[str, float]] = None) -> List[Tensor]:
        """Latents [T_i, C] of each request, sampled in one padded batch of ``rows`` rows at ``bucket`` seconds."""
        cfg = self.pipe.dit.config
        T = cfg.num_frames(bucket)
        cond = self.conditions(requests, bucket, rows)
        x = self.pipe._sample(cond, self.noise(requests, T, rows), self.options, {} if timings is None else timings)
        return [x[i, :cfg.num_frames(r.duration)] for i, r in enumerate(requests)]

    # -- many requests -------------------------------------------------------------------------------
    def sample(self, requests: Sequence[Request]) -> List[Tensor]:
        """Latents [T_i, C] per request, in request order."""
        out: List[Optional[Tensor]] = [None] * len(requests)
        for bucket, rows, idx in plan([r.duration for r in requests], self.config):
            for i, lat in zip(idx, self.sample_batch([requests[i] for i in idx], bucket, rows)):
                out[i] = lat
        return out

    @torch.no_grad()
    def decode(self, latents: Sequence[Tensor], durations: Sequence[float]) -> List[Tensor]:
        """Audio [round(duration_i * sample_rate)] float32 on the CPU per request; equal lengths decode together."""
        pipe = self.pipe
        out: List[Optional[Tensor]] = [None] * len(latents)
        by_len: Dict[int, List[int]] = {}
        for i, z in enumerate(latents):
            by_len.setdefault(z.shape[0], []).append(i)
        # a decode graph per shape: only for the shapes fixed-duration traffic repeats (a bucket's full length at a
        # configured batch size); other lengths decode eagerly instead of capturing one graph each
        full = {pipe.dit.config.num_frames(b) for b in self.config.buckets}
        for T, idx in by_len.items():
            z = pipe.to_vae_latents(torch.stack([latents[i] for i in idx])).float().transpose(1, 2)   # [n, C, T]
            graphed = pipe.device.type == "cuda" and T in full and len(idx) in self.config.batch_sizes
            wav = pipe.vae.decode_graphed(z) if graphed else pipe.vae.decode(z)
            wav = wav[:, 0].float().cpu()
            for j, i in enumerate(idx):
                out[i] = wav[j, :int(round(durations[i] * pipe.sample_rate))]
        return out

    def generate(self, requests: Sequence[Request]) -> List[Tensor]:
        """Audio per request (float32 [N_i] on the CPU), in request order."""
        if not requests:
            return []
        return self.decode(self.sample(requests), [r.duration for r in requests])

    def warm_up(self, text_tokens: int = 8) -> float:
        """Capture the graph of every (bucket, batch size) now (on the CPU: run each once); returns the seconds."""
        cfg = self.pipe.dit.config
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(0)
        for bucket in self.config.buckets:
            req = Request(duration=bucket, text_tokens=torch.randn(min(text_tokens, cfg.max_text_tokens), cfg.text_dim,
                                                                   generator=g),
                          video_features=torch.randn(int(math.ceil(bucket * cfg.video_rate - 1e-6)), cfg.video_dim,
                                                     generator=g),
                          sync_features=torch.randn(int(math.ceil(bucket * cfg.sync_rate - 1e-6)), cfg.sync_dim,
                                                    generator=g))
            for rows in self.config.batch_sizes:
                self.sample_batch([req], bucket, rows)
        if self.pipe.device.type == "cuda":
            torch.cuda.synchronize(self.pipe.device)
        return time.perf_counter() - t0
