"""CLAP text-audio embedders: LAION-CLAP and MS-CLAP, loading the released checkpoints from local paths.

LAION-CLAP (Wu et al. 2023). The `laion-clap` package is not used: its model constructor calls
`RobertaModel.from_pretrained("roberta-base")` and its tokenizer is fetched the same way at import, so it
cannot run offline. The architecture is `transformers`' `ClapModel` (HTSAT audio encoder, RoBERTa text
encoder, two-layer projections), which is LAION-CLAP's; `LaionClap.from_checkpoint` loads
  - the released `.pt` files (e.g. `630k-audioset-best.pt`, `music_speech_audioset_epoch_15_esc_89.98.pt`:
    a torch pickle {"state_dict": {"module.<laion name>": tensor}}), the architecture read from the
    tensors' shapes and the names translated to `ClapModel`'s; the text branch needs the roberta-base
    tokenizer files (vocab.json + merges.txt), passed as `tokenizer=DIR` or found beside the checkpoint;
  - or a `transformers` folder (config.json + weights + tokenizer files).
Audio: 48 kHz mono, quantised through int16 as LAION's inference does, 64 mel bands 50-14000 Hz
(window 1024, hop 480), 10 s per clip: shorter clips are repeated and zero-padded ("repeatpad"), longer
ones cut to their first 10 s (LAION takes a random 10 s crop: ours is deterministic). The fusion models
(`*-fusion-*.pt`) load when their fusion tensors are present; only the unfused layout is tested here.

MS-CLAP (Elizalde et al. 2023): see `MsClap` (`msclap` downloads GPT-2 in its constructor: same approach).

Embeddings are L2-normalised; batched; bf16 on CUDA, fp32 on the CPU; under torch.inference_mode().
"""
from __future__ import annotations

import math
import os
import re
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import load_torch_checkpoint, sha256_file

_SKIP = ("audio_branch.spectrogram_extractor.", "audio_branch.logmel_extractor.", "text_transform.",
         "audio_transform.", "audio_branch.tscam_conv.", "audio_branch.head.", "text_branch.embeddings.position_ids")


def _device_dtype(device: Optional[str]):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, (torch.bfloat16 if device.type == "cuda" else torch.float32)


def laion_to_transformers(sd: dict) -> dict:
    """LAION-CLAP state dict (names of `laion_clap.clap_module.model.CLAP`) -> `transformers.ClapModel` names."""
    out = {}
    for k, v in sd.items():
        k = k[7:] if k.startswith("module.") else k
        if k.startswith(_SKIP) or k.endswith(".attn_mask"):
            continue
        m = re.match(r"(text|audio)_projection\.(\d+)\.(weight|bias)$", k)
        if m:
            out[f"{m.group(1)}_projection.linear{1 if m.group(2) == '0' else 2}.{m.group(3)}"] = v
            continue
        if k.startswith("text_branch."):
            out["text_model." + k[len("text_branch."):]] = v
            continue
        if k.startswith("audio_branch."):
            _htsat_key("audio_model.audio_encoder." + k[len("audio_branch."):], v, out)
            continue
        out[k] = v                      # logit_scale_a, logit_scale_t
    return out


def _htsat_key(k: str, v: Tensor, out: dict) -> None:
    """One HTSAT tensor (the original Swin names, as LAION-CLAP and MS-CLAP keep them) under `transformers`'
    ClapAudioEncoder's name; qkv is split into query, key and value."""
    if ".attn.qkv." in k:
        for name, t in zip(("query", "key", "value"), v.chunk(3, dim=0)):
            out[k.replace(".attn.qkv.", f".attention.self.{name}.")] = t
        return
    for a, b in ((".attn.proj.", ".attention.output.dense."), (".attn.", ".attention.self."),
                 (".mlp.fc1.", ".intermediate.dense."), (".mlp.fc2.", ".output.dense."),
                 (".norm1.", ".layernorm_before."), (".norm2.", ".layernorm_after."),
                 ("audio_encoder.bn0.", "audio_encoder.batch_norm.")):
        k = k.replace(a, b)
    out[k] = v


