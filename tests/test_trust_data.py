"""Bad data gets a clear error: CSV tables, single-class datasets and split parts that come out empty.

Each error must name the file (and line), the setting and the value, and say what to change.
The class-name checks against the datasets' own lists live beside their fakes in test_registry.py.
"""

from __future__ import annotations

import pytest
from PIL import Image

from residual_lightning.data.registry import load_dataset, load_split_datasets
from residual_lightning.data.splits import PARTS


def write_image(path, i: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (i * 40 % 256, 90, 200)).save(path)


@pytest.fixture
def images(tmp_path):
    """a.png .. d.png beside the CSVs of a test."""
    for i, name in enumerate("abcd"):
        write_image(tmp_path / f"{name}.png", i)
    return tmp_path


def load_csv(path, text: str | bytes, **options):
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return load_dataset("csv", path, "all", **options)


# ---------------------------------------------------------------------------------------------
# CSV tables


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


# ---------------------------------------------------------------------------------------------
# fewer than two classes


def test_single_class_imagefolder_is_refused(tmp_path):
    for k in range(10):
        write_image(tmp_path / "only_cats" / f"{k}.png", k)
    assert len(load_dataset("imagefolder", tmp_path, "all")) == 10  # loading alone is fine
    with pytest.raises(ValueError) as err:
        load_split_datasets("imagefolder", tmp_path)
    msg = str(err.value)
    assert f"imagefolder at {tmp_path}: found 1 class(es) ['only cats']" in msg and "at least 2" in msg


def test_single_label_csv_is_refused(images):
    table = images / "labels.csv"
    table.write_text("path,label\n" + "".join(f"{c}.png,0\n" for c in "abcd"))
    with pytest.raises(ValueError, match=r"csv at .*labels.csv: found 1 class\(es\) \['0'\]"):
        load_split_datasets("csv", table)


# ---------------------------------------------------------------------------------------------
# split parts that would be empty


@pytest.fixture
def two_per_class(tmp_path):
    for c, cls in enumerate(["cat", "dog", "yak"]):
        for k in range(2):
            write_image(tmp_path / cls / f"{k}.png", 2 * c + k)
    return tmp_path


def test_zero_fraction_part_is_refused(two_per_class):
    with pytest.raises(ValueError) as err:
        load_split_datasets("imagefolder", two_per_class, fractions=[1, 0, 0])
    msg = str(err.value)
    assert "the val part would be empty: fractions [1, 0, 0] (train, val, test)" in msg
    assert "6 samples in 3 classes, samples per class {0: 2, 1: 2, 2: 2}" in msg
    assert "give val a positive fraction, e.g. fractions=[0.8, 0.1, 0.1]" in msg


def test_too_few_samples_per_class_is_refused(two_per_class):
    with pytest.raises(ValueError) as err:
        load_split_datasets("imagefolder", two_per_class)  # 80/10/10 of 2 images a class
    msg = str(err.value)
    assert "part would be empty: fractions [0.8, 0.1, 0.1]" in msg and "with 3+ samples per class" in msg
    parts = load_split_datasets("imagefolder", two_per_class, fractions=[0.4, 0.3, 0.3])
    assert all(len(parts[p]) > 0 for p in PARTS)  # what the message suggests works
