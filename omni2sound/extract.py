"""Feature extraction: a manifest (or the toy world) -> sharded safetensors of latents and conditions.

    python -m omni2sound.extract --manifest data/train.jsonl --vae runs/x/vae --out feats/train [--shard-size 64]
    torchrun --nproc_per_node 8 -m omni2sound.extract ...     # rank r takes shards r, r + world, ...

Per clip: the VAE posterior of the audio (latent_mean, latent_std [T, C] at 25 Hz), the text encoder's
tokens of the caption [L, Dt], the semantic video tokens [V, Dv] (8 fps) and the sync features [S, Ds]
(25 fps video -> 24 per second); clips without video or caption get zero-length entries. The encoders are an
``EncoderSpec`` (``--text-encoder / --video-encoder / --sync-encoder``, see omni2sound/encoder_spec.py), recorded
with the widths they make in index.json; a clip with precomputed features (a SoundAtlas record's .npy files)
skips the video and sync encoders. Clips decode in DataLoader workers (``--workers``) while the encoders run on
whole shards (bf16 weights on a GPU); the progress bar counts clips (clips/s, ETA).

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
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .data.shards import ShardDataset, done_shards, shard_name, write_index, write_shard
from .device import default_device, device_arg
from .files import BadFileError, content_hash, read_json, remove_stale_temps, write_json

EXTRACTION_RECORD = "extraction.json"
# the fields of extraction.json a resumed run must match (the rest: paths and counts, for the reader)
_SPEC_FIELDS = ("manifest_sha256", "split", "shard_size", "frame_size", "encoders", "vae_sha256")


class Encoders:
    """The condition encoders the extractor uses, as an ``EncoderSpec`` names them (default: MiniLM text and the
    built-in frame and motion encoders): text(list[str]) -> (tokens [B, L, Dt], lens [B]);
    semantic(frames [T8, s, s, 3] uint8) -> [T8, Dv]; sync(frames [T25, s', s', 3] uint8) -> [T24, Ds].
    ``video_request`` / ``sync_request`` say how to decode the frames each one reads."""

    def __init__(self, text_path: Optional[str] = None, spec=None, device=None, dtype: Optional[torch.dtype] = None):
        from .encoder_spec import EncoderSpec, LoadedEncoders, load_text
        self.spec = spec if spec is not None else EncoderSpec.parse(text_path)
        device = torch.device(device or "cpu")
        self.dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.device = device
        self.text_encoder = load_text(self.spec.text, device, self.dtype)
        self._video = self._sync = None         # loaded on first use: released features never need them
        self._requests = LoadedEncoders(self.spec, self.text_encoder, None, None)
        self._cache: dict = {}

    @property
    def frame_encoder(self):
        if self._video is None:
            from .encoder_spec import load_video
            self._video = load_video(self.spec.video, self.device, self.dtype)
            self._requests.video = self._video
        return self._video

    @property
    def motion_encoder(self):
        if self._sync is None:
            from .encoder_spec import load_sync
            self._sync = load_sync(self.spec.sync, self.device, self.dtype)
            self._requests.sync = self._sync
        return self._sync

    @property
    def video_request(self):
        if self.spec.video.kind != "builtin" and not self.spec.video.image_size:
            self.frame_encoder                  # the tower's own input size
        return self._requests.video_request

    @property
    def sync_request(self):
        return self._requests.sync_request

    def note_features(self, video_dim: int, sync_dim: int, where: str) -> None:
        """Precomputed features of a clip (``where``): their widths become the spec's when its encoders were never
        run, else must equal them (a clear error naming the clip and both widths)."""
        from .encoder_spec import KNOWN_WIDTHS
        got = {"video": int(video_dim), "sync": int(sync_dim)}
        if self.spec.dims is None and self._video is None and self._sync is None:
            for name in ("video", "sync"):
                known = KNOWN_WIDTHS.get((name, getattr(self.spec, name).kind))
                if known is not None and known != got[name]:
                    raise ValueError(f"{where}: precomputed {name} features are {got[name]}-d, the spec's {name} "
                                     f"encoder ({getattr(self.spec, name).kind}) makes {known}-d ones")
            self.spec.dims = {"text": int(self.text_encoder.dim), **got}
            return
        dv, ds = self.dims()
        if (dv, ds) != (got["video"], got["sync"]):
            raise ValueError(f"{where}: precomputed features are video {got['video']}-d / sync {got['sync']}-d, the "
                             f"other clips' (encoders {self.spec.describe()}) video {dv}-d / sync {ds}-d")

    def text(self, captions: list) -> list:
        """[L_i, Dt] float tensors, one per caption (None or "" -> [0, Dt]); repeated captions encoded once."""
        todo = sorted({c for c in captions if c and c not in self._cache})   # (keys of _cache are captions)
        for i in range(0, len(todo), 64):
            batch = todo[i:i + 64]
            with torch.no_grad():
                try:
                    tokens, lens = self.text_encoder.encode(batch)
                except ValueError as e:     # a caption over max_tokens: cut it (as the paper's T5 conditioner does)
                    print(f"[extract] {e}: cut to {self.text_encoder.max_tokens} tokens", file=sys.stderr)
                    self.text_encoder.truncate = True
                    try:
                        tokens, lens = self.text_encoder.encode(batch)
                    finally:
                        self.text_encoder.truncate = False
            for c, t, n in zip(batch, tokens, lens):
                self._cache[c] = t[: int(n)].float().cpu()
        dim = int(self.text_encoder.dim)
        return [self._cache[c] if c else torch.zeros(0, dim) for c in captions]

    def dims(self) -> tuple:
        """(Dv, Ds), measured once on a blank clip (or taken from the first precomputed features)."""
        if self.spec.dims is None:
            self.frame_encoder, self.motion_encoder
            self._requests.dims()
        return self.spec.dims["video"], self.spec.dims["sync"]

    def spec_dict(self) -> dict:
        """The spec with its measured widths, as index.json records it. Without the video / sync encoders' files
        (a run on released features never loads them) and before any precomputed features were seen, the widths
        are left out (None); extraction fills them from the features."""
        try:
            self.dims()
        except (FileNotFoundError, ValueError):
            if self.spec.dims is None and self._video is None and self._sync is None:
                return self.spec.to_dict()
            raise
        return self.spec.to_dict()

    def spec_identity(self) -> dict:
        """What makes two runs' features the same: the spec without the measured widths (loads nothing)."""
        return self.spec.identity()

    @torch.no_grad()
    def semantic(self, frames: np.ndarray, chunk: int = 512) -> torch.Tensor:
        # in chunks: a shard's frames as float pictures would not fit in memory at once (64 x 10 s x 384 px: 9 GB)
        return torch.cat([torch.as_tensor(self.frame_encoder.encode(frames[i:i + chunk])).float().cpu()
                          for i in range(0, len(frames), chunk)])

    @torch.no_grad()
    def sync(self, frames: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(self.motion_encoder.encode(frames)).float().cpu()

    @torch.no_grad()
    def sync_many(self, clips: list) -> list:
        """sync() of several clips, in shared batches when the encoder batches (Synchformer's segments)."""
        many = getattr(self.motion_encoder, "encode_many", None)
        return [t.float().cpu() for t in many(clips)] if many is not None else [self.sync(c) for c in clips]


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
    sems, syns = {}, {}
    if with_frames:
        allsem = enc.semantic(np.concatenate([r["frames_semantic"] for r in with_frames]))
        sems = dict(zip([id(r) for r in with_frames], allsem.split([len(r["frames_semantic"]) for r in with_frames])))
        clips = [r["frames_sync"] for r in with_frames]
        many = getattr(enc, "sync_many", None)
        syns = dict(zip([id(r) for r in with_frames], many(clips) if many else [enc.sync(c) for c in clips]))
    note = getattr(enc, "note_features", None)
    if note is not None:                        # released features fix (or must match) the widths first
        for r in raw:
            if r.get("video") is not None and r.get("frames_semantic") is None:
                note(r["video"].shape[-1], r["sync"].shape[-1], f"clip {r['clip_id']}")
    out = []
    for i, r in enumerate(raw):
        if r.get("video") is not None:          # features given (e.g. an off-screen variant of a clip)
            sem, syn = r["video"], r["sync"]
        elif r.get("frames_semantic") is not None:
            sem, syn = sems[id(r)], syns[id(r)]
        else:
            sem, syn = torch.zeros(0, enc.dims()[0]), torch.zeros(0, enc.dims()[1])
        out.append({"clip_id": r["clip_id"], "caption": r.get("caption"), "duration": r["duration"],
                    "latent_mean": means[i], "latent_std": stds[i], "text": texts[i], "video": sem, "sync": syn})
    return out


def extract_shards(load_shard: Callable[[int], list], n_shards: int, out_dir: str, vae, enc: Encoders,
                   rank: int = 0, world: int = 1, stop_after: Optional[int] = None, progress: bool = True,
                   iter_raw: Optional[Callable[[list], Iterator]] = None, n_clips: Optional[int] = None) -> list:
    """Write the missing shards among r::world. load_shard(k) -> raw items of shard k, or iter_raw(shards) ->
    (k, raw items) in order (decoding ahead in workers). Returns the shard numbers written by this call.
    stop_after: return after that many shards (tests simulate a kill). n_clips(k): clips in shard k, for a
    progress bar in clips with clips/s and an ETA."""
    done = set(done_shards(out_dir))
    ours = list(range(rank, n_shards, world))
    mine = [k for k in ours if k not in done]
    if stop_after is not None:
        mine = mine[:stop_after]
    written = []
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        count = n_clips or (lambda k: 1)
        bar = tqdm(total=sum(count(k) for k in ours), initial=sum(count(k) for k in ours if k in done),
                   unit="clip" if n_clips else "shard", desc=f"extract {os.path.basename(out_dir)}",
                   dynamic_ncols=True, mininterval=2.0, smoothing=0.1)
    source = iter_raw(mine) if iter_raw is not None else ((k, load_shard(k)) for k in mine)
    for k, raw in source:
        if raw:
            write_shard(os.path.join(out_dir, shard_name(k)), encode_items(raw, vae, enc))
        written.append(k)
        if bar is not None:
            bar.update(n_clips(k) if n_clips else 1)
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
    """The encoders' own description (``enc.spec_dict()``: the EncoderSpec with its widths), or their class for
    encoders without one."""
    fn = getattr(enc, "spec_dict", None)
    return fn() if callable(fn) else {"class": f"{type(enc).__module__}.{type(enc).__qualname__}"}


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
    remove_stale_temps(feat_dir, recursive=True)
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
        write_index(os.path.join(feat_dir, s), {"source": "toy", "toy": asdict(world.cfg), **encoder_record(enc)})
    meta = {"key": key, "complete": complete, "n_shards": n_shards}
    write_json(meta_path, meta)
    return meta


# ----------------------------------------------------------------------------------------------------
# Manifests (real data)
# ----------------------------------------------------------------------------------------------------
def encoder_record(enc) -> dict:
    """What index.json records of the encoders: the spec with its measured widths (EncoderSpec.to_dict())."""
    fn = getattr(enc, "spec_dict", None)
    return {"encoders": fn()} if fn is not None else {}


def extract_manifest(manifest: str, vae_dir: str, out_dir: str, shard_size: int = 64, rank: int = 0,
                     world: int = 1, text_encoder: Optional[str] = None, frame_size: Optional[int] = None,
                     split: Optional[str] = None, enc: Optional[Encoders] = None,
                     stop_after: Optional[int] = None, progress: bool = True, device: str = "cpu",
                     spec=None, workers: Optional[int] = None, rebuild: bool = False) -> dict:
    """Extract the records of ``manifest`` into shards under ``out_dir`` (this rank's share r::world), resuming a
    killed run of the same settings (see prepare_output; ``rebuild`` starts over). Under torch.distributed every
    rank must call it (rank 0 checks the folder, the others wait for its verdict).
    spec: the EncoderSpec (default: MiniLM, or ``text_encoder``, and the built-in video / sync encoders);
    frame_size: the built-in encoders' frame side; workers: decoding processes (default: CPUs - 1, at most 8)."""
    from .data.decode import default_workers, iter_shards
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
    if enc is None:
        from .encoder_spec import EncoderSpec
        spec = spec or EncoderSpec.parse(text_encoder)
        if frame_size is not None:
            if spec.video.kind == "builtin":
                spec.video.image_size = frame_size
            if spec.sync.kind == "builtin":
                spec.sync.frame_size = frame_size
        enc = Encoders(spec=spec, device=device)
    failed: list = []
    # through JSON, so it compares equal to the record read back (tuples become lists)
    record = json.loads(json.dumps({
        "manifest_sha256": records_hash(records), "split": split, "shard_size": shard_size,
        "frame_size": frame_size, "encoders": encoder_spec(enc), "vae_sha256": vae_hash(vae_dir),
        "manifest": os.path.abspath(manifest), "records": len(records), "vae": os.path.abspath(vae_dir)}))
    distributed = world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    refused = [None]
    if rank == 0:
        try:
            prepare_output(out_dir, record, rebuild)
        except ExtractionMismatch as e:
            refused[0] = str(e)
    if distributed:                 # the other ranks wait for rank 0's verdict (and stop with it)
        torch.distributed.broadcast_object_list(refused, src=0)
    if refused[0] is not None:
        raise ExtractionMismatch(refused[0])
    if rank != 0:
        recorded = read_json(os.path.join(out_dir, EXTRACTION_RECORD))
        if any(recorded.get(k) != record.get(k) for k in _SPEC_FIELDS):
            raise ExtractionMismatch(f"{out_dir}/{EXTRACTION_RECORD}: rank {rank} sees other settings than rank 0 "
                                     "(a different manifest, VAE or encoders on this node?)")
    from .encoder_spec import BUILTIN_FRAME_SIZE, FrameRequest
    vreq = sreq = None
    if any(r.video and not (r.features or {}).get("video") for r in records):   # some clip decodes its frames
        vreq = getattr(enc, "video_request", FrameRequest(8.0, frame_size or BUILTIN_FRAME_SIZE))
        sreq = getattr(enc, "sync_request", FrameRequest(25.0, frame_size or BUILTIN_FRAME_SIZE))
    n_shards = (len(records) + shard_size - 1) // shard_size
    workers = default_workers() if workers is None else workers

    def iter_raw(shards):
        return iter_shards(records, shards, shard_size, vae.sample_rate, vreq, sreq, workers, failed)

    def n_clips(k):
        return len(records[k * shard_size:(k + 1) * shard_size])
    written = extract_shards(None, n_shards, out_dir, vae, enc, rank, world, stop_after, progress,
                             iter_raw=iter_raw, n_clips=n_clips)
    return {"records": len(records), "manifest_skipped": report.skipped, "clips_failed": failed,
            "shards": n_shards, "written": written, **encoder_record(enc)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m omni2sound.extract", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n")[0],
        epilog="""manifest format (JSON lines, one clip per line; paths relative to the manifest's folder):
  {"clip_id": "vggsound/abc_1", "audio": "audio/abc_1.flac", "duration": 10.0,       <- required
   "video": "video/abc_1.mp4", "start": 0.0, "caption": "a dog barks twice",
   "offscreen": "a man speaks off-screen", "av_score": 0.34, "route": "audio-visual",
   "source": "vggsound", "split": "train"}
clip_id, audio and duration are required; a clip without video or caption gets empty video / text features.
split is train, val or test; route is audio-visual or audio-only (av_score under 0.20 is rejected).
A bad record is reported with its file and line and skipped; the run goes on.

output: OUT/shard-NNNNN.safetensors (latent_mean / latent_std [T, C] at the VAE's latent rate, text tokens
[L, Dt], semantic video tokens [V, Dv] at 8 fps, sync features [S, Ds] at 24 per second) and OUT/index.json.
Resumable: finished shards are skipped on a rerun. Several GPUs: torchrun --nproc_per_node N -m omni2sound.extract
""")
    p.add_argument("--manifest", required=True, help="the clips: a JSON-lines manifest (format below)")
    p.add_argument("--vae", required=True,
                   help="VAE folder (AudioVAE.save_pretrained, e.g. runs/NAME/vae) that encodes the audio to latents")
    p.add_argument("--out", required=True, help="output folder for the shards and index.json")
    p.add_argument("--shard-size", type=int, default=64, help="clips per shard (default 64)")
    p.add_argument("--split", choices=("train", "val", "test"), help="only the manifest's records of this split")
    p.add_argument("--text-encoder", help="minilm (default) | t5:DIR | clap:DIR | DIR (a local transformers folder)")
    p.add_argument("--video-encoder", help="builtin (default) | hf:DIR (CLIP / SigLIP) | open_clip:ARCH:FILE")
    p.add_argument("--sync-encoder", help="builtin (default) | synchformer:FILE")
    p.add_argument("--sync-config", help="JSON file of SynchformerConfig fields for a checkpoint of another size than "
                                         "the released one")
    p.add_argument("--video-size", type=int, help="vision tower input pixels (default: the model's; paper: 384)")
    p.add_argument("--text-max-tokens", type=int, help="longest caption in tokens (default 128)")
    p.add_argument("--frame-size", type=int, default=None,
                   help="video frames are resized to this square for the built-in frame and motion encoders "
                        "(default 64)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPUs - 1, at most 8)")
    p.add_argument("--device", default=default_device(), type=device_arg, help="default: cuda if visible, else cpu")
    p.add_argument("--rebuild", action="store_true",
                   help="remove shards extracted with other settings (manifest, shard size, encoders, VAE) and "
                        "start over; without it such a folder is refused")
    a = p.parse_args(argv)
    from .encoder_spec import EncoderSpec
    try:
        spec = EncoderSpec.parse(a.text_encoder, a.video_encoder, a.sync_encoder, a.text_max_tokens, a.video_size,
                                 check=False)
        if a.sync_config:
            with open(a.sync_config) as f:
                spec.sync.config = json.load(f)
    except (OSError, ValueError) as e:
        p.error(str(e))
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if a.device.startswith("cuda"):     # each rank its own GPU, set before NCCL starts (its barrier uses it)
            a.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(torch.device(a.device))
        torch.distributed.init_process_group("nccl" if a.device.startswith("cuda") else "gloo")
    try:
        res = extract_manifest(a.manifest, a.vae, a.out, a.shard_size, rank, world, None, a.frame_size,
                               a.split, device=a.device, spec=spec, workers=a.workers, rebuild=a.rebuild)
    except (ValueError, FileNotFoundError) as e:    # an unusable manifest, a missing VAE folder: the reason
        p.exit(2, f"{p.prog}: error: {e}\n")
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        # the VAE that made these latents and the encoders of the conditions: a training run on this folder
        # names both in its stages' pipeline.json (and sizes its DiT from the encoders' widths)
        idx = write_index(a.out, {"manifest": os.path.abspath(a.manifest), "vae": os.path.abspath(a.vae),
                                  "encoders": res["encoders"]})
        print(json.dumps({**{k: v for k, v in res.items() if k != "encoders"}, "num_clips": idx["num_clips"],
                          "written": len(res["written"])}))
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
