"""lightclip-shapes: a procedurally generated image-text dataset that needs no download.

Each picture shows one to three flat objects (a shape in a colour, small or large) on a neutral plain, gradient or
noise background. Captions are written from several templates with synonyms, and spatial words ("above", "on the
left", ...) are derived from the positions actually drawn. A fixed set of colour-shape combinations
(`HELD_OUT_COMBINATIONS`) never appears in the train split, in any object; in the test split half of the pictures
have a held-out main object, so zero-shot accuracy on `composition_seen == False` measures generalisation to new
compositions.

The main object is always the first and the largest one (in multi-object pictures the other objects are small);
the `shape` and `colour` labels of the zero-shot tasks are those of the main object. `num_objects == 1` selects the
pictures where the labels describe everything in the picture.

>>> from lightclip.shapes import make_shapes_dataset, shapes_zero_shot_tasks
>>> test = make_shapes_dataset("test", num_samples=8)
>>> test[0]["captions"]  # doctest: +SKIP
['a large pink heart on the left', 'a picture of a big pink heart on a dark noisy background', ...]
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from .datacache import cache_root, load_cached, save_atomically

# Bump when the pictures or captions change: it is part of the cache fingerprint.
GENERATOR_VERSION = 3

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart")
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
SIZES: tuple[str, ...] = ("small", "large")

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 30),
    "green": (35, 170, 55),
    "cyan": (30, 205, 215),
    "blue": (35, 75, 225),
    "purple": (140, 55, 200),
    "pink": (245, 120, 185),
}

# One held-out colour per shape and one held-out shape per colour: 8 of the 64 combinations (colour, shape).
HELD_OUT_COMBINATIONS: tuple[tuple[str, str], ...] = tuple(
    (COLOURS[(3 * i + 1) % len(COLOURS)], shape) for i, shape in enumerate(SHAPES)
)

SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disk"),
    "square": ("square",),
    "triangle": ("triangle",),
    "star": ("star",),
    "hexagon": ("hexagon",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign"),
    "heart": ("heart",),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
# relation of object A to object B ("A is above B")
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
}
POSITION_WORDS: dict[tuple[str, str], str] = {
    ("top", "left"): "in the top left",
    ("top", "centre"): "at the top",
    ("top", "right"): "in the top right",
    ("middle", "left"): "on the left",
    ("middle", "centre"): "in the centre",
    ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left",
    ("bottom", "centre"): "at the bottom",
    ("bottom", "right"): "in the bottom right",
}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "plain": ("plain",),
    "gradient": ("gradient", "shaded"),
    "noise": ("noisy", "grainy"),
}
PICTURE_WORDS: tuple[str, ...] = ("a picture of", "a photo of", "an image of", "a drawing of")
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three"}

# names `--train_data` / `load_image_text_dataset` accept for this dataset; the Hub-style id of its cards
SOURCE_NAMES = ("shapes", "lightclip-shapes")
DATASET_ID = "lightclip-shapes"
DEFAULT_NUM_SAMPLES: dict[str, int] = {"train": 4000, "test": 500}
_SPLIT_STREAM: dict[str, int] = {"train": 0, "test": 1}
# Share of test pictures whose main object is a held-out combination.
TEST_UNSEEN_FRACTION = 0.5
# Probabilities of 1, 2 and 3 objects.
NUM_OBJECTS_P = (0.5, 0.3, 0.2)
# Object radius as a fraction of the picture side.
_RADIUS = {("single", "small"): (0.13, 0.17), ("single", "large"): (0.25, 0.32),
           ("multi", "large"): (0.19, 0.23), ("multi", "small"): (0.10, 0.13)}


@dataclass
class ShapeObject:
    """One drawn object; `x`, `y` (centre) and `radius` are fractions of the picture side, y grows downwards."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    radius: float
    rgb: tuple[int, int, int]
    rotation: float


def relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where `a` is with respect to `b`, along the axis where they are further apart."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "left of" if dx < 0 else "right of"


