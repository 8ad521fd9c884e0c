"""A web demo: ``python -m omni2sound.demo --model DIR`` (needs the ``demo`` extra: ``pip install ".[demo]"``).

Three tabs, one per task: V2A (a video), T2A (a prompt) and VT2A (both). Each gives back the video with the
generated sound track (remuxed: the picture is not re-encoded), the audio as WAV, and its spectrogram. The page
listens on 127.0.0.1 unless ``--host`` says otherwise, refuses uploads over ``--max-upload-mb`` and videos over
``--max-seconds``, runs one request at a time (others wait in a queue of ``--queue-size``), and keeps its files in
one temporary folder that is pruned as it goes and removed at exit. Without ``--model`` it serves the default
toy run's last stage (``runs/toy/stage3``) when that exists. The same endpoints (``/v2a``, ``/t2a``, ``/vt2a``)
answer the Gradio Python client (``gradio_client.Client(url).predict(..., api_name="/v2a")``).
"""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import List, Optional

DEFAULT_MODEL = os.path.join("runs", "toy", "stage3")
log = logging.getLogger("omni2sound.demo")


@dataclass
class DemoLimits:
    max_upload_mb: float = 100.0      # per uploaded file
    max_seconds: float = 30.0         # longest video accepted and longest audio made
    max_steps: int = 100
    queue_size: int = 16              # requests waiting beyond the one running; more are turned away
    keep_seconds: float = 1800.0      # results older than this are deleted (the page has shown them by then)


class DemoError(ValueError):
    """A request the demo refuses; shown in the page as the message alone."""


class Generator:
    """The demo's work, without any web framework: checks a request, generates, writes the outputs into a fresh
    folder under ``root`` (mp4 / wav / png) and prunes old folders. One request at a time (a lock; the queue in
    front of it orders the waiting ones)."""

    def __init__(self, pipe, limits: DemoLimits, root: str, guidance=None):
        if guidance is None:        # the sliders start where the CLI and the API do (SamplingOptions' default)
            from .pipeline import SamplingOptions
            guidance = SamplingOptions().guidance
        self.pipe, self.limits, self.root = pipe, limits, root
        self.default_guidance = guidance
        self._lock = threading.Lock()
        os.makedirs(root, exist_ok=True)

    def check_video(self, video: Optional[str]) -> float:
        """The upload's duration in seconds, or DemoError saying what is wrong with it."""
        from .mux import video_duration
        if not video:
            raise DemoError("upload a video first")
        size_mb = os.path.getsize(video) / 2**20
        if size_mb > self.limits.max_upload_mb:
            raise DemoError(f"the video is {size_mb:.0f} MB; this demo takes at most {self.limits.max_upload_mb:g} MB")
        try:
            seconds = video_duration(video)
        except (ValueError, OSError) as e:
            why = _reason(e).replace(video, os.path.basename(video))        # not the demo's temporary paths
            raise DemoError(f"{os.path.basename(video)} is not a video this demo can read ({why})") from None
        if seconds > self.limits.max_seconds:
            raise DemoError(f"the video is {seconds:.1f} s long; this demo takes at most {self.limits.max_seconds:g} s")
        return seconds

    def run(self, task: str, video: Optional[str], text: Optional[str], seed, steps, duration, video_guidance,
            text_guidance, progress=None) -> tuple:
        """-> (muxed video path or None, wav path, spectrogram png path). Raises DemoError with the reason."""
        from .audio import save_audio
        from .mux import mux_audio

        text = (text or "").strip() or None
        if task in ("t2a", "vt2a") and text is None:
            raise DemoError("write a prompt first")
        if task == "t2a":
            video = None
        video_seconds = self.check_video(video) if task in ("v2a", "vt2a") else None
        steps = int(steps or 25)
        if not 1 <= steps <= self.limits.max_steps:
            raise DemoError(f"steps must be between 1 and {self.limits.max_steps}, got {steps}")
        duration = float(duration or 0) or video_seconds or 5.0
        if not 0 < duration <= self.limits.max_seconds:
            raise DemoError(f"duration must be between 0 and {self.limits.max_seconds:g} s, got {duration:g}")
        guidance = {"v2a": float(video_guidance), "t2a": float(text_guidance),
                    "vt2a": (float(video_guidance), float(text_guidance))}[task]
        self._prune()
        out = tempfile.mkdtemp(prefix=f"{task}-", dir=self.root)
        if progress is not None:
            progress(0.0, desc="waiting for the model" if self._lock.locked() else "encoding the conditions")
        with self._lock:
            try:
                result = self.pipe.generate(video=video, text=text, duration=duration, steps=steps, guidance=guidance,
                                            seed=int(seed or 0), progress=progress is not None)
            except (ValueError, OSError) as e:       # an undecodable frame deep in the video, a prompt too long
                raise DemoError(_reason(e)) from None
        if progress is not None:
            progress(0.95, desc="writing the outputs")
        wav = result.audio[0]
        wav_path = save_audio(os.path.join(out, "audio.wav"), wav, result.sample_rate)
        png = os.path.join(out, "spectrogram.png")
        spectrogram_png(png, wav.numpy(), result.sample_rate, f"{task.upper()}: {text or 'video only'}")
        muxed = None
        if video is not None:
            muxed = mux_audio(video, wav, result.sample_rate, os.path.join(out, "video.mp4"))
        return muxed, str(wav_path), png

    def _prune(self) -> None:
        now = time.time()
        for name in os.listdir(self.root):
            p = os.path.join(self.root, name)
            if os.path.isdir(p) and now - os.path.getmtime(p) > self.limits.keep_seconds:
                shutil.rmtree(p, ignore_errors=True)


