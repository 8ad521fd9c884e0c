"""Embedder adapters: full-size randomly initialised models of the real architectures, saved in the released
checkpoint formats and loaded back through the adapters; their front ends against independent computations."""
import numpy as np
import pytest
import torch

from omni2sound.evaluation.embedders._dsp import mel_filterbank_htk, mel_filterbank_slaney
from omni2sound.evaluation.embedders.logmel import LogMelStats
from omni2sound.evaluation.embedders.panns import Cnn14, PannsCnn14
from omni2sound.evaluation.embedders.vggish import VGGish, VGGishNet

# names and shapes of the released Cnn14_16k_mAP=0.438.pth ({"model": state_dict}, torchlibrosa's names)
PANNS_RELEASED = {"spectrogram_extractor.stft.conv_real.weight": (257, 1, 512),
                  "spectrogram_extractor.stft.conv_imag.weight": (257, 1, 512),
                  "logmel_extractor.melW": (257, 64), "bn0.running_var": (64,),
                  "conv_block1.conv1.weight": (64, 1, 3, 3),
                  "conv_block6.conv2.weight": (2048, 2048, 3, 3), "conv_block6.bn2.num_batches_tracked": (),
                  "fc1.weight": (2048, 2048), "fc_audioset.weight": (527, 2048), "fc_audioset.bias": (527,)}
# names and shapes of the released vggish-10086976.pth (a plain state dict)
VGGISH_RELEASED = {"features.0.weight": (64, 1, 3, 3), "features.3.weight": (128, 64, 3, 3),
                   "features.6.weight": (256, 128, 3, 3), "features.8.weight": (256, 256, 3, 3),
                   "features.11.weight": (512, 256, 3, 3), "features.13.bias": (512,),
                   "embeddings.0.weight": (4096, 12288), "embeddings.2.weight": (4096, 4096),
                   "embeddings.4.weight": (128, 4096)}


def _randomise_bn(model):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def test_panns_cnn14_checkpoint_roundtrip(tmp_path):
    model = Cnn14().eval()
    _randomise_bn(model)
    sd = model.state_dict()
    for k, shape in PANNS_RELEASED.items():
        assert tuple(sd[k].shape) == shape, k
    path = tmp_path / "Cnn14_16k_mAP=0.438.pth"
    torch.save({"model": sd, "iteration": 0}, path)
    emb = PannsCnn14.from_checkpoint(str(path))
    x = torch.randn(2, 8000) * 0.1
    f = emb.embed(x)
    with torch.no_grad():
        e_ref, l_ref = model(x - x.mean(1, keepdim=True))
    assert f.embedding.shape == (2, 2048) and f.logits.shape == (2, 527)
    assert torch.allclose(f.embedding.float(), e_ref, atol=1e-5) and torch.allclose(f.logits.float(), l_ref, atol=1e-5)
    assert (f.embedding >= 0).all()                                  # relu(fc1)
    assert len(emb.sha256) == 64
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"fc1.weight": torch.zeros(3, 3)}}, bad)
    with pytest.raises(ValueError, match="bad.pth"):
        PannsCnn14.from_checkpoint(str(bad))
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        PannsCnn14.from_checkpoint(str(tmp_path / "absent.pth"))


def test_panns_front_end_matches_torch_stft():
    m = Cnn14(widths=(4, 4, 4, 4, 4, 4))
    x = torch.randn(3, 4000, dtype=torch.float32)
    power = m.spectrogram_extractor(x)[:, 0]                          # [B, T, 257]
    spec = torch.stft(x.double(), 512, 160, window=torch.hann_window(512, periodic=True, dtype=torch.float64),
                      center=True, pad_mode="reflect", return_complex=True).abs() ** 2
    assert torch.allclose(power.double(), spec.transpose(1, 2), rtol=1e-3, atol=1e-3)


def test_mel_filterbanks():
    # Slaney: each filter's area-normalised triangle integrates (over Hz) to about 1 ... x 2 / width
    w = mel_filterbank_slaney(16000, 512, 64, 50, 8000)
    assert w.shape == (257, 64) and (w >= 0).all() and (w.sum(0) > 0).all()
    peaks = w.argmax(0)
    assert (np.diff(peaks) >= 0).all()                               # centres increase
    h = mel_filterbank_htk(16000, 512, 64, 125, 7500)
    assert h.shape == (257, 64) and h.max() <= 1.0 + 1e-12 and (h[0] == 0).all()
    freqs = np.linspace(0, 8000, 257)
    assert freqs[h[:, 0] > 0].min() > 125 and freqs[h[:, -1] > 0].max() < 7500


