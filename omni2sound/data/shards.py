"""Feature shards: precomputed conditions and latents in safetensors files, read memory-mapped.

One shard `shard-00042.safetensors` holds n clips. Every per-clip feature of variable length is packed
along its first axis with an offsets vector (like the varlen attention's cu_seqlens):

    latent_mean [sum T, C], latent_std [sum T, C]   VAE posterior of the audio (25 Hz frames)
    text        [sum L, Dt]                          text encoder tokens (L = 0 when there is no caption)
    video       [sum V, Dv]                          semantic video tokens, 8 per second (0 without video)
    sync        [sum S, Ds]                          sync features, 24 per second (0 without video)
    <key>.offsets [n + 1] int64 for each key above; duration [n] float32 seconds
    metadata: clip_ids, captions (JSON lists), format

A shard is written to a temporary file and renamed, so a shard that exists is complete: the file listing
is the done-list, and `index.json` (rewritten after every run of the extractor) is a cache of it.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors.torch import save_file

from ..conditions import Conditions
from ..files import BadFileError, atomic_write, open_safetensors, write_json

FORMAT = "omni2sound-shard-v1"
KEYS = ("latent_mean", "latent_std", "text", "video", "sync")
SHARD_RE = re.compile(r"^shard-(\d{5})\.safetensors$")


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def write_shard(path: str, items: list) -> None:
    """items: dicts with clip_id, caption, duration and the tensors of KEYS ([len, dim] each). Atomic."""
    if not items:
        raise ValueError(f"write_shard({path}): no items")
    tensors = {}
    for key in KEYS:
        parts = [torch.as_tensor(it[key]).float().contiguous() for it in items]
        dims = {tuple(p.shape[1:]) for p in parts if p.dim() == 2}
        if any(p.dim() != 2 for p in parts) or len(dims) != 1:
            raise ValueError(f"write_shard({path}): {key!r} must be [len, dim] with one dim for all clips, "
                             f"got {[tuple(p.shape) for p in parts]}")
        lens = torch.tensor([0] + [p.shape[0] for p in parts], dtype=torch.int64)
        tensors[key] = torch.cat(parts, 0)
        tensors[f"{key}.offsets"] = torch.cumsum(lens, 0)
    tensors["duration"] = torch.tensor([float(it["duration"]) for it in items], dtype=torch.float32)
    meta = {"format": FORMAT, "clip_ids": json.dumps([it["clip_id"] for it in items]),
            "captions": json.dumps([it.get("caption") for it in items])}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def done_shards(directory: str) -> list:
    """Shard numbers that exist (complete, thanks to the atomic rename), sorted."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for f in os.listdir(directory) if (m := SHARD_RE.match(f)))


def write_index(directory: str, extra: Optional[dict] = None) -> dict:
    """Rewrite index.json from the shards on disk (the file listing is the truth)."""
    shards = []
    for k in done_shards(directory):
        with open_safetensors(os.path.join(directory, shard_name(k))) as f:
            ids = json.loads(f.metadata()["clip_ids"])
        shards.append({"file": shard_name(k), "n": len(ids), "clip_ids": ids})
    index = {"format": FORMAT, "shards": shards, "num_clips": sum(s["n"] for s in shards), **(extra or {})}
    write_json(os.path.join(directory, "index.json"), index, indent=1)
    return index


