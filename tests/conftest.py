"""Shared fixtures: Hydra configs composed from conf/ (as run.py does), the device, one thread,
strict results.json. Everything else two test files share is in tests/helpers.py."""

import json
import os

# One torch thread per process unless the environment says otherwise (tests/numerics_matrix.py
# sets 1 and 2): set before torch loads, inherited by every run.py a test starts. Two xdist
# workers share the machine's cores, tiny models run fastest on one thread, and on a machine
# whose CPU quota is smaller than its visible cores torch's default (one thread per core)
# made run.py tests ~50x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from lipexp.config.schema import register

from .helpers import REPO

os.environ.setdefault("WANDB_MODE", "disabled")  # tests never reach the network
register()


def _reject(token: str):
    raise ValueError(f"{token} is not JSON")


@pytest.fixture(autouse=True)
def results_are_strict_json(tmp_path):
    """Every results.json a test leaves under its tmp_path parses as strict JSON: no NaN or
    Infinity tokens, which most JSON readers reject (lipexp.files.strict_json)."""
    yield
    for path in tmp_path.rglob("results.json"):
        json.loads(path.read_text(), parse_constant=_reject)


def _cuda_context():
    """CUDA with TF32 off for the test: the device-independent tests compare against float32
    closed forms (tolerances ~1e-5 relative), and TF32's 10-bit mantissa in cuDNN convolutions
    and matmuls would be ~1e-3. Tests that run bf16 autocast state their own tolerance."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield torch.device("cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.fixture(params=[
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ]),
])
def device(request):
    """The device a device-independent test runs on: ``cpu`` in every run; ``cuda`` only under
    ``pytest -m gpu`` (the default ``-m 'not slow and not gpu'`` deselects it), with TF32 off.
    A test taking this fixture asserts a property that must hold on any device."""
    if request.param == "cpu":
        yield torch.device("cpu")
    else:
        yield from _cuda_context()


@pytest.fixture
def one_thread():
    """One torch thread during the test: tiny models run faster without thread overhead, and
    results do not depend on the machine's core count. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``. ``LIPEXP_TEST_THREADS=N`` makes
    it N threads (``make test-numerics`` runs the numerics tests with 1 and 2)."""
    n = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("LIPEXP_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(n)


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(*overrides)``: the run config for these overrides, writing under tmp_path."""

    def _make(*overrides: str, output_dir: Path | None = None):
        out = output_dir or tmp_path / "run"
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            return compose(
                "config",
                overrides=[
                    f"paths.output_dir={out}",
                    "trainer.enable_progress_bar=false",
                    "+trainer.enable_model_summary=false",
                    *overrides,
                ],
            )

    return _make
