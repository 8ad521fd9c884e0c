"""The toy world (determinism, ground truth, captions) and the oracle that judges generated audio."""
import numpy as np
import pytest

from omni2sound.oracle import Oracle, match_events, score
from omni2sound.toy import CONTINUOUS, IMPULSIVE, LOOKS, SOUNDS, ToyConfig, ToyWorld, caption_of


def truth(clip):
    return [dict(cls=e.cls, onset=e.onset, onscreen=e.onscreen) for e in clip.events]


def test_deterministic_by_seed():
    a, b = ToyWorld(ToyConfig(seed=3)).clip(5, "train"), ToyWorld(ToyConfig(seed=3)).clip(5, "train")
    np.testing.assert_array_equal(a.audio, b.audio)
    np.testing.assert_array_equal(a.frames_sync, b.frames_sync)
    assert a.caption == b.caption and a.truth() == b.truth()
    c = ToyWorld(ToyConfig(seed=4)).clip(5, "train")
    d = ToyWorld(ToyConfig(seed=3)).clip(5, "val")
    assert not np.array_equal(a.audio, c.audio) and not np.array_equal(a.audio, d.audio)


def test_shapes_and_rates():
    cfg = ToyConfig(duration=1.6, size=32)
    clip = ToyWorld(cfg).clip(0)
    assert clip.audio.shape == (int(1.6 * 16000),) and clip.audio.dtype == np.float32
    assert np.abs(clip.audio).max() <= 0.95 + 1e-6
    assert clip.frames_sync.shape == (40, 32, 32, 3) and clip.frames_sync.dtype == np.uint8
    assert clip.frames_semantic.shape == (round(1.6 * 8), 32, 32, 3)


@pytest.mark.parametrize("index", range(6))
def test_sound_starts_on_the_strike_frame(index):
    """Ground truth: each strike is on a 25 fps frame, silent in its band before, loud after, and the
    video changes most on exactly that frame (the object jumps and flashes)."""
    world = ToyWorld(ToyConfig(p_continuous=0.0, p_offscreen=0.0))
    clip = world.clip(index, "test")
    sr = 16000
    strikes = [e for e in clip.events if e.impulsive]
    assert 1 <= len(strikes) <= 3
    motion = np.abs(np.diff(clip.frames_sync.astype(np.int32), axis=0)).sum((1, 2, 3))   # [T-1]: change into frame k+1
    for e in strikes:
        k = e.onset * 25
        assert abs(k - round(k)) < 1e-9
        k = int(round(k))
        i0 = int(round(e.onset * sr))
        assert np.abs(clip.audio[i0 - 160:i0]).max() < 1e-3 or len(strikes) > 1   # silent 10 ms before the first hit
        assert np.abs(clip.audio[i0:i0 + 160]).max() > 0.1
        assert motion[k - 1] > 0.5 * motion.max()                                  # the frame changes as it strikes
    hit_frames = {int(round(e.onset * 25)) for e in strikes}
    quiet = [k for k in range(1, len(motion)) if all(not (0 <= k + 1 - h <= 3) for h in hit_frames)]
    assert motion[quiet].max() == 0          # no continuous source: nothing moves between strikes


def test_each_class_has_its_own_look():
    """The frames show the colour of every on-screen class and of no other class (off-screen ones included)."""
    world = ToyWorld(ToyConfig(p_continuous=0.5, p_offscreen=0.5))
    assert len({LOOKS[k][0] for k in LOOKS}) == len(LOOKS) and len({LOOKS[k][1] for k in LOOKS}) == len(LOOKS)
    for i in range(10):
        clip = world.clip(i, "test")
        seen = set(map(tuple, clip.frames_semantic[0].reshape(-1, 3).tolist()))
        for k, (colour, _) in LOOKS.items():
            assert (tuple(colour) in seen) == any(e.cls == k and e.onscreen for e in clip.events), (i, k)


def test_captions_from_events():
    world = ToyWorld()
    clip = world.clip(0, "test", impulsive="bell", continuous="engine", offscreen=False)
    n = sum(e.cls == "bell" for e in clip.events)
    assert clip.caption == f"a bell rings {['once', 'twice', 'three times'][n - 1]} while an engine hums"
    assert clip.offscreen is None
    off = world.clip(1, "test", offscreen=True)
    assert off.offscreen and f"off-screen {off.offscreen}" in off.caption
    hidden = {e.cls for e in off.events if not e.onscreen}
    assert hidden and all(k not in {e.cls for e in off.events if e.onscreen} for k in hidden)
    assert caption_of([])[0] == ""


def test_offscreen_sources_are_heard_not_seen():
    world = ToyWorld(ToyConfig(p_continuous=0.0))
    base = world.clip(2, "test", offscreen=False, impulsive="drum")
    alone = world.clip(2, "test", offscreen=False, impulsive="drum")
    np.testing.assert_array_equal(base.frames_sync, alone.frames_sync)
    other = world.clip(3, "test", offscreen=False, impulsive="bell")
    mixed = world.mix_offscreen(base, other)
    np.testing.assert_array_equal(mixed.frames_sync, base.frames_sync)    # the picture does not change
    assert "off-screen a bell rings" in mixed.caption
    heard = {e["cls"] for e in Oracle().analyse(mixed.audio)}
    assert {"drum", "bell"} <= heard


def test_oracle_recovers_ground_truth_f1():
    """The oracle may judge generated audio only if it reads real toy clips right: F1 >= 0.98."""
    world, oracle = ToyWorld(ToyConfig(seed=11, p_offscreen=0.3)), Oracle()
    clips = world.clips(120, "test")
    s = score([oracle.analyse(c.audio) for c in clips], [truth(c) for c in clips])
    assert s["onset_f1"] >= 0.98, s
    assert s["class_acc"] >= 0.98, s
    assert s["offscreen_recall"] >= 0.98, s


def test_oracle_rejects_wrong_audio():
    """A test that can fail: audio shifted by 100 ms, silence and noise must score badly."""
    world, oracle = ToyWorld(ToyConfig(seed=12)), Oracle()
    clips = world.clips(30, "test")
    shifted = [np.roll(c.audio, 1600) for c in clips]
    s = score([oracle.analyse(a) for a in shifted], [truth(c) for c in clips])
    assert s["onset_f1"] < 0.2, s
    assert oracle.analyse(np.zeros(32000)) == []
    noise = np.random.default_rng(0).standard_normal(32000) * 0.001
    assert oracle.analyse(noise) == []


def test_match_events_tolerance():
    t = [{"cls": "drum", "onset": 0.5}, {"cls": "bell", "onset": 1.0}]
    assert match_events([{"cls": "drum", "onset": 0.53}], t) == (1, 0, 1)
    assert match_events([{"cls": "drum", "onset": 0.55}], t) == (0, 1, 2)
    assert match_events([{"cls": "bell", "onset": 0.5}], t) == (0, 1, 2)
    assert set(SOUNDS) == set(IMPULSIVE) | set(CONTINUOUS)
