"""Video out: generate --video in.mp4 --out out.mp4 remuxes the picture (packets copied) under an AAC track of the
video's length, for constant, NTSC, high and variable frame rates; the one duration rule of the API and the CLI."""
import json
import warnings

import av
import pytest
import soundfile as sf
import torch
from media import make_video, tiny_model

from omni2sound.generate import main as generate_main
from omni2sound.mux import AAC_FRAME, AAC_RATE, mux_audio, probe, video_duration
from omni2sound.video import VideoError

pytestmark = pytest.mark.usefixtures("one_thread")

VIDEOS = {   # name: (fps, seconds, vfr, with an audio track to replace)
    "ntsc": (30000 / 1001, 1.3, False, False),
    "fps60": (60.0, 0.9, False, False),
    "vfr": (25.0, 1.2, True, False),
    "fps24_audio": (24.0, 1.0, False, True),
}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("vo")
    videos = {k: make_video(root / f"{k}.mp4", fps, s, vfr=vfr, with_audio=a) for k, (fps, s, vfr, a) in VIDEOS.items()}
    return root, tiny_model(root / "model"), videos


def _video_packets(path):
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.video[0]) if p.size]


def test_cli_video_out_every_frame_rate(media, capsys):
    root, model, videos = media
    names = list(videos)
    argv = ["--model", model, "--steps", "1", "--device", "cpu", "--out", str(root / "out.mp4"), "--no-progress"]
    for k in names:
        argv += ["--video", videos[k]]
    assert generate_main(argv) == 0
    log = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert abs(log["duration"] - max(video_duration(v) for v in videos.values())) < 1e-9   # the longest video
    for k, out in zip(names, log["outputs"]):
        src, got = probe(videos[k]), probe(out)
        assert got["video_codec"] == src["video_codec"] and got["video_frames"] == src["video_frames"], k
        assert _video_packets(out) == _video_packets(videos[k]), f"{k}: the video was re-encoded"
        assert got["audio_codec"] == "aac" and got["audio_rate"] == AAC_RATE, k
        # the sound track is the video's length within one AAC frame (the encoder codes whole frames)
        assert abs(got["audio_seconds"] - got["video_seconds"]) <= AAC_FRAME / AAC_RATE, (k, got)
        assert abs(got["video_seconds"] - video_duration(videos[k])) < 1e-6
    with av.open(log["outputs"][names.index("vfr")]) as c:       # the variable frame rate survived the remux
        tb = c.streams.video[0].time_base
        pts = sorted(p.pts for p in c.demux(c.streams.video[0]) if p.pts is not None)
    gaps = {round(float((b - a) * tb), 3) for a, b in zip(pts, pts[1:])}
    assert len(gaps) >= 2, gaps


def test_wav_default_length_is_the_videos(media):
    root, model, videos = media
    out = root / "ntsc.wav"
    assert generate_main(["--model", model, "--video", videos["ntsc"], "--steps", "1", "--device", "cpu",
                          "--out", str(out), "--no-progress"]) == 0
    wav, sr = sf.read(out)
    assert len(wav) == round(video_duration(videos["ntsc"]) * sr)


def test_api_duration_rule_and_unconditional_warning(media):
    from omni2sound import Omni2SoundPipeline
    root, model, videos = media
    pipe = Omni2SoundPipeline.from_pretrained(model)
    out = pipe.generate(video=[videos["fps60"]], steps=1)          # no duration: the video's (0.9 s), not 10 s
    assert out.audio.shape == (1, round(video_duration(videos["fps60"]) * out.sample_rate))
    with pytest.warns(UserWarning, match="unconditional"):
        pipe.generate(duration=0.3, steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.generate(text="rain", duration=0.3, steps=1, seed=[4])          # conditional: no warning
    # per-request seeds: request i sounds as it would alone with its seed
    a = pipe.generate(text=["rain", "a bell"], duration=0.3, steps=1, seed=[4, 9])
    b = pipe.generate(text="a bell", duration=0.3, steps=1, seed=9)
    torch.testing.assert_close(a.latents[1:], b.latents, atol=1e-5, rtol=1e-5)


def test_bad_inputs(media, tmp_path, capsys):
    root, model, videos = media
    with pytest.raises(ValueError, match="must end in"):
        mux_audio(videos["ntsc"], torch.zeros(100), 16000, tmp_path / "x.txt")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(VideoError, match="bad.mp4"):
        mux_audio(tmp_path / "bad.mp4", torch.zeros(100), 16000, tmp_path / "o.mp4")
    assert not list(tmp_path.glob(".o.mp4*")) and not (tmp_path / "o.mp4").exists()    # nothing partial left
    with pytest.raises(SystemExit) as e:        # a video output needs a picture
        generate_main(["--model", model, "--text", "a", "--out", str(tmp_path / "o.mp4")])
    assert e.value.code == 2 and "needs --video" in capsys.readouterr().err
