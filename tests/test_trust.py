"""Trust: changed data never reuses a cache, derived files are verified, bad numbers and names are refused.

Each test goes through the console script (`residual_lightning.cli.main`) where a user would meet
the problem; see docs/reliability.md for the messages.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import QUICK, quick_args
from PIL import Image

from residual_lightning.cli import main
from residual_lightning.data.cache import ActivationCache
from residual_lightning.data.datamodule import ResidualDataModule
from residual_lightning.files import CacheError
from tests.helpers import derived_files, setup_digits, tamper

QUIET = ("--trainer.enable_progress_bar", "false")


def folder_args(tmp: Path, root: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "--config",
        QUICK,
        "--data.dataset",
        "imagefolder",
        "--data.root",
        str(root),
        "--data.cache_dir",
        str(cache),
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp),
        *QUIET,
        *extra,
    ]


def make_folder(root: Path, per_class: int = 10, classes=("cat", "dog"), shade: int = 0) -> Path:
    """One folder per class of small BMP images (a BMP's size depends only on its dimensions)."""
    rng = np.random.default_rng(shade)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (12, 12, 3), dtype=np.uint8) + np.uint8(90 * c + shade)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.bmp")
    return root


def train_caches(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob("imagefolder-train-*") if p.is_dir())


def test_changed_image_folder_never_reuses_a_cache(tmp_path):
    cache = tmp_path / "cache"
    a = make_folder(tmp_path / "a")
    main(["extract", *folder_args(tmp_path, a, cache)])
    (first,) = train_caches(cache)
    emb_a = np.array(ActivationCache.open(first).arrays["emb"])

    # Another folder, same dataset name and cache dir: its own caches, its own contributions.
    b = make_folder(tmp_path / "b", shade=40)
    main(["extract", *folder_args(tmp_path, b, cache)])
    second = [p for p in train_caches(cache) if p != first]
    assert len(second) == 1
    assert not np.array_equal(np.array(ActivationCache.open(second[0]).arrays["emb"]), emb_a)

    # The same folder copied elsewhere (a node-local disk): the caches are reused, nothing extracted.
    copy = tmp_path / "node-local" / "a"
    shutil.copytree(a, copy)
    main(["extract", *folder_args(tmp_path, copy, cache)])
    assert len(train_caches(cache)) == 2

    # The folder grew: a new cache sized for the new data, never the stale one.
    make_folder(a, per_class=14)
    main(["extract", *folder_args(tmp_path, a, cache)])
    grown = [p for p in train_caches(cache) if p not in (first, second[0])]
    assert len(grown) == 1 and len(ActivationCache.open(grown[0])) > len(ActivationCache.open(first))


def test_file_replaced_in_place_is_caught_with_hash_contents(tmp_path):
    cache = tmp_path / "cache"
    root = make_folder(tmp_path / "data", per_class=40)
    hashed = ("--data.hash_contents", "true")
    main(["extract", *folder_args(tmp_path, root, cache, *hashed)])
    before = train_caches(cache)
    victims = sorted(root.glob("*/*.bmp"))[::3]  # some files, whichever part they landed in
    for victim in victims:
        size = victim.stat().st_size
        Image.new("RGB", (12, 12), (255, 0, 0)).save(victim)  # same name, same size, other pixels
        assert victim.stat().st_size == size
    main(["extract", *folder_args(tmp_path, root, cache, *hashed)])
    assert len(train_caches(cache)) == len(before) + 1


def test_fixed_bad_image_reruns_without_deleting_anything(tmp_path):
    cache = tmp_path / "cache"
    root = make_folder(tmp_path / "data")
    bad = root / "cat" / "000.bmp"
    bad.write_bytes(b"not an image")
    with pytest.raises(Exception, match="000.bmp"):
        main(["extract", *folder_args(tmp_path, root, cache)])
    Image.new("RGB", (12, 12), (1, 2, 3)).save(bad)  # fixed
    main(["extract", *folder_args(tmp_path, root, cache)])  # no "holds a different partial cache"
    assert any(ActivationCache.open(p) for p in train_caches(cache))


# ------------------------------------------------------------------ derived files
# (the `digits` fixture, the quickstart's digits caches, bases and classifier, is in conftest.py)


def test_fit_names_an_altered_bases_file(tmp_path, digits):
    cache = tmp_path / "cache"
    shutil.copytree(digits, cache)
    bases_file, _ = derived_files(setup_digits(cache))
    tamper(bases_file)
    with pytest.raises(CacheError, match=rf"{bases_file.name} is corrupt.*on_mismatch rebuild"):
        main(["fit", *digits_args(tmp_path, cache, "--trainer.max_epochs", "1")])


def digits_args(tmp: Path, cache: Path, *extra: str) -> list[str]:
    return quick_args(tmp, cache, "--report", "false", *extra)


