"""SoundAtlas's local `transformers` backend with tiny randomly initialised models of the real classes
(Qwen2-Audio for captioning, Qwen2.5-VL for vision-to-language), saved with save_pretrained beside a
byte-level Qwen2 tokenizer and a chat template, and driven through the same ChatAgent as a chat server."""
import asyncio
import json

import numpy as np
import pytest
from byte_bpe import byte_vocab

from omni2sound.atlas import AgentConfig, AtlasConfig
from omni2sound.atlas.backends import ChatAgent, TransformersBackend
from omni2sound.atlas.types import Clip

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
            "{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
            "{% elif c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
            "{% elif c['type'] == 'audio' %}Audio: <|audio_bos|><|AUDIO|><|audio_eos|>\n{% endif %}{% endfor %}"
            "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer():
    """A Qwen2 byte-level BPE tokenizer with one token per byte (no merges) and Qwen's special tokens."""
    from transformers import Qwen2TokenizerFast
    vocab = byte_vocab()
    tok = Qwen2TokenizerFast(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                             pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    return tok


def _text_config(tok) -> dict:
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, bos_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))


@pytest.fixture(scope="module")
def qwen2_audio(tmp_path_factory):
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )
    d = tmp_path_factory.mktemp("qwen2-audio")
    tok = _tokenizer()
    cfg = Qwen2AudioConfig(audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2,
                                             encoder_ffn_dim=32, num_mel_bins=128, max_source_positions=1500),
                           text_config=dict(model_type="qwen2", **_text_config(tok)),
                           audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"))
    Qwen2AudioForConditionalGeneration(cfg).save_pretrained(d)
    Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok,
                        chat_template=TEMPLATE).save_pretrained(d)
    return d


def _clip(seconds: float, frames=None) -> Clip:
    audio = (np.random.default_rng(0).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)
    return Clip(index=0, record={"clip_id": "c"}, key="k", audio=audio, sample_rate=16000, frames=frames)


def test_qwen2_audio_captions_through_the_chat_agent(qwen2_audio):
    agent_cfg = AgentConfig(backend="transformers", model=str(qwen2_audio), max_tokens=6)
    cfg = AtlasConfig()
    backend = TransformersBackend(agent_cfg, cfg, device="cpu")
    assert backend.kind == "qwen2_audio"
    agent = ChatAgent("junior", agent_cfg, cfg, backend)
    one = asyncio.run(agent.caption(_clip(1.0), "a yellow disc jumps twice"))
    two = asyncio.run(agent.caption(_clip(2.0), "a yellow disc jumps twice"))
    assert isinstance(one.text, str) and 1 <= one.completion_tokens <= 6
    # the audio reached the prompt: Qwen2-Audio spends 25 tokens per second of audio
    assert two.prompt_tokens - one.prompt_tokens == 25
    inputs = backend._inputs([{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": __import__("omni2sound.atlas.media", fromlist=["m"])
                                                .wav_base64(_clip(1.0).audio, 16000), "format": "wav"}},
        {"type": "text", "text": "Caption this audio."}]}])
    text = backend.processor.tokenizer.decode(inputs["input_ids"][0])
    assert "Caption this audio." in text and text.count("<|AUDIO|>") == 25
    assert inputs["input_features"].shape[:2] == (1, 128)


def test_qwen2_5_vl_describes_frames(tmp_path):
    pytest.importorskip("torchvision", reason="transformers' Qwen2.5-VL processor needs torchvision")
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )
    tok = _tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    text = _text_config(tok)
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    cfg = Qwen2_5_VLConfig(vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2,
                                              out_hidden_size=32, patch_size=14, spatial_merge_size=2,
                                              temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0]),
                           text_config=text, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(tmp_path)
    Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112), tokenizer=tok,
                        chat_template=TEMPLATE).save_pretrained(tmp_path)
    agent_cfg = AgentConfig(backend="transformers", model=str(tmp_path), max_tokens=6)
    backend = TransformersBackend(agent_cfg, AtlasConfig(), device="cpu")
    agent = ChatAgent("vision", agent_cfg, AtlasConfig(), backend)
    frames = np.random.default_rng(1).integers(0, 256, (2, 56, 56, 3), dtype=np.uint8)
    r = asyncio.run(agent.describe_video(_clip(2.0, frames)))
    assert isinstance(r.text, str) and 1 <= r.completion_tokens <= 6 and r.prompt_tokens > 0
    assert json.loads(json.dumps({"t": r.text}))


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        TransformersBackend(AgentConfig(backend="transformers", model=str(tmp_path / "nope")), AtlasConfig())
