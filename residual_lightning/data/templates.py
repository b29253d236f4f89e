"""Class names and prompt templates for zero-shot text classifiers, per dataset.

The names are the "cleaned for prompting" lists of the CLIP paper's evaluation (OpenAI's
`data/prompts.md` and ImageNet notebook), in the label order of each dataset's on-disk source as
read by `residual_lightning.data.registry` (which follows torchvision's order). Templates are
strings with exactly one `{}` placeholder, e.g. ``"a photo of a {}."``.

ImageNet's 1000 names and 80 templates are open_clip's (`open_clip.zero_shot_metadata`:
``IMAGENET_CLASSNAMES`` and ``OPENAI_IMAGENET_TEMPLATES``, the lists of OpenAI's notebook). The other
long lists (SUN397, Stanford Cars, Food-101, Flowers-102) live in
``residual_lightning/resources/*.txt``, one entry per line, and are read with `importlib.resources`.
CLIP_benchmark's prompt set (``data.prompts: clip_benchmark``) is in
`residual_lightning.data.prompts`. SVHN and scikit-learn digits have no list in the CLIP paper: they reuse
MNIST's, as the ResiDual authors' code does.

Users can bring their own lists through `load_class_names_file` / `load_templates_file` (a YAML
list, or plain text with one entry per line).
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Sequence
from pathlib import Path

import yaml
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

__all__ = [
    "DATASET_TEMPLATES",
    "GENERIC_TEMPLATES",
    "check_shipped_class_names",
    "clean_class_name",
    "load_class_names",
    "load_class_names_file",
    "load_templates_file",
    "read_list_file",
    "sun397_class_name",
]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

CIFAR100_CLASSES = [
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn mower", "leopard", "lion", "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak tree", "orange", "orchid", "otter", "palm tree", "pear", "pickup truck", "pine tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow tree", "wolf", "woman", "worm",
]  # fmt: skip

DIGIT_CLASSES = [str(i) for i in range(10)]

# Class ids 0..42 of the German Traffic Sign Recognition Benchmark (folder 00000 .. 00042).
GTSRB_CLASSES = [
    "red and white circle 20 kph speed limit",
    "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit",
    "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit",
    "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit",
    "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit",
    "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing",
    "red and white triangle road intersection warning",
    "white and yellow diamond priority road",
    "red and white upside down triangle yield right-of-way",
    "stop",
    "empty red and white circle",
    "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry",
    "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning",
    "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning",
    "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning",
    "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit",
    "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory",
    "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory",
    "blue circle with white keep right arrow mandatory",
    "blue circle with white keep left arrow mandatory",
    "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
]

# The DTD folder names are already prompt-ready; sorted, as torchvision labels them.
DTD_CLASSES = [
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked", "crosshatched",
    "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy", "grid", "grooved",
    "honeycombed", "interlaced", "knitted", "lacelike", "lined", "marbled", "matted", "meshed", "paisley",
    "perforated", "pitted", "pleated", "polka-dotted", "porous", "potholed", "scaly", "smeared", "spiralled",
    "sprinkled", "stained", "stratified", "striped", "studded", "swirly", "veined", "waffled", "woven",
    "wrinkled", "zigzagged",
]  # fmt: skip

# EuroSAT folder name -> CLIP prompt name. torchvision reads the folders with ImageFolder, so the
# label order is the sorted folder order (AnnualCrop = 0), not the order of CLIP's prompts.md.
EUROSAT_FOLDER_NAMES = {
    "AnnualCrop": "annual crop land",
    "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road",
    "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments",
    "River": "river",
    "SeaLake": "lake or sea",
}
EUROSAT_CLASSES = [EUROSAT_FOLDER_NAMES[k] for k in sorted(EUROSAT_FOLDER_NAMES)]

# NWPU-RESISC45 folder names with underscores read as spaces, sorted.
RESISC45_CLASSES = [
    "airplane", "airport", "baseball diamond", "basketball court", "beach", "bridge", "chaparral", "church",
    "circular farmland", "cloud", "commercial area", "dense residential", "desert", "forest", "freeway",
    "golf course", "ground track field", "harbor", "industrial area", "intersection", "island", "lake",
    "meadow", "medium residential", "mobile home park", "mountain", "overpass", "palace", "parking lot",
    "railway", "railway station", "rectangular farmland", "river", "roundabout", "runway", "sea ice", "ship",
    "snowberg", "sparse residential", "stadium", "storage tank", "tennis court", "terrace",
    "thermal power station", "wetland",
]  # fmt: skip

_CIFAR_TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
]
_DIGIT_TEMPLATES = ['a photo of the number: "{}".']

#: Templates for folders and CSVs of unknown content, when no templates file is given.
GENERIC_TEMPLATES = [
    "a photo of a {}.",
    "a photo of the {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
]

# Files under residual_lightning/resources/, one entry per line.
_CLASS_NAME_FILES = {
    "sun397": "sun397_classnames.txt",
    "stanford_cars": "stanford_cars_classnames.txt",
    "food101": "food101_classnames.txt",
    "flowers102": "flowers102_classnames.txt",
}
_INLINE_CLASS_NAMES = {
    "cifar10": CIFAR10_CLASSES,
    "cifar100": CIFAR100_CLASSES,
    "mnist": DIGIT_CLASSES,
    "svhn": DIGIT_CLASSES,
    "digits": DIGIT_CLASSES,
    "gtsrb": GTSRB_CLASSES,
    "dtd": DTD_CLASSES,
    "eurosat": EUROSAT_CLASSES,
    "resisc45": RESISC45_CLASSES,
    "imagenet": list(IMAGENET_CLASSNAMES),
}


def _read_resource(filename: str) -> list[str]:
    """Non-empty lines of a file shipped in ``residual_lightning/resources``."""
    text = importlib.resources.files("residual_lightning").joinpath("resources", filename).read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


DATASET_TEMPLATES: dict[str, list[str]] = {
    "cifar10": _CIFAR_TEMPLATES,
    "cifar100": _CIFAR_TEMPLATES,
    "mnist": _DIGIT_TEMPLATES,
    "svhn": _DIGIT_TEMPLATES,
    "digits": _DIGIT_TEMPLATES,
    "gtsrb": [
        'a zoomed in photo of a "{}" traffic sign.',
        'a centered photo of a "{}" traffic sign.',
        'a close up photo of a "{}" traffic sign.',
    ],
    "dtd": [
        "a photo of a {} texture.",
        "a photo of a {} pattern.",
        "a photo of a {} thing.",
        "a photo of a {} object.",
        "a photo of the {} texture.",
        "a photo of the {} pattern.",
        "a photo of the {} thing.",
        "a photo of the {} object.",
    ],
    "eurosat": [
        "a centered satellite photo of {}.",
        "a centered satellite photo of a {}.",
        "a centered satellite photo of the {}.",
    ],
    "resisc45": [
        "satellite imagery of {}.",
        "aerial imagery of {}.",
        "satellite photo of {}.",
        "aerial photo of {}.",
        "satellite view of {}.",
        "aerial view of {}.",
        "satellite imagery of a {}.",
        "aerial imagery of a {}.",
        "satellite photo of a {}.",
        "aerial photo of a {}.",
        "satellite view of a {}.",
        "aerial view of a {}.",
        "satellite imagery of the {}.",
        "aerial imagery of the {}.",
        "satellite photo of the {}.",
        "aerial photo of the {}.",
        "satellite view of the {}.",
        "aerial view of the {}.",
    ],
    "sun397": ["a photo of a {}.", "a photo of the {}."],
    "stanford_cars": [
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of my {}.",
        "i love my {}!",
        "a photo of my dirty {}.",
        "a photo of my clean {}.",
        "a photo of my new {}.",
        "a photo of my old {}.",
    ],
    "food101": ["a photo of {}, a type of food."],
    "flowers102": ["a photo of a {}, a type of flower."],
    "imagenet": [template("{}") for template in OPENAI_IMAGENET_TEMPLATES],
    "imagefolder": GENERIC_TEMPLATES,
    "csv": GENERIC_TEMPLATES,
}


@functools.cache
def _class_names(name: str) -> tuple[str, ...]:
    if name in _INLINE_CLASS_NAMES:
        return tuple(_INLINE_CLASS_NAMES[name])
    return tuple(_read_resource(_CLASS_NAME_FILES[name]))


def load_class_names(name: str) -> list[str]:
    """The shipped, prompt-ready class names of a registry dataset, in label order.

    Args:
        name: a dataset name of the registry with a fixed label set (not ``imagefolder``/``csv``,
            whose names come from the data or a class-names file).

    Returns:
        A new list of class names; index i is the name of label i.

    Raises:
        ValueError: the dataset has no shipped list.
    """
    if name not in _INLINE_CLASS_NAMES and name not in _CLASS_NAME_FILES:
        known = sorted([*_INLINE_CLASS_NAMES, *_CLASS_NAME_FILES])
        raise ValueError(
            f"No shipped class names for dataset {name!r}; datasets with shipped names: {', '.join(known)}. "
            "For 'imagefolder'/'csv' the names come from the data or from a class-names file."
        )
    return list(_class_names(name))


def clean_class_name(raw: str) -> str:
    """Turn a folder or label name into a prompt-ready name: ``"lawn_mower"`` -> ``"lawn mower"``.

    Args:
        raw: the folder or label name.
    """
    return " ".join(raw.replace("_", " ").replace("/", " ").split())


def check_shipped_class_names(
    name: str, found: Sequence[str], source: str | Path, *, clean: bool = True
) -> None:
    """Refuse data whose own class-name list differs from the shipped, prompt-ready one.

    The data's labels index its own list (``cars_meta.mat``, CIFAR-100's ``meta``, Food-101's
    ``classes.txt``) while the prompts are built from the shipped list, so a difference in order
    or spelling would pair every image of a class with another class's prompts.

    Args:
        name: registry dataset name with a shipped list.
        found: the names as the data's file stores them, in label order.
        source: the file they were read from (for the message).
        clean: compare ``clean_class_name(found[i])`` (``aquarium_fish`` reads as
            ``aquarium fish``, as the shipped lists were written); False compares with only
            runs of whitespace collapsed (Stanford Cars' names are shipped verbatim).

    Raises:
        ValueError: the lists differ; the message names the file, the first differing index and
            both names.
    """
    shipped = load_class_names(name)
    norm = [clean_class_name(str(n)) if clean else " ".join(str(n).split()) for n in found]
    if norm == shipped:
        return
    if name in _CLASS_NAME_FILES:
        where = f"residual_lightning/resources/{_CLASS_NAME_FILES[name]}"
    elif name == "imagenet":
        where = "open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES"
    else:
        where = "residual_lightning/data/templates.py"
    common = min(len(norm), len(shipped))
    i = next((k for k in range(common) if norm[k] != shipped[k]), common)
    if i < common:
        diff = (
            f"first difference at index {i} (label {i}): the file has {found[i]!r}, "
            f"the shipped list has {shipped[i]!r}"
        )
    else:
        diff = f"the file has {len(norm)} names, the shipped list {len(shipped)} (equal up to index {i - 1})"
    raise ValueError(
        f"{name}: the class names in {source} do not match the shipped list ({where}): {diff}. The labels "
        f"index the file's list, so the prompts would name the wrong classes. Use the original {name} "
        "files, or pass class_names_file (data.dataset_options.class_names_file) with the names in the "
        "file's order."
    )


def sun397_class_name(category: str) -> str:
    """Prompt-ready name of a SUN397 category path: ``"/b/balcony/exterior"`` -> ``"balcony exterior"``.

    Accepts the lines of SUN397's ``ClassName.txt`` (``/a/abbey``) as well as torchvision's
    ``classes`` entries, which drop the leading ``/<letter>/``.

    Args:
        category: the category path.
    """
    parts = [p for p in category.strip().split("/") if p]
    if len(parts) > 1 and len(parts[0]) == 1:  # drop the "/a/" initial-letter directory
        parts = parts[1:]
    return clean_class_name(" ".join(parts))


def read_list_file(path: str | Path, what: str) -> list[str]:
    """Entries of a YAML list (``.yaml``/``.yml``/``.json``) or a plain text file (one per line).

    Plain-text lines are stripped; empty lines and lines starting with ``#`` are ignored.

    Args:
        path: the file.
        what: what the file holds, for error messages (``"Templates"``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty, not valid YAML, or not a YAML list of strings.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{what} file {path} is not valid YAML: {err}") from err
        if data is None:
            data = []
        if not isinstance(data, list) or not all(isinstance(x, str | int | float) for x in data):
            raise ValueError(
                f"{what} file {path} must hold a YAML list of strings, got {type(data).__name__}"
            )
        entries = [str(x).strip() for x in data]
        if any(not e for e in entries):
            raise ValueError(f"{what} file {path} has an empty entry")
    else:
        entries = [line.strip() for line in text.splitlines()]
        entries = [e for e in entries if e and not e.startswith("#")]
    if not entries:
        raise ValueError(f"{what} file {path} is empty")
    return entries


def load_templates_file(path: str | Path) -> list[str]:
    """Read prompt templates from a YAML list or a text file with one template per line.

    Args:
        path: the file. ``.yaml``/``.yml``/``.json`` are parsed as YAML; anything else as text.

    Returns:
        The templates, each with exactly one ``{}``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty, or a template lacks (or repeats) the ``{}`` placeholder.
    """
    templates = read_list_file(path, "Templates")
    for i, t in enumerate(templates):
        if t.count("{}") != 1:
            raise ValueError(
                f"Templates file {path}: entry {i + 1} {t!r} must contain exactly one '{{}}' placeholder "
                "for the class name"
            )
        try:
            t.format("x")
        except (IndexError, KeyError, ValueError) as err:
            raise ValueError(
                f"Templates file {path}: entry {i + 1} {t!r} is not a valid format string: {err}"
            ) from err
    return templates


def load_class_names_file(path: str | Path) -> list[str]:
    """Read class names (label order) from a YAML list or a text file with one name per line.

    Args:
        path: the file. ``.yaml``/``.yml``/``.json`` are parsed as YAML; anything else as text.

    Returns:
        The class names; index i names label i.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty.
    """
    return read_list_file(path, "Class-names")
