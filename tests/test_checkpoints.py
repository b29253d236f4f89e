"""Checkpoints through the CLI: weights-only loads (http too), atomic saves, truncated files, `last`."""

from __future__ import annotations

import contextlib
import errno
import functools
import http.server
import io
import os
import pathlib
import pickle
import re
import threading
from pathlib import Path

import pytest
import torch
from cli_helpers import QUICK, fit_killed_during_epoch, quick_args
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from residual_lightning import __version__
from residual_lightning.checkpoints import (
    AtomicCheckpointIO,
    check_checkpoint,
    find_last,
    use_atomic_checkpoints,
)
from residual_lightning.cli import ResidualCLI, ResidualTrainer, main
from residual_lightning.data.datamodule import ResidualDataModule
from residual_lightning.files import CacheError, StaleFileError
from residual_lightning.model import ResidualCLIP, ResidualModel

NO_EARLY_STOP = ("--early_stopping.patience", "100", "--report", "false")


@pytest.fixture(scope="module")
def cache(digits_cache):
    """Digits caches for the quickstart config (built once per session, see conftest)."""
    return digits_cache


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory) -> Path:
    """The last.ckpt of a one-epoch quickstart fit."""
    tmp = tmp_path_factory.mktemp("trained")
    main(["fit", *quick_args(tmp, cache, "--trainer.max_epochs", "1", *NO_EARLY_STOP)])
    return next(tmp.glob("runs/quickstart/version_*/checkpoints/last.ckpt"))


def lambdas(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.endswith("_lambdas")}


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve(folder: Path):
    """Serve `folder` over http on a free loopback port, in a thread, for the duration of the block."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class WriteMarker:
    """Pickles to a call that writes a file: what a crafted checkpoint would run on a pickle load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "code ran")


# ---------------------------------------------------------------- 1. weights-only loads, http too