def position(obj: ShapeObject) -> str:
    """Coarse position of an object in the picture (thirds of each axis), e.g. "on the left"."""
    row = "top" if obj.y < 1 / 3 else "bottom" if obj.y > 2 / 3 else "middle"
    col = "left" if obj.x < 1 / 3 else "right" if obj.x > 2 / 3 else "centre"
    return POSITION_WORDS[(row, col)]


# --------------------------------------------------------------------------------------------------- drawing


def _polygon(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    """Outline of `shape` centred on (cx, cy), fitting a circle of radius r, in pixels."""
    if shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.deg2rad([-90, 30, 150])]
        pts = [(x, y + 0.2) for x, y in pts]  # centre the bounding box vertically
    elif shape == "star":
        pts = [
            ((1.0 if k % 2 == 0 else 0.45) * math.cos(a), (1.0 if k % 2 == 0 else 0.45) * math.sin(a))
            for k, a in enumerate(np.deg2rad(np.arange(10) * 36 - 90))
        ]
    elif shape == "hexagon":
        pts = [(math.cos(a), math.sin(a)) for a in np.deg2rad(np.arange(6) * 60)]
    elif shape == "diamond":
        pts = [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]
    elif shape == "cross":
        w = 0.3
        pts = [(-w, -0.9), (w, -0.9), (w, -w), (0.9, -w), (0.9, w), (w, w), (w, 0.9), (-w, 0.9), (-w, w),
               (-0.9, w), (-0.9, -w), (-w, -w)]
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        hx = 16 * np.sin(t) ** 3
        hy = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        hy = hy - (hy.max() + hy.min()) / 2
        scale = 0.95 / max(np.abs(hx).max(), np.abs(hy).max())
        pts = list(zip(hx * scale, hy * scale))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    c, s = math.cos(rotation), math.sin(rotation)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str, str]:
    """A neutral (grey) background that never hides the saturated objects: array, kind, tone."""
    kind = str(rng.choice(list(BACKGROUND_WORDS)))
    tone = str(rng.choice(["dark", "light"]))
    lo, hi = (25, 85) if tone == "dark" else (165, 215)
    if kind == "plain":
        bg = np.full((size, size), rng.uniform(lo, hi))
    elif kind == "gradient":
        a, b = rng.uniform(lo, hi, size=2)
        ramp = np.linspace(0.0, 1.0, size)
        direction = rng.integers(3)
        grid = (ramp[None, :] if direction == 0 else ramp[:, None] if direction == 1
                else (ramp[None] + ramp[:, None]) / 2)
        bg = np.broadcast_to(a + (b - a) * grid, (size, size))
    else:
        bg = rng.uniform(lo + 10, hi - 10) + rng.normal(0.0, 8.0, size=(size, size))
    tint = rng.uniform(-6, 6, size=3)  # a slight colour cast, still far from any object colour
    rgb = np.clip(bg[..., None] + tint, 0, 255).round().astype(np.uint8)
    return rgb, kind, tone


def render(objects: list[ShapeObject], background: np.ndarray, image_size: int) -> Image.Image:
    """Draws the objects on the background with 4x supersampling, then downscales with a box filter."""
    factor = 4 if image_size <= 128 else 2
    big = Image.fromarray(background).resize((image_size * factor,) * 2, Image.NEAREST)
    draw = ImageDraw.Draw(big)
    side = image_size * factor
    for obj in objects:
        cx, cy, r = obj.x * side, obj.y * side, obj.radius * side
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=obj.rgb)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r, obj.rotation), fill=obj.rgb)
    return big.reduce(factor)


# --------------------------------------------------------------------------------------------------- sampling


def _sample_objects(rng: np.random.Generator, split: str) -> list[ShapeObject]:
    held_out = set(HELD_OUT_COMBINATIONS)
    seen = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held_out]
    n = int(rng.choice([1, 2, 3], p=NUM_OBJECTS_P))
    unseen_main = split == "test" and rng.random() < TEST_UNSEEN_FRACTION
    while True:
        pool = list(HELD_OUT_COMBINATIONS) if unseen_main else seen
        combos = [pool[rng.integers(len(pool))]]
        while len(combos) < n:  # the other objects are always seen combinations, all distinct
            combo = seen[rng.integers(len(seen))]
            if combo not in combos:
                combos.append(combo)
        objects = _place(rng, combos)
        if objects is not None:
            return objects
        n -= 1  # could not fit them: retry with one object fewer


