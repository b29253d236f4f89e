"""`CacheKey`: everything that determines an activation cache's contents (its folder name is a digest)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from residual_lightning.files import FORMAT_VERSIONS

FORMAT_VERSION = FORMAT_VERSIONS["cache"]


@dataclass(frozen=True)
class CacheKey:
    """Everything that determines a cache's contents.

    Attributes:
        model_name: open_clip architecture.
        weights_id: pretrained tag, ``file-<sha256>`` of a local checkpoint, or ``random``.
        dataset: registry name.
        part: ``train``, ``val``, ``test`` or ``reference``.
        selection: how the samples were chosen (split seed, fractions, shots, subset size).
        preprocessing: description of the image transform.
        convention: decomposition convention.
        dtype: storage dtype.
        format_version: cache format version.
        data: digest of the part's data: every sample's file path relative to the data root, size
            and label (or the file contents with ``hash_contents``); array datasets: their values.
    """

    model_name: str
    weights_id: str
    dataset: str
    part: str
    selection: str
    preprocessing: str
    convention: str
    dtype: str = "float16"
    format_version: int = FORMAT_VERSION
    data: str = ""

    def digest(self) -> str:
        """A stable 16-hex-digit identifier of this key."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def folder_name(self) -> str:
        """Human-readable folder name: ``<dataset>-<part>-<model>-<digest>``."""
        model = self.model_name.replace("/", "_").replace(":", "_")
        return f"{self.dataset}-{self.part}-{model}-{self.digest()}"
