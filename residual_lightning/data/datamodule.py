"""`ResidualDataModule`: dataset parts -> verified activation caches -> batches of `CachedBatch`.

`prepare_data` (one process) builds whatever cache is missing and the text classifier; `setup`
(every process) opens the caches and the PCA bases. Loaders read the memory-mapped caches in
batches; the order of training batches is a function of (seed, epoch) only, and validation/test
shards never repeat a sample across ranks.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import PositiveInt
from torch.utils.data import DataLoader, Dataset, Sampler

from residual_lightning.data.cache import ActivationCache, CacheError, CacheKey, open_or_none
from residual_lightning.data.extract import ExtractionJob, IndexedDataset, build_cache
from residual_lightning.data.identity import part_digest
from residual_lightning.data.registry import get_dataset_spec, load_split_datasets
from residual_lightning.spectral import UnitBases, fit_unit_bases
from residual_lightning.units import BackboneSpec, layout_from_config

PARTS = ("train", "val", "test")
DEFAULT_CACHE_DIR = os.environ.get("RESIDUAL_LIGHTNING_CACHE", ".cache/residual-lightning")


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of indices: a permutation that depends only on (seed, epoch), sharded by rank.

    Training shards have equal sizes on every rank (the remainder is dropped, as DDP needs);
    evaluation shards (``shuffle=False, drop_last=False``) cover every sample exactly once.

    Args:
        n: number of samples.
        batch_size: per-rank batch size.
        shuffle: permute every epoch.
        seed: base seed of the permutation.
        rank: this rank.
        world: number of ranks.
        drop_last: drop the last incomplete batch.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        drop_last: bool = False,
    ) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def _indices(self) -> np.ndarray:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).numpy()
        else:
            order = np.arange(self.n)
        if self.shuffle and self.world > 1:
            per_rank = self.n // self.world
            return order[self.rank * per_rank : (self.rank + 1) * per_rank]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[list[int]]:
        idx = self._indices()
        for start in range(0, len(idx), self.batch_size):
            batch = idx[start : start + self.batch_size]
            if self.drop_last and len(batch) < self.batch_size:
                return
            yield np.sort(batch).tolist() if not self.shuffle else batch.tolist()

    def __len__(self) -> int:
        m = len(self._indices())
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)


class CacheBatches(Dataset):
    """Map-style dataset whose items are whole batches: ``dataset[list_of_indices] -> CachedBatch``."""

    def __init__(self, cache: ActivationCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, indices: list[int]):
        order = np.argsort(indices)
        batch = self.cache.batch(np.asarray(indices)[order])  # sorted reads are faster on a memmap
        inverse = torch.from_numpy(np.argsort(order))
        return type(batch)(
            batch.heads[inverse], batch.mlps[inverse], batch.emb[inverse], batch.label[inverse]
        )


def _identity(x):
    return x


class ResidualDataModule(L.LightningDataModule):
    """Cached unit contributions of a dataset's train/val/test parts.

    Args:
        backbone: the frozen backbone whose units are cached.
        dataset: registry name (``digits``, ``cifar10``, ``imagefolder``, ``csv``, ...).
        root: data root (not needed for ``digits``).
        download: let torchvision download missing files where it can.
        dataset_options: extra loader options (``class_names_file``, ``templates_file``,
            ``on_bad_image``, csv columns, ...).
        split_seed: seed of the stratified splits and few-shot draws.
        fractions: override of the split fractions of method.md §3.
        shots: keep this many training samples per class (few-shot); validation is unchanged.
        reference: PCA reference set: ``train`` (the target's own train part, offline default)
            or ``imagenet`` (a class-stratified subset of ImageNet train, as the authors).
        reference_root: ImageNet root for ``reference: imagenet``.
        reference_size: number of reference images (the authors: 80,000).
        convention: decomposition convention (``default`` or ``equal_share``).
        hash_contents: also hash every image file's bytes into the cache key (for files replaced
            in place under the same name and size); by default the key covers each file's path
            relative to the root, its size and its label.
        cache_dir: root folder of caches, bases and classifiers.
        cache_dtype: storage dtype of the caches.
        chunk_size: samples per resumable cache chunk.
        on_mismatch: a cache, PCA-bases or classifier file failing its checks (truncated,
            altered, stale) raises (``error``) or is rebuilt with a warning (``rebuild``).
        extract_batch_size: images per forward pass during extraction.
        extract_device: device of the frozen backbone during extraction (``auto``: CUDA if present).
        batch_size: global training batch (divided by the number of devices).
        eval_batch_size: batch size of validation/test loaders.
        num_workers: DataLoader workers.
        pin_memory: pin batches (for GPU training).
        seed: seed of the training batch order (a function of seed and epoch).
        predict_path: for ``predict``: a folder of images (searched recursively) or an image
            file; default: the images of the test part.
        mode: ``cache`` (batches of cached contributions) or ``images`` (preprocessed images, for
            ``finetune``; the CLI sets it from ``model.method``).
    """

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        dataset: str = "digits",
        root: str | None = None,
        download: bool = False,
        dataset_options: dict[str, Any] | None = None,
        split_seed: int = 42,
        fractions: list[float] | None = None,
        shots: int | None = None,
        reference: Literal["train", "imagenet"] = "train",
        reference_root: str | None = None,
        reference_size: int = 80_000,
        convention: Literal["default", "equal_share"] = "default",
        hash_contents: bool = False,
        cache_dir: str = DEFAULT_CACHE_DIR,
        cache_dtype: Literal["float16", "float32"] = "float16",
        chunk_size: PositiveInt = 1024,
        on_mismatch: Literal["error", "rebuild"] = "error",
        extract_batch_size: PositiveInt = 64,
        extract_device: str = "auto",
        batch_size: PositiveInt = 64,
        eval_batch_size: PositiveInt = 1024,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        predict_path: str | None = None,
        mode: Literal["cache", "images"] = "cache",
    ) -> None:
        super().__init__()
        # Plain ints (jsonargparse's PositiveInt values are a subclass); checked for direct calls too.
        chunk_size, extract_batch_size, batch_size, eval_batch_size = _positive_ints(
            chunk_size=chunk_size,
            extract_batch_size=extract_batch_size,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
        )
        self.backbone = backbone or BackboneSpec()
        self.spec = get_dataset_spec(dataset)
        self.dataset = self.spec.name
        self.root = root
        self.download = download
        self.dataset_options = dict(dataset_options or {})
        self.split_seed, self.fractions, self.shots = split_seed, fractions, shots
        self.reference, self.reference_root, self.reference_size = reference, reference_root, reference_size
        if reference == "imagenet" and reference_root is None:
            raise ValueError("reference: imagenet needs reference_root (an ImageFolder root with train/)")
        self.convention = convention
        self.hash_contents = hash_contents
        self._digests: dict[str, str] | None = None  # data identity of each part (cache keys)
        self.cache_dir = Path(cache_dir)
        self.cache_dtype, self.chunk_size, self.on_mismatch = cache_dtype, chunk_size, on_mismatch
        self.extract_batch_size, self.extract_device = extract_batch_size, extract_device
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed
        self.predict_path = predict_path
        self.predict_on_bad_image: Literal["raise", "skip"] = "raise"  # `predict --skip_bad_images`
        self.predict_skipped: list[str] = []
        self.mode = mode
        self.images: dict[str, Dataset] = {}
        self.caches: dict[str, ActivationCache] = {}
        self._backbone = None
        self._bases: UnitBases | None = None
        # A class-names file replaces the shipped names: known once the data is read.
        shipped = self.spec.class_names and "class_names_file" not in self.dataset_options
        self._class_names: list[str] | None = list(self.spec.class_names) if shipped else None
        self._templates: list[str] = list(self.spec.templates)

    # ---------------------------------------------------------------- what the model must know

    @property
    def class_names(self) -> list[str]:
        """Class names (for folder/csv datasets known once the data is read)."""
        if self._class_names is None:
            self._load_parts(transform=None)
        return list(self._class_names or [])

    @property
    def templates(self) -> list[str]:
        """Prompt templates."""
        if "templates_file" in self.dataset_options and self._class_names is None:
            self._load_parts(transform=None)
        return list(self._templates)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(L, H, k, D)`` of the cached units, from the backbone's config (no weights needed)."""
        return layout_from_config(self.backbone.model_name, self.convention)

    @property
    def num_classes(self) -> int:
        """C."""
        return len(self.class_names)

    def _selection(self, part: str) -> str:
        return json.dumps(
            {
                "part": part,
                "seed": self.split_seed,
                "fractions": self.fractions,
                "shots": self.shots if part == "train" else None,
                "reference_size": self.reference_size if part == "reference" else None,
                "options": self.dataset_options,
            },
            sort_keys=True,
        )

    def key(self, part: str, preprocessing: str) -> CacheKey:
        """The cache key of a part (``train``, ``val``, ``test`` or ``reference``)."""
        dataset = "imagenet" if part == "reference" else self.dataset
        return CacheKey(
            model_name=self.backbone.model_name,
            weights_id=self.backbone.weights_id,
            dataset=dataset,
            part=part,
            selection=self._selection(part),
            preprocessing=preprocessing,
            convention=self.convention,
            dtype=self.cache_dtype,
            data=self.data_digests()[part],
        )

    def data_digests(self) -> dict[str, str]:
        """The identity of each part's data (`residual_lightning.data.identity`), computed once.

        `setup` computes it on global rank 0 and broadcasts it, so every rank keys the same caches.
        """
        if self._digests is None:
            parts = self._load_parts(transform=None)
            self._digests = {
                part: part_digest(
                    parts[part],
                    self.reference_root if part == "reference" else self.root,
                    self.hash_contents,
                )
                for part in self.parts()
            }
        return self._digests

    def _share_digests(self) -> None:
        """Global rank 0's data digests, broadcast to every rank (called from `setup`)."""
        rank, world = self._rank_world()
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            box = [self.data_digests() if rank == 0 else None]
            torch.distributed.broadcast_object_list(box, src=0)
            self._digests = box[0]

    def parts(self) -> list[str]:
        """Parts that get a cache (``reference`` only with an ImageNet reference)."""
        return [*PARTS, "reference"] if self.reference == "imagenet" else list(PARTS)

    # ---------------------------------------------------------------- building

    def _load_parts(self, transform) -> dict[str, Dataset]:
        opts = dict(self.dataset_options)
        image_size = opts.pop("image_size", 224)
        parts = load_split_datasets(
            self.dataset,
            self.root,
            transform,
            seed=self.split_seed,
            fractions=self.fractions,
            shots=self.shots,
            download=self.download,
            image_size=image_size,
            **opts,
        )
        self._class_names = list(parts["train"].class_names)
        self._templates = list(parts["train"].templates)
        if self.reference == "imagenet":
            ref = load_split_datasets("imagenet", self.reference_root, transform, seed=self.split_seed)[
                "train"
            ]
            parts["reference"] = _stratified_subset(ref, self.reference_size, self.split_seed)
        return parts

    def preprocessing(self) -> str:
        """What determines the images fed to the backbone besides its name and weights.

        Images go through open_clip's own eval transform of the backbone (no augmentation, so the
        cached contributions are exact for training), so the open_clip version pins it; a cache
        extracted under mixed precision records it too.
        """
        import open_clip

        amp = self.amp_dtype()
        return f"open_clip-eval-{open_clip.__version__}" + (
            f"|autocast-{amp}".replace("torch.", "") if amp else ""
        )

    def amp_dtype(self) -> torch.dtype | None:
        """Autocast dtype of extraction, from the trainer's precision (``bf16-mixed``, ``16-mixed``)."""
        precision = str(getattr(self.trainer, "precision", "32")) if self.trainer is not None else "32"
        return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)

    def cache_paths(self) -> dict[str, Path]:
        """Folder of each part's cache."""
        pre = self.preprocessing()
        return {p: self.cache_dir / self.key(p, pre).folder_name() for p in self.parts()}

    def jobs(self, backbone) -> list[ExtractionJob]:
        """Extraction jobs of every part (for `build_cache` and the `extract` command)."""
        datasets = self._load_parts(backbone.transform)
        pre = self.preprocessing()
        return [ExtractionJob(datasets[p], self.key(p, pre), path) for p, path in self.cache_paths().items()]

    def _device(self) -> torch.device:
        if self.extract_device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.extract_device)

    def missing(self) -> list[str]:
        """Parts whose cache is not complete and valid.

        Checksums are verified here only with ``on_mismatch: rebuild`` (so a corrupt cache is
        rebuilt by `prepare_data`); otherwise `setup` verifies them and raises.
        """
        pre = self.preprocessing()
        verify = self.on_mismatch == "rebuild"
        return [
            p
            for p, path in self.cache_paths().items()
            if open_or_none(path, self.key(p, pre), self.on_mismatch, verify=verify) is None
        ]

    def prepare_data(self) -> None:
        """Build missing caches and the text classifier (one process). Nothing to do when all exist."""
        if self.mode == "images":  # finetune reads images: only the text classifier is prepared
            self.classifier()
            return
        missing = self.missing()
        if not missing:
            self.classifier()  # verified; built or rebuilt (loading the backbone) only if it must be
            return
        world = self.trainer.world_size if self.trainer is not None else 1
        if missing and world > 1:
            raise CacheError(
                f"caches {missing} are missing; with several devices build them first: "
                "residual-lightning extract --config <the same config> (it shards extraction across devices)"
            )
        backbone = self.loaded_backbone()
        for job in self.jobs(backbone):
            build_cache(
                backbone.model,
                job,
                batch_size=self.extract_batch_size,
                chunk_size=self.chunk_size,
                autocast_dtype=self.amp_dtype(),
                num_workers=self.num_workers,
                on_mismatch=self.on_mismatch,
            )
        self.classifier()

    # ---------------------------------------------------------------- reading

    def loaded_backbone(self):
        """The backbone, loaded once per process (for extraction and predict)."""
        if self._backbone is None:
            self._backbone = self.backbone.load(self._device())
        return self._backbone

    def setup(self, stage: str | None = None) -> None:
        """Open the (already built) caches of every part; verified on open. Predict needs no cache."""
        if stage == "predict" or self.caches or self.images:
            return
        if self.mode == "images":
            self.images = self._load_parts(self.loaded_backbone().transform)
            return
        self._share_digests()
        pre = self.preprocessing()
        for part, path in self.cache_paths().items():
            if not (path / "meta.json").exists():
                raise CacheError(
                    f"no {part} cache at {path}: run prepare_data or `residual-lightning extract` first"
                )
            self.caches[part] = ActivationCache.open(path, self.key(part, pre))
        if self._class_names is None:
            self._class_names = self.caches["train"].meta.get("class_names") or None
        if self.trainer is not None and self.trainer.world_size > 1:
            if self.trainer._accelerator_connector.use_distributed_sampler:
                raise ValueError(
                    "ResidualDataModule shards its own batches: set trainer.use_distributed_sampler: false "
                    "(the residual-lightning CLI does this by default)"
                )

    @property
    def head_maps(self) -> torch.Tensor:
        """(L, H, D, k) fixed head maps of the caches."""
        return self.caches["train"].head_maps

    def classifier(self) -> tuple[torch.Tensor, float]:
        """(C, D) text classifier and logit scale: built in prepare_data, verified whenever read.

        The backbone is loaded only when the file has to be (re)built.
        """
        from residual_lightning.classifier import load_or_build_classifier

        backbone = self._backbone if self._backbone is not None else self.backbone
        return load_or_build_classifier(
            backbone, self.class_names, self.templates, self.cache_dir, self.on_mismatch
        )

    def bases(self) -> UnitBases:
        """PCA bases of every unit on the reference set, fitted once into a keyed file.

        With several ranks each fits its share of the batches and the moments are summed
        across ranks, so the result equals a single-process fit.
        """
        if self._bases is not None:  # the model and the plots callback both ask for them
            return self._bases
        path, key = self.bases_path(), asdict(self._reference_key())
        rank, world = self._rank_world()
        loaded = False
        if _rank0_says(path.exists(), world):  # every rank takes rank 0's branch (all_reduce below)
            try:
                self._bases = UnitBases.load(path, key=key)
                loaded = True
            except CacheError as err:
                if self.on_mismatch != "rebuild":
                    raise CacheError(f"{err}; delete it or pass --data.on_mismatch rebuild") from err
                warnings.warn(f"{err}; refitting the PCA bases", stacklevel=2)
        if _rank0_says(loaded, world):
            return self._bases
        ref = self.reference_cache()
        shard = (b for i, b in enumerate(ref.iter_batches(2048)) if i % world == rank)
        bases = fit_unit_bases(
            shard,
            ref.head_maps,
            convention=self.convention,
            metadata={"reference": self.reference, "dataset": key["dataset"], "samples": len(ref)},
        )
        if rank == 0:
            bases.save(path, key=key)  # atomic, checksummed
        self._bases = bases
        return bases

    def _reference_key(self) -> CacheKey:
        return self.key("reference" if self.reference == "imagenet" else "train", self.preprocessing())

    def bases_path(self) -> Path:
        """The PCA-bases file, keyed by the reference part's cache key."""
        return self.cache_dir / f"bases-{self._reference_key().digest()}.safetensors"

    def reference_cache(self) -> ActivationCache:
        """The cache PCA bases are fitted on."""
        return self.caches["reference" if self.reference == "imagenet" else "train"]

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _loader(self, part: str, train: bool) -> DataLoader:
        rank, world = self._rank_world()
        if self.mode == "images":
            data = self.images[part]
            size = max(1, self.batch_size // world) if train else self.extract_batch_size
            sampler = EpochBatchSampler(len(data), size, train, self.seed, rank, world)
            return DataLoader(
                data, batch_sampler=sampler, num_workers=self.num_workers, pin_memory=self.pin_memory
            )
        cache = self.caches[part]
        if train:
            per_device = max(1, self.batch_size // world)
            sampler = EpochBatchSampler(len(cache), per_device, True, self.seed, rank, world, drop_last=False)
        else:
            sampler = EpochBatchSampler(len(cache), self.eval_batch_size, False, 0, rank, world)
        return DataLoader(
            CacheBatches(cache),
            sampler=sampler,
            batch_size=None,
            collate_fn=_identity,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of the train cache (order = f(seed, epoch))."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches (each sample once across ranks)."""
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches (each sample once across ranks)."""
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        """Raw images (``predict_path`` or the test part) as ``(image, label, index)`` batches.

        Each rank gets a disjoint share; the dataset's ``names`` give each index its file name.
        """
        from residual_lightning.data.images import IMAGE_EXTENSIONS, ImageListDataset

        transform = self.loaded_backbone().transform
        if self.predict_path is not None:
            root = Path(self.predict_path)
            if root.is_file():
                files = [root]
            elif root.is_dir():
                files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            else:
                raise FileNotFoundError(f"predict_path {root} does not exist")
            if not files:
                raise FileNotFoundError(
                    f"no images ({', '.join(IMAGE_EXTENSIONS)}) under predict_path {root}"
                )
            data = ImageListDataset(
                files,
                [-1] * len(files),
                self.class_names,
                self.templates,
                transform,
                on_bad_image=self.predict_on_bad_image,
                name="predict_path",
            )
            self.predict_skipped = list(data.skipped_files)
            names = list(data.paths)
        else:
            data = self._load_parts(transform)["test"]
            paths = getattr(getattr(data, "dataset", None), "paths", None)
            idx = getattr(data, "indices", range(len(data)))
            names = [paths[i] for i in idx] if paths is not None else [f"test[{i}]" for i in range(len(data))]
        self.predict_names = names
        rank, world = self._rank_world()
        mine = list(range(rank, len(data), world))  # a disjoint share per rank, nothing repeated
        return DataLoader(
            IndexedDataset(data),
            batch_size=self.extract_batch_size,
            sampler=mine,
            num_workers=self.num_workers,
        )


def build_caches(datamodule: ResidualDataModule) -> dict[str, ActivationCache]:
    """Build (or resume, or just verify) every cache of a data module in this process, and open them.

    The programmatic twin of ``residual-lightning extract`` (which also shards across devices).

    Args:
        datamodule: the data module whose caches to build.

    Returns:
        The opened caches by part (``train``, ``val``, ``test``, and ``reference`` if any).
    """
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule.caches


def _positive_ints(**values: int) -> tuple[int, ...]:
    """The values as plain ints; a clear error naming the setting for one that is not positive."""
    out = []
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        out.append(int(value))
    return tuple(out)


def _rank0_says(flag: bool, world: int) -> bool:
    """Rank 0's value of `flag`, broadcast to every rank."""
    decision = [flag]
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(decision, src=0)
    return decision[0]


def _stratified_subset(dataset, size: int, seed: int):
    """A class-stratified, seeded subset of `size` samples (all of them if smaller)."""
    from torch.utils.data import Subset

    from residual_lightning.data.splits import stratified_split

    targets = np.asarray(dataset.targets)
    if size >= len(targets):
        return dataset
    keep, _ = stratified_split(targets, [size / len(targets), 1 - size / len(targets)], seed=seed)
    sub = Subset(dataset, keep)
    sub.targets = targets[keep]
    sub.class_names = getattr(dataset, "class_names", None)
    return sub
