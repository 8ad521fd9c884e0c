"""Agent backends: an OpenAI-compatible chat-completions client and a local `transformers` model, behind
one `ChatBackend.complete(messages) -> Reply`, and `ChatAgent`, which turns each SoundAtlas role into a
chat request (frames as image parts, audio as input_audio parts).

The chat backend is the official `openai` client (`AsyncOpenAI(base_url=...)`), so vLLM, SGLang,
llama.cpp servers and hosted APIs all work. Its own retries are off: this module retries 429, 5xx,
timeouts, dropped connections and unreadable answers itself, with exponential backoff and jitter, waiting
at least what a Retry-After header asks, and bounds the requests in flight per backend.
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import re
import threading
import time
from typing import Optional

import numpy as np

from .config import AgentConfig, AtlasConfig
from .media import jpeg_data_url, wav_base64
from .types import AgentCallError, Clip, Reply

PROMPTS = {
    "vision": ("You describe short videos for sound designers. Describe only what is visible: the objects, what "
               "they do and when, in at most three sentences. Do not guess what is heard."),
    "caption": ("You write one-sentence audio captions. Describe only what is heard: the sound sources, what they "
                "do, how many times and in what order. A video description, when given, may only help you name "
                "sources that you hear. Answer with JSON: {\"caption\": \"...\", \"complex\": true|false}, complex "
                "meaning several overlapping sources or a scene you are unsure of."),
    "verify": ("You check an audio caption against the audio and the video frames. Answer \"yes\" if every "
               "sound the caption names is heard in the audio, otherwise \"no: \" and the reason."),
}


def _retry_after(headers) -> Optional[float]:
    """Seconds a Retry-After (or retry-after-ms) header asks for; None if absent or unreadable."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    v = headers.get("retry-after")
    if not v:
        return None
    try:
        return max(0.0, float(v))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(v).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def backoff_delay(attempt: int, cfg: AtlasConfig, retry_after: Optional[float], rng: random.Random) -> float:
    """Wait before attempt `attempt + 1`: base * 2^attempt with jitter U(0.5, 1.5), capped; never less than
    what the server asked for in Retry-After."""
    d = min(cfg.backoff_max, cfg.backoff_base * (2 ** attempt)) * rng.uniform(0.5, 1.5)
    if retry_after is not None:
        d = max(d, retry_after) + rng.uniform(0, 0.05 * max(retry_after, 0.1))
    return d


class ChatBackend:
    """complete(messages, agent) -> Reply; messages in the chat-completions format."""
    name = "chat"

    async def complete(self, messages: list, agent: AgentConfig) -> Reply:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


class EncodedPart(dict):
    """A message part whose JSON text is made once: a clip's base64 audio or JPEG frame, which several
    requests of the clip carry (re-escaping ~100 kB of base64 for every request costs more than sending it)."""
    __slots__ = ("json",)

    def __init__(self, part: dict):
        super().__init__(part)
        self.json = _dumps(part)


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _object(d: dict, key: str, raw: str) -> str:
    """JSON of the object `d`, its field `key` written as the JSON text `raw`."""
    return "{" + ",".join(_dumps(k) + ":" + (raw if k == key else _dumps(v)) for k, v in d.items()) + "}"


def chat_body_bytes(body: dict) -> bytes:
    """The chat-completions request body as JSON bytes (what `json.dumps` writes, compact), taking each
    EncodedPart's JSON text as made instead of encoding it again."""
    msgs = []
    for m in body["messages"]:
        c = m["content"]
        raw = "[" + ",".join(p.json if isinstance(p, EncodedPart) else _dumps(p) for p in c) + "]" \
            if isinstance(c, list) else _dumps(c)
        msgs.append(_object(m, "content", raw))
    return _object(body, "messages", "[" + ",".join(msgs) + "]").encode()


def _httpx_module(client_cls):
    """The httpx package (httpx or httpx2) an openai HTTP client class is built on, for its Limits."""
    import importlib
    for c in client_cls.__mro__:
        root = c.__module__.split(".")[0]
        if c.__name__ == "AsyncClient" and root in ("httpx", "httpx2"):
            return importlib.import_module(root)
    import httpx
    return httpx


