"""Checkpoint files: atomic saves, weights-only loads, clear refusals, and ``--ckpt_path last``.

- `AtomicCheckpointIO` is the Lightning ``CheckpointIO`` the CLI installs in place of Lightning's
  default: a local checkpoint is written under a temporary name in its own folder, fsynced and
  renamed (`files.atomic_path`), so a full disk or a kill never leaves a truncated ``best-*.ckpt``
  or ``last.ckpt``; every load is weights-only unless asked otherwise, so a crafted checkpoint
  (local or ``http://``) cannot run code.
- `check_checkpoint` refuses an empty, truncated or foreign file before anything loads it, with a
  message that names it; `stamp`/`check_stamp` record and check the checkpoint format version.
- `find_last` resolves ``--ckpt_path last`` to the newest ``last.ckpt`` of the experiment.
"""

from __future__ import annotations

import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from residual_lightning import __version__
from residual_lightning.files import FORMAT_VERSIONS, CacheError, atomic_path, check_format

STAMP_KEY = "residual_lightning"
LAST = "last.ckpt"


def stamp(checkpoint: dict) -> None:
    """Record the checkpoint format version and the package version in a checkpoint dict."""
    checkpoint[STAMP_KEY] = {"format_version": FORMAT_VERSIONS["checkpoint"], "version": __version__}


def check_stamp(checkpoint: dict, path: str | Path) -> None:
    """Refuse a checkpoint of another format version (no stamp: format 1, the current one).

    Args:
        checkpoint: the loaded checkpoint dict.
        path: the file, for the message.

    Raises:
        StaleFileError: written in another checkpoint format.
    """
    info = checkpoint.get(STAMP_KEY)
    check_format("checkpoint", info.get("format_version") if isinstance(info, dict) else None, path)


def is_keyword(ckpt_path: Any) -> bool:
    """Whether Lightning resolves this ``ckpt_path`` itself (``best``, ``last``, ``hpc``, ``registry``)."""
    text = str(ckpt_path)
    return (
        text in ("best", "last", "hpc") or text.lower() == "registry" or text.lower().startswith("registry:")
    )


def _local_path(path: Any) -> Path | None:
    """The local path of `path` (a plain path or ``file://`` URL); None for remote URLs."""
    text = str(path)
    if text.startswith(("http://", "https://")):
        return None
    fs, stripped = url_to_fs(text)
    return Path(stripped) if isinstance(fs, LocalFileSystem) else None


def _truncated(path: Path, why: str) -> CacheError:
    size = path.stat().st_size if path.exists() else 0
    return CacheError(f"checkpoint {path} is truncated or not a checkpoint ({size} bytes): {why}")


def _refused(path: Any, err: BaseException) -> pickle.UnpicklingError:
    """The weights-only refusal, naming the file and saying what torch refused (not its long advice)."""
    detail = str(err)
    found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", detail)
    detail = found.group(1).strip() if found else detail.splitlines()[0]
    return pickle.UnpicklingError(
        f"checkpoint {path} holds objects that a weights-only load refuses ({detail}); residual-lightning "
        "loads checkpoints weights-only so that a crafted file cannot run code. Only if you trust its "
        "source, load it with weights_only=False (CLI: --weights_only false)"
    )


def _is_weights_only_refusal(err: BaseException) -> bool:
    return isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err)


