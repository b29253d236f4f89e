"""Prompt sets (`residual_lightning.data.prompts`): CLIP_benchmark's prompts carried as data, checked
against values typed in from its repository, and the ``data.prompts`` option of the data module.

Upstream values below are copied by hand from https://github.com/LAION-AI/CLIP_benchmark at commit
374d11f51c5a17a1b925a14c206471e13c205a2b (``clip_benchmark/datasets/en_classnames.json``,
``en_zeroshot_classification_templates.json``) and, for RESISC45's names, from TFDS
(``tensorflow_datasets/image_classification/resisc45.py``, ``_LABELS``), which CLIP_benchmark's
``vtab/resisc45`` uses verbatim. When the ``clip_benchmark`` package is installed (dev only), the
shipped file is also compared with the package's own JSON.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
from pathlib import Path

import pytest

from residual_lightning.classifier import classifier_key, classifier_path
from residual_lightning.data.datamodule import ResidualDataModule
from residual_lightning.data.prompts import clip_benchmark_prompts, select_prompts
from residual_lightning.data.registry import DATASETS
from residual_lightning.data.templates import DATASET_TEMPLATES, load_class_names


def shipped() -> dict:
    path = importlib.resources.files("residual_lightning").joinpath(
        "resources", "clip_benchmark_prompts.json"
    )
    return json.loads(path.read_text("utf-8"))


# Typed in from CLIP_benchmark (see the module docstring), `{c}` placeholders as upstream writes them.
UPSTREAM_TEMPLATES = {
    "svhn": [
        "a photo of the number {c} written on a sign",
        "an outdoor house number {c}",
        "the number {c} in the center of the image",
        "an outdoor number {c} writte on a sign",
        "an outdoor number {c}",
        "a centered image of the number {c}",
    ],
    "resisc45": [
        "a sattelite image of {c}",
        "an aerial view of {c}",
        "a sattelite photo of {c}",
        "{c} from above",
    ],
    "mnist": ['a photo of the number: "{c}".'],
    "gtsrb": [
        'a zoomed in photo of a "{c}" traffic sign.',
        'a centered photo of a "{c}" traffic sign.',
        'a close up photo of a "{c}" traffic sign.',
    ],
    "eurosat": [
        "a centered satellite photo of {c}.",
        "a centered satellite photo of a {c}.",
        "a centered satellite photo of the {c}.",
    ],
    "food101": ["a photo of {c}, a type of food."],
    "sun397": ["a photo of a {c}.", "a photo of the {c}."],
    "flowers": ["a photo of a {c}, a type of flower."],
}
UPSTREAM_TEMPLATE_COUNTS = {"cifar10": 18, "cifar100": 18, "imagenet1k": 80, "cars": 8, "dtd": 8}
UPSTREAM_NAMES = {
    "svhn": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    "mnist": [str(i) for i in range(10)],
    "eurosat": [
        "annual crop land", "forest", "brushland or shrubland", "highway or road",
        "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
        "residential buildings or homes or apartments", "river", "lake or sea",
    ],
}  # fmt: skip
UPSTREAM_NAME_EXCERPTS = {  # (index, name)
    "flowers": [(0, "pink primrose"), (1, "hard-leaved pocket orchid"), (101, "blackberry lily")],
    "gtsrb": [(6, "end / de-restriction of 80 kph speed limit"), (14, "stop"), (29, "red and white triangle with bicyle warning")],
    "imagenet1k": [(0, "tench"), (21, "kite (bird of prey)"), (999, "toilet paper")],
    "resisc45": [(0, "airplane"), (2, "baseball_diamond"), (24, "mobile_home_park"), (44, "wetland")],
    "cifar100": [(1, "aquarium_fish"), (41, "lawn_mower"), (99, "worm")],  # torchvision's raw CIFAR-100 meta
}  # fmt: skip
OURS = {"cifar10": "cifar10", "cifar100": "cifar100", "imagenet1k": "imagenet", "cars": "stanford_cars",
        "dtd": "dtd", "svhn": "svhn", "resisc45": "resisc45", "mnist": "mnist", "gtsrb": "gtsrb",
        "eurosat": "eurosat", "food101": "food101", "sun397": "sun397", "flowers": "flowers102"}  # fmt: skip


def test_file_names_its_source_and_licence():
    source = shipped()["source"]
    assert source["repository"] == "https://github.com/LAION-AI/CLIP_benchmark"
    assert "MIT" in source["license"] and len(source["commit"]) == 40


def test_every_registry_dataset_with_fixed_classes_is_covered_except_digits():
    datasets = shipped()["datasets"]
    assert set(datasets) == {n for n, s in DATASETS.items() if s.class_names is not None} - {"digits"}
    for name, entry in datasets.items():
        assert len(entry["class_names"]) == len(load_class_names(name)), name
        assert entry["templates"] and all(t.count("{c}") == 1 and "{}" not in t for t in entry["templates"])
        assert OURS[entry["clip_benchmark_dataset"].removeprefix("vtab/")] == name
        assert entry["class_names_from"].startswith(("en_classnames.json", "derived at run time"))


def test_matches_upstream_values_typed_in():
    datasets = shipped()["datasets"]
    for key, templates in UPSTREAM_TEMPLATES.items():
        assert datasets[OURS[key]]["templates"] == templates, key
    for key, count in UPSTREAM_TEMPLATE_COUNTS.items():
        assert len(datasets[OURS[key]]["templates"]) == count, key
    for key, names in UPSTREAM_NAMES.items():
        assert datasets[OURS[key]]["class_names"] == names, key
    for key, excerpt in UPSTREAM_NAME_EXCERPTS.items():
        names = datasets[OURS[key]]["class_names"]
        assert [(i, names[i]) for i, _ in excerpt] == excerpt, key


def test_matches_the_clip_benchmark_package_when_installed():
    """Dev-only extra check (the typed-in excerpt above always runs)."""
    pytest.importorskip("clip_benchmark")
    import clip_benchmark.datasets

    folder = Path(clip_benchmark.datasets.__file__).parent
    names = json.loads((folder / "en_classnames.json").read_text("utf-8"))
    templates = json.loads((folder / "en_zeroshot_classification_templates.json").read_text("utf-8"))
    for entry in shipped()["datasets"].values():
        key = entry["clip_benchmark_dataset"].removeprefix("vtab/")
        assert entry["templates"] == templates[key], key
        if entry["class_names_from"].startswith("en_classnames.json"):
            assert entry["class_names"] == names[key], key


def test_known_differences_from_clip_and_equal_elsewhere():
    differ = {"svhn", "resisc45", "cifar100"}
    for name in shipped()["datasets"]:
        names, templates = clip_benchmark_prompts(name)
        same = names == load_class_names(name) and templates == DATASET_TEMPLATES[name]
        assert same == (name not in differ), name
    names, templates = clip_benchmark_prompts("svhn")
    assert names[0] == "zero" and len(templates) == 6 and templates[1] == "an outdoor house number {}"
    assert len(clip_benchmark_prompts("resisc45")[1]) == 4 and len(DATASET_TEMPLATES["resisc45"]) == 18
    assert clip_benchmark_prompts("cifar100")[0][1] == "aquarium_fish"
    assert [n.replace("_", " ") for n in clip_benchmark_prompts("cifar100")[0]] == load_class_names(
        "cifar100"
    )


@pytest.mark.parametrize("name", ["digits", "imagefolder", "csv"])
def test_datasets_without_a_clip_benchmark_set_raise_naming_them(name):
    with pytest.raises(ValueError, match=f"no prompt set for dataset '{name}'"):
        clip_benchmark_prompts(name)


def test_select_prompts():
    assert select_prompts("svhn", "clip", ["0"], ["{}"]) == (["0"], ["{}"])
    with pytest.raises(ValueError, match="must be one of clip, clip_benchmark"):
        select_prompts("svhn", "openai", None, ["{}"])
    with pytest.raises(ValueError, match="svhn has 3 classes, CLIP_benchmark's list 10"):
        select_prompts("svhn", "clip_benchmark", ["a", "b", "c"], ["{}"])


def test_imagenet_lists_from_open_clip_equal_the_previously_shipped_files():
    """sha256 of the JSON of the lists read from the former resources/imagenet_classnames.txt and
    imagenet_templates.txt (git history), so ImageNet's classifier keys do not change."""
    names, templates = load_class_names("imagenet"), DATASET_TEMPLATES["imagenet"]
    assert len(names) == 1000 and len(templates) == 80
    digest = lambda x: hashlib.sha256(json.dumps(x).encode()).hexdigest()  # noqa: E731
    assert digest(names) == "6ef5246539bb6543da0958381424e7f7b63b6758af04434f6e8f6da88e0cca70"
    assert digest(templates) == "e30aa9d7fb289e072e361fb1b2d16a295f7cb396978685fa57a0882c96c06b0d"
    assert classifier_key("openai", "ViT-B-32", names, templates) == "1e525f1fb0a95071"
    assert clip_benchmark_prompts("imagenet") == (names, templates)


