"""Fixtures of the data-layer tests: small image folders on disk."""

from __future__ import annotations

import pytest

from tests.data.fakes import write_image, write_tinted_image


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    for c, cls in enumerate(["golden_retriever", "tabby", "zebra"]):
        for k in range(4):
            write_image(root / cls / f"{k}.png", 10 * c + k)
    (root / ".cache").mkdir()  # hidden folders are not classes
    return root


@pytest.fixture
def images(tmp_path):
    """a.png .. d.png beside the CSVs of a test."""
    for i, name in enumerate("abcd"):
        write_tinted_image(tmp_path / f"{name}.png", i)
    return tmp_path