def _place(rng: np.random.Generator, combos: list[tuple[str, str]]) -> list[ShapeObject] | None:
    """Places the objects without overlap, with unambiguous relations between the main object and the others."""
    layout = "single" if len(combos) == 1 else "multi"
    for _ in range(200):
        objects = []
        for k, (colour, shape) in enumerate(combos):
            size = str(rng.choice(SIZES)) if layout == "single" else ("large" if k == 0 else "small")
            radius = rng.uniform(*_RADIUS[(layout, size)])
            margin = radius + 0.02
            objects.append(ShapeObject(
                shape=shape, colour=colour, size=size,
                x=float(rng.uniform(margin, 1 - margin)), y=float(rng.uniform(margin, 1 - margin)),
                radius=float(radius), rgb=COLOUR_RGB[colour], rotation=float(np.deg2rad(rng.uniform(-10, 10))),
            ))
        if all(_apart(a, b) for i, a in enumerate(objects) for b in objects[i + 1:]) and all(
            _clear_relation(objects[0], b) for b in objects[1:]
        ):
            for obj in objects:  # a little colour jitter
                jitter = rng.integers(-12, 13, size=3)
                obj.rgb = tuple(int(min(255, max(0, v + j))) for v, j in zip(obj.rgb, jitter))
            return objects
    return None


def _apart(a: ShapeObject, b: ShapeObject) -> bool:
    return math.hypot(a.x - b.x, a.y - b.y) > a.radius + b.radius + 0.03


def _clear_relation(a: ShapeObject, b: ShapeObject) -> bool:
    dx, dy = abs(a.x - b.x), abs(a.y - b.y)
    return max(dx, dy) > 1.6 * min(dx, dy)


# --------------------------------------------------------------------------------------------------- captions


