"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for the tests and the benchmark.

It speaks HTTP/1.1 with keep-alive (what the `openai` client's httpx pool uses) on loopback only, answers
POST .../chat/completions after `latency` seconds, and can be scripted per request:

    server = ChatServer(latency=0.0).start()          # a thread with its own event loop
    server.push({"status": 429, "headers": {"Retry-After": "0.3"}}, {"text": "a bell rings"})
    ... AsyncOpenAI(base_url=server.base_url) ...
    server.requests                                    # every request body received, parsed
    server.stop()

Actions (a dict; pushed ones are used first, in order, then `responder(body)` decides):
    {"text": "...", "usage": {...}}     a normal answer (usage defaults to counts of the request's parts)
    {"status": 500, "headers": {...}}   an error status with a JSON error body
    {"delay": 2.0, ...}                 wait first (longer than the client's timeout: a timeout)
    {"malformed": true}                 200 with a body that is not JSON
    {"drop": true}                      close the connection without answering

    python -m omni2sound.atlas.loopback --latency 0.2      # prints "PORT <n>", serves until SIGTERM / SIGINT,
                                                           # then prints {"served": ..., "max_in_flight": ...}
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import threading
import time
from typing import Callable, Optional

STATUS_TEXT = {200: "OK", 400: "Bad Request", 404: "Not Found", 408: "Request Timeout", 429: "Too Many Requests",
               500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


def count_parts(body: dict) -> tuple[int, int]:
    """(image parts, audio parts) over a request's messages."""
    images = audios = 0
    for m in body.get("messages", []):
        if isinstance(m.get("content"), list):
            for p in m["content"]:
                images += p.get("type") == "image_url"
                audios += p.get("type") == "input_audio"
    return images, audios


def default_usage(body: dict, text: str) -> dict:
    """Token counts a server would report: 100 per text message, 258 per image, 320 per audio part."""
    images, audios = count_parts(body)
    prompt = 100 * len(body.get("messages", [])) + 258 * images + 320 * audios
    completion = max(1, len(text.split()))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"audio_tokens": 320 * audios, "cached_tokens": 0}}


def default_responder(body: dict) -> dict:
    """Answers by role, read from the system prompt: vision -> a description, captioner -> JSON, verifier -> yes."""
    system = next((m["content"] for m in body.get("messages", []) if m.get("role") == "system"), "")
    system = system if isinstance(system, str) else ""
    if "check an audio caption" in system:
        return {"text": "yes"}
    if "audio captions" in system:
        return {"text": json.dumps({"caption": "a bell rings twice", "complex": False})}
    return {"text": "A yellow disc jumps twice."}


class ChatServer:
    def __init__(self, responder: Optional[Callable[[dict], dict]] = None, latency: float = 0.0,
                 port: int = 0, keep_requests: bool = True):
        self.responder = responder or default_responder
        self.latency, self.port, self.keep_requests = latency, port, keep_requests
        self.requests: list = []
        self.served = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._script: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._server = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def push(self, *actions: dict) -> "ChatServer":
        with self._lock:
            self._script.extend(actions)
        return self

    def _next_action(self, body: dict) -> dict:
        with self._lock:
            if self._script:
                return self._script.popleft()
        return self.responder(body)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers = {}
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                body_bytes = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                if method != "POST" or not path.rstrip("/").endswith("/chat/completions"):
                    await self._send(writer, 404, {"error": {"message": f"no route {method} {path}"}})
                    continue
                try:
                    body = json.loads(body_bytes)
                except json.JSONDecodeError:
                    await self._send(writer, 400, {"error": {"message": "request body is not JSON"}})
                    continue
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    if self.keep_requests:
                        self.requests.append(body)
                    action = self._next_action(body)
                    delay = self.latency + float(action.get("delay", 0.0))
                    if delay > 0:
                        await asyncio.sleep(delay)
                    self.served += 1
                finally:
                    self.in_flight -= 1
                if action.get("drop"):
                    writer.transport.abort()
                    return
                if action.get("malformed"):
                    await self._send(writer, 200, b'{"id": "x", "choices": [{"message": ')
                    continue
                status = int(action.get("status", 200))
                if status != 200:
                    await self._send(writer, status, {"error": {"message": action.get("message", "scripted error"),
                                                                "type": "server_error"}}, action.get("headers"))
                    continue
                text = action.get("text", "")
                payload = {"id": f"chatcmpl-{self.served}", "object": "chat.completion", "created": int(time.time()),
                           "model": body.get("model", ""),
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": text}}],
                           "usage": action.get("usage") or default_usage(body, text)}
                await self._send(writer, 200, payload, action.get("headers"))
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            try:
                writer.close()
            except Exception:
                pass

    async def _send(self, writer, status: int, payload, headers: Optional[dict] = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        head = [f"HTTP/1.1 {status} {STATUS_TEXT.get(status, 'Status')}", "Content-Type: application/json",
                f"Content-Length: {len(data)}", "Connection: keep-alive"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        await writer.drain()

    async def serve(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    def start(self) -> "ChatServer":
        ready = threading.Event()

        def run():
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.serve())
            ready.set()
            self._loop.run_forever()
            self._server.close()
            self._loop.run_until_complete(self._server.wait_closed())
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name="chat-server")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the loopback chat server did not start within 10 s")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="a loopback chat-completions server with simulated latency")
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    server = ChatServer(latency=args.latency, port=args.port, keep_requests=False)

    async def go():
        import signal
        await server.serve()
        print(f"PORT {server.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        # what a benchmark reads back: requests served and the most that were open at once
        print(json.dumps({"served": server.served, "max_in_flight": server.max_in_flight}), flush=True)

    asyncio.run(go())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
