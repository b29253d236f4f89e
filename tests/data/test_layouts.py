"""Missing data (`residual_lightning.data.layouts`): errors that name the path and the expected layout,
where to get what torchvision cannot download, and downloads only when files are missing."""

from __future__ import annotations

import pytest
import torchvision.datasets as tvd

from residual_lightning.data.registry import DATASETS, get_dataset_spec, load_dataset
from residual_lightning.data.templates import EUROSAT_FOLDER_NAMES
from tests.data.fakes import write_image


@pytest.mark.parametrize("name", sorted(set(DATASETS) - {"digits", "csv"}))
def test_missing_root_names_path_and_layout(tmp_path, name):
    root = tmp_path / "nowhere"
    split = get_dataset_spec(name).source_splits[0]
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, root, split)
    assert str(root) in str(err.value) and "Expected layout" in str(err.value)
    root.mkdir()  # empty root: same
    with pytest.raises(FileNotFoundError, match="Expected layout"):
        load_dataset(name, root, split)


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("imagenet", "image-net.org"),
        ("stanford_cars", "cars_test_annos_withlabels.mat"),
        ("resisc45", "resisc45-train.txt"),
    ],
)
def test_no_torchvision_download_says_where_files_go(tmp_path, name, where):
    spec = get_dataset_spec(name)
    assert not spec.can_download
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, tmp_path / "x", spec.source_splits[0], download=True)
    msg = str(err.value)
    assert "cannot be downloaded" in msg or "has no RESISC45" in msg
    assert where in msg and str(tmp_path / "x") in msg


def test_download_goes_through_torchvision_only_when_files_are_missing(tmp_path, monkeypatch):
    calls = []

    def fake_eurosat(root, download=False, **kw):  # stands in for torchvision's downloader
        calls.append((root, download))
        for i, folder in enumerate(sorted(EUROSAT_FOLDER_NAMES)):
            write_image(tmp_path / "eurosat" / "2750" / folder / "1.jpg", i)

    monkeypatch.setattr(tvd, "EuroSAT", fake_eurosat)
    with pytest.raises(FileNotFoundError):
        load_dataset("eurosat", tmp_path, "all")  # download=False never fetches
    assert calls == []
    assert len(load_dataset("eurosat", tmp_path, "all", download=True)) == 10
    assert calls == [(str(tmp_path), True)]
    load_dataset("eurosat", tmp_path, "all", download=True)  # files present: no second fetch
    assert len(calls) == 1