def _phrase(rng: np.random.Generator, obj: ShapeObject, with_size: bool = True) -> str:
    words = [str(rng.choice(SIZE_WORDS[obj.size]))] if with_size else []
    words += [obj.colour, str(rng.choice(SHAPE_WORDS[obj.shape]))]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def _list(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _one_attribute(rng: np.random.Generator, obj: ShapeObject) -> str:
    """The object by its size and either its colour ("a large red shape") or its shape ("a large triangle")."""
    size = str(rng.choice(SIZE_WORDS[obj.size]))
    noun = f"{obj.colour} {rng.choice(('shape', 'thing', 'object'))}" if rng.random() < 0.5 else str(
        rng.choice(SHAPE_WORDS[obj.shape]))
    return f"a {size} {noun}"


def _templates(objects: list[ShapeObject], bg_kind: str, bg_tone: str):
    """Caption templates for these objects; each is a function of a random generator."""
    main = objects[0]
    bg = lambda rng: f"on a {bg_tone} {rng.choice(BACKGROUND_WORDS[bg_kind])} background"  # noqa: E731
    if len(objects) == 1:
        return [
            lambda rng: _phrase(rng, main),
            lambda rng: f"{rng.choice(PICTURE_WORDS)} {_phrase(rng, main, with_size=False)} {position(main)}",
            lambda rng: f"{_phrase(rng, main)} {bg(rng)}",
            lambda rng: f"{_phrase(rng, main, with_size=False)} {position(main)}",
            lambda rng: f"{rng.choice(PICTURE_WORDS)} {_phrase(rng, main)} {position(main)} {bg(rng)}",
            lambda rng: _one_attribute(rng, main),
        ]
    others = objects[1:]
    rel = [relation(main, b) for b in others]

    def related(rng, with_bg=False):
        text = f"{_phrase(rng, main)} {rng.choice(RELATION_WORDS[rel[0]])} {_phrase(rng, others[0])}"
        if len(others) > 1:
            text += f" and {rng.choice(RELATION_WORDS[rel[1]])} {_phrase(rng, others[1])}"
        return text + (f" {bg(rng)}" if with_bg else "")

    return [
        related,
        lambda rng: f"{rng.choice(PICTURE_WORDS)} {related(rng)}",
        lambda rng: related(rng, with_bg=True),
        lambda rng: f"{COUNT_WORDS[len(objects)]} shapes: {_list([_phrase(rng, o) for o in objects])}",
        lambda rng: f"{rng.choice(PICTURE_WORDS)} {_list([_phrase(rng, o, with_size=False) for o in objects])}",
        # the main object alone, as people caption the salient object of a picture
        lambda rng: f"{_phrase(rng, main)} with {'a smaller shape' if len(others) == 1 else 'smaller shapes'}",
        lambda rng: f"{_one_attribute(rng, main)} with {'a smaller shape' if len(others) == 1 else 'smaller shapes'}",
        lambda rng: f"{rng.choice(PICTURE_WORDS)} {_phrase(rng, main, with_size=False)} {position(main)}",
    ]


def make_captions(rng: np.random.Generator, objects: list[ShapeObject], bg_kind: str, bg_tone: str, n: int = 3):
    """`n` captions from `n` different templates; the first names size, colour and shape of every object."""
    templates = _templates(objects, bg_kind, bg_tone)
    order = [0] + list(1 + rng.permutation(len(templates) - 1))
    return [templates[i](rng) for i in order[:n]]


# --------------------------------------------------------------------------------------------------- datasets


def _generate(split: str, num_samples: int, image_size: int, seed: int) -> dict[str, list]:
    columns: dict[str, list] = {k: [] for k in (
        "image", "text", "captions", "shape", "colour", "composition_seen", "num_objects", "objects", "background",
        "index")}
    held_out = set(HELD_OUT_COMBINATIONS)
    for i in range(num_samples):
        rng = np.random.default_rng([seed, _SPLIT_STREAM[split], i])
        objects = _sample_objects(rng, split)
        background, bg_kind, bg_tone = _background(rng, image_size)
        image = render(objects, background, image_size)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        captions = make_captions(rng, objects, bg_kind, bg_tone)
        columns["image"].append({"bytes": buffer.getvalue(), "path": None})
        columns["text"].append(captions[0])
        columns["captions"].append(captions)
        columns["shape"].append(SHAPES.index(objects[0].shape))
        columns["colour"].append(COLOURS.index(objects[0].colour))
        columns["composition_seen"].append(not any((o.colour, o.shape) in held_out for o in objects))
        columns["num_objects"].append(len(objects))
        columns["objects"].append(json.dumps([asdict(o) for o in objects]))
        columns["background"].append(f"{bg_tone} {bg_kind}")
        columns["index"].append(i)
    return columns


def _features():
    import datasets

    return datasets.Features({
        "image": datasets.Image(),
        "text": datasets.Value("string"),
        "captions": datasets.List(datasets.Value("string")),
        "shape": datasets.ClassLabel(names=list(SHAPES)),
        "colour": datasets.ClassLabel(names=list(COLOURS)),
        "composition_seen": datasets.Value("bool"),
        "num_objects": datasets.Value("int32"),
        "objects": datasets.Value("string"),  # JSON list of the drawn objects (`ShapeObject` fields)
        "background": datasets.Value("string"),
        "index": datasets.Value("int64"),
    })


def _fingerprint(split: str, num_samples: int, image_size: int, seed: int) -> str:
    key = json.dumps([GENERATOR_VERSION, split, num_samples, image_size, seed])
    return f"{split}-{num_samples}-{image_size}px-seed{seed}-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def make_shapes_dataset(split: str = "train", num_samples: int | None = None, image_size: int = 64, seed: int = 0,
                        *, use_cache: bool = True):
    """Generates (or loads from the cache) a split of lightclip-shapes as a `datasets.Dataset`.

    Args:
        split: "train" or "test". The test split has half of its main objects in `HELD_OUT_COMBINATIONS`.
        num_samples: number of pictures; default 4000 for train and 500 for test.
        image_size: side of the square pictures in pixels.
        seed: the same (split, num_samples, image_size, seed) always gives identical bytes. Train and test use
            different random streams for every seed.
        use_cache: read and write `<cache_root()>/shapes/<fingerprint>` (`save_to_disk` format).

    Columns: image (Image), text (the first caption), captions (3 captions from different templates), shape and
    colour (ClassLabel of the main object), composition_seen (False when any object is a held-out combination),
    num_objects, objects (JSON of what was drawn), background, index (0..n-1).
    """
    import datasets

    if split not in _SPLIT_STREAM:
        raise ValueError(f"lightclip-shapes has splits {sorted(_SPLIT_STREAM)}, not {split!r}")
    num_samples = DEFAULT_NUM_SAMPLES[split] if num_samples is None else int(num_samples)
    if num_samples < 0 or image_size < 16:
        raise ValueError("num_samples must be >= 0 and image_size >= 16")
    # Not `Dataset.from_generator`: its fingerprint names `_generate` without hashing its code (GENERATOR_VERSION does
    # that job here), and a cache whose Arrow file is corrupt fails to load instead of being regenerated.
    path = os.path.join(cache_root(), "shapes", _fingerprint(split, num_samples, image_size, seed))
    if use_cache and (dataset := load_cached(path, _features(), num_samples)) is not None:
        return dataset
    dataset = datasets.Dataset.from_dict(_generate(split, num_samples, image_size, seed), features=_features())
    if use_cache:
        save_atomically(dataset, path, {"generator_version": GENERATOR_VERSION, "num_rows": len(dataset)})
    return dataset