def htsat_config(sd: dict, prefix: str, spec_size: int = 256, projection_dim: int = 512) -> dict:
    """ClapAudioConfig fields of the HTSAT under `prefix` in a state dict, read from the tensors' shapes."""
    a = prefix
    depths = []
    for i in range(16):
        n = len({m.group(1) for k in sd if (m := re.match(rf"{re.escape(a)}layers\.{i}\.blocks\.(\d+)\.", k))})
        if n == 0:
            break
        depths.append(n)
    if not depths:
        raise ValueError(f"no HTSAT tensors under {a!r} ({a}layers.*.blocks.*)")
    heads = [sd[f"{a}layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1] for i in range(len(depths))]
    window = int(round((math.sqrt(sd[f"{a}layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]) + 1) / 2))
    proj = sd[f"{a}patch_embed.proj.weight"]
    fusion = f"{a}patch_embed.mel_conv2d.weight" in sd
    return dict(window_size=window, num_mel_bins=sd[f"{a}bn0.weight"].shape[0], spec_size=spec_size,
                patch_size=proj.shape[-1], patch_stride=[proj.shape[-2], proj.shape[-1]], depths=depths,
                num_attention_heads=heads, hidden_size=sd[f"{a}norm.weight"].shape[0],
                patch_embeds_hidden_size=proj.shape[0], enable_fusion=fusion,
                fusion_type="aff_2d" if fusion else None, projection_dim=projection_dim)


def laion_config(sd: dict, spec_size: int = 256, text_heads: Optional[int] = None):
    """The `ClapConfig` of a LAION-CLAP state dict, read from its tensors' shapes."""
    from transformers import ClapConfig
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
    if "audio_projection.0.weight" not in sd:
        raise ValueError("not a LAION-CLAP checkpoint: no audio_projection.0.weight")
    audio = htsat_config(sd, "audio_branch.", spec_size, sd["audio_projection.0.weight"].shape[0])
    t = "text_branch."
    hidden = sd[f"{t}embeddings.word_embeddings.weight"].shape[1]
    n_layers = len({m.group(1) for k in sd if (m := re.match(rf"{t}encoder\.layer\.(\d+)\.", k))})
    text = dict(vocab_size=sd[f"{t}embeddings.word_embeddings.weight"].shape[0], hidden_size=hidden,
                num_hidden_layers=n_layers, num_attention_heads=text_heads or max(1, hidden // 64),
                intermediate_size=sd[f"{t}encoder.layer.0.intermediate.dense.weight"].shape[0],
                max_position_embeddings=sd[f"{t}embeddings.position_embeddings.weight"].shape[0],
                type_vocab_size=sd[f"{t}embeddings.token_type_embeddings.weight"].shape[0],
                projection_dim=sd["text_projection.0.weight"].shape[0])
    return ClapConfig(text_config=text, audio_config=audio, projection_dim=sd["text_projection.2.weight"].shape[0])


class LaionClap:
    name = "LAION"
    sample_rate = 48000
    max_seconds = 10.0

    def __init__(self, model, tokenizer, checkpoint: Optional[str] = None, device: Optional[str] = None):
        from transformers import ClapFeatureExtractor
        self.device, self.dtype = _device_dtype(device)
        self.model = model.to(self.device, self.dtype).eval()
        self.tokenizer = tokenizer
        ac = model.config.audio_config
        self.features = ClapFeatureExtractor(feature_size=ac.num_mel_bins, sampling_rate=self.sample_rate,
                                             hop_length=480, max_length_s=int(self.max_seconds), fft_window_size=1024,
                                             frequency_min=50, frequency_max=14000,
                                             truncation="fusion" if ac.enable_fusion else "rand_trunc",
                                             padding="repeatpad")
        self.checkpoint = checkpoint
        self.sha256 = sha256_file(checkpoint) if checkpoint and os.path.isfile(checkpoint) else None

    @classmethod
    def from_checkpoint(cls, path: str, tokenizer: Optional[str] = None, device: Optional[str] = None,
                        spec_size: int = 256, text_heads: Optional[int] = None) -> "LaionClap":
        from transformers import AutoTokenizer, ClapModel
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise FileNotFoundError(f"LAION-CLAP: {path} has no config.json (expected a transformers folder)")
            return cls(ClapModel.from_pretrained(path), AutoTokenizer.from_pretrained(tokenizer or path),
                       os.path.join(path, "config.json"), device)
        sd = load_torch_checkpoint(path, "LAION-CLAP")
        config = laion_config(sd, spec_size, text_heads)
        model = ClapModel(config)
        missing, unexpected = model.load_state_dict(laion_to_transformers(sd), strict=False)
        missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids", "relative_position_index"))]
        if missing or unexpected:
            raise ValueError(f"{path}: not a LAION-CLAP checkpoint of this layout: missing {missing[:5]} "
                             f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
        tok_dir = tokenizer or os.path.dirname(os.path.abspath(path))
        if not (os.path.isfile(os.path.join(tok_dir, "vocab.json")) or
                os.path.isfile(os.path.join(tok_dir, "tokenizer.json"))):
            raise FileNotFoundError(f"LAION-CLAP {path}: the text branch needs the roberta-base tokenizer files "
                                    f"(vocab.json and merges.txt, or tokenizer.json): pass tokenizer=DIR "
                                    f"(looked in {tok_dir})")
        return cls(model, AutoTokenizer.from_pretrained(tok_dir), path, device)

    def to(self, device, dtype=None) -> "LaionClap":
        self.device = torch.device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model.to(self.device, self.dtype)
        return self

    @staticmethod
    def _pooled(out) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    @torch.inference_mode()
    def embed_audio(self, audio: Tensor) -> Tensor:
        """audio [B, N] mono at 48 kHz -> [B, D] unit vectors (fp32, on the CPU)."""
        x = torch.as_tensor(audio, dtype=torch.float32).reshape(len(audio), -1).cpu().numpy()
        x = x[:, : int(self.max_seconds * self.sample_rate)]
        x = (np.clip(x, -1, 1) * 32767.0).astype(np.int16).astype(np.float32) / 32767.0    # LAION's int16 round trip
        feats = self.features(list(x), sampling_rate=self.sample_rate, return_tensors="pt")
        kw = {"input_features": feats["input_features"].to(self.device, self.dtype)}
        if self.model.config.audio_config.enable_fusion:
            kw["is_longer"] = feats["is_longer"].to(self.device)
        emb = self._pooled(self.model.get_audio_features(**kw))
        return F.normalize(emb.float(), dim=-1).cpu()

    @torch.inference_mode()
    def embed_text(self, texts: list) -> Tensor:
        """list of B captions -> [B, D] unit vectors (fp32, on the CPU)."""
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        emb = self._pooled(self.model.get_text_features(**tok))
        return F.normalize(emb.float(), dim=-1).cpu()


class _Projection(torch.nn.Module):
    """MS-CLAP's projection: layer_norm(l1(x) + l2(gelu(l1(x)))), both linears without bias."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear1 = torch.nn.Linear(d_in, d_out, bias=False)
        self.linear2 = torch.nn.Linear(d_out, d_out, bias=False)
        self.layer_norm = torch.nn.LayerNorm(d_out)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.linear1(x)
        return self.layer_norm(e1 + self.linear2(F.gelu(e1)))


class MsClap(torch.nn.Module):
    """MS-CLAP 2023 (Elizalde et al.): HTSAT audio encoder + GPT-2 text encoder, each with a residual projection
    into a 1024-d space.

    The `msclap` package is not used: `CLAPWrapper` builds its text encoder with
    `AutoModel.from_pretrained("gpt2")` (a download) and loads its tokenizer the same way. The architecture
    here is `transformers`' `ClapAudioModel` (the same HTSAT) and `GPT2Model`, loading the released
    `CLAP_weights_2023.pth` ({"model": state_dict} with msclap's names: audio_encoder.base.htsat.*,
    audio_encoder.projection.*, caption_encoder.base.* (GPT-2), caption_encoder.projection.*); the GPT-2
    tokenizer files (vocab.json + merges.txt) are passed as `tokenizer=DIR` or found beside the checkpoint.
    Audio: 44.1 kHz, 7 s (shorter clips repeated to fill 7 s, as msclap does; longer ones cut to their first
    7 s where msclap takes a random crop), log-mel as torchlibrosa computes it (Hann 1024, hop 320, centred,
    reflect padding, power, 64 Slaney mel bands 50-14000 Hz, 10 log10(max(x, 1e-10)): the HTSAT reads its own
    front-end settings, msclap's models/config.py, not the fmax 8000 of the YAML config). Text: the caption plus
    " <|endoftext|>", padded with "!" (GPT-2 id 0) to 77 tokens, and the hidden state of its last non-pad token.
    """
    name = "MS"
    sample_rate = 44100
    max_seconds = 7.0
    text_len = 77

    def __init__(self, audio_config: dict, gpt2_config, d_proj: int, tokenizer=None):
        from transformers import ClapAudioConfig, ClapAudioModel, GPT2Model
        super().__init__()
        self.audio = ClapAudioModel(ClapAudioConfig(**audio_config))
        self.audio_projection = _Projection(audio_config["hidden_size"], d_proj)
        self.text = GPT2Model(gpt2_config)
        self.text_projection = _Projection(gpt2_config.n_embd, d_proj)
        self.tokenizer = tokenizer
        from ._dsp import mel_filterbank_slaney
        self.register_buffer("melW", torch.from_numpy(
            mel_filterbank_slaney(self.sample_rate, 1024, audio_config["num_mel_bins"], 50.0, 14000.0)).float(),
            persistent=False)                                                 # [513, mels]
        self.checkpoint = self.sha256 = None
        self.device_, self.dtype_ = torch.device("cpu"), torch.float32

    @classmethod
    def from_checkpoint(cls, path: str, tokenizer: Optional[str] = None, device: Optional[str] = None,
                        spec_size: int = 256, text_heads: Optional[int] = None) -> "MsClap":
        from transformers import AutoTokenizer, GPT2Config
        sd = load_torch_checkpoint(path, "MS-CLAP")
        sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
        if "audio_encoder.projection.linear1.weight" not in sd:
            raise ValueError(f"{path}: not an MS-CLAP checkpoint (no audio_encoder.projection.linear1.weight)")
        d_proj = sd["audio_encoder.projection.linear1.weight"].shape[0]
        audio_cfg = htsat_config(sd, "audio_encoder.base.htsat.", spec_size, d_proj)
        t = "caption_encoder.base."
        n_embd = sd[f"{t}wte.weight"].shape[1]
        gpt2 = GPT2Config(vocab_size=sd[f"{t}wte.weight"].shape[0], n_positions=sd[f"{t}wpe.weight"].shape[0],
                          n_embd=n_embd, n_layer=len({m.group(1) for k in sd if (m := re.match(rf"{t}h\.(\d+)\.", k))}),
                          n_head=text_heads or max(1, n_embd // 64),
                          n_inner=sd[f"{t}h.0.mlp.c_fc.weight"].shape[1])
        tok_dir = tokenizer or os.path.dirname(os.path.abspath(path))
        if not (os.path.isfile(os.path.join(tok_dir, "vocab.json")) or
                os.path.isfile(os.path.join(tok_dir, "tokenizer.json"))):
            raise FileNotFoundError(f"MS-CLAP {path}: the text encoder needs the GPT-2 tokenizer files (vocab.json "
                                    f"and merges.txt): pass tokenizer=DIR (looked in {tok_dir})")
        tok = AutoTokenizer.from_pretrained(tok_dir)
        tok.add_special_tokens({"pad_token": "!"})
        model = cls(audio_cfg, gpt2, d_proj, tok)
        ours = {}
        for k, v in sd.items():
            if k.startswith("audio_encoder.base.htsat."):
                rest = k[len("audio_encoder.base.htsat."):]
                if rest.startswith(("spectrogram_extractor.", "logmel_extractor.", "tscam_conv.", "head.")) or \
                        rest.endswith(".attn_mask"):
                    continue
                _htsat_key("audio.audio_encoder." + rest, v, ours)
            elif k.startswith("audio_encoder.projection."):
                ours["audio_projection." + k[len("audio_encoder.projection."):]] = v
            elif k.startswith("caption_encoder.base."):
                if k.endswith((".attn.bias", ".attn.masked_bias")):
                    continue                 # GPT-2's causal-mask buffers of older transformers
                ours["text." + k[len(t):]] = v
            elif k.startswith("caption_encoder.projection."):
                ours["text_projection." + k[len("caption_encoder.projection."):]] = v
        missing, unexpected = model.load_state_dict(ours, strict=False)
        missing = [k for k in missing if not k.endswith(("relative_position_index",))]
        if missing or unexpected:
            raise ValueError(f"{path}: not an MS-CLAP checkpoint of this layout: missing {missing[:5]} "
                             f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
        model.checkpoint, model.sha256 = path, sha256_file(path)
        dev, dt = _device_dtype(device)
        return model.to(dev, dt)

    def to(self, device, dtype=None) -> "MsClap":
        self.device_ = torch.device(device)
        self.dtype_ = dtype or (torch.bfloat16 if self.device_.type == "cuda" else torch.float32)
        super().to(self.device_)
        for mod in (self.audio, self.audio_projection, self.text, self.text_projection):
            mod.to(dtype=self.dtype_)
        return self.eval()

    def log_mel(self, audio: Tensor) -> Tensor:
        """[B, N] at 44.1 kHz -> [B, 1, T, mels] (fp32; torchlibrosa's Spectrogram + LogmelFilterBank)."""
        x = audio.float()
        window = torch.hann_window(1024, periodic=True, device=x.device)
        spec = torch.stft(x, 1024, 320, 1024, window, center=True, pad_mode="reflect", return_complex=True)
        power = spec.abs() ** 2                                              # [B, 513, T]
        mel = torch.matmul(power.transpose(1, 2), self.melW.to(x.device))     # [B, T, mels]
        return (10.0 * torch.log10(torch.clamp(mel, min=1e-10)))[:, None]

    @torch.inference_mode()
    def embed_audio(self, audio: Tensor) -> Tensor:
        """audio [B, N] mono at 44.1 kHz -> [B, D] unit vectors (fp32, on the CPU)."""
        x = torch.as_tensor(audio, dtype=torch.float32).reshape(len(audio), -1)
        n = int(self.max_seconds * self.sample_rate)
        if x.shape[1] < n:
            x = x.repeat(1, -(-n // max(x.shape[1], 1)))
        x = x[:, :n].to(self.device_)
        feats = self.log_mel(x).to(self.dtype_)
        out = self.audio(input_features=feats)
        emb = self.audio_projection(out.pooler_output)
        return F.normalize(emb.float(), dim=-1).cpu()

    @torch.inference_mode()
    def embed_text(self, texts: list) -> Tensor:
        """list of B captions -> [B, D] unit vectors (fp32, on the CPU)."""
        tok = self.tokenizer([t + " <|endoftext|>" for t in texts], padding="max_length", truncation=True,
                             max_length=self.text_len, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device_), tok["attention_mask"].to(self.device_)
        hidden = self.text(input_ids=ids, attention_mask=mask).last_hidden_state     # [B, L, H]
        last = (ids != 0).sum(-1) - 1                      # msclap: the last token that is not "!" (id 0)
        emb = self.text_projection(hidden[torch.arange(len(ids), device=ids.device), last])
        return F.normalize(emb.float(), dim=-1).cpu()
