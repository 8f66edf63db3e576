"""The data set's Lipschitz constant (lipexp.lipschitz.data_constant, ``lipexp lipschitz data``):
exact against brute force in float64 / integers, duplicates, permutations, float32 traps, CLI."""

import json
import math

import pytest
import torch

from lipexp.cli import main
from lipexp.data.sources import digits
from lipexp.lipschitz.data_constant import Result, smallest_distance

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force(a, la, b=None, lb=None):
    """``(distance, first pair in index order, ties, duplicates)`` over all pairs: exact
    integer squared distances for uint8 images, float64 direct differences otherwise."""
    within = b is None
    if within:
        b, lb = a, la
    a2, b2 = a.reshape(len(a), -1), b.reshape(len(b), -1)
    if a2.dtype == torch.uint8 and b2.dtype == torch.uint8:
        key = ((a2.long()[:, None] - b2.long()[None]) ** 2).sum(-1)
        scale = 255.0**2
    else:
        def unit(x):
            return x.double() / 255 if x.dtype == torch.uint8 else x.double()
        key = torch.cdist(unit(a2), unit(b2), compute_mode="donot_use_mm_for_euclid_dist") ** 2
        scale = 1.0
    pairs = torch.as_tensor(la)[:, None] != torch.as_tensor(lb)[None]
    if within:
        pairs &= torch.ones_like(pairs).triu(1)
    duplicates = int((pairs & (key == 0)).sum())
    valid = pairs & (key > 0)
    if not valid.any():
        return math.inf, None, 0, duplicates
    low = key[valid].min()
    at = torch.nonzero(valid & (key == low))  # row-major: lexicographic order
    return math.sqrt(float(low) / scale), tuple(at[0].tolist()), len(at), duplicates


def assert_matches(result: Result, expected) -> None:
    distance, pair, ties, duplicates = expected
    assert result.distance == pytest.approx(distance, rel=1e-12)
    assert result.constant == pytest.approx(1 / distance, rel=1e-12)
    assert result.pair == pair
    assert result.ties == ties
    assert result.duplicates == duplicates