# ------------------------------------------------------------------ numbers


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--data.batch_size", "-5"),
        ("--data.eval_batch_size", "0"),
        ("--data.chunk_size", "0"),
        ("--data.extract_batch_size", "0"),
        ("--model.lr", "-0.5"),
        ("--model.lr", "0"),
    ],
)
def test_invalid_numbers_are_refused_at_start_up(tmp_path, digits, flag, value, capsys):
    with pytest.raises(SystemExit):
        main(["fit", *digits_args(tmp_path, digits, flag, value)])
    err = capsys.readouterr().err
    assert flag.removeprefix("--") in err and value in err
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_absurd_learning_rate_warns_naming_it_and_checkpoints_stay_weights_only(tmp_path, digits):
    with pytest.warns(
        UserWarning, match=r"\|λ\| = .*learning rate is far too high \(model.lr=1000000000.0\)"
    ):
        main(["fit", *digits_args(tmp_path, digits, "--trainer.max_epochs", "1", "--model.lr", "1e9")])
    ckpt = next(tmp_path.glob("runs/quickstart/version_*/checkpoints/last.ckpt"))
    hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert type(hparams["lr"]) is float


def test_programmatic_bad_numbers_name_the_setting():
    from residual_lightning.model import ResidualModel

    with pytest.raises(ValueError, match=r"data.batch_size must be a positive integer, got -5"):
        ResidualDataModule(batch_size=-5)
    with pytest.raises(ValueError, match=r"model.lr must be a positive number or 'auto', got -0.5"):
        ResidualModel(class_names=["a", "b"], shape=(1, 1, 2, 3), lr=-0.5)
    with pytest.raises(ValueError, match="at least 2"):
        ResidualModel(class_names=["only"], shape=(1, 1, 2, 3))


def test_diverging_loss_warns_naming_the_learning_rate():
    from residual_lightning.model import ResidualModel

    model = ResidualModel(class_names=["a", "b"], shape=(1, 1, 2, 3), lr=0.8)
    with pytest.warns(UserWarning, match=r"stayed above its first-epoch value .* for 3 epochs.*model.lr=0.8"):
        for loss in (1.0, 1.5, 1.2, 1.1):
            model._check_divergence(loss)


# ------------------------------------------------------------------ messages and outcomes


def test_start_up_errors_are_not_wrapped_in_link_noise(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        main(["fit", *folder_args(tmp_path, tmp_path / "missing", tmp_path / "cache")])
    assert "missing" in str(err.value) and "compute_fn" not in str(err.value)
    assert "Train dataloader" not in str(err.value)


def test_max_epochs_zero_says_it_did_not_train(tmp_path, digits, capsys):
    main(["fit", *digits_args(tmp_path, digits, "--trainer.max_epochs", "0")])
    out = capsys.readouterr().out
    assert "not trained: no training step ran (trainer.max_epochs=0)" in out
    assert "residual test accuracy (untrained)" in out


def test_single_class_dataset_is_refused_by_name(tmp_path):
    root = make_folder(tmp_path / "one", classes=("cat",))
    with pytest.raises(ValueError, match="at least 2"):
        main(["fit", *folder_args(tmp_path, root, tmp_path / "cache")])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    """A checkpoint of one quickstart epoch on digits."""
    tmp = tmp_path_factory.mktemp("trained")
    main(["fit", *digits_args(tmp, digits, "--trainer.max_epochs", "1")])
    return next(tmp.glob("runs/quickstart/version_*/checkpoints/last.ckpt"))


def test_checkpoint_of_other_class_names_is_refused(tmp_path, digits, trained):
    names = tmp_path / "names.txt"
    names.write_text("".join(f"{w}\n" for w in "zero one two three four five six seven eight nine".split()))
    with pytest.raises(ValueError, match=r"other classes: class 0 is '0' in the checkpoint and 'zero'"):
        main(
            [
                "validate",
                *digits_args(tmp_path, digits),
                "--data.dataset_options.class_names_file",
                str(names),
                "--ckpt_path",
                str(trained),
            ]
        )


def test_predict_skips_bad_images_on_request_and_lists_them(tmp_path, digits, trained):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (30, 30), (90 * i, 10, 200)).save(images / f"ok{i}.png")
    (images / "broken.png").write_bytes(b"\x89PNG truncated")
    out = tmp_path / "pred.csv"
    common = [
        *digits_args(tmp_path, digits),
        "--ckpt_path",
        str(trained),
        "--data.predict_path",
        str(images),
        "--trainer.callbacks",
        "residual_lightning.callbacks.PredictionCSV",
        "--trainer.callbacks.output",
        str(out),
    ]
    with pytest.raises(Exception, match="broken.png"):
        main(["predict", *common])
    main(["predict", *common, "--skip_bad_images", "true"])
    rows = list(csv.DictReader(open(out)))
    assert sorted(Path(r["file"]).name for r in rows) == ["ok0.png", "ok1.png"]
    listed = (tmp_path / "skipped_images.txt").read_text().splitlines()
    assert [Path(p).name for p in listed] == ["broken.png"]
