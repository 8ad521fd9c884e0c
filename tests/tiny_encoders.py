"""Tiny randomly initialised encoders of the real architectures, saved in their released formats
(transformers ``save_pretrained`` folders with the packaged MiniLM tokenizer files, Synchformer state dicts)
for the tests that load them back through the package's loading code. No downloads."""
import json
import shutil

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _tokenizer(dst) -> None:
    from omni2sound.encoders import default_text_encoder_path
    src = default_text_encoder_path()
    for name in TOKENIZER_FILES:
        shutil.copy(f"{src}/{name}", f"{dst}/{name}")


def flan_t5(dst, d_model: int = 24):
    """A whole T5ForConditionalGeneration checkpoint (the flan-t5-base layout: encoder + decoder)."""
    from transformers import T5Config, T5ForConditionalGeneration
    model = T5ForConditionalGeneration(T5Config(vocab_size=30522, d_model=d_model, d_kv=8, d_ff=32, num_layers=1,
                                                num_heads=2, feed_forward_proj="gated-gelu"))
    model.save_pretrained(dst)
    _tokenizer(dst)
    return model


def clap(dst, hidden: int = 16):
    """A whole ClapModel checkpoint (text + audio towers, the released CLAP layout)."""
    from transformers import ClapConfig, ClapModel
    cfg = ClapConfig(text_config=dict(vocab_size=30522, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=64),
                     audio_config=dict(hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2],
                                       patch_embeds_hidden_size=16, spec_size=64, num_mel_bins=16, window_size=4,
                                       patch_stride=[4, 4], patch_size=4), projection_dim=8)
    model = ClapModel(cfg)
    model.save_pretrained(dst)
    _tokenizer(dst)
    return model


def clip_vision(dst, projection_dim: int = 20, image_size: int = 32, mean=None, std=None):
    """A CLIPVisionModelWithProjection folder, optionally with a preprocessor_config.json (its normalisation)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                           num_attention_heads=2, image_size=image_size, patch_size=8,
                                                           projection_dim=projection_dim))
    model.save_pretrained(dst)
    if mean is not None:
        with open(f"{dst}/preprocessor_config.json", "w") as f:
            json.dump({"image_mean": list(mean), "image_std": list(std), "size": {"shortest_edge": image_size}}, f)
    return model


def siglip_vision(dst, hidden: int = 24, image_size: int = 32):
    from transformers import SiglipVisionConfig, SiglipVisionModel
    model = SiglipVisionModel(SiglipVisionConfig(hidden_size=hidden, intermediate_size=37, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=image_size, patch_size=8))
    model.save_pretrained(dst)
    return model


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def write_av_clip(path, frames, fps: float, wav, sample_rate: int) -> None:
    """An mp4 with an MPEG-4 video stream and an AAC mono soundtrack (the layout of VGGSound's clips), written
    with PyAV. frames: uint8 [T, H, W, 3] (even H, W); wav: float32 [N] in [-1, 1]."""
    from fractions import Fraction

    import av
    import numpy as np
    with av.open(str(path), mode="w") as c:
        vs = c.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1001))
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        aus = c.add_stream("aac", rate=sample_rate)
        aus.layout = "mono"
        for img in frames:
            for pkt in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)
        wav = np.asarray(wav, np.float32)
        for i in range(0, len(wav), 1024):
            fr = av.AudioFrame.from_ndarray(wav[None, i:i + 1024].copy(), format="fltp", layout="mono")
            fr.sample_rate = sample_rate
            fr.pts = i
            for pkt in aus.encode(fr):
                c.mux(pkt)
        for pkt in aus.encode():
            c.mux(pkt)


def synchformer(path):
    """A tiny random Synchformer visual extractor saved as the released state dict (``vfeat_extractor.*`` keys,
    torch.save); returns (extractor, its config as a dict for the encoder spec)."""
    from omni2sound.synchformer import SyncFeatureExtractor, SynchformerConfig
    cfg = SynchformerConfig.tiny()
    ex = SyncFeatureExtractor(cfg).eval()
    torch.save(ex.state_dict(), path)
    return ex, cfg.to_dict()
