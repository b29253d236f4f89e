"""`ResidualDataModule`: dataset parts -> verified activation caches -> batches of `Contributions`.

`prepare_data` (one process) builds whatever cache is missing and the text classifier; with
several ranks it downloads the data and builds the text classifier, and `setup` (every process)
builds the missing caches sharded across the ranks (`ShardedBuild`), then opens them (rank 0
verifies the checksums) and the PCA bases. Loaders read the memory-mapped caches in
batches; the order of training batches is a function of (seed, epoch) only, and validation/test
shards never repeat a sample across ranks.

The class composes the data layer: parts (`parts`, `registry`), cache keys (`keys`, `identity`),
caches built by `extract`, batches from `loaders`, PCA bases from `bases`, the text classifier from
`residual_lightning.classifier`, what ``predict`` reads from `predict`, and option checks and
``from_config`` from `options`. `EpochBatchSampler`, `CacheBatches` and `build_caches` are
re-exported from here, where code written before this split imports them.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse.typing import PositiveInt
from torch.utils.data import DataLoader, Dataset

from residual_lightning.contributions import UnitLayout
from residual_lightning.data.bases import load_or_fit_bases, rank0_says
from residual_lightning.data.cache import ActivationCache, CacheError, CacheKey, open_or_none
from residual_lightning.data.device_cache import (
    CacheOnDevice,
    DeviceBatches,
    DeviceCache,
    device_loader,
    use_device_cache,
)
from residual_lightning.data.extract import ExtractionJob, ShardedBuild, build_cache, build_caches
from residual_lightning.data.identity import part_digest
from residual_lightning.data.loaders import CacheBatches, EpochBatchSampler, cache_loader, image_loader
from residual_lightning.data.options import check_device_cache, data_module_from_configs, positive_ints
from residual_lightning.data.parts import autocast_dtype, load_parts, preprocessing_name, selection
from residual_lightning.data.predict import predict_dataset, predict_files, predict_loader, sample_names
from residual_lightning.data.prompts import PromptSet, select_prompts
from residual_lightning.data.registry import get_dataset_spec
from residual_lightning.spectral import UnitBases
from residual_lightning.units import BackboneSpec

PARTS = ("train", "val", "test")
DEFAULT_CACHE_DIR = os.environ.get("RESIDUAL_LIGHTNING_CACHE", ".cache/residual-lightning")
__all__ = [
    "DEFAULT_CACHE_DIR",
    "PARTS",
    "CacheBatches",
    "EpochBatchSampler",
    "ResidualDataModule",
    "build_caches",
]


class ResidualDataModule(L.LightningDataModule):
    """Cached unit contributions of a dataset's train/val/test parts.

    Args:
        backbone: the frozen backbone whose units are cached.
        dataset: registry name (``digits``, ``cifar10``, ``imagefolder``, ``csv``, ...).
        root: data root (not needed for ``digits``).
        download: let torchvision download missing files where it can.
        dataset_options: extra loader options (``class_names_file``, ``templates_file``,
            ``on_bad_image``, csv columns, ...).
        prompts: the class names and templates of the text classifier: ``clip`` (the CLIP
            paper's lists, or those of ``class_names_file``/``templates_file``) or
            ``clip_benchmark`` (CLIP_benchmark's, to compare zero-shot numbers with its tables;
            `residual_lightning.data.prompts`). They make the classifier's cache key.
        split_seed: seed of the stratified splits and few-shot draws.
        fractions: override of the dataset's split fractions: (train, val) when val is carved from
            the official train split, (train, val, test) when one pool is cut three ways
            (e.g. ``[0.8, 0.1, 0.1]``); stratified by class, fixed by ``split_seed``.
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
        cache_dtype: storage dtype of the caches: ``float16`` holds the embedding to ~2e-4 relative,
            ``float32`` to ~5e-7 at twice the size (docs/cache.md).
        chunk_size: samples per resumable cache chunk.
        on_mismatch: a cache, PCA-bases or classifier file failing its checks (truncated,
            altered, stale) raises (``error``) or is rebuilt with a warning (``rebuild``).
        extract_batch_size: images per forward pass during extraction.
        extract_device: device of the frozen backbone during extraction (``auto``: CUDA if present).
        batch_size: global training batch (divided by the number of devices).
        eval_batch_size: batch size of validation/test loaders.
        num_workers: DataLoader workers.
        pin_memory: pin batches (for GPU training).
        cache_on_device: hold each split's cache on the training device and draw batches there
            (no DataLoader, no host copies; `residual_lightning.data.device_cache`): ``auto`` when
            it fits in ``device_cache_fraction`` of the device's free memory (RAM on a CPU),
            ``true`` always, ``false`` never (memory-mapped loader). Same batches either way.
        device_cache_fraction: share of the device's free memory a split may take under ``auto``.
        seed: seed of the training batch order (a function of seed and epoch).
        predict_path: for ``predict``: a folder of images (searched recursively) or an image
            file; default: the images of the test part.
        mode: ``cache`` (batches of cached contributions) or ``images`` (preprocessed images, for
            ``FinetuneModel``; the CLI sets it from the model class's ``data_mode``).
        prepare_data_per_node: download and prepare the data on local rank 0 of every node (a
            ``root`` on node-local disks) instead of once, on global rank 0 (a ``root`` on a shared
            filesystem; the default). Caches are built across all ranks either way (docs/cluster.md).
    """

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        dataset: str = "digits",
        root: str | None = None,
        download: bool = False,
        dataset_options: dict[str, Any] | None = None,
        prompts: PromptSet = "clip",
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
        cache_on_device: CacheOnDevice = "auto",
        device_cache_fraction: float = 0.5,
        seed: int = 0,
        predict_path: str | None = None,
        mode: Literal["cache", "images"] = "cache",
        prepare_data_per_node: bool = False,
    ) -> None:
        super().__init__()
        self.prepare_data_per_node = prepare_data_per_node  # Lightning's: who runs `prepare_data`
        # Plain ints (jsonargparse's PositiveInt values are a subclass); checked for direct calls too.
        chunk_size, extract_batch_size, batch_size, eval_batch_size = positive_ints(
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
        self.prompts = prompts
        given = sorted({"class_names_file", "templates_file"} & set(self.dataset_options))
        if prompts != "clip" and given:
            raise ValueError(
                f"data.prompts: {prompts} sets the class names and templates; drop dataset_options "
                f"{', '.join(given)} or use prompts: clip"
            )
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
        self.cache_on_device, self.device_cache_fraction = check_device_cache(
            cache_on_device, device_cache_fraction
        )
        self.on_device: dict[str, DeviceCache | None] = {}  # each split on the device, or None: memory-mapped
        self.predict_on_bad_image: Literal["raise", "skip"] = "raise"  # `predict --skip_bad_images`
        self.predict_skipped: list[str] = []
        self.mode = mode
        self.images: dict[str, Dataset] = {}
        self.caches: dict[str, ActivationCache] = {}
        self._backbone = None
        self._bases: UnitBases | None = None
        # A class-names file replaces the shipped names: known once the data is read.
        shipped = self.spec.class_names and "class_names_file" not in self.dataset_options
        self._class_names, self._templates = select_prompts(
            self.dataset, prompts, list(self.spec.class_names) if shipped else None, list(self.spec.templates)
        )
        self._listing: dict[str, Dataset] | None = None  # the parts without a transform, read once

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
    def layout(self) -> UnitLayout:
        """The layout of the cached units, from the backbone's config (no weights needed)."""
        return self.backbone.layout(self.convention)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(L, H, k, D)`` of the cached units (what the model and its checkpoints record)."""
        return self.layout.shape

    @property
    def num_classes(self) -> int:
        """C."""
        return len(self.class_names)

    def key(self, part: str, preprocessing: str) -> CacheKey:
        """The cache key of a part (``train``, ``val``, ``test`` or ``reference``)."""
        dataset = "imagenet" if part == "reference" else self.dataset
        return CacheKey(
            model_name=self.backbone.model_name,
            weights_id=self.backbone.weights_id,
            dataset=dataset,
            part=part,
            selection=selection(
                part, self.split_seed, self.fractions, self.shots, self.reference_size, self.dataset_options
            ),
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

    def _load_parts(self, transform, download: bool | None = None) -> dict[str, Dataset]:
        """The parts with `transform`; the transform-less listing (names, labels, the data
        digests) is read once per process and reused. `download` (default ``self.download``) is
        off on the ranks that did not prepare the data."""
        if transform is None and self._listing is not None:
            return self._listing
        parts = load_parts(
            self.dataset,
            self.root,
            transform,
            self.dataset_options,
            self.split_seed,
            self.fractions,
            self.shots,
            self.download if download is None else download,
            self.reference_root if self.reference == "imagenet" else None,
            self.reference_size,
        )
        self._class_names, self._templates = select_prompts(
            self.dataset, self.prompts, list(parts["train"].class_names), list(parts["train"].templates)
        )
        if transform is None:
            self._listing = parts
        return parts

    def preprocessing(self) -> str:
        """What determines the images fed to the backbone besides its name and weights
        (`residual_lightning.data.parts.preprocessing_name`: the library and its version, the
        autocast dtype)."""
        return preprocessing_name(self.amp_dtype(), self.backbone.preprocessing_id)

    def amp_dtype(self) -> torch.dtype | None:
        """Autocast dtype of extraction, from the trainer's precision (``bf16-mixed``, ``16-mixed``)."""
        return autocast_dtype(
            str(getattr(self.trainer, "precision", "32")) if self.trainer is not None else "32"
        )

    def cache_paths(self) -> dict[str, Path]:
        """Folder of each part's cache."""
        pre = self.preprocessing()
        return {p: self.cache_dir / self.key(p, pre).folder_name() for p in self.parts()}

    def jobs(self, backbone, download: bool | None = None) -> list[ExtractionJob]:
        """Extraction jobs of every part (for `build_cache` and the `extract` command)."""
        datasets = self._load_parts(backbone.transform, download)
        pre = self.preprocessing()
        return [ExtractionJob(datasets[p], self.key(p, pre), path) for p, path in self.cache_paths().items()]

    def distributed_jobs(self, backbone) -> list[ExtractionJob]:
        """The jobs on every rank of a run: the data downloaded and listed by one process (global
        rank 0, or local rank 0 of each node with ``prepare_data_per_node``), a barrier, then
        every rank lists it without downloading, keyed by rank 0's data digests."""
        if self._prepares_here():
            self._load_parts(transform=None)
        if self.trainer is not None:
            self.trainer.strategy.barrier("prepare-data")
        self._load_parts(transform=None, download=False)  # the listing, read without downloading
        self._share_digests()
        return self.jobs(backbone, download=False)

    def _prepares_here(self) -> bool:
        if self.trainer is None:
            return True
        return (self.trainer.local_rank if self.prepare_data_per_node else self.trainer.global_rank) == 0

    def _device(self) -> torch.device:
        rank, world = self._rank_world()
        if world > 1 and self.extract_device == "auto":  # each rank extracts on its own device
            return self.trainer.strategy.root_device
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
        """Build missing caches and the text classifier (one process). Nothing to do when all exist.

        With several ranks this process downloads the data and builds the text classifier; the
        missing caches are built in `setup`, sharded across every rank.

        A vision-only backbone (timm, DINOv2, ViT) has no text classifier: its models use
        class-mean prototypes of the train cache.
        """
        # finetune reads images; several ranks build the caches together in `setup`: here only the
        # data (downloaded where allowed, by this process alone) and the text classifier
        if self.mode == "images" or self._rank_world()[1] > 1:
            self._load_parts(transform=None)
            self._prepare_classifier()
            return
        missing = self.missing()
        if not missing:
            self._prepare_classifier()  # verified; built or rebuilt (loading the backbone) only if it must be
            return
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
        self._prepare_classifier()

    def _prepare_classifier(self) -> None:
        if self.backbone.has_text:
            self.classifier()

    # ---------------------------------------------------------------- reading

    def loaded_backbone(self):
        """The backbone, loaded once per process (for extraction and predict)."""
        if self._backbone is None:
            self._backbone = self.backbone.load(self._device())
        return self._backbone

    def setup(self, stage: str | None = None) -> None:
        """Open the caches of every part; with several ranks, build the missing ones first,
        sharded across the ranks. Rank 0 verifies the checksums and tells the others the outcome.
        Predict needs no cache."""
        if stage == "predict" or self.caches or self.images:
            return
        rank, world = self._rank_world()
        if self.mode == "images":  # several ranks: the data was downloaded by `prepare_data`
            self.images = self._load_parts(self.loaded_backbone().transform, None if world == 1 else False)
            return
        self._share_digests()
        if world > 1 and self._on_rank0(self.missing):
            self._build_sharded()
        self._open_caches(rank, world)
        if self._class_names is None:
            self._class_names = self.caches["train"].meta.get("class_names") or None
        if self.trainer is not None and self.trainer.world_size > 1:
            if self.trainer._accelerator_connector.use_distributed_sampler:
                raise ValueError(
                    "ResidualDataModule shards its own batches: set trainer.use_distributed_sampler: false "
                    "(the residual-lightning CLI does this by default)"
                )

    def _on_rank0(self, fn):
        """`fn()` computed on global rank 0 and broadcast; its `CacheError` is raised on every rank."""
        rank, world = self._rank_world()
        value, error = None, None
        if rank == 0:
            try:
                value = fn()
            except CacheError as err:
                error = err
        value, message = rank0_says((value, None if error is None else str(error)), world)
        if error is not None:
            raise error
        if message is not None:
            raise CacheError(f"{message} (found by rank 0)")
        return value

    def _build_sharded(self) -> None:
        """Build the missing caches across the ranks (`ShardedBuild`, as ``extract`` does)."""
        backbone = self.loaded_backbone()
        rank, world = self._rank_world()
        build = ShardedBuild(
            backbone.model,
            self.distributed_jobs(backbone),
            self.chunk_size,
            self.on_mismatch,
            rank,
            world,
            self.trainer.strategy.barrier,
            self.amp_dtype(),
        )
        build.run(self.extract_batch_size, self.num_workers)
        self._backbone = None  # not needed for training: free its (device) memory

    def _open_caches(self, rank: int, world: int) -> None:
        """Open every part's cache: rank 0 verifies checksums, and its failure is every rank's."""
        pre = self.preprocessing()
        error = None
        try:
            for part, path in self.cache_paths().items():
                if not (path / "meta.json").exists():
                    raise CacheError(
                        f"no {part} cache at {path}: run prepare_data or `residual-lightning extract` first"
                    )
                self.caches[part] = ActivationCache.open(path, self.key(part, pre), verify=rank == 0)
        except CacheError as err:
            error = err
        first = rank0_says(None if error is None else str(error), world)
        if error is not None and (rank == 0 or first is None):
            raise error
        if first is not None:
            raise CacheError(f"{first} (found by rank 0)")

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

    def classifier_bias(self) -> float | None:
        """The text classifier's logit bias (SigLIP's sigmoid logits), None for softmax models."""
        from residual_lightning.classifier import load_or_build_classifier

        if not self.backbone.has_text:
            return None
        backbone = self._backbone if self._backbone is not None else self.backbone
        return load_or_build_classifier(
            backbone, self.class_names, self.templates, self.cache_dir, self.on_mismatch, with_bias=True
        )[2]

    def bases(self) -> UnitBases:
        """PCA bases of every unit on the reference set, fitted once into a keyed file.

        With several ranks each fits its share of the batches and the moments are summed
        across ranks, so the result equals a single-process fit.
        """
        if self._bases is None:  # the model and the plots callback both ask for them
            rank, world = self._rank_world()
            self._bases = load_or_fit_bases(
                self.bases_path(),
                asdict(self._reference_key()),
                self.reference_cache,
                self.convention,
                self.reference,
                self.on_mismatch,
                rank,
                world,
            )
        return self._bases

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

    def _device_split(self, part: str) -> DeviceCache | None:
        """`part`'s cache on the training device (loaded once), or None to use the memory-mapped loader."""
        if part not in self.on_device:
            device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
            cache, mode, share = self.caches[part], self.cache_on_device, self.device_cache_fraction
            on = use_device_cache(mode, cache, device, share, part)
            self.on_device[part] = DeviceCache(cache, device) if on else None
        return self.on_device[part]

    def _loader(self, part: str, train: bool) -> DataLoader | DeviceBatches:
        rank, world = self._rank_world()
        if self.mode == "cache" and (split := self._device_split(part)) is not None:
            return device_loader(split, train, self.batch_size, self.eval_batch_size, self.seed, rank, world)
        if self.mode == "images":  # evaluated in batches of extract_batch_size, as in extraction
            make, data, eval_size = image_loader, self.images[part], self.extract_batch_size
        else:
            make, data, eval_size = cache_loader, self.caches[part], self.eval_batch_size
        sizes = (self.batch_size, eval_size, self.seed)
        return make(data, train, *sizes, rank, world, self.num_workers, self.pin_memory)

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
        transform = self.loaded_backbone().transform
        if self.predict_path is not None:
            files = predict_files(self.predict_path)
            data = predict_dataset(
                files, self.class_names, self.templates, transform, self.predict_on_bad_image
            )
            self.predict_skipped = list(data.skipped_files)
            names = list(data.paths)
        else:
            data = self._load_parts(transform)["test"]
            names = sample_names(data)
        self.predict_names = names
        rank, world = self._rank_world()
        return predict_loader(data, self.extract_batch_size, rank, world, self.num_workers)

    @classmethod
    def from_config(
        cls, config: str | Path | list[str | Path] | None = None, **overrides: Any
    ) -> ResidualDataModule:
        """Build the data module of one or more `residual-lightning fit` configs.

        Only each YAML's ``data:`` section is read (its ``init_args`` when written with a
        class_path); later files override earlier ones, `overrides` override them all, and
        jsonargparse checks the result against this class's signature, as ``fit`` does.

        Args:
            config: fit YAML file(s); None builds from `overrides` and the defaults.
            **overrides: data options (``cache_dir="/tmp/c"``; nested ones dotted, as on the
                command line: ``**{"backbone.model_name": "ViT-B-32"}``). Strings are parsed as
                a command-line value would be.

        Returns:
            The data module (not yet prepared nor set up).

        Raises:
            FileNotFoundError: a config file does not exist.
            ValueError: a config has no ``data:`` section.
        """
        return data_module_from_configs(cls, config, overrides)
