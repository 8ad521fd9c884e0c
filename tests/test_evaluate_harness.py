"""The benchmark harness on the toy world: a perfect system, white noise, silence and shuffled pairings; the
tracks builder; resumable generation; scoring another system's folder; the reports."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from omni2sound.evaluate import baseline_audio
from omni2sound.evaluate import main as evaluate_main
from omni2sound.evaluation.embedders.logmel import LogMelStats
from omni2sound.evaluation.runner import Scorer, higher_is_better
from omni2sound.evaluation.tracks import Source, ToyBenchmark, mix, offscreen_caption, pair_offscreen
from omni2sound.oracle import Oracle
from omni2sound.toy import CLASSES, LOOKS

pytestmark = pytest.mark.usefixtures("one_thread")


class ToyImageBind:
    """A test double with ImageBind's adapter API: video -> which classes' colours are on screen; audio -> how
    loud each class band is (the oracle's band energies). Matched pairs score a higher cosine."""
    name = "toy-ib"

    def embed_video(self, frames, fps):
        f = torch.as_tensor(frames).numpy().astype(np.int16)                   # [B, T, H, W, 3]
        out = [[float((np.abs(v - np.array(LOOKS[c][0])).sum(-1) < 12).any()) for c in CLASSES] for v in f]
        return torch.tensor(out) + 0.05

    def embed_audio(self, audio):
        o = Oracle()
        return torch.tensor([[float(np.clip((np.percentile(o.band_db(a.numpy())[1][c], 95) + 60) / 60, 0, 1))
                              for c in CLASSES] for a in audio]) + 0.05


class ToySynchformer:
    """A test double with Synchformer's desync API: |first onset heard - first strike flash| in seconds."""

    def desync(self, frames, fps, audio, sample_rate):
        bright = [i for i, fr in enumerate(frames) if (fr.astype(int).sum(-1) > 560).any()]
        heard = [e["onset"] for e in Oracle().analyse(audio.numpy()) if e["cls"] in ("drum", "bell", "woodblock")]
        if not bright or not heard:
            return 2.0
        return min(2.0, abs(min(heard) - bright[0] / fps))


@pytest.fixture(scope="module")
def toy():
    # 48 clips: the 32-d log-mel covariance is full rank, as a Frechet distance needs
    return ToyBenchmark(n=48, seed=0, duration=2.0)


@pytest.fixture(scope="module")
def scored(toy):
    scorer = Scorer([LogMelStats()], imagebind=ToyImageBind(), synchformer=ToySynchformer())
    res = {}
    for kind in ("reference", "noise", "silence", "shuffled"):
        # the reference on two tracks; the bad systems on the off-screen one (the tracks share their scoring code)
        tracks = ("vt2a", "offscreen") if kind == "reference" else ("offscreen",)
        gen = baseline_audio(kind, toy, list(tracks), seed=int(np.random.randint(1 << 30)))
        res[kind] = {t: scorer.score_track(toy, toy.tracks[t], [gen[it.item_id] for it in toy.tracks[t]])
                     for t in tracks}
    return res


def test_perfect_system(scored):
    for t, r in scored["reference"].items():
        assert abs(r["FD_logmel"]) < 1e-6, (t, r["FD_logmel"])
        assert abs(r["KL_logmel"]) < 1e-9
        assert r["oracle_onset_f1"] == 1.0 and r["oracle_class_acc"] == 1.0 and r["oracle_class_f1"] == 1.0
        assert r["oracle_offset_s"] == 0.0
    assert scored["reference"]["offscreen"]["oracle_offscreen_recall"] == 1.0


@pytest.mark.parametrize("bad", ["noise", "silence"])
def test_noise_and_silence_are_worse_on_every_metric(scored, bad):
    for t in scored[bad]:
        ref = scored["reference"][t]
        for m, v in ref.items():
            hib = higher_is_better(m)
            if hib is None:
                continue
            w = scored[bad][t][m]
            assert (w < v) if hib else (w > v), (bad, t, m, v, w)


def test_shuffled_pairing_keeps_fd_and_worsens_paired_metrics(scored):
    for t, sh in scored["shuffled"].items():
        ref = scored["reference"][t]
        assert sh["FD_logmel"] == pytest.approx(ref["FD_logmel"], abs=1e-6)       # a set metric
        assert sh["KL_logmel"] > ref["KL_logmel"] + 0.1
        assert sh["IB"] < ref["IB"] and sh["DeSync"] > ref["DeSync"]
        assert sh["oracle_offset_s"] > ref["oracle_offset_s"]


def test_tracks_builder_is_deterministic_and_offscreen_is_consistent(toy):
    again = ToyBenchmark(n=48, seed=0, duration=2.0)
    assert [i.to_json() for i in again.tracks["offscreen"]] == [i.to_json() for i in toy.tracks["offscreen"]]
    other = ToyBenchmark(n=48, seed=0, duration=2.0, level_db=0.0, n_offscreen=10)
    assert len(other.tracks["offscreen"]) == 10
    assert {len(toy.tracks[t]) for t in ("t2a", "v2a", "vt2a")} == {48}
    for it in toy.tracks["offscreen"]:
        truth = toy.truth(it)
        on = {e["cls"] for e in truth if e["onscreen"]}
        off = {e["cls"] for e in truth if not e["onscreen"]}
        assert on and off and not (on & off)
        assert it.text == offscreen_caption(toy.clips[it.clip_id].caption, it.offscreen["description"])
        assert np.array_equal(toy.frames(it, 25.0), toy.clips[it.clip_id].frames_sync)   # the video unchanged
    assert all(it.text is None for it in toy.tracks["v2a"])
    # the generic builder: music partners allowed, seeded, never the target itself
    src = [Source(f"c{i}", f"sound {i}", label=i % 3) for i in range(9)]
    music = [Source("m0", "piano music", label="music", kind="music")]
    p1 = pair_offscreen(src, 5, pool=src + music)
    assert p1 == pair_offscreen(src, 5, pool=src + music) and p1 != pair_offscreen(src, 6, pool=src + music)
    assert all(t.clip_id != p.clip_id and t.label != p.label for t, p in p1)
    # the mix: partner at the requested RMS ratio, peak at most 0.95
    rng = np.random.default_rng()
    a, b = rng.standard_normal(1000) * 0.1, rng.standard_normal(800) * 0.5
    y = mix(a, b, -6.0).astype(np.float64)
    part = y - a
    assert 20 * np.log10(np.sqrt(np.mean(part ** 2)) / np.sqrt(np.mean(a ** 2))) == pytest.approx(-6.0, abs=1e-6)
    assert np.abs(mix(a * 20, b, 0.0)).max() <= 0.95 + 1e-6


def test_audio_dir_scoring_and_reports(tmp_path, capsys):
    refs = tmp_path / "refs"
    assert evaluate_main(["--export-references", str(refs), "--toy-clips", "12", "--toy-duration", "1",
                          "--tracks", "v2a", "t2a"]) == 0
    files = sorted((refs / "v2a").glob("*.wav"))
    assert len(files) == 12
    # another system's folder: one file stereo at 44.1 kHz, one missing, one extra
    import soxr
    wav, sr = sf.read(files[0])
    up = soxr.resample(wav, sr, 44100)
    sf.write(files[0], np.stack([up, up], 1), 44100)
    files[1].unlink()
    sf.write(refs / "v2a" / "not-a-clip.wav", np.zeros(100), 16000)
    out = tmp_path / "eval"
    assert evaluate_main(["--audio-dir", str(refs), "--toy-clips", "12", "--toy-duration", "1", "--out", str(out),
                          "--tracks", "v2a", "t2a", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "1 of 12 items have no file" in err and "not-a-clip.wav" in err
    m = json.loads((out / "metrics.json").read_text())
    assert m["tracks"]["v2a"]["n"] == 11 and m["tracks"]["t2a"]["n"] == 12
    assert m["tracks"]["v2a"]["oracle_class_acc"] == 1.0 and m["missing"]["v2a"] == ["v2a/toy-test-000001"]
    assert np.isfinite(m["tracks"]["t2a"]["FD_logmel"]) and "command" in m and "versions" in m
    assert any("FD_logmel: 12 vectors of 32 dimensions" in w for w in m["warnings"])     # 12 clips < 32-d
    assert "oracle" in m["embedders"] and "cut to the reference" in m["length_policy"]
    for f in ("metrics.md", "metrics.png", "spectrograms.png"):
        assert (out / f).stat().st_size > 0
    assert "| V2A |" in (out / "metrics.md").read_text()
    noise = tmp_path / "noise"
    assert evaluate_main(["--baseline", "noise", "--toy-clips", "12", "--toy-duration", "1", "--out", str(noise),
                          "--tracks", "v2a", "--no-oracle", "--quiet"]) == 0
    capsys.readouterr()
    assert evaluate_main(["--compare", str(out / "metrics.json"), str(noise / "metrics.json")]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("v2a") and "FD_logmel" in line)
    assert row.rstrip().endswith("A")                               # the reference beats noise on FD


def test_model_generation_resumes_each_item_once(tmp_path, monkeypatch):
    from omni2sound.model import Omni2SoundDiT, dit_config
    from omni2sound.pipeline import Omni2SoundPipeline, PipelineConfig
    from omni2sound.vae import VAE_PRESETS, AudioVAE
    torch.manual_seed(0)
    dit = Omni2SoundDiT(dit_config("tiny", hidden_dim=64, depth=2, num_heads=2, max_duration=1.0))
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = tmp_path / "model"
    Omni2SoundPipeline(dit, AudioVAE(VAE_PRESETS["tiny"]), PipelineConfig()).save_pretrained(model)
    args = ["--model", str(model), "--toy-clips", "3", "--toy-duration", "1", "--tracks", "v2a", "offscreen",
            "--steps", "2", "--batch-size", "2", "--quiet", "--no-oracle"]
    import omni2sound.audio as audio_mod
    real_save, calls = audio_mod.save_audio, []

    def dying_save(path, wav, sr, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        calls.append(path)
        return real_save(path, wav, sr, **kw)

    monkeypatch.setattr(audio_mod, "save_audio", dying_save)
    with pytest.raises(KeyboardInterrupt):
        evaluate_main(args + ["--out", str(tmp_path / "a")])
    monkeypatch.setattr(audio_mod, "save_audio", real_save)
    assert evaluate_main(args + ["--out", str(tmp_path / "a")]) == 0
    ids = [json.loads(line)["item_id"] for line in (tmp_path / "a" / "generated.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 3 + len(ToyBenchmark(3, duration=1.0).tracks["offscreen"])
    # written as float WAV at the model's own level, so level-sensitive metrics see what the model made
    import soundfile as sf
    assert sf.info(calls[0]).subtype == "FLOAT"
    # the resumed run's audio equals an uninterrupted run's
    assert evaluate_main(args + ["--out", str(tmp_path / "b")]) == 0
    for p in sorted((tmp_path / "a" / "generated").rglob("*.wav")):
        q = tmp_path / "b" / p.relative_to(tmp_path / "a")
        assert np.array_equal(sf.read(p)[0], sf.read(q)[0]), p
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert set(m["tracks"]) == {"v2a", "offscreen"} and "FD_logmel" in m["tracks"]["v2a"]
    assert m["generation"]["steps"] == 2 and m["generation"]["seed"] == 0


def test_desync_through_the_package_synchformer(tmp_path):
    """The scorer drives omni2sound.synchformer.Synchformer (a random tiny one, saved in the released flat
    state-dict layout and loaded back) on 5 s toy clips: per clip the mean |offset| of two 4.8 s windows."""
    from omni2sound.synchformer import Synchformer, SynchformerConfig
    cfg = SynchformerConfig.tiny()
    torch.save(Synchformer(cfg).state_dict(), tmp_path / "synchformer_state_dict.pth")
    sync = Synchformer.from_checkpoint(tmp_path / "synchformer_state_dict.pth", cfg=cfg)
    bench = ToyBenchmark(n=2, seed=0, duration=5.0)
    items = bench.tracks["v2a"]
    r = Scorer([], synchformer=sync, oracle=False).score_track(bench, items, [bench.reference(i) for i in items])
    assert 0.0 <= r["DeSync"] <= 2.0
    per_clip = [sync.desync(bench.frames(i, 25.0), 25.0, torch.from_numpy(bench.reference(i)), 16000) for i in items]
    assert r["DeSync"] == pytest.approx(np.mean(per_clip), abs=1e-9)
    # the mean of two |offsets| on the 0.2 s grid: twice it is a multiple of 0.2 s
    assert all(abs(2 * x / 0.2 - round(2 * x / 0.2)) < 1e-6 for x in per_clip)


def test_clap_and_imagebind_through_the_package_adapters(tmp_path):
    """The scorer drives the package's LAION-CLAP and ImageBind adapters (tiny random models in the released
    layouts, built by their own tests' helpers) on toy VT2A items; the scores equal the mean cosines of the
    adapters' own embeddings (x100 for IB)."""
    from byte_bpe import write_bpe_tokenizer
    from test_embedders_clap import HTSAT, to_laion
    from test_embedders_imagebind import CFG
    from transformers import ClapConfig, ClapModel

    from omni2sound.evaluation.embedders.clap import LaionClap
    from omni2sound.evaluation.embedders.imagebind import ImageBind, ImageBindTowers
    vocab = write_bpe_tokenizer(tmp_path, "roberta")
    cfg = ClapConfig(text_config=dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=40, max_position_embeddings=82, type_vocab_size=1,
                                      pad_token_id=1, projection_dim=24),
                     audio_config=dict(HTSAT, projection_dim=24), projection_dim=24)
    torch.manual_seed(0)
    sd = to_laion(ClapModel(cfg).eval().state_dict())
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "630k-tiny.pt")
    clap = LaionClap.from_checkpoint(str(tmp_path / "630k-tiny.pt"), text_heads=2, device="cpu")
    torch.save(ImageBindTowers(CFG).state_dict(), tmp_path / "imagebind_tiny.pth")
    ib = ImageBind.from_checkpoint(str(tmp_path / "imagebind_tiny.pth"), device="cpu")
    bench = ToyBenchmark(n=2, seed=0, duration=2.0)
    items = bench.tracks["vt2a"]
    gens = [bench.reference(i) for i in items]
    r = Scorer([], clap=[clap], imagebind=ib, oracle=False).score_track(bench, items, gens)
    import soxr
    a = clap.embed_audio(torch.from_numpy(np.stack([soxr.resample(g, 16000, 48000, quality="HQ") for g in gens])))
    t = clap.embed_text([i.text for i in items])
    assert r["CLAP_LAION"] == pytest.approx(float(torch.nn.functional.cosine_similarity(a, t).mean()), abs=1e-5)
    v = ib.embed_video(torch.from_numpy(np.stack([bench.frames(i, 25.0) for i in items])), 25.0)
    au = ib.embed_audio(torch.from_numpy(np.stack(gens)))
    assert r["IB"] == pytest.approx(100 * float(torch.nn.functional.cosine_similarity(v, au).mean()), abs=1e-3)
    # T2A has no video: no IB there; V2A has no caption: no CLAP there
    r_t2a = Scorer([], clap=[clap], imagebind=ib, oracle=False).score_track(bench, bench.tracks["t2a"], gens)
    r_v2a = Scorer([], clap=[clap], imagebind=ib, oracle=False).score_track(bench, bench.tracks["v2a"], gens)
    assert "IB" not in r_t2a and "CLAP_LAION" in r_t2a and "CLAP_LAION" not in r_v2a and "IB" in r_v2a


def test_real_test_set_tracks_from_the_vggsound_csv(tmp_path, capsys):
    """VGGSound CSV + clip folder + captions -> track files (off-screen mixes written as FLAC, music partners
    allowed) -> FileBenchmark, scored end to end with --tracks-dir."""
    from omni2sound.evaluation.tracks import FileBenchmark
    from omni2sound.evaluation.tracks import main as tracks_main
    from omni2sound.video import write_video
    clips = tmp_path / "clips"
    clips.mkdir()
    rows, caps = [], []
    rng = np.random.default_rng()
    for i, label in enumerate(["dog barking", "car engine", "bird chirping", "rain"]):
        cid = f"yt{i:03d}_{10 * i:06d}"
        t = np.arange(16000) / 16000
        sf.write(clips / f"{cid}.flac", 0.3 * np.sin(2 * np.pi * (300 + 400 * i) * t) * (1 + 0.1 * rng.random()), 16000)
        frames = np.full((25, 32, 32, 3), 40 * i, np.uint8)
        write_video(str(clips / f"{cid}.mp4"), frames, fps=25)
        rows.append(f"yt{i:03d},{10 * i},{label},test")
        caps.append(json.dumps({"clip_id": cid, "caption": f"a {label} sound"}))
    rows.append("ytzzz,0,missing clip,test")
    rows.append("yt999,0,train clip,train")
    (tmp_path / "vggsound.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "captions.jsonl").write_text("\n".join(caps) + "\n")
    out = tmp_path / "omni"
    assert tracks_main(["--vggsound-csv", str(tmp_path / "vggsound.csv"), "--clips", str(clips), "--captions",
                        str(tmp_path / "captions.jsonl"), "--out", str(out), "--seed", "3", "--level-db", "-3"]) == 0
    assert "1 test clips not found" in capsys.readouterr().err
    bench = FileBenchmark(str(out))
    assert {t: len(v) for t, v in bench.tracks.items()} == {"t2a": 4, "v2a": 4, "vt2a": 4, "offscreen": 4}
    it = bench.tracks["offscreen"][0]
    cap = {json.loads(c)["clip_id"]: json.loads(c)["caption"] for c in caps}
    assert it.text == f"{cap[it.clip_id]}, and off-screen {cap[it.offscreen['clip_id']]}"
    assert it.offscreen["clip_id"] != it.clip_id and it.offscreen["level_db"] == -3
    mixed = bench.reference(it)
    own = sf.read(clips / f"{it.clip_id}.flac")[0]
    assert mixed.shape == own.shape and not np.allclose(mixed, own, atol=1e-3)
    assert bench.frames(bench.tracks["t2a"][0], 25.0) is None and bench.frames(it, 25.0).shape[0] == 25
    again = tmp_path / "omni2"
    tracks_main(["--vggsound-csv", str(tmp_path / "vggsound.csv"), "--clips", str(clips), "--captions",
                 str(tmp_path / "captions.jsonl"), "--out", str(again), "--seed", "3", "--level-db", "-3"])
    assert (again / "offscreen.jsonl").read_text().replace(str(again), "") == \
        (out / "offscreen.jsonl").read_text().replace(str(out), "")
    res = tmp_path / "eval"
    assert evaluate_main(["--baseline", "noise", "--tracks-dir", str(out), "--out", str(res), "--quiet"]) == 0
    m = json.loads((res / "metrics.json").read_text())
    assert set(m["tracks"]) == {"t2a", "v2a", "vt2a", "offscreen"} and m["tracks"]["v2a"]["KL_logmel"] > 0
    assert not any(k.startswith("oracle") for k in m["tracks"]["v2a"])     # no truth events on real data


def test_guidance_flag_and_its_cfg_alias():
    from omni2sound.evaluate import parse_args
    assert parse_args(["--model", "m", "--guidance", "2", "5"]).guidance == (2.0, 5.0)
    assert parse_args(["--model", "m", "--cfg", "3"]).guidance == 3.0
    assert parse_args(["--model", "m"]).guidance is None                      # the run's own
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--guidance", "1", "2", "3"])