def images(n, dim, seed, kind):
    """``n`` images: "uint8" small pixel range (many ties and duplicates), "uint8_full",
    or "float" uniform in [0, 1] (float32)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "uint8":
        return torch.randint(0, 3, (n, 1, dim), generator=g, dtype=torch.uint8) * 100
    if kind == "uint8_full":
        return torch.randint(0, 256, (n, 1, dim), generator=g, dtype=torch.uint8)
    return torch.rand(n, 1, dim, generator=g)


def labels(n, seed, values=(0, 3, 7, 9)):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.tensor(values)[torch.randint(0, len(values), (n,), generator=g)]


# float images: float32 screen, float64 recomputation against float64 brute force (the
# integer kinds are exact whatever the kernels)
KINDS = ["uint8", "uint8_full", pytest.param("float", marks=pytest.mark.numerics)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block", [1, 7, None])
def test_within_equals_brute_force(kind, seed, block, device):
    """Exact on any device (the images are given on the CPU; smallest_distance moves them)."""
    x, y = images(53, 4 if kind == "uint8" else 10, seed, kind), labels(53, seed)
    result = smallest_distance(x, y, block=block, device=device)
    expected = brute_force(x, y)
    assert_matches(result, expected)
    if kind == "uint8":  # small pixel range: the exact tie count and duplicates are exercised
        assert expected[2] > 1 and expected[3] > 0
    assert result.labels == (int(y[result.pair[0]]), int(y[result.pair[1]]))
    assert result.labels[0] != result.labels[1]
    assert result.pairs == int((y[:, None] != y[None]).sum()) // 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block", [7, None])
def test_across_equals_brute_force(kind, seed, block, device):
    dim = 4 if kind == "uint8" else 10
    a, b = images(29, dim, seed, kind), images(41, dim, seed + 50, kind)
    # a label of a missing from b, and one of b missing from a
    la, lb = labels(29, seed, (0, 3, 7, 11)), labels(41, seed + 7, (0, 3, 7, 9))
    result = smallest_distance(a, la, b, lb, block=block, device=device)
    assert_matches(result, brute_force(a, la, b, lb))
    assert result.pairs == int((la[:, None] != lb[None]).sum())


def test_mixed_uint8_and_float_inputs_use_float64():
    a, b = images(30, 10, 3, "uint8_full"), images(30, 10, 4, "float")
    la, lb = labels(30, 3), labels(30, 4)
    result = smallest_distance(a, la, b, lb, block=7, device="cpu")
    assert result.exact == "float64"
    assert_matches(result, brute_force(a, la, b, lb))
    assert smallest_distance(a, la, block=7, device="cpu").exact == "int64"


@pytest.mark.numerics
def test_float64_inputs_are_recomputed_from_their_own_values():
    x, y = images(40, 10, 5, "float").double(), labels(40, 5)
    x[7] = x[3] + 1e-9  # distinct in float64, identical once rounded to float32
    y[7] = 1
    result = smallest_distance(x, y, block=7, device="cpu")
    assert_matches(result, brute_force(x, y))
    assert result.pair == (3, 7) and result.duplicates == 0


def test_digits_train_and_test_equal_brute_force():
    arrays = digits("unused", False)
    train = smallest_distance(arrays.train_x, arrays.train_y, block=100, device="cpu")
    assert_matches(train, brute_force(arrays.train_x, arrays.train_y))
    test = smallest_distance(arrays.test_x, arrays.test_y, arrays.train_x, arrays.train_y,
                             device="cpu")
    assert_matches(test, brute_force(arrays.test_x, arrays.test_y,
                                     arrays.train_x, arrays.train_y))
    assert test.distance > 0 and train.distance > 0


def test_identical_images_with_different_labels_are_counted_and_excluded():
    x, y = images(60, 10, 0, "float"), torch.arange(60) % 5
    clean = smallest_distance(x, y, block=7, device="cpu")
    assert clean.duplicates == 0
    x[40], y[40] = x[3], (y[3] + 1) % 5  # duplicate, other label
    x[21], y[21] = x[12], (y[12] + 2) % 5  # duplicate, other label
    x[33], y[33] = x[5], y[5]  # duplicate, same label: not a pair at all
    result = smallest_distance(x, y, block=7, device="cpu")
    assert result.duplicates == 2
    assert result.duplicate_examples == ((3, 40), (12, 21))
    assert result.distance > 0
    assert_matches(result, brute_force(x, y))


def test_duplicates_across_sets():
    a, b = images(20, 10, 1, "uint8_full"), images(30, 10, 2, "uint8_full")
    la, lb = torch.zeros(20, dtype=torch.long), torch.ones(30, dtype=torch.long)
    b[29] = a[4]
    b[2] = a[4]
    result = smallest_distance(a, la, b, lb, block=3, device="cpu")
    assert result.duplicates == 2 and result.duplicate_examples == ((4, 2), (4, 29))
    assert_matches(result, brute_force(a, la, b, lb))


@pytest.mark.numerics
@pytest.mark.parametrize("seed", [0, 1])
def test_invariant_to_shuffling(seed):
    x, y = images(80, 12, seed, "float"), labels(80, seed)
    result = smallest_distance(x, y, block=9, device="cpu")
    perm = torch.randperm(80, generator=torch.Generator().manual_seed(seed))
    shuffled = smallest_distance(x[perm], y[perm], block=9, device="cpu")
    assert shuffled.distance == result.distance
    assert shuffled.constant == result.constant
    assert sorted(perm[list(shuffled.pair)].tolist()) == list(result.pair)


@pytest.mark.numerics
def test_planted_near_duplicate_is_found(device):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, 100, generator=g, dtype=torch.float64)  # pairs at distance ~4
    y = torch.arange(300) % 10
    x[217] = x[58]
    k = int(torch.argmin((x[58] - 0.5).abs()))  # a pixel away from 0 and 1
    x[217, k] += 1e-4
    y[217] = (y[58] + 3) % 10
    result = smallest_distance(x, y, block=32, device=device)
    assert result.pair == (58, 217)
    assert result.distance == pytest.approx(1e-4, rel=1e-9)
    assert result.duplicates == 0 and result.ties == 1
    assert_matches(result, brute_force(x, y))


def float32_trap(seed):
    """Two pairs at large norms whose squared distances (1 and 1 - 4e-6 + ...) differ far
    below float32 resolution there: pair (0, 1) at distance 1, pair (2, 3) slightly closer."""
    g = torch.Generator().manual_seed(seed)
    x = 0.5 + 0.5 * torch.rand(6, 1000, generator=g, dtype=torch.float64)  # norms^2 ~ 580
    x[1] = x[0]
    x[1, :4] -= 0.5  # squared distance 4 * 0.25 = 1 exactly
    x[3] = x[2]
    x[3, :4] -= 0.5 - 1e-6
    return x, torch.tensor([0, 1, 0, 1, 2, 3])


@pytest.mark.numerics
def test_float32_rounding_trap_is_resolved_in_float64(device):
    """On CUDA too: the screen's float32 products with TF32 off (lipexp.precision.tf32_off).
    The count of seeds that trap a naive float32 computation is taken on the CPU."""
    naive_wrong = 0
    for seed in range(12):
        x, y = float32_trap(seed)
        result = smallest_distance(x, y, block=2, device=device)
        assert result.pair == (2, 3)
        assert result.squared_distance == pytest.approx(4 * (0.5 - 1e-6) ** 2, rel=1e-13)
        assert_matches(result, brute_force(x, y))
        # what a float32 ||a||^2 + ||b||^2 - 2 a.b would have chosen
        x32 = x.float()
        n = (x32 * x32).sum(1)
        g32 = n[:, None] + n[None] - 2 * x32 @ x32.T
        naive_wrong += bool(g32[0, 1] < g32[2, 3])
    assert naive_wrong > 0  # the trap does catch float32 for some seeds


def test_no_differently_labelled_pair():
    x = images(10, 5, 0, "float")
    result = smallest_distance(x, torch.zeros(10, dtype=torch.long), device="cpu")
    assert math.isinf(result.distance) and result.constant == 0 and result.pair is None
    dup = smallest_distance(torch.zeros(3, 4), torch.tensor([0, 1, 2]), device="cpu")
    assert dup.duplicates == 3 and dup.pair is None and dup.constant == 0


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="labels"):
        smallest_distance(torch.rand(5, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be integers"):
        smallest_distance(torch.rand(5, 3), torch.zeros(5))
    y = torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="pixels per image"):
        smallest_distance(torch.rand(5, 3), y, torch.rand(5, 4), y)
    with pytest.raises(ValueError, match="block"):
        smallest_distance(torch.rand(5, 3), y, block=0)
    with pytest.raises(ValueError, match="together"):
        smallest_distance(torch.rand(5, 3), y, torch.rand(5, 3))
    with pytest.raises(ValueError, match="NaN"):
        smallest_distance(torch.full((5, 3), math.nan), y)


KEYS = {"data", "split", "overrides", "n_images", "constant", "distance", "squared_distance",
        "pair", "ties", "duplicates_excluded", "pairs_examined", "candidates_recomputed",
        "block", "device", "threads", "seconds", "load_seconds", "precision", "definition",
        "torch"}


@pytest.mark.parametrize("split", ["train", "test"])
def test_cli_digits(tmp_path, capsys, split):
    out = tmp_path / "sub" / "digits.json"
    code = main(["lipschitz", "data", "data=digits", "--split", split, "--block", "50",
                 "--out", str(out), "--device", "cpu"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(out.read_text())
    assert set(record) >= KEYS
    arrays = digits("unused", False)
    if split == "train":
        expected = brute_force(arrays.train_x, arrays.train_y)
        names = ("train", "train")
    else:
        expected = brute_force(arrays.test_x, arrays.test_y, arrays.train_x, arrays.train_y)
        names = ("test", "train")
    (i, a), (j, b) = [(p["index"], p["label"]) for p in record["pair"]]
    assert (i, j) == expected[1]
    assert [p["split"] for p in record["pair"]] == list(names)
    assert record["distance"] == pytest.approx(expected[0], rel=1e-12)
    assert record["constant"] == pytest.approx(1 / expected[0], rel=1e-12)
    assert record["duplicates_excluded"]["count"] == 0
    assert record["data"] == "digits" and record["split"] == split and record["block"] == 50
    assert record["n_images"] == {"train": 1437, "test": 360}
    assert lines[0].startswith(f"digits {split}: L = {record['constant']:.6g} (smallest distance "
                               f"{record['distance']:.6g} between {names[0]}[{i}] (label {a}) "
                               f"and {names[1]}[{j}] (label {b})")
    assert "0 duplicate pairs excluded;" in lines[0] and lines[0].endswith(" s")


def test_cli_overrides_after_options_and_default_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["lipschitz", "data", "--device", "cpu", "data=digits", "--split", "test",
                 "data.download=false"]) == 0
    assert json.loads((tmp_path / "lipschitz_data_digits_test.json").read_text())["split"] \
        == "test"
    capsys.readouterr()


@pytest.mark.parametrize("overrides", [
    ["data=cifar10", "data.download=false"],  # no data in data_dir
    ["data=no_such_data"],
    ["data.no_such_key=1"],
    ["data=digits", "--device", "no_such_device"],
])
def test_cli_errors_are_one_line(tmp_path, capsys, overrides):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "x.json"
    code = main(["lipschitz", "data", *overrides, f"data.data_dir={empty}", "--out", str(out)])
    assert code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lipexp lipschitz data: error: ")
    assert not out.exists()


def test_cli_rejects_unknown_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["lipschitz", "data", "data=digits", "--no-such-option"])
    assert exit_info.value.code == 2
    capsys.readouterr()
