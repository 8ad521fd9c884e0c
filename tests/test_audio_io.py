"""omni2sound.audio: load/save round trips and the edge cases (stereo, 44.1 kHz, empty, corrupt, non-audio)."""
import logging
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from omni2sound.audio import AudioError, is_silent, load_audio, save_audio


def tone(f, sr, seconds, amp=0.5):
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * math.pi * f * t)).astype(np.float32)


def peak_hz(wav, sr):
    spec = np.abs(np.fft.rfft(wav))
    return np.fft.rfftfreq(len(wav), 1 / sr)[spec.argmax()]


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_round_trip_16k(tmp_path, suffix):
    wav = torch.from_numpy(tone(440.0, 16000, 0.5))
    path = save_audio(tmp_path / f"a{suffix}", wav, 16000)
    back = load_audio(path, 16000)
    assert back.dtype == torch.float32 and back.shape == wav.shape
    assert (back - wav).abs().max() < 1e-3             # 16-bit PCM quantisation only
    assert not list(tmp_path.glob(".*"))                # no temporary file left behind


def test_stereo_44k1_is_mixed_down_and_resampled(tmp_path):
    sr = 44100
    left, right = tone(440.0, sr, 1.0, 0.4), tone(440.0, sr, 1.0, 0.2)
    sf.write(tmp_path / "s.wav", np.stack([left, right], 1), sr)
    wav = load_audio(tmp_path / "s.wav", 16000)
    assert wav.dim() == 1 and abs(wav.shape[0] - 16000) <= 1
    assert abs(peak_hz(wav.numpy(), 16000) - 440.0) <= 1.0
    mid = wav[2000:-2000]                               # away from the resampler's edges
    assert abs(mid.abs().max().item() - 0.3) < 0.01     # the mean of the two channels


def test_ogg_is_read(tmp_path):
    if "OGG" not in sf.available_formats():
        pytest.skip("libsndfile without OGG")
    sf.write(tmp_path / "a.ogg", tone(1000.0, 16000, 0.5), 16000, format="OGG", subtype="VORBIS")
    wav = load_audio(tmp_path / "a.ogg")
    assert abs(peak_hz(wav.numpy(), 16000) - 1000.0) <= 4.0


def test_empty_corrupt_and_non_audio_files(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav.*empty"):
        load_audio(tmp_path / "empty.wav")
    good = tmp_path / "good.wav"
    sf.write(good, tone(440.0, 16000, 0.2), 16000)
    (tmp_path / "corrupt.wav").write_bytes(good.read_bytes()[:30])      # header cut in the middle
    with pytest.raises(AudioError, match="corrupt.wav"):
        load_audio(tmp_path / "corrupt.wav")
    (tmp_path / "notes.txt").write_text("this is not audio\n" * 20)
    with pytest.raises(AudioError, match="not a readable audio file"):
        load_audio(tmp_path / "notes.txt")
    with pytest.raises(AudioError, match="no such audio file"):
        load_audio(tmp_path / "missing.wav")
    sf.write(tmp_path / "zero_frames.wav", np.zeros((0,), np.float32), 16000)
    with pytest.raises(AudioError, match="no samples"):
        load_audio(tmp_path / "zero_frames.wav")


def test_silence_is_loaded_and_detectable(tmp_path):
    sf.write(tmp_path / "quiet.wav", np.zeros(1600, np.float32), 16000)
    wav = load_audio(tmp_path / "quiet.wav")
    assert wav.shape == (1600,) and is_silent(wav)
    assert not is_silent(torch.from_numpy(tone(100.0, 16000, 0.1, amp=0.01)))
    assert is_silent(torch.zeros(0))


def test_save_scales_down_instead_of_clipping(tmp_path, caplog):
    wav = torch.from_numpy(tone(300.0, 16000, 0.25, amp=2.5))
    with caplog.at_level(logging.WARNING, logger="omni2sound.audio"):
        save_audio(tmp_path / "loud.wav", wav, 16000)
    assert "scaling down" in caplog.text
    back = load_audio(tmp_path / "loud.wav")
    assert back.abs().max() <= 1.0 and back.abs().max() > 0.99
    torch.testing.assert_close(back, wav / wav.abs().max(), atol=2e-4, rtol=0)   # shape kept: no clipping


def test_save_float32_keeps_level_and_peaks(tmp_path):
    wav = torch.from_numpy(tone(300.0, 16000, 0.25, amp=2.5)) * torch.linspace(0.1, 1.0, 4000)
    save_audio(tmp_path / "loud.wav", wav, 16000, float32=True)
    assert sf.info(str(tmp_path / "loud.wav")).subtype == "FLOAT"
    back, sr = sf.read(str(tmp_path / "loud.wav"), dtype="float32")
    assert sr == 16000
    torch.testing.assert_close(torch.from_numpy(back), wav, atol=0, rtol=0)     # bit-exact, peak 2.5 kept
    with pytest.raises(AudioError, match="FLAC"):
        save_audio(tmp_path / "a.flac", wav, 16000, float32=True)


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(AudioError, match="mp3"):
        save_audio(tmp_path / "a.mp3", torch.zeros(10), 16000)
    with pytest.raises(ValueError, match="mono"):
        save_audio(tmp_path / "a.wav", torch.zeros(2, 10), 16000)
    with pytest.raises(AudioError, match="empty"):
        save_audio(tmp_path / "a.wav", torch.zeros(0), 16000)
    with pytest.raises(ValueError, match="NaN"):
        save_audio(tmp_path / "a.wav", torch.tensor([0.0, float("nan")]), 16000)
    with pytest.raises(ValueError, match="sample_rate"):
        save_audio(tmp_path / "a.wav", torch.zeros(10), 0)
