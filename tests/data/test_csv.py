"""The ``csv`` dataset (`residual_lightning.data.csv_reader`): paths relative or absolute, int or named
labels, and a clear error for every bad table.

Each error must name the file (and line), the setting and the value, and say what to change.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from residual_lightning.data.registry import load_dataset
from tests.data.fakes import check_dataset, write_image


def _write_csv(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")


def test_csv_relative_absolute_and_named_labels(tmp_path):
    write_image(tmp_path / "a" / "0.jpg", 0)
    write_image(tmp_path / "a" / "1.jpg", 1)
    write_image(tmp_path / "elsewhere" / "2.jpg", 2)
    table = tmp_path / "a" / "labels.csv"
    _write_csv(
        table,
        ["image", "label"],
        [["0.jpg", "sea_lion"], ["1.jpg", "cat"], [tmp_path / "elsewhere" / "2.jpg", "cat"]],
    )
    ds = load_dataset("csv", table, "all")
    check_dataset(ds, "csv")
    assert ds.class_names == ["cat", "sea lion"] and ds.targets.tolist() == [1, 0, 0]
    assert np.array_equal(
        np.asarray(ds[2][0])[0, 0], np.asarray(Image.open(tmp_path / "elsewhere" / "2.jpg"))[0, 0]
    )
    names = tmp_path / "names.txt"
    names.write_text("dog\nsea_lion\ncat\n")  # a superset, in its own order
    ds = load_dataset("csv", table, "all", class_names_file=names)
    assert ds.class_names == ["dog", "sea_lion", "cat"] and ds.targets.tolist() == [1, 2, 2]


def test_csv_int_labels_and_mismatch(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"{i}.png", i)
    table = tmp_path / "d.csv"
    _write_csv(table, ["path", "label"], [["0.png", 0], ["1.png", 3], ["2.png", 1]])
    ds = load_dataset("csv", table, "all")
    assert ds.targets.tolist() == [0, 3, 1] and len(ds.class_names) == 4
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    with pytest.raises(ValueError) as err:
        load_dataset("csv", table, "all", class_names_file=names)
    assert "4 classes" in str(err.value) and "2 names" in str(err.value)
    _write_csv(table, ["path", "label"], [["0.png", "cat"], ["1.png", "yak"]])
    names.write_text("cat\ndog\n")
    with pytest.raises(ValueError, match="2 names") as err:
        load_dataset("csv", table, "all", class_names_file=names)
    assert "yak" in str(err.value)


def test_csv_errors_and_skip(tmp_path):
    write_image(tmp_path / "0.png", 0)
    (tmp_path / "bad.png").write_bytes(b"garbage")
    table = tmp_path / "d.csv"
    _write_csv(table, ["file_name", "label"], [["0.png", 0]])
    with pytest.raises(ValueError, match="image-path column"):
        load_dataset("csv", table, "all")
    assert len(load_dataset("csv", table, "all", path_column="file_name")) == 1
    _write_csv(table, ["path", "label"], [["0.png", 0], ["missing.png", 1], ["bad.png", 1]])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_dataset("csv", table, "all")
    ds = load_dataset("csv", table, "all", on_bad_image="skip")
    assert len(ds) == 1 and ds.num_skipped == 2 and ds.targets.tolist() == [0]
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_dataset("csv", tmp_path / "nope.csv", "all")


# ---------------------------------------------------------------------------------------------
# bad tables (the `images` fixture, a.png .. d.png, is in conftest.py)


def load_csv(path, text: str | bytes, **options):
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return load_dataset("csv", path, "all", **options)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ("b.png,", "empty label cell (column 'label')"),
        ("b.png", "1 field but the header (line 1) has 2 columns ['path', 'label']"),
        (",cat", "empty image-path cell (column 'path')"),
        (
            "b.png,cat,tabby",
            "3 fields but the header (line 1) has 2 columns ['path', 'label']; quote a value",
        ),
    ],
)
def test_csv_bad_row_names_file_and_line(images, row, problem):
    table = images / "labels.csv"
    with pytest.raises(ValueError) as err:
        load_csv(table, f"path,label\na.png,dog\n{row}\nc.png,cat\n")
    assert f"CSV {table}, line 3: " in str(err.value) and problem in str(err.value)


def test_csv_line_numbers_are_physical_lines(images):
    table = images / "labels.csv"
    text = 'path,label\n\na.png,dog\n"b\n.png",cat\nc.png,\n'  # blank line 2, a record on lines 4-5
    with pytest.raises(ValueError, match=r"labels.csv, line 6: empty label cell"):
        load_csv(table, text)


def test_csv_with_utf8_bom_reads(images):
    table = images / "labels.csv"
    ds = load_csv(table, "\ufeffpath,label\na.png,sea_lion\nb.png,café\n")  # as spreadsheets save it
    assert ds.class_names == ["café", "sea lion"] and ds.targets.tolist() == [1, 0]


@pytest.mark.parametrize(("bom", "offset"), [(b"", 30), (b"\xef\xbb\xbf", 33)])
def test_csv_not_utf8_says_where_and_what_to_do(images, bom, offset):
    table = images / "labels.csv"
    with pytest.raises(ValueError) as err:
        load_csv(table, bom + "path,label\na.png,dog\nb.png,café\n".encode("latin-1"))  # é at byte 30
    msg = str(err.value)
    assert str(table) in msg and "not UTF-8" in msg and f"byte 0xe9 at byte offset {offset} (line 3)" in msg
    assert "save it as UTF-8" in msg


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("path,label\na.png,dog\nb.png,c\x00at\n", "line 3: NUL byte"),
        ('path,label\na.png,dog\n"b.png,cat\nc.png,cat\n', "line 3: unexpected end of data"),
        ('path,label\n"a.png"x,dog\n', "line 2: ',' expected after '\"'"),
    ],
)
def test_csv_malformed_text_names_file_and_line(images, text, problem):
    table = images / "labels.csv"
    with pytest.raises(ValueError) as err:
        load_csv(table, text)
    assert str(table) in str(err.value) and problem in str(err.value)


def test_csv_bad_options_are_named(images):
    table = images / "labels.csv"
    with pytest.raises(ValueError, match=r"delimiter=';;'"):
        load_csv(table, "path,label\na.png,dog\n", delimiter=";;")
    with pytest.raises(
        ValueError, match=r"no label column label_column='kind'; columns: \['path', 'label'\]"
    ):
        load_csv(table, "path,label\na.png,dog\n", label_column="kind")
    with pytest.raises(ValueError, match=r"line 1: column 'label' appears twice"):
        load_csv(table, "path,label,label\na.png,dog,cat\n")
    with pytest.raises(ValueError, match="is empty"):
        load_csv(table, "\n\n")