def test_datamodule_prompts_option_selects_names_templates_and_classifier_key(tmp_path):
    clip = ResidualDataModule(dataset="svhn", cache_dir=str(tmp_path))
    bench = ResidualDataModule(dataset="svhn", cache_dir=str(tmp_path), prompts="clip_benchmark")
    assert clip.prompts == "clip" and clip.class_names == [str(i) for i in range(10)]
    assert clip.templates == DATASET_TEMPLATES["svhn"]
    assert bench.class_names[:2] == ["zero", "one"] and len(bench.templates) == 6
    path = lambda dm: classifier_path(dm.cache_dir, dm.backbone, dm.class_names, dm.templates)  # noqa: E731
    assert path(clip) != path(bench)
    # where the lists are equal (ImageNet, CIFAR-10, ...) both sets share one classifier file
    same = [
        ResidualDataModule(dataset="cifar10", cache_dir=str(tmp_path), prompts=p)
        for p in ("clip", "clip_benchmark")
    ]
    assert path(same[0]) == path(same[1])


def test_datamodule_prompts_errors(tmp_path):
    with pytest.raises(ValueError, match="no prompt set for dataset 'digits'"):
        ResidualDataModule(dataset="digits", cache_dir=str(tmp_path), prompts="clip_benchmark")
    with pytest.raises(ValueError, match="drop dataset_options templates_file"):
        ResidualDataModule(
            dataset="svhn",
            cache_dir=str(tmp_path),
            prompts="clip_benchmark",
            dataset_options={"templates_file": "t.txt"},
        )