def test_vggish_checkpoint_roundtrip(tmp_path):
    model = VGGishNet().eval()
    sd = model.state_dict()
    for k, shape in VGGISH_RELEASED.items():
        assert tuple(sd[k].shape) == shape, k
    assert set(sd) == {f"features.{i}.{p}" for i in (0, 3, 6, 8, 11, 13) for p in ("weight", "bias")} | \
        {f"embeddings.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    path = tmp_path / "vggish-10086976.pth"
    torch.save(sd, path)
    emb = VGGish.from_checkpoint(str(path))
    x = torch.randn(2, 32000) * 0.1                                   # 2 s: 198 frames -> 2 examples each
    f = emb.embed(x)
    assert [e.shape for e in f.embedding] == [(2, 128), (2, 128)] and f.logits is None
    ex, counts = emb.front.examples(x)
    with torch.no_grad():
        direct = model(ex)
    assert torch.allclose(torch.cat(f.embedding).float(), direct, atol=1e-6)
    # the front end: log(|rfft| mel + 0.01) of 25 ms periodic-Hann frames, hop 10 ms, no padding
    frame = x[0, 160 * 5: 160 * 5 + 400].double().numpy() * (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400))
    mel = np.log(np.abs(np.fft.rfft(frame, 512)) @ mel_filterbank_htk(16000, 512, 64, 125, 7500) + 0.01)
    assert np.allclose(ex[0, 0, 5].double().numpy(), mel, atol=1e-4)
    assert emb.embed(torch.zeros(1, 8000)).embedding[0].shape == (0, 128)      # under 0.96 s: no example


def test_logmel_embedding_is_deterministic_and_band_sensitive():
    e = LogMelStats()
    t = torch.arange(16000) / 16000
    low, high = torch.sin(2 * np.pi * 300 * t), torch.sin(2 * np.pi * 3000 * t)
    f = e.embed(torch.stack([low, high, low]))
    assert f.embedding.shape == (3, 32) and f.logits.shape == (3, 16)
    assert torch.equal(f.embedding[0], f.embedding[2])
    p = torch.softmax(f.logits, 1)
    centres = torch.from_numpy(mel_filterbank_slaney(16000, 512, 16, 50, 8000).argmax(0) * 8000 / 256)
    assert abs(float(centres[p[0].argmax()]) - 300) < 200 and abs(float(centres[p[1].argmax()]) - 3000) < 800


# names and shapes of the released passt-s-f128-p16-s10-ap.476-swa.pt (timm's state dict)
PASST_RELEASED = {"patch_embed.proj.weight": (768, 1, 16, 16), "cls_token": (1, 1, 768), "dist_token": (1, 1, 768),
                  "new_pos_embed": (1, 2, 768), "freq_new_pos_embed": (1, 768, 12, 1),
                  "time_new_pos_embed": (1, 768, 1, 99), "blocks.11.attn.qkv.weight": (2304, 768),
                  "blocks.11.mlp.fc2.weight": (768, 3072), "norm.weight": (768,), "head.0.weight": (768,),
                  "head.1.weight": (527, 768), "head_dist.weight": (527, 768)}


def test_passt_checkpoint_roundtrip(tmp_path):
    from omni2sound.evaluation.embedders.passt import CLIP_SAMPLES, PaSST, PasstNet, kaldi_mel_banks
    with torch.device("meta"):                                       # the full-size layout, without 86M weights
        sd = PasstNet().state_dict()
    for k, shape in PASST_RELEASED.items():
        assert tuple(sd[k].shape) == shape, k
    assert sum(1 for k in sd if k.endswith("attn.qkv.weight")) == 12
    # save / load / forward through the adapter on a 2-block model (a full ViT-B over 1,188 tokens takes most of
    # a minute on a shared 2-core CPU), saved as hear21passt's wrapper ("net." keys)
    small = PasstNet(depth=2).eval()
    with torch.no_grad():
        for p in small.parameters():
            p.add_(0.02 * torch.randn_like(p))
    wrapped = {"net." + k: v for k, v in small.state_dict().items()}
    torch.save(wrapped, tmp_path / "passt_wrapper.pt")
    emb = PaSST.from_checkpoint(str(tmp_path / "passt_wrapper.pt"))
    x = torch.randn(2, 48000) * 0.1                                   # 1.5 s: padded with zeros to 10 s
    f = emb.embed(x)
    mel = emb.mel(torch.nn.functional.pad(x, (0, CLIP_SAMPLES - 48000)))
    assert mel.shape == (2, 1, 128, 1000)
    with torch.no_grad():
        e_ref, l_ref = small(mel)
    assert f.embedding.shape == (2, 768) and f.logits.shape == (2, 527)
    assert torch.allclose(f.embedding.float(), e_ref, atol=1e-5) and torch.allclose(f.logits.float(), l_ref, atol=1e-5)
    # Kaldi mel banks: 128 triangles within 0-15 kHz, the Nyquist column zero, centres increasing
    w = kaldi_mel_banks(128, 1024, 32000, 0.0, 15000.0)
    assert w.shape == (128, 513) and (w[:, -1] == 0).all() and (w.sum(1) > 0).all()
    assert (np.diff(w.argmax(1)) >= 0).all() and np.nonzero(w.sum(0))[0].max() * 32000 / 1024 < 15000
    with pytest.raises(ValueError, match="not a PaSST"):
        torch.save({"fc1.weight": torch.zeros(2, 2)}, tmp_path / "x.pt")
        PaSST.from_checkpoint(str(tmp_path / "x.pt"))