class ShardDataset:
    """Random access to the clips of a shard folder, memory-mapped (safetensors safe_open + slices).
    `ds[i]` -> dict of [len, dim] tensors + clip_id, caption, duration."""

    def __init__(self, directory: str):
        self.directory = directory
        ks = done_shards(directory)
        if not ks:
            raise FileNotFoundError(f"no feature shards (shard-NNNNN.safetensors) in {directory}")
        self.files, self.offsets, self.clip_ids, self.captions, self.rows = [], {}, [], [], []
        for k in ks:
            path = os.path.join(directory, shard_name(k))
            f = open_safetensors(path)                 # kept open: the file is mapped, slices are cheap
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not an omni2sound feature shard (format {meta.get('format')!r})")
            si = len(self.files)
            try:
                offsets = {key: f.get_tensor(f"{key}.offsets") for key in KEYS}
                offsets["duration"] = f.get_tensor("duration")
                ids, captions = json.loads(meta["clip_ids"]), json.loads(meta["captions"])
            except Exception as e:          # a missing tensor or metadata entry: not a shard write_shard made
                raise BadFileError(path, f"incomplete feature shard ({type(e).__name__}: {e})") from None
            self.files.append(f)
            self.offsets[si] = offsets
            self.clip_ids += ids
            self.captions += captions
            self.rows += [(si, j) for j in range(len(ids))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        si, j = self.rows[i]
        f, off = self.files[si], self.offsets[si]
        out = {"clip_id": self.clip_ids[i], "caption": self.captions[i], "duration": float(off["duration"][j])}
        for key in KEYS:
            a, b = int(off[key][j]), int(off[key][j + 1])
            out[key] = f.get_slice(key)[a:b]
        return out


@dataclass
class FeatureTable:
    """All clips of a data set as padded dense tensors in memory: the fast path for small data (the toy
    world) where one step's batch is an index_select. Shapes (N clips):
        latent_mean, latent_std [N, T, C]; text [N, L, Dt], text_lens [N]; video [N, V, Dv], video_lens [N];
        sync [N, S, Ds]; duration [N]; latent_lens [N]"""
    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    latent_lens: torch.Tensor
    text: torch.Tensor
    text_lens: torch.Tensor
    video: torch.Tensor
    video_lens: torch.Tensor
    sync: torch.Tensor
    duration: torch.Tensor
    clip_ids: list
    captions: list

    def __len__(self) -> int:
        return self.latent_mean.shape[0]

    @staticmethod
    def from_items(items: list) -> "FeatureTable":
        def pad(key):
            ts = [torch.as_tensor(it[key]).float() for it in items]
            n = max(t.shape[0] for t in ts)
            out = torch.zeros(len(ts), max(n, 1), ts[0].shape[1])
            for i, t in enumerate(ts):
                out[i, : t.shape[0]] = t
            return out, torch.tensor([t.shape[0] for t in ts], dtype=torch.int64)

        lm, ll = pad("latent_mean")
        ls, _ = pad("latent_std")
        tx, tl = pad("text")
        vd, vl = pad("video")
        sy, _ = pad("sync")
        return FeatureTable(lm, ls, ll, tx, tl, vd, vl, sy,
                            torch.tensor([float(it["duration"]) for it in items]),
                            [it["clip_id"] for it in items], [it.get("caption") for it in items])

    @staticmethod
    def from_shards(directory: str) -> "FeatureTable":
        ds = ShardDataset(directory)
        return FeatureTable.from_items([ds[i] for i in range(len(ds))])

    def batch(self, index: torch.Tensor, generator: Optional[torch.Generator] = None,
              sample_latent: bool = True) -> tuple:
        """(x1 [B, T, C], Conditions) for the clips `index`. x1 is a draw from the VAE posterior
        (mean + std * noise) when sample_latent, else the mean. Clips of different lengths are cut to the
        shortest of the batch (latent frames, video tokens and sync features from the start, in proportion)."""
        index = torch.as_tensor(index, dtype=torch.int64)
        T = int(self.latent_lens[index].min())
        dur = torch.minimum(self.duration[index], self.duration[index].min().expand(len(index)))
        x1 = self.latent_mean[index, :T]
        if sample_latent:
            noise = torch.randn(x1.shape, generator=generator)
            x1 = x1 + self.latent_std[index, :T] * noise
        frac = T / self.latent_lens[index].float()                     # [B] kept fraction of each clip
        vlen = torch.minimum(self.video_lens[index], torch.ceil(self.video_lens[index] * frac).long())
        S = int(torch.ceil(self.sync.shape[1] * frac.min()).clamp(min=1))
        Lt = max(1, int(self.text_lens[index].max()))
        Lv = max(1, int(vlen.max()))
        cond = Conditions(text_tokens=self.text[index, :Lt], text_lens=self.text_lens[index].clone(),
                          video_tokens=self.video[index, :Lv], video_lens=vlen,
                          sync=self.sync[index, :S], duration=dur)
        return x1, cond
