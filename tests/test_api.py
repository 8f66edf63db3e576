"""The notebook API (lipexp.api, docs/api.md): ``load_run`` reads back what a run trained and
measured, ``evaluate`` measures any network with the project's attacks."""

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

import lipexp
import lipexp.api
from lipexp.runs.checkpoint import CheckpointError
from lipexp.runs.folder import RunFolderError
from lipexp.runs.train import run

from .helpers import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

N_IMAGES = 24  # evaluated images of the tiny run
ATTACKS = ("l2_pgd", "linf_pgd")  # evaluate's default, with conf/attacks/'s settings


def lower_median(d: np.ndarray) -> float:
    """``d_(ceil(N/2))`` of the sorted distances, as results.json defines its median."""
    return float(np.sort(d.astype(np.float64))[math.ceil(len(d) / 2) - 1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny digits run, trained once for the module: ``(run folder, its results)``. Four
    epochs of a width-8 CNN (about 2 s): after one its clean error is above 1/2 and both
    medians are 0, which no comparison of medians could tell from a wrong one."""
    out = tmp_path_factory.mktemp("api") / "run"
    threads = torch.get_num_threads()  # one thread, as the one_thread fixture (function-scoped)
    torch.set_num_threads(int(os.environ.get("LIPEXP_TEST_THREADS", "1")))  # gives the tests
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"paths.output_dir={out}", "trainer.enable_progress_bar=false",
            "+trainer.enable_model_summary=false", "trainer.max_epochs=4", "model.width=8",
            f"eval.n_images={N_IMAGES}", "eval.progress=false", "logger=none",
            f"attacks=[{','.join(ATTACKS)}]"])
    try:
        results = run(cfg)
    finally:
        torch.set_num_threads(threads)
    assert results["status"] == "completed"
    assert 0 < results["attacks"]["l2_pgd"]["median"] < math.inf  # a telling median
    return out, results


def test_import_lipexp_loads_no_torch_and_names_the_api():
    code = ("import sys, lipexp; assert 'torch' not in sys.modules, 'torch at import'; "
            "print(sorted(lipexp.__all__))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert {"load_run", "evaluate", "Run"} <= set(eval(out.stdout))
    # on first use, lipexp.api's own objects
    assert lipexp.load_run is lipexp.api.load_run and lipexp.Run is lipexp.api.Run
    assert lipexp.evaluate is lipexp.api.evaluate and "load_run" in dir(lipexp)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        lipexp.nothing


def test_load_run_gives_the_evaluated_network_its_numbers_and_images(trained):
    folder, results = trained
    loaded = lipexp.load_run(folder)
    assert isinstance(loaded, lipexp.Run)
    assert loaded.path == folder.resolve()
    assert loaded.checkpoint == (folder / "checkpoints" / "last.ckpt").resolve()
    assert not any(m.training for m in loaded.model.modules())  # BN on running statistics
    assert loaded.config["eval"]["n_images"] == N_IMAGES
    assert loaded.results["status"] == "completed"

    x, y = loaded.test_images()  # the evaluated images: the first eval.n_images
    assert x.shape == (N_IMAGES, 1, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) >= 0 and float(x.max()) <= 1 and float(x.max()) > 0.5
    np.testing.assert_array_equal(loaded.indices, np.arange(N_IMAGES))
    x5, y5 = loaded.test_images(5)
    assert torch.equal(x5, x[:5]) and torch.equal(y5, y[:5])
    with torch.no_grad():
        wrong = int((loaded.model(x).argmax(1) != y).sum())
    assert wrong == round(results["evaluation"]["clean_error"] * N_IMAGES)

    assert set(ATTACKS) | {"ensemble_l2", "ensemble_linf"} == set(loaded.distances)
    for name in ATTACKS:
        d = loaded.distances[name]
        assert d.shape == (N_IMAGES,)
        assert lower_median(d) == loaded.results["attacks"][name]["median"]
        assert int((d == 0).sum()) == wrong  # 0: misclassified clean
        # the certified radius never exceeds a distance an attack found (docs/method.md,
        # "Guarantees"), and the model's bound makes some positive
        radius = loaded.certified[f"certified_{name.split('_')[0]}"]
        assert (radius <= d * (1 + 1e-5)).all() and (radius > 0).any()


def test_a_checkpoint_file_gives_the_same_weights(trained, tmp_path):
    folder, _ = trained
    last = folder / "checkpoints" / "last.ckpt"
    by_folder, by_file = lipexp.load_run(folder), lipexp.load_run(last)
    a, b = by_folder.model.state_dict(), by_file.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # the same file
    assert by_file.results == by_folder.results  # the checkpoint the evaluation used
    assert set(by_file.distances) == set(by_folder.distances)

    # a copy outside its run folder: the weights, no numbers (none measured these here)
    loose = tmp_path / "copy.ckpt"
    shutil.copy(last, loose)
    alone = lipexp.load_run(loose)
    c = alone.model.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert alone.results is None and alone.distances == {} and alone.indices is None
    x, _ = alone.test_images()  # the first eval.n_images, from the config alone
    assert len(x) == N_IMAGES


def test_bad_paths_are_refused_with_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run folder or checkpoint"):
        lipexp.load_run(tmp_path / "missing")
    with pytest.raises(RunFolderError, match="no readable checkpoint"):
        lipexp.load_run(tmp_path)  # a folder without checkpoints
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        lipexp.load_run(text)


def test_evaluate_finds_a_linear_models_distances(device):
    """A 2-class linear model ``z_1 - z_0 = w.x + b``: the l2 distance to its boundary is
    ``|w.x + b| / ||w||_2``, the l-infinity one ``|w.x + b| / ||w||_1`` (Hoelder), reached
    inside the pixel box here (the images sit in [0.3, 0.7], the distances below 0.2). PGD's
    search finds an example at ``d`` with ``true <= d <= (1 + rtol) true``. The model is in
    train mode with dropout: the evaluation must run it in eval mode, then restore it."""
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(16, generator=gen), 0.1
    x = 0.3 + 0.4 * torch.rand(400, 1, 4, 4, generator=gen)
    margin = x.flatten(1) @ w + b
    l2, linf = margin.abs() / w.norm(p=2), margin.abs() / w.norm(p=1)
    keep = (l2 > 0.02) & (l2 < 0.2)  # l-inf <= l2: both inside the box
    x, margin, l2, linf = x[keep][:40], margin[keep][:40], l2[keep][:40], linf[keep][:40]
    y = (margin > 0).long()
    y[:3] = 1 - y[:3]  # misclassified clean: distance 0
    linear = nn.Linear(16, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.stack([torch.zeros(16), w]))
        linear.bias.copy_(torch.tensor([0.0, b]))
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), linear).train()

    rtol = 0.005  # tighter than conf's 0.02: the setting reaches the attack
    found = lipexp.evaluate(model, x, y, device=device, l2_pgd={"rtol": rtol}, progress=False)

    assert model.training and model[1].training  # modes restored
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert next(model.parameters()).device.type == "cpu"  # moved back
    assert found.results["attacks"]["l2_pgd"]["settings"]["rtol"] == rtol
    assert found.results["attacks"]["linf_pgd"]["settings"]["rtol"] == 0.02  # conf's
    assert round(found.clean_error * len(x)) == 3
    for name, true, tol in [("l2_pgd", l2, rtol), ("linf_pgd", linf, 0.02)]:
        d = torch.as_tensor(found.distances[name])
        assert (d[:3] == 0).all()
        # 1e-4: float32 rounding of the found example's norm and of the logits at the boundary
        assert (d[3:] >= true[3:] * (1 - 1e-4)).all()
        assert (d[3:] <= true[3:] * (1 + tol) * (1 + 1e-4)).all()
        assert found.medians[name] == lower_median(found.distances[name])


def test_evaluate_reproduces_the_runs_medians(trained):
    folder, results = trained
    loaded = lipexp.load_run(folder)
    x, y = loaded.test_images()
    found = lipexp.evaluate(loaded.model, x, y, progress=False)  # conf's settings, as the run's
    assert round(found.clean_error * N_IMAGES) == round(
        results["evaluation"]["clean_error"] * N_IMAGES)
    for name in ATTACKS:
        rtol = results["attacks"][name]["settings"]["rtol"]
        recorded = results["attacks"][name]["median"]
        # each median is found within the search's relative bracket rtol
        assert found.medians[name] == pytest.approx(recorded, rel=rtol)
        mine, theirs = found.distances[name], loaded.distances[name]
        np.testing.assert_array_equal(mine == 0, theirs == 0)
        np.testing.assert_array_equal(np.isinf(mine), np.isinf(theirs))
        finite = np.isfinite(mine) & (mine > 0)
        np.testing.assert_allclose(mine[finite], theirs[finite], rtol=rtol)


def test_evaluate_refuses_what_it_cannot_measure():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x, y = torch.rand(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)
    cases = [({"attacks": ["l2_nothing"]}, "no such attack l2_nothing"),
             ({"n_images": 2}, "n_images: neither one of the attacks"),
             ({"l2_pgd": {"strength": 1}}, "l2_pgd has no setting strength"),
             ({"l2_pgd": {"rtol": 2.0}}, "0 < rtol < 1"),
             ({"batch_size": 0}, "eval.batch_size must be > 0")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            lipexp.evaluate(model, x, y, progress=False, **kwargs)
    with pytest.raises(ValueError, match=r"pixels must be in \[0, 1\]"):
        lipexp.evaluate(model, 255 * x, y, progress=False)
    with pytest.raises(ValueError, match="the same N"):
        lipexp.evaluate(model, x, y[:2], progress=False)