def test_remote_checkpoint_that_would_run_code_is_refused(tmp_path, cache, trained, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # hub downloads land in the scratch folder
    marker = tmp_path / "marker"
    served = tmp_path / "served"
    served.mkdir()
    ckpt = torch.load(trained, weights_only=True)
    ckpt["extra"] = WriteMarker(marker)
    torch.save(ckpt, served / "evil.ckpt")
    with serve(served) as url:
        refused = (
            r"checkpoint http://127\.0\.0\.1:\d+/evil\.ckpt holds objects that a weights-only load refuses"
        )
        with pytest.raises(pickle.UnpicklingError, match=refused):
            main(["validate", *quick_args(tmp_path, cache), "--ckpt_path", f"{url}/evil.ckpt"])
        assert not marker.exists()
        with pytest.raises(pickle.UnpicklingError):
            ResidualCLIP.from_checkpoint(f"{url}/evil.ckpt")
    assert not marker.exists()


def val_accuracy(out: str) -> str:
    return re.search(r"val/accuracy\W+([0-9.]+)", out).group(1)


def test_remote_checkpoint_loads_weights_only(tmp_path, cache, trained, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    main(["validate", *quick_args(tmp_path, cache), "--ckpt_path", str(trained)])
    local = val_accuracy(capsys.readouterr().out)
    with serve(trained.parent) as url:
        main(["validate", *quick_args(tmp_path, cache), "--ckpt_path", f"{url}/last.ckpt"])
        remote = val_accuracy(capsys.readouterr().out)
        clip = ResidualCLIP.from_checkpoint(f"{url}/last.ckpt")
    assert remote == local
    assert (tmp_path / "torch" / "hub" / "checkpoints" / "last.ckpt").is_file()
    state = clip.model.state_dict()
    for k, v in lambdas(trained).items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)


def test_weights_only_defaults_to_true_for_every_loading_subcommand(capsys):
    for subcommand in ("fit", "validate", "test", "predict"):
        with pytest.raises(SystemExit):
            main([subcommand, "--config", QUICK, "--print_config"])
        assert re.search(r"^weights_only: true$", capsys.readouterr().out, re.M), subcommand


# ---------------------------------------------------------------- 2. atomic saves, format stamp


def test_disk_full_while_saving_leaves_no_truncated_checkpoint(tmp_path, cache, monkeypatch):
    real_save = torch.save

    def disk_full_in_epoch_1(obj, f, *a, **kw):
        if isinstance(obj, dict) and "state_dict" in obj and obj.get("epoch") == 1:
            buffer = io.BytesIO()
            real_save(obj, buffer, *a, **kw)
            part = buffer.getvalue()[: len(buffer.getvalue()) // 2]
            if hasattr(f, "write"):
                f.write(part)
            else:
                Path(f).write_bytes(part)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", disk_full_in_epoch_1)
    with pytest.raises(OSError) as info:
        main(["fit", *quick_args(tmp_path, cache, "--trainer.max_epochs", "2", *NO_EARLY_STOP)])
    monkeypatch.undo()
    folder = next(tmp_path.glob("runs/quickstart/version_*/checkpoints"))
    assert info.value.errno == errno.ENOSPC
    assert re.search(
        rf"could not write checkpoint {re.escape(str(folder))}/(best-epoch01\S*|last)\.ckpt: "
        "No space left on device; nothing was written under that name",
        str(info.value),
    ), str(info.value)
    names = sorted(p.name for p in folder.iterdir())
    assert "last.ckpt" in names and not [n for n in names if n.startswith(".") or n.endswith(".tmp")], names
    for name in names:
        check_checkpoint(folder / name)  # complete, readable
        assert torch.load(folder / name, weights_only=True)["epoch"] == 0  # the previous good ones


def test_checkpoints_carry_a_format_stamp_and_a_newer_format_is_refused(tmp_path, trained):
    ckpt = torch.load(trained, weights_only=True)
    assert ckpt["residual_lightning"] == {"format_version": 1, "version": __version__}
    del ckpt["residual_lightning"]  # written before stamps: format 1, accepted
    torch.save(ckpt, tmp_path / "unstamped.ckpt")
    ResidualCLIP.from_checkpoint(str(tmp_path / "unstamped.ckpt"))
    ckpt["residual_lightning"] = {"format_version": 99, "version": "9.9"}
    torch.save(ckpt, tmp_path / "newer.ckpt")
    with pytest.raises(StaleFileError, match=r"newer.ckpt was written by a newer residual-lightning"):
        ResidualCLIP.from_checkpoint(str(tmp_path / "newer.ckpt"))


def cli_trainer(tmp_path, *extra: str) -> Trainer:
    cli = ResidualCLI(
        ResidualModel,
        ResidualDataModule,
        trainer_class=ResidualTrainer,
        run=False,
        args=[
            "--config",
            QUICK,
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            *extra,
        ],
    )
    return cli.trainer


def test_atomic_checkpoint_io_is_the_default_and_composes_with_user_plugins(tmp_path):
    assert type(cli_trainer(tmp_path).strategy.checkpoint_io) is AtomicCheckpointIO
    other = cli_trainer(
        tmp_path, "--trainer.plugins", "lightning.fabric.plugins.environments.LightningEnvironment"
    )
    assert type(other.strategy.checkpoint_io) is AtomicCheckpointIO
    own = cli_trainer(tmp_path, "--trainer.plugins", "lightning.pytorch.plugins.io.TorchCheckpointIO")
    assert type(own.strategy.checkpoint_io) is TorchCheckpointIO  # the user's choice is kept
    trainer = Trainer(logger=False, plugins=[AtomicCheckpointIO()])
    use_atomic_checkpoints(trainer)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ---------------------------------------------------------------- 3. truncated and empty files


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
@pytest.mark.parametrize("kind", ["empty", "truncated"])
def test_truncated_or_empty_ckpt_path_is_refused_naming_the_file(tmp_path, cache, trained, subcommand, kind):
    bad = tmp_path / f"{kind}.ckpt"
    data = trained.read_bytes()
    bad.write_bytes(b"" if kind == "empty" else data[: len(data) * 2 // 3])
    message = (
        rf"checkpoint {re.escape(str(bad))} is truncated or not a checkpoint \({bad.stat().st_size} bytes\)"
    )
    with pytest.raises(CacheError, match=message):
        main([subcommand, *quick_args(tmp_path, cache), "--ckpt_path", str(bad)])
    with pytest.raises(CacheError, match=message):
        ResidualCLIP.from_checkpoint(str(bad))


# ---------------------------------------------------------------- 4. --ckpt_path last


def test_ckpt_path_last_with_nothing_to_resume_names_where_it_looked(tmp_path, cache):
    experiment = tmp_path / "runs" / "quickstart"
    (experiment / "version_0").mkdir(parents=True)  # a run killed before its first checkpoint
    where = re.escape(f"{experiment}/version_*/checkpoints/")
    with pytest.raises(FileNotFoundError, match=rf"--ckpt_path last: no last\.ckpt to resume in {where}"):
        main(["fit", *quick_args(tmp_path, cache), "--ckpt_path", "last"])
    assert not list(experiment.glob("version_*/checkpoints"))  # nothing was trained


def test_find_last_takes_the_highest_version_holding_a_last_ckpt(tmp_path):
    experiment = tmp_path / "runs" / "exp"
    for version, last in (("version_2", True), ("version_10", True), ("version_11", False), ("other", True)):
        folder = experiment / version / "checkpoints"
        folder.mkdir(parents=True)
        if last:
            (folder / "last.ckpt").write_bytes(b"x")
    trainer = {"logger": {"init_args": {"save_dir": str(tmp_path / "runs"), "name": "exp"}}}
    found = find_last(trainer)
    assert (
        found.version == "version_10"
        and found.path == experiment / "version_10" / "checkpoints" / "last.ckpt"
    )
    trainer["logger"]["init_args"]["version"] = 2  # a fixed version: that folder only
    assert find_last(trainer).version == "version_2"
    assert find_last({"logger": False, "default_root_dir": str(experiment / "other")}).version is None
    with pytest.raises(FileNotFoundError, match=r"no last\.ckpt to resume in \S+/exp/version_11/checkpoints"):
        find_last(
            {"logger": {"init_args": {"save_dir": str(tmp_path / "runs"), "name": "exp", "version": 11}}}
        )


def scalar_steps(logdir: Path, tag: str) -> list[int]:
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0}).Reload()
    return sorted({e.step for e in events.Scalars(tag)})


@pytest.mark.slow
def test_ckpt_path_last_resumes_a_killed_fit_in_its_version_folder(tmp_path, cache):
    epochs = ("--trainer.max_epochs", "3", *NO_EARLY_STOP)
    full = tmp_path / "full"
    main(["fit", *quick_args(full, cache, *epochs)])
    killed = tmp_path / "killed"
    fit_killed_during_epoch(quick_args(killed, cache, *epochs), epoch=1)
    version = killed / "runs" / "quickstart" / "version_0"
    assert torch.load(version / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    main(["fit", *quick_args(killed, cache, *epochs), "--ckpt_path", "last"])
    assert [p.name for p in version.parent.iterdir()] == ["version_0"]  # one continuous run
    resumed = torch.load(version / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == 2
    a = lambdas(next(full.glob("runs/quickstart/version_*/checkpoints/last.ckpt")))
    b = lambdas(version / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    full_log = next(full.glob("runs/quickstart/version_*"))
    assert scalar_steps(version, "val/accuracy") == scalar_steps(full_log, "val/accuracy")
