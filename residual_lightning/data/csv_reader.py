"""The ``csv`` dataset: a user's CSV list of image paths and labels, read strictly.

Every problem in the file (a missing or extra field, an empty cell, a NUL byte, an encoding other
than UTF-8, unbalanced quotes) is an error naming the file and its physical line (the header is
line 1); a UTF-8 byte-order mark is accepted.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np

from residual_lightning.data.layouts import _LAYOUTS, _missing_error
from residual_lightning.data.readers import _Source
from residual_lightning.data.templates import clean_class_name

_PATH_COLUMNS = ("path", "image", "image_path", "filepath", "file", "filename")
_LABEL_COLUMNS = ("label", "class", "target", "y", "class_name")


def _csv_records(path: Path, delimiter: str) -> list[tuple[int, list[str]]]:
    """(line, stripped fields) of every non-blank record of a CSV file, the header first.

    Strict parsing (csv's ``strict=True``); `line` is the physical line of the file where the
    record starts (the header is line 1). A UTF-8 BOM (as spreadsheets write) is dropped; other
    encodings are refused with the offending byte's offset and line.
    """
    data = path.read_bytes()
    body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        offset = err.start + len(data) - len(body)
        line = data.count(b"\n", 0, offset) + 1
        raise ValueError(
            f"CSV {path} is not UTF-8: byte 0x{data[offset]:02x} at byte offset {offset} (line {line}) "
            "cannot be decoded (a latin-1/Windows-1252 export?); save it as UTF-8 (in a spreadsheet: 'CSV UTF-8')"
        ) from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise ValueError(
            f"CSV {path}, line {line}: NUL byte; this is not a plain-text CSV (UTF-16, or a spreadsheet "
            "file?): save it as UTF-8 CSV"
        )
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    except TypeError as err:
        raise ValueError(f"csv option delimiter={delimiter!r} is not valid: {err}") from None
    records, line = [], 1
    try:
        for fields in reader:
            if any(f.strip() for f in fields):
                records.append((line, [f.strip() for f in fields]))
            line = reader.line_num + 1
    except csv.Error as err:
        raise ValueError(f"CSV {path}, line {line}: {err} (an unbalanced or stray '\"' quote?)") from None
    return records


def _read_csv(
    root,
    split,
    *,
    download,
    image_size,
    class_names,
    path_column: str | None = None,
    label_column: str | None = None,
    delimiter: str = ",",
):
    if root is None:
        raise ValueError(f"csv needs root = the CSV file. Expected: {_LAYOUTS['csv']}")
    if not root.is_file():
        raise _missing_error("csv", root, f"CSV file {root} not found")
    records = _csv_records(root, delimiter)
    if not records:
        raise ValueError(f"CSV {root} is empty; expected {_LAYOUTS['csv']}")
    header_line, columns = records[0]
    body = records[1:]

    def pick(given: str | None, candidates: tuple[str, ...], what: str, option: str) -> int:
        if given is not None and given not in columns:
            raise ValueError(f"CSV {root}: no {what} column {option}={given!r}; columns: {columns}")
        name = given if given is not None else next((c for c in candidates if c in columns), None)
        if name is None:
            raise ValueError(
                f"CSV {root}: no {what} column; name one of {list(candidates)} or pass {option}; "
                f"columns: {columns}"
            )
        if columns.count(name) > 1:
            raise ValueError(
                f"CSV {root}, line {header_line}: column {name!r} appears twice in the header {columns}"
            )
        return columns.index(name)

    pi = pick(path_column, _PATH_COLUMNS, "image-path", "path_column")
    li = pick(label_column, _LABEL_COLUMNS, "label", "label_column")
    pcol, lcol = columns[pi], columns[li]
    if not body:
        raise ValueError(f"CSV {root} has no data rows")
    for line, fields in body:
        if len(fields) != len(columns):
            fix = (
                f"quote a value that contains the delimiter {delimiter!r}, or remove the extra field"
                if len(fields) > len(columns)
                else "every row needs a value in each column"
            )
            raise ValueError(
                f"CSV {root}, line {line}: {len(fields)} field{'s' * (len(fields) != 1)} but the header "
                f"(line {header_line}) has "
                f"{len(columns)} columns {columns}; {fix}"
            )
        for i, col, what in ((pi, pcol, "image-path"), (li, lcol, "label")):
            if not fields[i]:
                raise ValueError(
                    f"CSV {root}, line {line}: empty {what} cell (column {col!r}); every row needs one"
                )
    raw_paths = [fields[pi] for _, fields in body]
    raw_labels = [fields[li] for _, fields in body]
    if all(re.fullmatch(r"\d+", x) for x in raw_labels):
        labels = np.asarray([int(x) for x in raw_labels], np.int64)
        n_data = int(labels.max()) + 1
        if class_names is not None and n_data > len(class_names):
            raise ValueError(
                f"CSV {root}: labels go up to {n_data - 1} ({n_data} classes) but the class-names file "
                f"has {len(class_names)} names"
            )
        names = list(class_names) if class_names is not None else [str(i) for i in range(n_data)]
    else:
        distinct = sorted(set(raw_labels))
        if class_names is not None:
            index = {n: i for i, n in enumerate(class_names)}
            unknown = [x for x in distinct if x not in index]
            if unknown:
                raise ValueError(
                    f"CSV {root}: {len(distinct)} distinct labels, {len(unknown)} of them not among the "
                    f"{len(class_names)} names of the class-names file, e.g. {unknown[:3]}"
                )
            names = list(class_names)
        else:
            index = {n: i for i, n in enumerate(distinct)}
            names = [clean_class_name(n) for n in distinct]
        labels = np.asarray([index[x] for x in raw_labels], np.int64)
    base = root.parent
    paths = [Path(p) if Path(p).is_absolute() else base / p for p in raw_paths]
    return _Source(
        labels=labels,
        paths=paths,
        class_names=names,
        check_files=True,
        names_from_file=class_names is not None,
    )
