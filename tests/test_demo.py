"""The web demo on loopback with a tiny random model: driven through the Gradio Python client (every tab, a bad
upload, a video over the limit) and, marked ``browser``, by headless Chromium through Selenium as a user would:
upload a video, press Generate, wait for the audio, fetch the returned video."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from media import make_video, tiny_model

from omni2sound.mux import AAC_FRAME, AAC_RATE, probe

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    model = "model"                       # relative to the demo's folder: the page names it so
    tiny_model(root / "model")
    # H.264 so that the browser plays it (the page shows a still of it in the screenshot)
    clip = make_video(root / "clip.mp4", 25, 1.6, size=128, codec="libx264")
    long_clip = make_video(root / "long.mp4", 25, 4.0)
    port = _free_port()
    log = open(root / "demo.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "omni2sound.demo", "--model", model, "--port", str(port),
                             "--device", "cpu", "--max-seconds", "3", "--max-upload-mb", "1"], stdout=log,
                            stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}, cwd=root)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the demo did not start: {(root / 'demo.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield {"url": url, "clip": clip, "long": long_clip, "root": root}
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    log.close()
    text = (root / "demo.log").read_text()
    files = re.search(r"files under (\S+)\)", text).group(1)
    assert not os.path.exists(files), "the demo left its temporary files behind"
    assert "request failed" not in text, text[-3000:]        # no request met an unexpected error


def _check_muxed(path, clip):
    got, src = probe(path), probe(clip)
    assert got["video_frames"] == src["video_frames"] and got["video_codec"] == src["video_codec"]
    assert got["audio_codec"] == "aac" and abs(got["audio_seconds"] - got["video_seconds"]) <= AAC_FRAME / AAC_RATE


def test_gradio_client_endpoints(server):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    c = Client(server["url"], verbose=False)
    assert set(c.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {"/v2a", "/t2a", "/vt2a"}
    video, wav, png = c.predict(handle_file(server["clip"]), 1, 2, 0, 3.0, 6.0, api_name="/v2a")
    _check_muxed(video, server["clip"])
    import soundfile as sf
    assert sf.info(wav).duration == pytest.approx(1.6, abs=1e-3) and os.path.getsize(png) > 1000
    video, wav, png = c.predict("a bell rings", 0, 2, 0.5, 6.0, api_name="/t2a")
    assert video is None and sf.info(wav).duration == pytest.approx(0.5, abs=1e-3)
    video, wav, png = c.predict(handle_file(server["clip"]), "a block slides", 0, 1, 0, 3.0, 6.0, api_name="/vt2a")
    _check_muxed(video, server["clip"])
    # bad requests: a message for the page, never a stack trace
    not_video = server["root"] / "notes.mp4"
    not_video.write_text("not a video")
    for args, api, why in (((handle_file(str(not_video)), 0, 2, 0, 3.0, 6.0), "/v2a", "not a video"),
                           ((handle_file(server["long"]), 0, 2, 0, 3.0, 6.0), "/v2a", "at most 3 s"),
                           (("   ", 0, 2, 1.0, 6.0), "/t2a", "write a prompt"),
                           (("rain", 0, 2, 9.0, 6.0), "/t2a", "maximum value 3")):
        with pytest.raises(AppError, match=why) as e:
            c.predict(*args, api_name=api)
        assert "Traceback" not in str(e.value) and str(server["root"]) not in str(e.value)
    big = server["root"] / "big.mp4"                      # over --max-upload-mb: refused at the upload
    big.write_bytes(os.urandom(2 * 2**20))
    with pytest.raises(Exception, match="(?i)large|size|exceed"):
        c.predict(handle_file(str(big)), 0, 2, 0, 3.0, 6.0, api_name="/v2a")
    # concurrent requests wait in the queue and all finish
    jobs = [c.submit("a bell rings", i, 1, 0.3, 6.0, api_name="/t2a") for i in range(3)]
    assert all(sf.info(j.result(timeout=300)[1]).duration == pytest.approx(0.3, abs=1e-3) for j in jobs)


@pytest.mark.browser
def test_browser_upload_generate_and_play(server, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not (chromium and driver_bin):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,1000",
              "--mute-audio"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(driver_bin), options=opts)
    try:
        d.get(server["url"])
        wait = WebDriverWait(d, 240)
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#v2a-input input[type=file]"))).send_keys(
            server["clip"])
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#v2a-input video")))
        steps = d.find_element(By.CSS_SELECTOR, "#v2a-steps input[type=number]")
        steps.send_keys(Keys.CONTROL, "a")
        steps.send_keys("4", Keys.TAB)
        d.find_element(By.CSS_SELECTOR, "#v2a-run").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#v2a-audio audio")))
        src = wait.until(lambda drv: drv.find_element(By.CSS_SELECTOR, "#v2a-video video").get_attribute("src"))
        out = tmp_path / "returned.mp4"
        out.write_bytes(urllib.request.urlopen(src, timeout=60).read())
        _check_muxed(out, server["clip"])
        assert abs(probe(out)["audio_seconds"] - 1.6) <= AAC_FRAME / AAC_RATE
        assert not d.find_elements(By.CSS_SELECTOR, ".toast-body.error"), "the page showed an error"
        d.execute_script("window.scrollTo(0, 0)")
        time.sleep(1.0)                   # let the waveform and the spectrogram paint
        shot = tmp_path / "demo.png"
        d.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("OMNI2SOUND_DEMO_SCREENSHOT"):       # the README's picture: docs/demo.png, 64 colours
            from PIL import Image
            Image.open(shot).convert("RGB").quantize(64).save(os.environ["OMNI2SOUND_DEMO_SCREENSHOT"], optimize=True)
    finally:
        d.quit()


def test_no_model_message(tmp_path):
    r = subprocess.run([sys.executable, "-m", "omni2sound.demo"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=120)
    assert r.returncode == 2 and "runs/toy/stage3 does not exist" in r.stderr and "Traceback" not in r.stderr


def test_sliders_start_at_the_pipeline_default_guidance(tmp_path):
    from omni2sound.demo import DemoLimits, Generator
    from omni2sound.pipeline import SamplingOptions
    assert Generator(None, DemoLimits(), str(tmp_path)).default_guidance == SamplingOptions().guidance
    assert Generator(None, DemoLimits(), str(tmp_path), guidance=(3.0, 6.0)).default_guidance == (3.0, 6.0)