def _reason(e: BaseException) -> str:
    """An error's message in one line, without the paths of the demo's own temporary folders."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg


def spectrogram_png(path: str, wav, sample_rate: int, title: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 2.6))
    ax.specgram(wav, NFFT=512, Fs=sample_rate, noverlap=384, cmap="magma", vmin=-120)
    ax.set_title(title[:90], fontsize=8)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("Hz")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def build_demo(gen: Generator, model_name: str = ""):
    """The Gradio page over ``gen``: tabs V2A, T2A, VT2A, each an endpoint of the same name."""
    import gradio as gr

    def handler(task):
        def fn(*args, progress=gr.Progress(track_tqdm=True)):
            video, text, rest = _split(task, args)
            try:
                return gen.run(task, video, text, *rest, progress=progress)
            except DemoError as e:
                raise gr.Error(str(e), print_exception=False) from None
            except Exception as e:           # noqa: BLE001 - the page gets a message, the console the traceback
                log.exception("request failed")
                raise gr.Error(f"generation failed: {type(e).__name__}: {_reason(e)}", print_exception=False) \
                    from None
        fn.__name__ = task
        return fn

    g = gen.default_guidance if isinstance(gen.default_guidance, tuple) else (gen.default_guidance,) * 2
    with gr.Blocks(title="omni2sound", delete_cache=(600, int(gen.limits.keep_seconds))) as demo:
        gr.Markdown(f"## omni2sound: sound for video and text\nModel: `{model_name}`. Videos up to "
                    f"{gen.limits.max_seconds:g} s and {gen.limits.max_upload_mb:g} MB. Duration 0 = the video's.")
        for task, label in (("v2a", "V2A: video"), ("t2a", "T2A: text"), ("vt2a", "VT2A: video + text")):
            with gr.Tab(label, id=task):
                with gr.Row():
                    with gr.Column():
                        inputs = []
                        if task != "t2a":
                            inputs.append(gr.Video(label="video", sources=["upload"], elem_id=f"{task}-input",
                                                   height=240))
                        if task != "v2a":
                            inputs.append(gr.Textbox(label="prompt", lines=2, elem_id=f"{task}-prompt",
                                                     placeholder="a dog barks twice, then a door closes"))
                        with gr.Row():
                            seed = gr.Number(label="seed", value=0, precision=0, elem_id=f"{task}-seed")
                            steps = gr.Slider(1, gen.limits.max_steps, value=25, step=1, label="steps",
                                              elem_id=f"{task}-steps")
                            duration = gr.Number(label="duration (s)", value=0 if task != "t2a" else 5.0,
                                                 minimum=0, maximum=gen.limits.max_seconds, elem_id=f"{task}-duration")
                        with gr.Row():
                            vg = gr.Slider(0, 12, value=g[0], step=0.5, label="video guidance",
                                           visible=task != "t2a", elem_id=f"{task}-video-guidance")
                            tg = gr.Slider(0, 12, value=g[1], step=0.5, label="text guidance",
                                           visible=task != "v2a", elem_id=f"{task}-text-guidance")
                        run = gr.Button("Generate", variant="primary", elem_id=f"{task}-run")
                    with gr.Column():
                        out_video = gr.Video(label="video with sound", visible=task != "t2a",
                                             elem_id=f"{task}-video", interactive=False, height=240)
                        out_audio = gr.Audio(label="audio", type="filepath", elem_id=f"{task}-audio",
                                             interactive=False)
                        out_png = gr.Image(label="spectrogram", type="filepath", elem_id=f"{task}-spectrogram",
                                           interactive=False)
                run.click(handler(task), inputs=[*inputs, seed, steps, duration, vg, tg],
                          outputs=[out_video, out_audio, out_png], api_name=task)
    demo.queue(default_concurrency_limit=1, max_size=gen.limits.queue_size)
    return demo


def _split(task: str, args: tuple):
    """(video, text, [seed, steps, duration, video guidance, text guidance]) from a tab's inputs."""
    args = list(args)
    video = args.pop(0) if task != "t2a" else None
    text = args.pop(0) if task != "v2a" else None
    if isinstance(video, dict):              # the Gradio client's file payload
        video = video.get("video") or video.get("path")
    return video, text, args


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(prog="python -m omni2sound.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help=f"pipeline folder (default: {DEFAULT_MODEL}, the toy run's last stage, if present)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None, help="default: cuda if visible, else cpu")
    p.add_argument("--max-upload-mb", type=float, default=DemoLimits.max_upload_mb)
    p.add_argument("--max-seconds", type=float, default=DemoLimits.max_seconds,
                   help="longest video accepted and longest audio made")
    p.add_argument("--queue-size", type=int, default=DemoLimits.queue_size,
                   help="requests that may wait while one runs")
    return p, p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    p, args = parse_args(argv)
    model = args.model
    if model is None:
        if not os.path.isdir(DEFAULT_MODEL):
            p.error(f"no --model given and {DEFAULT_MODEL} does not exist: train the toy model first "
                    "(python -m omni2sound.train) or pass --model DIR (a pipeline or training stage folder)")
        model = DEFAULT_MODEL
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    root = tempfile.mkdtemp(prefix="omni2sound-demo-")
    atexit.register(shutil.rmtree, root, True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))          # a plain kill also removes the files
    # uploads and Gradio's copies of the results live under the same folder (unless the user chose another)
    os.environ.setdefault("GRADIO_TEMP_DIR", os.path.join(root, "gradio"))
    try:
        import gradio  # noqa: F401
    except ImportError:
        p.exit(2, f"{p.prog}: error: the demo needs Gradio: pip install \"omni2sound[demo]\" (or pip install gradio)\n")
    from .device import device_arg
    from .pipeline import Omni2SoundPipeline
    try:
        if args.device is not None:
            device_arg(args.device)
        pipe = Omni2SoundPipeline.from_pretrained(model, device=args.device)
    except Exception as e:         # noqa: BLE001 - a folder that is not a model, a missing GPU: the reason
        p.exit(2, f"{p.prog}: error: cannot load {model}: {_reason(e)}\n")
    limits = DemoLimits(max_upload_mb=args.max_upload_mb, max_seconds=args.max_seconds, queue_size=args.queue_size)
    demo = build_demo(Generator(pipe, limits, os.path.join(root, "results")), model)
    print(f"[demo] serving {model} on http://{args.host}:{args.port} (files under {root})", file=sys.stderr, flush=True)
    import inspect
    known = inspect.signature(demo.launch).parameters
    extra = {k: v for k, v in (("ssr_mode", False), ("footer_links", ["api"])) if k in known}   # Gradio 5 / 6
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=f"{int(limits.max_upload_mb)}mb",
                show_error=True, quiet=True, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