def check_checkpoint(path: str | Path, weights_only: bool = True) -> None:
    """Refuse a local checkpoint that is missing, empty, truncated, unreadable or of another format.

    Cheap: the zip end record (`torch.save` writes a zip archive; a partial write loses its end), then
    a memory-mapped load (tensor bytes are not read). Folders (sharded FSDP/DeepSpeed checkpoints)
    and remote URLs are left to their loaders.

    Args:
        path: the checkpoint file.
        weights_only: load it weights-only (False: also accept pickled objects).

    Raises:
        FileNotFoundError: it does not exist.
        CacheError: empty, truncated or not a checkpoint; `StaleFileError` for another format version.
        pickle.UnpicklingError: a weights-only load refuses it.
    """
    local = _local_path(path)
    if local is None or local.is_dir():
        return
    if not local.exists():
        raise FileNotFoundError(f"checkpoint {local} does not exist")
    if local.stat().st_size == 0:
        raise _truncated(local, "the file is empty")
    if not zipfile.is_zipfile(local):
        raise _truncated(local, "it has no zip end record, so its end is missing (torch.save writes a zip)")
    try:
        ckpt = torch.load(local, map_location="cpu", weights_only=weights_only, mmap=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, zip errors ...
        if _is_weights_only_refusal(err):
            raise _refused(local, err) from err
        raise _truncated(local, f"{type(err).__name__}: {err}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CacheError(f"checkpoint {local} is not a Lightning checkpoint (no state_dict in it)")
    check_stamp(ckpt, local)


def _keep_storage(storage: Any, location: Any) -> Any:
    return storage  # Lightning's default map_location: tensors stay on the CPU


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO` with atomic local saves and weights-only loads by default.

    The `residual-lightning` CLI installs it when the strategy would use Lightning's plain
    `TorchCheckpointIO`; a ``CheckpointIO`` you configure yourself (``trainer.plugins`` or the
    strategy's) is kept. To combine it with ``AsyncCheckpointIO``, wrap it:
    ``AsyncCheckpointIO(AtomicCheckpointIO())``. Remote (fsspec) paths use Lightning's own save.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Write to a temporary name beside `path`, fsync, rename: on failure `path` is untouched.

        Args:
            checkpoint: what Lightning saves.
            path: the checkpoint file.
            storage_options: unsupported (as in `TorchCheckpointIO`).

        Raises:
            OSError: the write failed (a full disk...); the message names the checkpoint.
        """
        local = _local_path(path)
        if local is None or storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(local) as tmp, open(tmp, "wb") as f:
                torch.save(checkpoint, f)
        except Exception as err:
            why = (
                err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"
            )
            msg = f"could not write checkpoint {local}: {why}; nothing was written under that name"
            if isinstance(err, OSError) and err.errno is not None:
                raise OSError(err.errno, msg) from err
            raise OSError(msg) from err

    def load_checkpoint(
        self, path: Any, map_location: Any = _keep_storage, weights_only: bool | None = None
    ) -> dict:
        """Load a checkpoint, weights-only unless ``weights_only=False``; explain a truncated or refused file.

        Args:
            path: a local path or URL.
            map_location: as `torch.load`'s.
            weights_only: None (the default) means True.
        """
        weights_only = True if weights_only is None else weights_only
        try:
            if str(path).startswith(("http://", "https://")):
                return self._load_url(str(path), map_location, weights_only)
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as err:
            if _is_weights_only_refusal(err):
                raise _refused(path, err) from err
            local = _local_path(path)
            if local is not None and local.is_file():
                check_checkpoint(local, weights_only)  # raises the clear message when the file is bad
            raise

    def _load_url(self, url: str, map_location: Any, weights_only: bool) -> dict:
        """Download into a fresh temporary folder and load from there.

        torch.hub's cache (what Lightning uses for URLs) reuses a download by file name alone, so a
        second ``http://other/last.ckpt`` would silently load the first one.
        """
        with tempfile.TemporaryDirectory(prefix="residual-lightning-ckpt-") as folder:
            file = Path(folder) / "checkpoint.ckpt"
            torch.hub.download_url_to_file(url, str(file), progress=False)
            return super().load_checkpoint(file, map_location=map_location, weights_only=weights_only)


def use_atomic_checkpoints(trainer: Any) -> None:
    """Swap Lightning's default `TorchCheckpointIO` of `trainer`'s strategy for `AtomicCheckpointIO`.

    Only when nothing was configured: a ``CheckpointIO`` given in ``trainer.plugins`` or to the
    strategy (even a plain `TorchCheckpointIO`), or a strategy's own default (XLA's), is kept.
    """
    strategy = trainer.strategy
    configured = getattr(strategy, "_checkpoint_io", None) is not None
    if not configured and type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


@dataclass
class LastCheckpoint:
    """Where ``--ckpt_path last`` resumes from.

    Args:
        path: the ``last.ckpt`` file.
        version: its logger version folder (``version_3``), to log into; None when the checkpoint
            folder does not come from the logger's versions.
    """

    path: Path
    version: str | None


def _get(ns: Any, key: str, default: Any = None) -> Any:
    return ns.get(key, default) if hasattr(ns, "get") else getattr(ns, key, default)


def find_last(trainer: Any, checkpoint_dirpath: str | None = None) -> LastCheckpoint:
    """Resolve ``--ckpt_path last`` to the newest ``last.ckpt`` of this experiment.

    Where it looks, as Lightning's `ModelCheckpoint` places its files: ``checkpoint_dirpath`` when
    set; else ``<save_dir>/<name>/version_N/checkpoints/`` of the (first) logger, taking the highest
    N that holds a ``last.ckpt`` (version numbers, not mtimes: they survive copies and are the
    order TensorBoard shows), or the logger's fixed ``version`` when it sets one; with no logger,
    ``<default_root_dir>/checkpoints/``.

    Args:
        trainer: the parsed ``trainer`` config (``logger``, ``default_root_dir``).
        checkpoint_dirpath: the ``ModelCheckpoint`` dirpath, when set.

    Raises:
        FileNotFoundError: there is nothing to resume; the message names the folder searched.
    """
    if checkpoint_dirpath:
        return _fixed(Path(checkpoint_dirpath) / LAST)
    root = Path(_get(trainer, "default_root_dir") or ".")
    logger = _get(trainer, "logger")
    if isinstance(logger, (list, tuple)):
        logger = logger[0] if logger else None
    if logger is None or logger is False:
        return _fixed(root / "checkpoints" / LAST)
    if logger is True:  # Lightning's default logger; its version is not ours to set
        return LastCheckpoint(find_last({"logger": _default_logger(root)}).path, None)
    init = _get(logger, "init_args") or {}
    save_dir = _get(init, "save_dir")
    if save_dir is None:
        raise ValueError(
            f"--ckpt_path last cannot tell where the logger {_get(logger, 'class_path', logger)} keeps "
            "checkpoints: set --checkpoint.dirpath, or pass --ckpt_path <file>"
        )
    name, version = _get(init, "name", "lightning_logs"), _get(init, "version")
    experiment = Path(save_dir) / str(name) if name else Path(save_dir)
    if version is not None:
        folder = version if isinstance(version, str) else f"version_{version}"
        return LastCheckpoint(_fixed(experiment / folder / "checkpoints" / LAST).path, folder)
    found = [
        (int(m.group(1)), d.name)
        for d in (experiment.iterdir() if experiment.is_dir() else ())
        if (m := re.fullmatch(r"version_(\d+)", d.name)) and (d / "checkpoints" / LAST).is_file()
    ]
    if not found:
        raise FileNotFoundError(
            f"--ckpt_path last: no {LAST} to resume in {experiment}/version_*/checkpoints/ "
            "(the logger's save_dir/name); start a new run without --ckpt_path, or pass --ckpt_path <file>"
        )
    folder = max(found)[1]
    return LastCheckpoint(experiment / folder / "checkpoints" / LAST, folder)


def _default_logger(root: Path) -> dict:
    return {"init_args": {"save_dir": str(root), "name": "lightning_logs"}}


def _fixed(path: Path) -> LastCheckpoint:
    if not path.is_file():
        raise FileNotFoundError(
            f"--ckpt_path last: no {path.name} to resume in {path.parent}; start a new run without "
            "--ckpt_path, or pass --ckpt_path <file>"
        )
    return LastCheckpoint(path, None)


def set_logger_version(trainer: Any, version: str) -> None:
    """Make the (first) logger of a parsed ``trainer`` config log into the version folder `version`."""
    logger = _get(trainer, "logger")
    if isinstance(logger, (list, tuple)):
        logger = logger[0] if logger else None
    init = _get(logger, "init_args") if logger not in (None, True, False) else None
    if init is not None:
        init["version"] = version
