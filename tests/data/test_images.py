"""Image datasets (`residual_lightning.data.images`): an unreadable image raises naming the file, or is
skipped and counted with ``on_bad_image="skip"``."""

from __future__ import annotations

import numpy as np
import pytest

from residual_lightning.data.registry import BadImageError, load_dataset
from tests.data.fakes import image_bytes


def test_corrupt_image_raise_and_skip(folder):
    good = (folder / "tabby" / "0.png").read_bytes()
    (folder / "tabby" / "9_truncated.png").write_bytes(good[: len(good) // 2])
    jpg = image_bytes(3)
    (folder / "zebra" / "9_truncated.jpg").write_bytes(jpg[: len(jpg) - 20])
    (folder / "zebra" / "notanimage.jpg").write_bytes(b"this is not an image")
    ds = load_dataset("imagefolder", folder, "all")
    assert len(ds) == 15 and ds.num_skipped == 0
    bad = ds.paths.index(str(folder / "zebra" / "notanimage.jpg"))
    with pytest.raises(BadImageError, match="notanimage.jpg"):
        ds[bad]
    bad = ds.paths.index(str(folder / "tabby" / "9_truncated.png"))
    with pytest.raises(BadImageError, match="9_truncated.png"):
        ds[bad]
    skip = load_dataset("imagefolder", folder, "all", on_bad_image="skip")
    assert len(skip) == len(skip.targets) == 12
    assert skip.num_skipped == 3 and len(skip.skipped_files) == 3
    assert np.bincount(skip.targets).tolist() == [4, 4, 4]
    assert all(skip[i][0].mode == "RGB" for i in range(len(skip)))
