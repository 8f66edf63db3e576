"""Pictures of the attacks (lipexp.evaluation.pictures): the images chosen, their
adversarial examples found again at the reported distance and misclassified, the figures,
and the W&B images and table."""

import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from omegaconf import OmegaConf
from torch import Tensor, nn

from lipexp.attacks.distance import DistanceAttack, FMNAttack, PGDSearch
from lipexp.attacks.threat import THREATS, Norm
from lipexp.config.schema import EvalConfig
from lipexp.data.datamodule import to_unit
from lipexp.evaluation.pictures import TOLERANCE, choose
from lipexp.evaluation.runner import Evaluator

from ..helpers import REPO, records, summary_keys

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: threads cost more
N, PICTURES = 24, 5  # images evaluated, pictured per norm


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Tanh(), nn.Linear(16, 4))


class TinyData:
    """``test_set()``: 24 uint8 RGB images of 4 x 4 pixels, labelled as the network predicts
    but for the first three (misclassified clean: never pictured)."""

    def __init__(self, net: nn.Module):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, 256, (N, 3, 4, 4), generator=g, dtype=torch.uint8)
        with torch.no_grad():
            self.y = net(to_unit(self.x)).argmax(1)
        self.y[:3] = (self.y[:3] + 1) % 4

    def test_set(self):
        return self.x, self.y


def attacks() -> dict[str, DistanceAttack]:
    return {"l2_pgd": PGDSearch("l2", steps=5, targets=2),
            "linf_pgd": PGDSearch("linf", steps=5, targets=2),
            "l2_fmn": FMNAttack("l2", steps=10, targets=2)}


def evaluator(pictures: int = PICTURES, attack_set=None, **kw) -> Evaluator:
    return Evaluator(attack_set or attacks(), batch_size=16, grid_points=10, progress=False,
                     pictures=pictures, **kw)


