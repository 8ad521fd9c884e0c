"""CLAP adapters: tiny randomly initialised models of the real architectures, saved in the released checkpoint
layouts (LAION-CLAP's `.pt` with {"state_dict": {"module.<laion name>"}}, MS-CLAP's {"model": ...}) with
byte-level BPE tokenizer files, loaded back through the adapters and compared with the original modules."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from byte_bpe import write_bpe_tokenizer

from omni2sound.evaluation.embedders.clap import LaionClap, MsClap

HTSAT = dict(spec_size=256, num_mel_bins=64, patch_size=4, patch_stride=[4, 4], window_size=8, depths=[1, 1],
             num_attention_heads=[2, 2], patch_embeds_hidden_size=8, hidden_size=16)


def to_laion(sd: dict) -> dict:
    """transformers ClapModel names -> the names of LAION-CLAP's released state dict (the inverse mapping,
    written out from LAION's module layout: audio_branch = HTSAT Swin, text_branch = RoBERTa)."""
    out = {}
    for k, v in sd.items():
        if k.endswith(("position_ids", "token_type_ids")):
            continue
        if k.startswith("text_model."):
            out["text_branch." + k[len("text_model."):]] = v
        elif k.startswith(("text_projection.linear", "audio_projection.linear")):
            head, rest = k.split(".linear")
            out[f"{head}.{0 if rest[0] == '1' else 2}{rest[1:]}"] = v
        elif k.startswith("audio_model.audio_encoder."):
            out.update(_htsat_to_original("audio_branch.", k[len("audio_model.audio_encoder."):], v, sd, k))
        else:
            out[k] = v
    return out


def _htsat_to_original(prefix, rest, v, sd, full) -> dict:
    if ".attention.self.query." in rest:
        qkv = torch.cat([v, sd[full.replace(".query.", ".key.")], sd[full.replace(".query.", ".value.")]])
        return {prefix + rest.replace(".attention.self.query.", ".attn.qkv."): qkv}
    if ".attention.self.key." in rest or ".attention.self.value." in rest:
        return {}
    for a, b in ((".attention.output.dense.", ".attn.proj."), (".attention.self.", ".attn."),
                 (".intermediate.dense.", ".mlp.fc1."), (".output.dense.", ".mlp.fc2."),
                 (".layernorm_before.", ".norm1."), (".layernorm_after.", ".norm2.")):
        rest = rest.replace(a, b)
    if rest.startswith("batch_norm."):
        rest = "bn0." + rest[len("batch_norm."):]
    return {prefix + rest: v}


