"""Test-suite set-up shared by every test file.

Triton kernels run on the CPU only through the interpreter, which must be switched on before triton is
imported: without a GPU the whole suite runs with TRITON_INTERPRET=1 (a GPU run leaves it off).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


# Fresh random inputs on every run (kernels must be right on any valid input), reproducible on failure:
# the run's seed is printed in the header; OMNI2SOUND_TEST_SEED=<n> replays it.
RUN_SEED = int(os.environ.get("OMNI2SOUND_TEST_SEED", str(int.from_bytes(os.urandom(4), "little"))))


def pytest_report_header(config):
    return f"omni2sound test seed: OMNI2SOUND_TEST_SEED={RUN_SEED}"


@pytest.fixture(autouse=True)
def _seeded(request):
    import zlib

    torch.manual_seed((RUN_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31))
    yield


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread (opt in with ``pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A folder holding a randomly initialised `tiny` AudioVAE (seed 0) saved with save_pretrained."""
    from omni2sound.vae import VAE_PRESETS, AudioVAE
    torch.manual_seed(0)
    d = str(tmp_path_factory.mktemp("vae"))
    AudioVAE(VAE_PRESETS["tiny"]).save_pretrained(d)
    return d
