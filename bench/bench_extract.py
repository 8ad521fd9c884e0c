"""Feature extraction throughput: clips per second of ``extract_manifest`` (clips decoded in DataLoader workers,
each shard's frames and Synchformer segments batched through the encoders, bf16 weights on a GPU) against the
naive loop (one clip at a time in the main process: decode, then each encoder and the VAE on that clip alone, fp32),
on the same clips, encoders and VAE in the same run.

    python bench/bench_extract.py                         # tiny random encoders of the paper's kinds, CPU
    python bench/bench_extract.py --full --device cuda    # full-size random CLIP ViT-H/14 at 384 px (transformers),
                                                          # Synchformer and Flan-T5-base widths, on a GPU

Media: N mp4 clips (MPEG-4 video 25 fps with an AAC soundtrack, written here with PyAV) of a moving square over
noise, listed in a manifest. Encoders (random weights, the real architectures, saved and loaded through the
package's loaders): Flan-T5 (whole seq2seq checkpoint), a CLIP vision tower with projection, Synchformer's visual
extractor. The VAE is the ``tiny`` preset (``--vae paper`` for the paper's).
"""
import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from fractions import Fraction

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def write_clip(path, seconds: float, seed: int, size=(240, 320), sr=16000) -> None:
    import av
    rng = np.random.default_rng(seed)
    n = int(seconds * 25)
    h, w = size
    with av.open(str(path), mode="w") as c:
        vs = c.add_stream("mpeg4", rate=Fraction(25))
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        aus = c.add_stream("aac", rate=sr)
        aus.layout = "mono"
        for i in range(n):
            img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            y, x = (i * 7) % (h - 40), (i * 11) % (w - 40)
            img[y:y + 40, x:x + 40] = 220
            for pkt in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)
        wav = (0.1 * rng.standard_normal(int(seconds * sr))).astype(np.float32)
        for i in range(0, len(wav), 1024):
            fr = av.AudioFrame.from_ndarray(wav[None, i:i + 1024].copy(), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = sr, i
            for pkt in aus.encode(fr):
                c.mux(pkt)
        for pkt in aus.encode():
            c.mux(pkt)


def make_encoders(root: str, full: bool) -> tuple:
    """(spec, description) of random encoders of the paper's kinds saved under root."""
    import shutil

    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, T5Config, T5ForConditionalGeneration

    from omni2sound.encoder_spec import EncoderSpec
    from omni2sound.encoders import default_text_encoder_path
    from omni2sound.synchformer import SyncFeatureExtractor, SynchformerConfig
    torch.manual_seed(0)
    if full:     # flan-t5-base, DFN5B's ViT-H/14 (as a transformers CLIP tower: open_clip is optional), Synchformer
        t5 = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                      feed_forward_proj="gated-gelu")
        clip = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                                image_size=378, patch_size=14, projection_dim=1024, hidden_act="quick_gelu")
        sync_cfg, video_size = SynchformerConfig(), 384
    else:
        t5 = T5Config(vocab_size=30522, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu")
        clip = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                image_size=64, patch_size=16, projection_dim=64)
        sync_cfg, video_size = SynchformerConfig.tiny(), 64
    t5.vocab_size = 30522                     # the packaged MiniLM tokenizer stands in for T5's
    T5ForConditionalGeneration(t5).save_pretrained(f"{root}/flan-t5")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{default_text_encoder_path()}/{name}", f"{root}/flan-t5/{name}")
    CLIPVisionModelWithProjection(clip).save_pretrained(f"{root}/clip")
    torch.save(SyncFeatureExtractor(sync_cfg).state_dict(), f"{root}/synchformer_state_dict.pth")
    spec = EncoderSpec.parse(f"t5:{root}/flan-t5", f"hf:{root}/clip", f"synchformer:{root}/synchformer_state_dict.pth",
                             text_max_tokens=128, video_size=video_size)
    if not full:
        spec.sync.config = sync_cfg.to_dict()
    desc = (f"Flan-T5 d_model {t5.d_model} x {t5.num_layers}; CLIP ViT {clip.hidden_size} x {clip.num_hidden_layers} "
            f"patch {clip.patch_size} at {video_size} px -> {clip.projection_dim}; Synchformer {sync_cfg.vis_dim} x "
            f"{sync_cfg.vis_depth} at {sync_cfg.image_size} px")
    return spec, desc