def test_choose_takes_the_easiest_the_hardest_and_those_around_the_median():
    d = np.array([0.0, 3.0, np.inf, 1.0, 2.0, 5.0, 4.0, 0.5])  # eligible: 6, sorted 7 3 4 1 6 5
    assert choose(d, 4).tolist() == [7, 4, 1, 5]  # easiest, the two middle ones, hardest
    assert choose(d, 3).tolist() == [7, 4, 5]
    assert choose(d, 2).tolist() == [7, 5]
    assert choose(d, 1).tolist() == [4]  # the lower median
    assert choose(d, 6).tolist() == choose(d, 100).tolist() == [7, 3, 4, 1, 6, 5]
    assert choose(np.array([0.0, np.inf]), 8).tolist() == []


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_pictures_hold_the_chosen_images_and_their_adversarial_examples(tmp_path, device,
                                                                        bf16):
    """Under bf16 the attacks run again under the same autocast; the examples' success is
    checked in full precision, as the attacks check theirs."""
    net = tiny_net().to(device)
    data = TinyData(tiny_net())
    results = evaluator(bf16=bf16)(net, data, tmp_path)
    files = results["files"]
    assert {k: files[k].rsplit("/", 1)[-1] for k in ("pictures", "pictures_l2",
                                                      "pictures_linf")} == {
        "pictures": "pictures.npz", "pictures_l2": "attacks_l2.png",
        "pictures_linf": "attacks_linf.png"}
    pictures, distances = np.load(files["pictures"]), np.load(files["distances"])
    tolerance = {name: max(TOLERANCE, getattr(a, "rtol", 0.0)) for name, a in attacks().items()}
    for norm in ("l2", "linf"):
        best = distances[f"ensemble_{norm}"]
        eligible = np.flatnonzero((best > 0) & np.isfinite(best))
        assert len(eligible) > PICTURES and not set(eligible) & {0, 1, 2}
        index = pictures[f"{norm}_index"]
        assert len(index) == PICTURES and set(index) <= set(eligible)
        d = best[index]
        assert (np.diff(d) >= 0).all()  # easiest first
        assert d[0] == best[eligible].min() and d[-1] == best[eligible].max()
        median = np.sort(best[eligible])[(len(eligible) - 1) // 2]
        assert median in d
        np.testing.assert_array_equal(pictures[f"{norm}_reported"], d)

        x, x_adv = pictures[f"{norm}_x"], pictures[f"{norm}_x_adv"]
        assert x.shape == x_adv.shape == (PICTURES, 3, 4, 4) and x.dtype == np.float32
        np.testing.assert_array_equal(x, to_unit(data.x[index]).numpy())
        assert (x_adv >= 0).all() and (x_adv <= 1).all()
        np.testing.assert_array_equal(pictures[f"{norm}_label"], data.y[index].numpy())
        np.testing.assert_array_equal(pictures[f"{norm}_clean_pred"], data.y[index].numpy())
        size = THREATS[Norm(norm)].norm(torch.from_numpy(x_adv - x)).double().numpy()
        np.testing.assert_allclose(pictures[f"{norm}_distance"], size, rtol=1e-6)
        rtol = np.array([tolerance[a] for a in pictures[f"{norm}_attack"]])
        assert (np.abs(size - d) <= rtol * d).all(), (size, d)  # at the reported distance
        with torch.no_grad():
            pred = net(torch.from_numpy(x_adv).to(device)).argmax(1).cpu().numpy()
        np.testing.assert_array_equal(pred, pictures[f"{norm}_pred_adv"])
        assert (pred != pictures[f"{norm}_label"]).all()  # adversarial
        assert results["pictures"]["norms"][norm]["larger_than_reported"] == 0

        image = imread(files[f"pictures_{norm}"])
        assert image.shape[0] > image.shape[1] > 0  # five rows of three pictures
    assert set(pictures["l2_attack"]) <= {"l2_pgd", "l2_fmn"}
    cost = results["pictures"]["cost"]
    assert 0 < cost["forward"] < results["evaluation"]["cost"]["l2_pgd"]["forward_per_image"] \
        * N and cost["backward"] > 0


def test_no_pictures_with_eval_pictures_0(tmp_path):
    net = tiny_net()
    results = evaluator(pictures=0)(net, TinyData(net), tmp_path)
    assert "pictures" not in results and not any(k.startswith("pictures") for k in
                                                  results["files"])
    assert not list(tmp_path.glob("pictures*")) and not list(tmp_path.glob("attacks_*"))


def test_the_setting_defaults_to_8_and_is_checked():
    assert OmegaConf.load(REPO / "conf" / "eval" / "default.yaml").pictures == 8
    assert EvalConfig().pictures == 8
    with pytest.raises(ValueError, match="eval.pictures must be >= 0"):
        EvalConfig(pictures=-1)


@dataclass(frozen=True)
class Halved(DistanceAttack):
    """Reports half the distance of the examples it finds (as no attack may): the example
    found again is larger than reported."""

    norm: Norm = Norm.l2

    def _distances(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return PGDSearch("l2", steps=5, targets=2).distances(model, x, y) / 2


def test_an_example_larger_than_reported_is_shown_with_a_warning(tmp_path, caplog):
    net = tiny_net()
    attack_set = {"l2_halved": Halved(), "l2_pgd": PGDSearch("l2", steps=5, targets=2)}
    with caplog.at_level(logging.WARNING, logger="lipexp.evaluation.pictures"):
        results = evaluator(2, attack_set, lipschitz=False)(net, TinyData(net), tmp_path)
    summary = results["pictures"]["norms"]["l2"]
    assert summary["larger_than_reported"] == 2 and "linf" not in results["pictures"]["norms"]
    assert caplog.text.count("the l2 example found again") == 2
    pictures = np.load(results["files"]["pictures"])
    ratio = pictures["l2_distance"] / pictures["l2_reported"]
    np.testing.assert_allclose(ratio, 2, rtol=1e-5)  # the smallest example found: the search's


def wait_for_exit(path, timeout: float = 60.0) -> None:
    """Until the offline run file holds its exit record: W&B's service may still be writing
    it when ``wandb.finish`` returns on a busy machine."""
    end = time.monotonic() + timeout
    while True:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in records(path)):
                return
        except Exception:  # a record still being written
            pass
        assert time.monotonic() < end, f"{path} has no exit record after {timeout} s"
        time.sleep(0.2)


def test_the_images_and_the_table_go_to_wandb(tmp_path, monkeypatch):
    import wandb

    from lipexp.runs.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()  # W&B reads its settings once per process: an earlier test's stay
    logger = WandbLogger(project="lipexp-test", save_dir=str(tmp_path), offline=True)
    net = tiny_net()
    try:
        results = evaluator(8)(net, TinyData(net), tmp_path / "run", logger)
    finally:
        wandb.finish()
    (run,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    wait_for_exit(run)
    keys = summary_keys(tmp_path)
    for key in ("test/images/_type", "test/attack_pictures_l2/_type",
                "test/attack_pictures_linf/_type"):
        assert key in keys, key
    (path,) = tmp_path.glob("wandb/offline-run-*/files/media/table/test/images_*.table.json")
    logged = json.loads(path.read_text())
    pictured = sorted(set(results["pictures"]["norms"]["l2"]["index"])
                      | set(results["pictures"]["norms"]["linf"]["index"]))
    columns = logged["columns"]
    assert columns == ["index", "label", "clean_pred", "image", "adv_pred_l2", "adv_l2",
                       "adv_pred_linf", "adv_linf", "l2_pgd", "linf_pgd", "l2_fmn", "best_l2",
                       "best_linf", "certified_l2", "certified_linf"]
    rows = [dict(zip(columns, row)) for row in logged["data"]]
    assert [r["index"] for r in rows] == pictured
    assert len(rows) > 8  # some image pictured in one norm only: its other cells are None
    distances = np.load(results["files"]["distances"])
    for r in rows:
        assert r["best_l2"] == pytest.approx(float(distances["ensemble_l2"][r["index"]]))
        assert r["certified_l2"] == pytest.approx(float(distances["certified_l2"][r["index"]]))
        assert r["clean_pred"] == r["label"]
        assert r["image"] is not None  # a wandb.Image: its file in the table's artifact
        pictured_l2 = r["index"] in results["pictures"]["norms"]["l2"]["index"]
        assert (r["adv_pred_l2"] is not None) == pictured_l2 and r["adv_pred_l2"] != r["label"]
        assert (r["adv_l2"] is not None) == pictured_l2
    artifacts = [r.artifact for r in records(run) if r.WhichOneof("record_type") == "artifact"]
    (table,) = [a for a in artifacts if "-testimages-" in a.name]  # run-<id>-testimages-<v>
    contents = [e.path for e in table.manifest.contents]
    assert "test/images.table.json" in contents
    assert len([c for c in contents if c.endswith(".png")]) >= len(rows)  # the clean images
