"""Feature extraction: a manifest (or the toy world) -> sharded safetensors of latents and conditions.

    python -m omni2sound.extract --manifest data/train.jsonl --vae runs/x/vae --out feats/train [--shard-size 64]
    torchrun --nproc_per_node 8 -m omni2sound.extract ...     # rank r takes shards r, r + world, ...

Per clip: the VAE posterior of the audio (latent_mean, latent_std [T, C] at 25 Hz), the text encoder's
tokens of the caption [L, Dt], the semantic video tokens [V, Dv] (8 fps) and the sync features [S, Ds]
(25 fps video -> 24 per second); clips without video or caption get zero-length entries.

Resumable: shard k holds manifest records [k * size, (k + 1) * size) and is written atomically, so after
a kill the shards on disk are exactly the finished ones; a rerun skips them (and never writes one twice).
That holds only if the rerun cuts the same records into the same shards with the same models, so the
output folder's extraction.json records, before the first shard is written, what the shards depend on:
the content hash of the manifest's usable records, the shard size, the encoders, the frame size and the
VAE's weights hash. A rerun that differs in any of them refuses, naming what changed (``--rebuild``
removes the old shards and starts over). index.json is rewritten from the files at the end. Bad records
are skipped and counted (manifest.py); a clip that fails to load is reported with its id and left out of
its shard.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict
from typing import Callable, Optional

import numpy as np
import torch

from .data.shards import ShardDataset, done_shards, shard_name, write_index, write_shard
from .device import device_arg
from .files import BadFileError, content_hash, read_json, remove_stale_temps, write_json

EXTRACTION_RECORD = "extraction.json"
# the fields of extraction.json a resumed run must match (the rest: paths and counts, for the reader)
_SPEC_FIELDS = ("manifest_sha256", "split", "shard_size", "frame_size", "encoders", "vae_sha256")


class Encoders:
    """The condition encoders the extractor uses (the package's built-in ones by default):
    text(list[str]) -> (tokens [B, L, Dt], lens [B]); semantic(frames [T8, H, W, 3] uint8) -> [T8, Dv];
    sync(frames [T25, H, W, 3] uint8) -> [S, Ds]."""

    def __init__(self, text_path: Optional[str] = None):
        from .encoders import FrameSemanticEncoder, MotionSyncEncoder, TextEncoder
        self.text_encoder = TextEncoder.from_pretrained(text_path)
        self.frame_encoder = FrameSemanticEncoder()
        self.motion_encoder = MotionSyncEncoder()
        self._cache: dict = {}

    def spec(self) -> dict:
        """What the features depend on, for extraction.json (a rerun with other encoders must not resume)."""
        t = self.text_encoder
        return {"text": {"class": type(t).__name__, "path": os.path.abspath(t.name) if t.name else None,
                         "max_tokens": t.max_tokens, "truncate": t.truncate},
                "semantic": {"class": type(self.frame_encoder).__name__, "dim": self.frame_encoder.dim},
                "sync": {"class": type(self.motion_encoder).__name__, "dim": self.motion_encoder.dim}}

    def text(self, captions: list) -> list:
        """[L_i, Dt] float tensors, one per caption (None or "" -> [0, Dt]); repeated captions encoded once."""
        todo = sorted({c for c in captions if c and c not in self._cache})   # (keys of _cache are captions)
        for i in range(0, len(todo), 64):
            batch = todo[i:i + 64]
            with torch.no_grad():
                tokens, lens = self.text_encoder.encode(batch)
            for c, t, n in zip(batch, tokens, lens):
                self._cache[c] = t[: int(n)].float().cpu()
        dim = next((v.shape[-1] for k, v in self._cache.items() if k != "_dims"), 384)
        return [self._cache[c] if c else torch.zeros(0, dim) for c in captions]

    def dims(self) -> tuple:
        """(Dv, Ds), probed once on a blank clip."""
        if "_dims" not in self._cache:
            blank = np.zeros((25, 32, 32, 3), np.uint8)
            self._cache["_dims"] = (self.semantic(blank[:8]).shape[-1], self.sync(blank).shape[-1])
        return self._cache["_dims"]

    @torch.no_grad()
    def semantic(self, frames: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(self.frame_encoder.encode(frames)).float().cpu()

    @torch.no_grad()
    def sync(self, frames: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(self.motion_encoder.encode(frames)).float().cpu()


@torch.no_grad()
def encode_items(raw: list, vae, enc: Encoders) -> list:
    """raw: dicts with clip_id, audio (np [N] at the VAE rate), frames_semantic / frames_sync (uint8 or None)
    or precomputed video / sync features, caption (or None), duration -> feature dicts for write_shard."""
    texts = enc.text([r.get("caption") for r in raw])
    lens = {len(r["audio"]) for r in raw}
    device = next(vae.parameters()).device
    if len(lens) == 1:          # one batched encode when the clips have one length (the toy world)
        wav = torch.from_numpy(np.stack([r["audio"] for r in raw])).float()[:, None].to(device)
        posts = [vae.encode(wav)]
    else:
        posts = [vae.encode(torch.from_numpy(r["audio"]).float()[None, None].to(device)) for r in raw]
    means = torch.cat([p.mean for p in posts]).transpose(1, 2).float().cpu()        # [B, T, C]
    stds = torch.cat([torch.exp(0.5 * p.logvar) for p in posts]).transpose(1, 2).float().cpu()
    # the semantic encoder is per frame: one call for every frame of the shard
    with_frames = [r for r in raw if r.get("video") is None and r.get("frames_semantic") is not None]
    sems = {}
    if with_frames:
        allsem = enc.semantic(np.concatenate([r["frames_semantic"] for r in with_frames]))
        sems = dict(zip([id(r) for r in with_frames], allsem.split([len(r["frames_semantic"]) for r in with_frames])))
    out = []
    for i, r in enumerate(raw):
        if r.get("video") is not None:          # features given (e.g. an off-screen variant of a clip)
            sem, syn = r["video"], r["sync"]
        elif r.get("frames_semantic") is not None:
            sem, syn = sems[id(r)], enc.sync(r["frames_sync"])
        else:
            sem, syn = torch.zeros(0, enc.dims()[0]), torch.zeros(0, enc.dims()[1])
        out.append({"clip_id": r["clip_id"], "caption": r.get("caption"), "duration": r["duration"],
                    "latent_mean": means[i], "latent_std": stds[i], "text": texts[i], "video": sem, "sync": syn})
    return out


def extract_shards(load_shard: Callable[[int], list], n_shards: int, out_dir: str, vae, enc: Encoders,
                   rank: int = 0, world: int = 1, stop_after: Optional[int] = None, progress: bool = True) -> list:
    """Write the missing shards among r::world. load_shard(k) -> raw items of shard k. Returns the shard
    numbers written by this call. stop_after: return after that many shards (tests simulate a kill)."""
    done = set(done_shards(out_dir))
    mine = [k for k in range(rank, n_shards, world) if k not in done]
    written = []
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=len(range(rank, n_shards, world)), initial=len(range(rank, n_shards, world)) - len(mine),
                   desc=f"extract {os.path.basename(out_dir)}", dynamic_ncols=True, mininterval=2.0)
    for k in mine:
        if stop_after is not None and len(written) >= stop_after:
            break
        raw = load_shard(k)
        if raw:
            write_shard(os.path.join(out_dir, shard_name(k)), encode_items(raw, vae, enc))
        written.append(k)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return written


# ----------------------------------------------------------------------------------------------------
# The toy world's features (once per run, cached under runs/<name>/features)
# ----------------------------------------------------------------------------------------------------
def _toy_raw(clip) -> dict:
    return {"clip_id": clip.clip_id, "audio": clip.audio, "frames_semantic": clip.frames_semantic,
            "frames_sync": clip.frames_sync, "caption": clip.caption, "duration": clip.duration}


def offscreen_partner(world, clip, i: int, n: int, seed: int):
    """A deterministic other training clip whose classes the clip does not have (its sound goes off-screen)."""
    rng = np.random.default_rng([seed, 99, i])
    mine = {e.cls for e in clip.events}
    for _ in range(100):
        j = int(rng.integers(n))
        other = world.clip(j, "train")
        if j != i and not mine & {e.cls for e in other.events}:
            return other
    return world.clip((i + 1) % n, "train")


def _file_digest(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encoder_spec(enc) -> dict:
    """The encoders' own description (``enc.spec()``), or their class for encoders without one."""
    spec = getattr(enc, "spec", None)
    return spec() if callable(spec) else {"class": f"{type(enc).__module__}.{type(enc).__qualname__}"}


def vae_hash(vae_dir: str) -> str:
    """sha256 of the VAE folder's weights (model.safetensors) and config.json, in that order."""
    from .vae import CONFIG_NAME, WEIGHTS_NAME
    return hashlib.sha256("".join(content_hash(os.path.join(vae_dir, n))
                                  for n in (WEIGHTS_NAME, CONFIG_NAME)).encode()).hexdigest()


def records_hash(records) -> str:
    """sha256 of the usable records in order (what the shards are cut from: an edited, added or removed record,
    or a reordered manifest, changes it)."""
    h = hashlib.sha256()
    for r in records:
        h.update((r.to_json() if hasattr(r, "to_json") else json.dumps(r, sort_keys=True)).encode() + b"\n")
    return h.hexdigest()


class ExtractionMismatch(ValueError):
    """An output folder holds shards extracted with other settings than this run's."""


def _describe_change(key: str, old, new) -> str:
    if key == "manifest_sha256":
        return "the manifest's records changed (an added, removed, edited or reordered record)"
    if key == "vae_sha256":
        return "the VAE's weights or config changed"
    if key == "encoders":
        return f"the encoders changed ({json.dumps(old, sort_keys=True)} -> {json.dumps(new, sort_keys=True)})"
    return f"{key.replace('_', ' ')} {old!r} -> {new!r}"


def prepare_output(out_dir: str, spec: dict, rebuild: bool = False) -> list:
    """Check (or start) ``out_dir`` for an extraction with ``spec`` before any shard is written: a new folder gets
    extraction.json; a folder whose recorded spec matches resumes; one that differs (or holds shards with no record)
    raises ExtractionMismatch naming what changed, unless ``rebuild``, which removes its shards and index.json first.
    Returns the shard numbers already done."""
    path = os.path.join(out_dir, EXTRACTION_RECORD)
    remove_stale_temps(out_dir)
    done = done_shards(out_dir)
    old = None
    if os.path.exists(path):
        try:
            old = read_json(path)
        except BadFileError as e:
            if not rebuild:
                raise ExtractionMismatch(f"{e}; rerun with --rebuild to start this folder over") from None
    changes = []
    if old is not None:
        changes = [_describe_change(k, old.get(k), spec.get(k)) for k in _SPEC_FIELDS if old.get(k) != spec.get(k)]
    elif done:
        changes = [f"{len(done)} shards but no {EXTRACTION_RECORD} saying how they were made"]
    if changes and not rebuild:
        raise ExtractionMismatch(f"{out_dir}: holds {len(done)} shards extracted with other settings: "
                                 f"{'; '.join(changes)}. Rerun with --rebuild to remove them and start over, "
                                 "or choose another --out")
    if changes or (rebuild and (done or old is not None)):
        for k in done:
            os.remove(os.path.join(out_dir, shard_name(k)))
        if os.path.exists(os.path.join(out_dir, "index.json")):
            os.remove(os.path.join(out_dir, "index.json"))
        done = []
    write_json(path, spec)
    return done


def extract_toy_features(cfg, vae_dir: str, feat_dir: str, shard_size: int = 64, enc: Optional[Encoders] = None,
                         stop_after: Optional[int] = None) -> dict:
    """train/ (the clips) and offscreen/ (each clip mixed with another clip's sound, off-screen caption),
    skipped when features of the same VAE weights and toy config exist."""
    from .toy import ToyConfig, ToyWorld
    from .vae import AudioVAE
    enc = enc or Encoders()
    weights = [f for f in os.listdir(vae_dir) if f.endswith(".safetensors")]
    # json round trip: the key compares equal to the one read back from meta.json (tuples become lists)
    key = json.loads(json.dumps({
        "vae": _file_digest(os.path.join(vae_dir, sorted(weights)[0])) if weights else None,
        "seed": cfg.seed, "clips": cfg.toy_train_clips, "duration": cfg.toy_duration, "shard_size": shard_size,
        "encoders": encoder_spec(enc)}))
    meta_path = os.path.join(feat_dir, "meta.json")
    for sub in ("train", "offscreen"):
        remove_stale_temps(os.path.join(feat_dir, sub))
    meta = None
    if os.path.isfile(meta_path):
        try:
            meta = read_json(meta_path)
        except BadFileError as e:           # a cache: a broken record means its shards cannot be trusted
            print(f"[extract] {e}; extracting the toy features again", file=sys.stderr)
            meta = {}
        if meta.get("key") == key and meta.get("complete"):
            return meta
    stale = meta is not None and meta.get("key") != key       # other VAE, data or encoders
    if stale or meta is None:           # no record: shards of unknown provenance are stale too
        for sub in ("train", "offscreen"):
            for k in done_shards(os.path.join(feat_dir, sub)):
                os.remove(os.path.join(feat_dir, sub, shard_name(k)))
    write_json(meta_path, {"key": key, "complete": False})
    vae = AudioVAE.from_pretrained(vae_dir).eval()
    world = ToyWorld(ToyConfig(seed=cfg.seed, duration=cfg.toy_duration))
    n = cfg.toy_train_clips
    n_shards = (n + shard_size - 1) // shard_size
    rows = lambda k: range(k * shard_size, min(n, (k + 1) * shard_size))
    extract_shards(lambda k: [_toy_raw(world.clip(i, "train")) for i in rows(k)], n_shards,
                   os.path.join(feat_dir, "train"), vae, enc, stop_after=stop_after, progress=cfg.progress)

    train = ShardDataset(os.path.join(feat_dir, "train")) if stop_after is None else None

    def off_shard(k):
        out = []
        for i in rows(k):
            clip = world.clip(i, "train")
            mixed = world.mix_offscreen(clip, offscreen_partner(world, clip, i, n, cfg.seed))
            raw = {**_toy_raw(mixed), "clip_id": clip.clip_id}           # aligned row by row with train/
            if train is not None:                                        # the picture is the clip's: reuse
                raw.update(video=train[i]["video"], sync=train[i]["sync"], frames_semantic=None, frames_sync=None)
            out.append(raw)
        return out
    extract_shards(off_shard, n_shards, os.path.join(feat_dir, "offscreen"), vae, enc, stop_after=stop_after,
                   progress=cfg.progress)
    complete = all(len(done_shards(os.path.join(feat_dir, s))) == n_shards for s in ("train", "offscreen"))
    for s in ("train", "offscreen"):
        write_index(os.path.join(feat_dir, s), {"source": "toy", "toy": asdict(world.cfg)})
    meta = {"key": key, "complete": complete, "n_shards": n_shards}
    write_json(meta_path, meta)
    return meta


# ----------------------------------------------------------------------------------------------------
# Manifests (real data)
# ----------------------------------------------------------------------------------------------------
def _load_record(rec, sample_rate: int, frame_size: int) -> Optional[dict]:
    from .audio import load_audio
    wav = load_audio(rec.audio, sample_rate).numpy()
    a = int(round(rec.start * sample_rate))
    wav = wav[a:a + int(round(rec.duration * sample_rate))]
    if len(wav) == 0:
        raise ValueError(f"{rec.audio}: no audio in [{rec.start}, {rec.start + rec.duration}] s")
    f8 = f25 = None
    if rec.video:
        from .video import read_video
        f8 = read_video(rec.video, fps=8, size=frame_size, start=rec.start, max_seconds=rec.duration)
        f25 = read_video(rec.video, fps=25, size=frame_size, start=rec.start, max_seconds=rec.duration)
    return {"clip_id": rec.clip_id, "audio": wav.astype(np.float32), "frames_semantic": f8, "frames_sync": f25,
            "caption": rec.caption, "duration": len(wav) / sample_rate}


def extract_manifest(manifest: str, vae_dir: str, out_dir: str, shard_size: int = 64, rank: int = 0,
                     world: int = 1, text_encoder: Optional[str] = None, frame_size: int = 64,
                     split: Optional[str] = None, enc: Optional[Encoders] = None,
                     stop_after: Optional[int] = None, progress: bool = True, device: str = "cpu",
                     rebuild: bool = False) -> dict:
    """Extract the manifest's records (of ``split``) into shards of ``shard_size`` clips in ``out_dir``, this rank's
    shards r::world, resuming a killed run of the same settings (see prepare_output; ``rebuild`` starts over).
    Under torch.distributed every rank must call it (rank 0 checks the folder, the others wait)."""
    from .data.manifest import ManifestValidationError, read_manifest
    from .vae import AudioVAE
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    records, report = read_manifest(manifest, split=split)
    if not records:                 # nothing to extract: say why (every bad line) instead of writing an empty index
        raise ManifestValidationError(f"no usable records{f' in split {split!r}' if split else ''}: "
                                      f"{report.summary()}")
    if report.skipped and rank == 0:
        print(report.summary(), file=sys.stderr)
    vae = AudioVAE.from_pretrained(vae_dir, device=device).eval()
    enc = enc or Encoders(text_encoder)
    spec = {"manifest_sha256": records_hash(records), "split": split, "shard_size": shard_size,
            "frame_size": frame_size, "encoders": encoder_spec(enc), "vae_sha256": vae_hash(vae_dir),
            "manifest": os.path.abspath(manifest), "records": len(records), "vae": os.path.abspath(vae_dir)}
    distributed = world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    refused = [None]
    if rank == 0:
        try:
            prepare_output(out_dir, spec, rebuild)
        except ExtractionMismatch as e:
            refused[0] = str(e)
    if distributed:                 # the other ranks wait for rank 0's verdict (and stop with it)
        torch.distributed.broadcast_object_list(refused, src=0)
    if refused[0] is not None:
        raise ExtractionMismatch(refused[0])
    if rank != 0:
        recorded = read_json(os.path.join(out_dir, EXTRACTION_RECORD))
        if any(recorded.get(k) != spec.get(k) for k in _SPEC_FIELDS):
            raise ExtractionMismatch(f"{out_dir}/{EXTRACTION_RECORD}: rank {rank} sees other settings than rank 0 "
                                     "(a different manifest, VAE or encoders on this node?)")
    failed = []

    def load_shard(k):
        out = []
        for rec in records[k * shard_size:(k + 1) * shard_size]:
            try:
                out.append(_load_record(rec, vae.sample_rate, frame_size))
            except Exception as e:          # one bad clip never stops a long run
                failed.append(f"{rec.clip_id}: {e}")
                print(f"[extract] skipped {rec.clip_id}: {e}", file=sys.stderr)
        return out

    n_shards = (len(records) + shard_size - 1) // shard_size
    written = extract_shards(load_shard, n_shards, out_dir, vae, enc, rank, world, stop_after, progress)
    return {"records": len(records), "manifest_skipped": report.skipped, "clips_failed": failed,
            "shards": n_shards, "written": written}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m omni2sound.extract", description=__doc__.split("\n")[0])
    p.add_argument("--manifest", required=True)
    p.add_argument("--vae", required=True, help="VAE folder (save_pretrained)")
    p.add_argument("--out", required=True)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--split", choices=("train", "val", "test"))
    p.add_argument("--text-encoder", help="local text encoder folder (default: the packaged MiniLM)")
    p.add_argument("--frame-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_arg)
    p.add_argument("--rebuild", action="store_true",
                   help="remove shards extracted with other settings (manifest, shard size, encoders, VAE) and "
                        "start over; without it such a folder is refused")
    a = p.parse_args(argv)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if a.device.startswith("cuda"):     # each rank its own GPU, set before NCCL starts (its barrier uses it)
            a.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(torch.device(a.device))
        torch.distributed.init_process_group("nccl" if a.device.startswith("cuda") else "gloo")
    try:
        res = extract_manifest(a.manifest, a.vae, a.out, a.shard_size, rank, world, a.text_encoder, a.frame_size,
                               a.split, device=a.device, rebuild=a.rebuild)
    except (ValueError, FileNotFoundError) as e:    # an unusable manifest, a missing VAE folder: the reason
        p.exit(2, f"{p.prog}: error: {e}\n")
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        # the VAE that made these latents: a training run on this folder names it in its stages' pipeline.json
        idx = write_index(a.out, {"manifest": os.path.abspath(a.manifest), "vae": os.path.abspath(a.vae)})
        print(json.dumps({**res, "num_clips": idx["num_clips"], "written": len(res["written"])}))
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