def naive(manifest: str, vae_dir: str, out_dir: str, spec, device: str, shard_size: int) -> int:
    """One clip at a time, fp32, in the main process: decode it, run each encoder and the VAE on it alone."""
    from omni2sound.data.decode import load_clip
    from omni2sound.data.manifest import read_manifest
    from omni2sound.data.shards import shard_name, write_shard
    from omni2sound.extract import Encoders, encode_items
    from omni2sound.vae import AudioVAE
    records, _ = read_manifest(manifest)
    vae = AudioVAE.from_pretrained(vae_dir, device=device).eval()
    enc = Encoders(spec=spec, device=device, dtype=torch.float32)
    vreq, sreq = enc.video_request, enc.sync_request
    os.makedirs(out_dir, exist_ok=True)
    for k in range(0, len(records), shard_size):
        items = []
        for rec in records[k:k + shard_size]:
            raw = load_clip(rec, vae.sample_rate, vreq, sreq)
            items += encode_items([raw], vae, enc)
        write_shard(os.path.join(out_dir, shard_name(k // shard_size)), items)
    return len(records)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--shard-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPUs - 1, at most 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full", action="store_true", help="full-size encoders (a GPU job)")
    p.add_argument("--vae", default="tiny", choices=("tiny", "paper"))
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    from _timing import hardware

    from omni2sound.data.decode import default_workers
    from omni2sound.data.manifest import ClipRecord, write_manifest
    from omni2sound.extract import Encoders, extract_manifest
    from omni2sound.vae import VAE_PRESETS, AudioVAE
    workers = default_workers() if a.workers is None else a.workers
    root = tempfile.mkdtemp(prefix="bench_extract_")
    t0 = time.perf_counter()
    recs = []
    for i in range(a.clips):
        path = f"{root}/clip{i:04d}.mp4"
        write_clip(path, a.seconds, i)
        recs.append(ClipRecord(clip_id=f"c{i}", audio=path, video=path, duration=a.seconds, caption=f"sound {i % 5}"))
    write_manifest(f"{root}/m.jsonl", recs)
    AudioVAE(VAE_PRESETS[a.vae]).save_pretrained(f"{root}/vae")
    spec, desc = make_encoders(root, a.full)
    print(f"[bench] media + models in {time.perf_counter() - t0:.1f} s: {a.clips} clips of {a.seconds} s; {desc}",
          file=sys.stderr)

    runs = {}
    for name in ("naive", "batched", "naive_again", "batched_again"):
        out = f"{root}/out_{name}"
        if a.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        if name.startswith("naive"):
            n = naive(f"{root}/m.jsonl", f"{root}/vae", out, spec, a.device, a.shard_size)
        else:
            enc = Encoders(spec=spec, device=a.device)          # bf16 weights on a GPU
            res = extract_manifest(f"{root}/m.jsonl", f"{root}/vae", out, a.shard_size, enc=enc, workers=workers,
                                   device=a.device, progress=False)
            n = res["records"] - len(res["clips_failed"])
        if a.device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        runs[name] = {"seconds": dt, "clips_per_s": n / dt}
        print(f"[bench] {name}: {n} clips in {dt:.2f} s = {n / dt:.2f} clips/s", file=sys.stderr)
    naive_cps = max(runs["naive"]["clips_per_s"], runs["naive_again"]["clips_per_s"])
    batched_cps = max(runs["batched"]["clips_per_s"], runs["batched_again"]["clips_per_s"])
    result = {
        "bench": "extract", "date": datetime.date.today().isoformat(), "device": a.device,
        "hardware": hardware(a.device), "cpus": os.cpu_count(), "platform": platform.platform(),
        "torch": torch.__version__, "python": platform.python_version(), "workers": workers,
        "clips": a.clips, "seconds_per_clip": a.seconds, "shard_size": a.shard_size, "encoders": desc, "vae": a.vae,
        "runs": runs, "naive_clips_per_s": naive_cps, "batched_clips_per_s": batched_cps,
        "speedup": batched_cps / naive_cps, "command": " ".join(["python"] + sys.argv),
    }
    print(json.dumps(result, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            from omni2sound.gpu_info import provenance
            json.dump({**provenance(), **result}, f, indent=1)


if __name__ == "__main__":
    main()