@pytest.fixture(scope="module")
def laion(tmp_path_factory):
    from transformers import ClapConfig, ClapModel
    d = tmp_path_factory.mktemp("laion")
    vocab = write_bpe_tokenizer(d, "roberta")
    cfg = ClapConfig(text_config=dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=40, max_position_embeddings=82, type_vocab_size=1,
                                      pad_token_id=1, projection_dim=24),
                     audio_config=dict(HTSAT, projection_dim=24), projection_dim=24)
    model = ClapModel(cfg).eval()
    sd = to_laion(model.state_dict())
    # tensors of the release that inference does not use (front end buffers, training-only heads)
    sd["audio_branch.spectrogram_extractor.stft.conv_real.weight"] = torch.zeros(3, 1, 4)
    sd["audio_branch.logmel_extractor.melW"] = torch.zeros(4, 3)
    sd["audio_branch.tscam_conv.weight"] = torch.zeros(5, 16, 2, 3)
    sd["text_transform.sequential.0.weight"] = torch.zeros(24, 24)
    sd["audio_transform.sequential.3.weight"] = torch.zeros(24, 24)
    for name in ("audio_branch.layers.0.blocks.0.attn.qkv.weight", "audio_branch.layers.0.blocks.0.attn.proj.weight",
                 "audio_branch.layers.0.blocks.0.mlp.fc1.weight", "audio_branch.layers.0.downsample.reduction.weight",
                 "audio_branch.bn0.running_var", "audio_branch.patch_embed.proj.weight", "audio_branch.norm.weight",
                 "text_branch.encoder.layer.0.attention.self.query.weight", "text_branch.pooler.dense.weight",
                 "audio_projection.0.weight", "audio_projection.2.bias", "text_projection.2.weight", "logit_scale_a"):
        assert name in sd, name                              # LAION-CLAP's own names
    path = d / "630k-tiny.pt"
    torch.save({"epoch": 45, "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    return model, path


def test_laion_clap_loads_the_released_layout(laion):
    from transformers import AutoTokenizer, ClapFeatureExtractor
    model, path = laion
    clap = LaionClap.from_checkpoint(str(path), text_heads=2, device="cpu")
    assert clap.sample_rate == 48000 and clap.sha256
    audio = torch.randn(3, 48000 * 2) * 0.1
    audio[2] = audio[2, torch.randperm(audio.shape[1])]
    emb = clap.embed_audio(audio)
    assert emb.shape == (3, 24)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    fe = ClapFeatureExtractor(feature_size=64, sampling_rate=48000, hop_length=480, max_length_s=10,
                              fft_window_size=1024, frequency_min=50, frequency_max=14000, truncation="rand_trunc",
                              padding="repeatpad")
    q = (np.clip(audio.numpy(), -1, 1) * 32767).astype(np.int16).astype(np.float32) / 32767
    feats = fe(list(q), sampling_rate=48000, return_tensors="pt")["input_features"]
    with torch.no_grad():
        pooled = model.audio_model(input_features=feats).pooler_output
        ref = F.normalize(model.audio_projection(pooled), dim=-1)
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(clap.embed_audio(audio[1:2]), emb[1:2], atol=1e-5, rtol=1e-4)   # batching

    texts = ["a dog barks twice", "rain", "a bell rings while an engine hums"]
    temb = clap.embed_text(texts)
    tok = AutoTokenizer.from_pretrained(str(path.parent))(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        tref = F.normalize(model.text_projection(out.pooler_output), dim=-1)
    torch.testing.assert_close(temb, tref, atol=1e-5, rtol=1e-4)
    assert temb.shape == (3, 24) and not torch.allclose(temb[0], temb[1])


def test_laion_clap_errors_name_the_file(laion, tmp_path):
    _, path = laion
    lone = tmp_path / "lone.pt"
    lone.write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match="roberta-base tokenizer"):
        LaionClap.from_checkpoint(str(lone), text_heads=2, device="cpu")
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"module.x": torch.zeros(1)}}, bad)
    with pytest.raises(ValueError, match="LAION-CLAP"):
        LaionClap.from_checkpoint(str(bad), device="cpu")
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        LaionClap.from_checkpoint(str(tmp_path / "missing.pt"), device="cpu")


def _msclap_reference(tmp_path):
    from transformers import ClapAudioConfig, ClapAudioModel, GPT2Config, GPT2Model

    from omni2sound.evaluation.embedders.clap import _Projection
    vocab = write_bpe_tokenizer(tmp_path, "gpt2")
    audio = ClapAudioModel(ClapAudioConfig(**HTSAT)).eval()
    text = GPT2Model(GPT2Config(vocab_size=vocab, n_positions=80, n_embd=32, n_layer=1, n_head=2, n_inner=48)).eval()
    aproj, tproj = _Projection(16, 20).eval(), _Projection(32, 20).eval()
    for p in list(aproj.layer_norm.parameters()) + list(tproj.layer_norm.parameters()):
        torch.nn.init.normal_(p, 0.5, 0.2)
    sd = {}
    asd = audio.state_dict()
    for k, v in asd.items():
        sd.update(_htsat_to_original("audio_encoder.base.htsat.", k[len("audio_encoder."):], v, asd, k))
    sd.update({"audio_encoder.projection." + k: v for k, v in aproj.state_dict().items()})
    sd.update({"caption_encoder.base." + k: v for k, v in text.state_dict().items()})
    sd.update({"caption_encoder.projection." + k: v for k, v in tproj.state_dict().items()})
    sd["audio_encoder.base.htsat.spectrogram_extractor.stft.conv_real.weight"] = torch.zeros(3, 1, 4)
    sd["audio_encoder.base.htsat.head.weight"] = torch.zeros(527, 16)
    sd["logit_scale"] = torch.tensor(2.0)
    path = tmp_path / "CLAP_weights_2023.pth"
    torch.save({"model": sd}, path)
    return (audio, text, aproj, tproj), path