class OpenAIBackend(ChatBackend):
    def __init__(self, agent: AgentConfig, cfg: AtlasConfig):
        self.agent, self.cfg = agent, cfg       # agent: the first agent on this server (its url and key)
        self.name = f"openai:{agent.base_url}"
        self._clients: Optional[list] = None
        self._turn = 0
        self._sem: Optional[asyncio.Semaphore] = None
        self._rng = random.Random()
        self._send_bytes = False
        self.transport = ""
        self.in_flight = 0
        self.max_seen_in_flight = 0
        self._import()

    @staticmethod
    def _import():
        try:
            import openai
        except ImportError as e:
            raise ImportError("the chat backend needs the openai client: pip install 'omni2sound[atlas]'") from e
        return openai

    def _ensure(self):
        """The clients, made inside the running event loop, with as many connections as requests in flight.
        The transport is aiohttp where the `openai[aiohttp]` extra is installed (the client's
        `DefaultAioHttpClient`: a fraction of httpx's CPU per request, which is what bounds a 2-core worker);
        otherwise httpx, spread over clients of at most 16 connections, since httpx's pool scans every
        connection (a system call each) for every request it places."""
        if self._clients is not None:
            return
        import inspect
        openai = self._import()
        AsyncOpenAI = openai.AsyncOpenAI
        limit, timeout = self.cfg.max_requests_in_flight, self.cfg.request_timeout
        key = os.environ.get(self.agent.api_key_env) or "none"
        make = lambda http: AsyncOpenAI(base_url=self.agent.base_url, api_key=key, max_retries=0, timeout=timeout,
                                        http_client=http)
        aio = getattr(openai, "DefaultAioHttpClient", None)
        if aio is not None:
            hx = _httpx_module(aio)
            try:
                http = aio(limits=hx.Limits(max_connections=limit, max_keepalive_connections=limit), timeout=timeout)
            except (RuntimeError, ImportError):      # the aiohttp extra is not installed
                http = None
            if http is not None:
                self._clients, self.transport = [make(http)], "aiohttp"
        if self._clients is None:
            import httpx
            n = max(1, -(-limit // 16))
            per = -(-limit // n)
            ssl_ctx = httpx.create_ssl_context()      # one certificate store for all clients (0.2 s each to load)
            self._clients = [make(httpx.AsyncClient(limits=httpx.Limits(max_connections=per,
                                                                        max_keepalive_connections=per),
                                                    timeout=timeout, verify=ssl_ctx)) for _ in range(n)]
            self.transport = "httpx"
        # clients whose post() takes the body as bytes get it spliced from the clip's pre-encoded parts
        self._send_bytes = "content" in inspect.signature(self._clients[0].post).parameters
        self._sem = asyncio.Semaphore(limit)

    async def _post(self, body: dict) -> dict:
        """One chat-completions request through the client's low-level post, the answer read as plain JSON:
        the typed `create()` walks every base64 frame and audio string of the messages, and the typed
        answer costs a pydantic model per request for the three fields read here."""
        self._turn = (self._turn + 1) % len(self._clients)
        client, opts = self._clients[self._turn], {"timeout": self.cfg.request_timeout}
        if self._send_bytes:
            return await client.post("/chat/completions", cast_to=object, content=chat_body_bytes(body), options=opts)
        return await client.post("/chat/completions", cast_to=object, body=body, options=opts)

    async def complete(self, messages: list, agent: AgentConfig) -> Reply:
        import openai
        self._ensure()
        prices = agent.price_per_token()
        last = "no attempt made"
        for attempt in range(self.cfg.max_attempts):
            retry_after = None
            async with self._sem:
                self.in_flight += 1
                self.max_seen_in_flight = max(self.max_seen_in_flight, self.in_flight)
                try:
                    body = {"model": agent.model, "messages": messages, "max_tokens": agent.max_tokens,
                            "temperature": agent.temperature, **(agent.extra_body or {})}
                    resp = await self._post(body)
                    text = resp["choices"][0]["message"]["content"]
                    if not isinstance(text, str):
                        raise ValueError("the answer has no message content")
                except openai.APIStatusError as e:
                    status = e.status_code
                    last = f"HTTP {status}: {str(e)[:200]}"
                    if status != 429 and status < 500 and status not in (408, 409):
                        raise AgentCallError(f"openai:{agent.model}: {last} (not retried)") from None
                    retry_after = _retry_after(getattr(e.response, "headers", None))
                    continue_ = True
                except openai.APITimeoutError:
                    last, continue_ = f"timed out after {self.cfg.request_timeout:g} s", True
                except openai.APIConnectionError as e:
                    last, continue_ = f"connection error: {e.__cause__ or e}", True
                except (openai.APIResponseValidationError, json.JSONDecodeError, ValueError, AttributeError,
                        IndexError, KeyError, TypeError) as e:
                    last, continue_ = f"unreadable answer: {type(e).__name__}: {str(e)[:200]}", True
                else:
                    continue_ = False
                finally:
                    self.in_flight -= 1
            if not continue_:
                return self._reply(resp, text, prices, attempt + 1, f"openai:{agent.model}")
            if attempt + 1 < self.cfg.max_attempts:
                await asyncio.sleep(backoff_delay(attempt, self.cfg, retry_after, self._rng))
        raise AgentCallError(f"openai:{agent.model}: failed after {self.cfg.max_attempts} attempts; last: {last}")

    @staticmethod
    def _reply(resp: dict, text: str, prices: dict, attempts: int, name: str) -> Reply:
        u = resp.get("usage")
        u = u if isinstance(u, dict) else {}
        n = lambda d, k: int(d.get(k) or 0) if isinstance(d, dict) else 0
        pt, ct = n(u, "prompt_tokens"), n(u, "completion_tokens")
        audio = n(u.get("prompt_tokens_details"), "audio_tokens")
        reasoning = n(u.get("completion_tokens_details"), "reasoning_tokens")
        cost = (pt - audio) * prices["input"] + audio * prices["audio_input"] + ct * prices["output"]
        return Reply(text=text, prompt_tokens=pt, completion_tokens=ct, reasoning_tokens=reasoning, cost=cost,
                     agent=name, attempts=attempts)

    async def aclose(self) -> None:
        for c in self._clients or []:
            await c.close()
        self._clients = None


class TransformersBackend(ChatBackend):
    """A local chat model from a directory: Qwen2.5-VL (frames -> text) or Qwen2-Audio (audio + text -> text),
    or any model whose processor has a chat template. Generation is greedy, one request at a time per model
    (in a worker thread), bf16 on CUDA, under torch.inference_mode()."""

    def __init__(self, agent: AgentConfig, cfg: AtlasConfig, device: Optional[str] = None):
        import torch
        from transformers import AutoConfig, AutoProcessor
        self.agent, self.cfg = agent, cfg
        self.name = f"transformers:{os.path.basename(os.path.normpath(agent.model))}"
        if not os.path.isdir(agent.model):
            raise FileNotFoundError(f"transformers backend: model directory not found: {agent.model}")
        mcfg = AutoConfig.from_pretrained(agent.model)
        self.kind = mcfg.model_type
        if self.kind == "qwen2_5_vl":
            from transformers import Qwen2_5_VLForConditionalGeneration as cls
        elif self.kind == "qwen2_audio":
            from transformers import Qwen2AudioForConditionalGeneration as cls
        else:
            from transformers import AutoModelForImageTextToText as cls
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = cls.from_pretrained(agent.model, dtype=dtype).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(agent.model)
        self._lock = threading.Lock()

    def _inputs(self, messages: list):
        """Chat-completions messages -> the processor's conversation, images and audios."""
        from .media import decode_image_data_url, decode_wav_base64
        conv, images, audios = [], [], []
        sr = getattr(getattr(self.processor, "feature_extractor", None), "sampling_rate", 16000)
        for m in messages:
            parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
            content = []
            for p in parts:
                if p["type"] == "text":
                    content.append({"type": "text", "text": p["text"]})
                elif p["type"] == "image_url":
                    images.append(decode_image_data_url(p["image_url"]["url"]))
                    content.append({"type": "image"})
                elif p["type"] == "input_audio":
                    a, asr = decode_wav_base64(p["input_audio"]["data"])
                    if asr != sr:
                        import soxr
                        a = soxr.resample(a, asr, sr)
                    audios.append(np.asarray(a, np.float32))
                    content.append({"type": "audio", "audio_url": "input.wav"})
            conv.append({"role": m["role"], "content": content})
        text = self.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        kw = {"text": [text], "return_tensors": "pt", "padding": True}
        if images:
            kw["images"] = images
        if audios:
            kw["audio"] = audios
            kw["sampling_rate"] = sr
        return self.processor(**kw)

    def _generate(self, messages: list) -> Reply:
        import torch
        with self._lock, torch.inference_mode():
            inputs = self._inputs(messages).to(self.device)
            if "pixel_values" in inputs and self.device.startswith("cuda"):
                inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
            out = self.model.generate(**inputs, max_new_tokens=self.agent.max_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1]:]
            text = self.processor.batch_decode(new, skip_special_tokens=True)[0]
        pt, ct = int(inputs["input_ids"].shape[1]), int(new.shape[1])
        p = self.agent.price_per_token()
        return Reply(text=text, prompt_tokens=pt, completion_tokens=ct, cost=pt * p["input"] + ct * p["output"],
                     agent=self.name)

    async def complete(self, messages: list, agent: AgentConfig) -> Reply:
        return await asyncio.to_thread(self._generate, messages)


def parse_caption_reply(text: str) -> tuple[str, bool]:
    """(caption, complex) from a captioner's answer: the JSON asked for, or failing that the first line."""
    s = text.strip()
    m = re.search(r"\{.*\}", s, re.S)
    if m:
        try:
            obj = json.loads(m.group(0))
            if isinstance(obj, dict) and isinstance(obj.get("caption"), str):
                return obj["caption"].strip(), bool(obj.get("complex", False))
        except json.JSONDecodeError:
            pass
    line = next((ln for ln in s.splitlines() if ln.strip()), "")
    return line.strip().strip('"'), False


class ChatAgent:
    """A SoundAtlas role answered by a chat backend."""

    def __init__(self, role: str, agent: AgentConfig, cfg: AtlasConfig, backend: ChatBackend):
        self.role, self.agent, self.cfg, self.backend = role, agent, cfg, backend
        self.name = f"{agent.backend}:{agent.model}"

    def prepare(self, clip: Clip, frames: bool = True) -> None:
        """Encode the media this agent sends (the frames only if `frames`) once per clip, shared with the
        other agents; the runner calls this in a media thread, so the event loop only splices ready JSON."""
        if frames:
            self._frames(clip)
        self._audio(clip)

    def _frames(self, clip: Clip) -> list:
        """Image parts of the clip's frames (encoded once per clip, shared by every agent that sends them)."""
        if clip.frames is None or not self.agent.send_frames:
            return []
        if "jpeg" not in clip.encoded:
            clip.encoded["jpeg"] = [EncodedPart({"type": "image_url", "image_url": {"url": jpeg_data_url(f)}})
                                    for f in clip.frames]
        return list(clip.encoded["jpeg"])

    def _audio(self, clip: Clip) -> list:
        if not self.agent.send_audio:
            return []
        if "wav" not in clip.encoded:
            clip.encoded["wav"] = EncodedPart({"type": "input_audio",
                                               "input_audio": {"data": wav_base64(clip.audio, clip.sample_rate),
                                                               "format": "wav"}})
        return [clip.encoded["wav"]]

    async def describe_video(self, clip: Clip) -> Reply:
        frames = self._frames(clip)
        user = frames + [{"type": "text", "text": f"{len(frames)} frames of a {clip.duration:.1f} s clip, "
                                                  f"{clip.frames_fps:g} per second. Describe what is visible."}]
        msgs = [{"role": "system", "content": PROMPTS["vision"]}, {"role": "user", "content": user}]
        return await self.backend.complete(msgs, self.agent)

    async def caption(self, clip: Clip, context: Optional[str]) -> Reply:
        text = "Caption this audio." + (f" Video description (what is visible): {context}" if context else "")
        msgs = [{"role": "system", "content": PROMPTS["caption"]},
                {"role": "user", "content": self._audio(clip) + [{"type": "text", "text": text}]}]
        reply = await self.backend.complete(msgs, self.agent)
        reply.text, reply.complex = parse_caption_reply(reply.text)
        return reply

    async def verify(self, clip: Clip, caption: str, context: Optional[str]) -> Reply:
        text = f"Caption: {caption}" + (f"\nVideo description: {context}" if context else "")
        msgs = [{"role": "system", "content": PROMPTS["verify"]},
                {"role": "user", "content": self._audio(clip) + self._frames(clip) + [{"type": "text", "text": text}]}]
        return await self.backend.complete(msgs, self.agent)


def make_agents(cfg: AtlasConfig) -> dict:
    """role -> agent. Chat agents on one server share one client and one bound on requests in flight
    (max_requests_in_flight per server, whichever models they ask for); local models load once."""
    from .toy import ToyAgent
    backends: dict = {}
    agents = {}
    for role, a in cfg.agents.items():
        if a.backend == "toy":
            agents[role] = ToyAgent(role, a, cfg.seed)
            continue
        key = (a.backend, a.base_url, a.api_key_env) if a.backend == "openai" else (a.backend, a.model)
        if key not in backends:
            if a.backend == "openai":
                backends[key] = OpenAIBackend(a, cfg)
            elif a.backend == "transformers":
                backends[key] = TransformersBackend(a, cfg)
            else:
                raise ValueError(f"agent {role!r}: unknown backend {a.backend!r} (toy, openai, transformers)")
        agents[role] = ChatAgent(role, a, cfg, backends[key])
    return agents


def verdict_ok(text: str) -> bool:
    """The verifier's answer read as accept (starts with yes) or reject (anything else)."""
    return text.strip().lower().lstrip("\"'*").startswith("yes")