def shapes_zero_shot_tasks() -> dict[str, dict]:
    """Zero-shot classification tasks on lightclip-shapes: class names, prompt templates and the label column."""
    return {
        "shape": {
            "classnames": list(SHAPES),
            "templates": ["a photo of a {}.", "a {} shape.", "a drawing of a {}.", "a picture of a {}.",
                          "a coloured {}."],
            "label_column": "shape",
        },
        "colour": {
            "classnames": list(COLOURS),
            "templates": ["a photo of a {} shape.", "a {} object.", "a drawing of something {}.",
                          "a picture of a {} thing.", "something coloured {}."],
            "label_column": "colour",
        },
    }


def evaluate_shapes(
    model, processor, *, image_size: int | None = None, num_samples: int | None = None, batch_size: int = 64,
    dataset=None, progress: bool = False, train_dataset=None, final: bool = True,
) -> dict[str, float]:
    """The built-in benchmark on the synthetic shapes test split (`lightclip.shapes`).

    Images are encoded once and shared by the zero-shot tasks ("shape", "colour", each with its own templates) and
    retrieval. Keys: `shapes/<task>/acc1`, `shapes/<task>/acc5` (when the task has >= 5 classes),
    `shapes/<task>/mean_per_class_recall`, `shapes/<task>/acc1_seen`, `shapes/<task>/acc1_unseen` (compositions
    seen / held out in training), and
    `shapes/retrieval/{image,text}_retrieval_recall@{1,5,10}`, plus `shapes/num_images`, `shapes/num_images_seen`,
    `shapes/num_images_unseen` and `shapes/retrieval/num_texts`.

    Args:
        image_size: size the dataset is rendered at (`None`: the `make_shapes_dataset` default); the processor
            resizes to the model's input size anyway.
        num_samples: number of test images (`None`: the split's default size).
        dataset: an already rendered shapes split, to skip rendering (e.g. cached by a trainer); it may come from
            `lightclip.data.load_image_text_dataset("shapes", ...)` (undecoded images, streamed or not).
        train_dataset, final: taken as every built-in benchmark takes them; shapes fits no probe on the training
            split, so they change nothing.
    """
    from .evaluation import (
        as_map_dataset,
        encode_images,
        grouped_zero_shot,
        retrieval_from_image_embeds,
        zero_shot_classifier,
    )

    if dataset is None:
        kwargs = {} if image_size is None else {"image_size": image_size}
        dataset = make_shapes_dataset(split="test", num_samples=num_samples, **kwargs)
    dataset = as_map_dataset(dataset)
    image_embeds = encode_images(model, processor, dataset, batch_size=batch_size, progress=progress)
    groups = dataset["composition_seen"]

    results: dict[str, float] = {}
    for task, spec in shapes_zero_shot_tasks().items():
        classifier = zero_shot_classifier(model, processor, spec["classnames"], spec["templates"])
        task_results = grouped_zero_shot(image_embeds, classifier, dataset[spec["label_column"]], groups)
        for key, value in task_results.items():
            prefix = "shapes" if key.startswith("num_images") else f"shapes/{task}"
            results[f"{prefix}/{key}"] = value
    retrieval = retrieval_from_image_embeds(model, processor, image_embeds, dataset["captions"], (1, 5, 10))
    retrieval.pop("num_images")
    results.update({f"shapes/retrieval/{key}": value for key, value in retrieval.items()})
    return results