def _logmel_numpy(x: np.ndarray) -> np.ndarray:
    """torchlibrosa's log-mel, computed independently: reflect-padded frames, periodic Hann, |rfft|^2, Slaney mel."""
    from omni2sound.evaluation.embedders._dsp import mel_filterbank_slaney
    x = np.pad(x.astype(np.float64), (512, 512), mode="reflect")
    n = 1 + (len(x) - 1024) // 320
    frames = x[np.arange(1024)[None] + 320 * np.arange(n)[:, None]]
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(1024) / 1024)
    power = np.abs(np.fft.rfft(frames * win, axis=1)) ** 2
    mel = power @ mel_filterbank_slaney(44100, 1024, 64, 50.0, 14000.0)
    return 10 * np.log10(np.maximum(mel, 1e-10))


def test_ms_clap_loads_the_released_layout(tmp_path):
    from transformers import AutoTokenizer
    (audio_m, text_m, aproj, tproj), path = _msclap_reference(tmp_path)
    clap = MsClap.from_checkpoint(str(path), text_heads=2, device="cpu")
    assert clap.sample_rate == 44100 and clap.sha256
    wav = torch.randn(2, 44100 * 3) * 0.1                          # 3 s: repeated to fill 7 s
    emb = clap.embed_audio(wav)
    assert emb.shape == (2, 20)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    full = wav.repeat(1, 3)[:, : 7 * 44100].numpy()
    feats = torch.from_numpy(np.stack([_logmel_numpy(x) for x in full])).float()[:, None]
    with torch.no_grad():
        ref = F.normalize(aproj(audio_m(input_features=feats).pooler_output), dim=-1)
    torch.testing.assert_close(emb, ref, atol=2e-4, rtol=1e-3)

    texts = ["a dog barks", "an engine hums while a bell rings twice"]
    temb = clap.embed_text(texts)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    refs = []
    for t in texts:   # one caption at a time, no padding: its last token is the appended <|endoftext|>
        ids = tok(t + " <|endoftext|>", return_tensors="pt")["input_ids"]
        assert ids[0, -1].item() == tok.convert_tokens_to_ids("<|endoftext|>")
        with torch.no_grad():
            refs.append(F.normalize(tproj(text_m(input_ids=ids).last_hidden_state[:, -1]), dim=-1))
    torch.testing.assert_close(temb, torch.cat(refs), atol=1e-5, rtol=1e-4)


@pytest.mark.cuda
def test_clap_bf16_on_cuda_matches_fp32(laion):
    _, path = laion
    cpu = LaionClap.from_checkpoint(str(path), text_heads=2, device="cpu")
    gpu = LaionClap.from_checkpoint(str(path), text_heads=2, device="cuda")
    assert gpu.dtype == torch.bfloat16
    audio = torch.randn(4, 48000) * 0.1
    cos = (cpu.embed_audio(audio) * gpu.embed_audio(audio)).sum(-1)
    assert cos.min() > 0.98
    t = ["a bell rings", "rain on a roof"]
    assert (cpu.embed_text(t) * gpu.embed_text(t)).sum(-1).min() > 0.98


def test_atlas_clap_scorer_batches_match_single_clips(laion):
    import threading

    from omni2sound.atlas.scorers import ClapScorer
    from omni2sound.atlas.types import Clip
    _, path = laion
    sc = ClapScorer.__new__(ClapScorer)
    sc.model, sc._lock = LaionClap.from_checkpoint(str(path), text_heads=2, device="cpu"), threading.Lock()
    rng = np.random.default_rng()
    clips = [Clip(i, {"clip_id": str(i)}, "k", (rng.standard_normal(n) * 0.1).astype(np.float32), 16000, None)
             for i, n in enumerate([16000, 24000, 16000])]
    caps = ["a bell rings", "rain", "an engine hums"]
    batch = sc.score_batch(clips, caps)
    single = [sc.score(c, t) for c, t in zip(clips, caps)]
    np.testing.assert_allclose(batch, single, atol=1e-5)