def is_shapes_source(name) -> bool:
    """Whether a data argument names this dataset."""
    return name in SOURCE_NAMES


# ----------------------------------------------------------------------------------------------- model cards

# the benchmark's metrics shown in a model card, in order
CARD_METRICS = (
    ("shapes/shape/acc1", "zero-shot shape top-1"),
    ("shapes/shape/acc5", "zero-shot shape top-5"),
    ("shapes/shape/acc1_seen", "zero-shot shape top-1, seen compositions"),
    ("shapes/shape/acc1_unseen", "zero-shot shape top-1, held-out compositions"),
    ("shapes/colour/acc1", "zero-shot colour top-1"),
    ("shapes/colour/acc5", "zero-shot colour top-5"),
    ("shapes/colour/acc1_unseen", "zero-shot colour top-1, held-out compositions"),
    ("shapes/retrieval/image_retrieval_recall@1", "text-to-image retrieval recall@1"),
    ("shapes/retrieval/image_retrieval_recall@5", "text-to-image retrieval recall@5"),
    ("shapes/retrieval/text_retrieval_recall@1", "image-to-text retrieval recall@1"),
    ("shapes/retrieval/text_retrieval_recall@5", "image-to-text retrieval recall@5"),
)
# the metrics that go into the model-index (zero-shot classification only; retrieval has no Hub task id)
# (the Hub groups metrics by task and dataset, so all share one task name)
MODEL_INDEX_METRICS = (
    ("shapes/shape/acc1", "zero-shot shape top-1 accuracy"),
    ("shapes/shape/acc1_unseen", "zero-shot shape top-1 accuracy, held-out compositions"),
    ("shapes/colour/acc1", "zero-shot colour top-1 accuracy"),
)
MODEL_INDEX_TASK = "Zero-shot image classification (lightclip-shapes: shape and colour)"
MODEL_INDEX_DATASET_NAME = "lightclip-shapes (synthetic)"


def describe_training_data(train: dict) -> str:
    """The card's "data" row for a run on this dataset, from its `train_config.json`."""
    size = train.get("shapes_train_size") or DEFAULT_NUM_SAMPLES["train"]
    return (f"lightclip-shapes (built-in synthetic generator): {size} training pictures rendered at "
            f"{train.get('shapes_image_size') or 64} px, 3 captions each")
# the card's pipeline example; the template has its own chance paragraph for shapes
CARD_EXAMPLE = ("shapes.png", ["a red circle", "a blue square", "a green triangle"])
CARD_CHANCE_NOTE = None
DEFAULT_LABEL_COLUMN = "shape"  # the main zero-shot task
NUM_IMAGES_KEY = "shapes/num_images"
BENCHMARK_TITLE = "Zero-shot classification and retrieval on the lightclip-shapes test split"
SYNTHETIC = True

# how every built-in benchmark is called (`lightclip.data.builtin_benchmark`)
evaluate_benchmark = evaluate_shapes
