"""Publishing lightclip checkpoints: model cards, upload to the Hugging Face Hub, and checks before upload.

- `write_model_card(folder, command=...)` fills `model_cards/lightclip_model_card.md` (a Jinja template, rendered by
  `huggingface_hub.ModelCard.from_template`) from the folder's `config.json`, `model.safetensors`, `train_config.json`
  and `eval_results.json`, and writes it as the folder's `README.md`. The YAML metadata is built with
  `ModelCardData` / `EvalResult`, never by hand.
- `push_folder(folder, repo_id)` validates the folder, then `HfApi.create_repo(..., exist_ok=True)` and
  `HfApi.upload_folder` with an allow-list of the model files (weights, configs, processor, card, copied code,
  results, curves); `dry_run=True` validates and lists what would be uploaded, uploading nothing.
- `validate_folder(folder)` is that check before upload: the files, the zero-shot pipeline on a synthetic picture, and
  `ModelCard.load` of the card (tests/test_checkpoints.py smoke-tests the shipped checkpoints themselves).

The token comes from the `token` argument, else `HF_TOKEN` or the stored login (`huggingface_hub.get_token()`); it is
passed to the client and never printed or logged.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from . import shapes
from .configuration_lightclip import LightClipConfig, LightClipVisionConfig
from .data import builtin_benchmark, results_benchmark
from .modeling_lightclip import PICKLE_SUFFIXES

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "lightclip_model_card.md"
# searched in order: an installed copy next to this module, then the repository's model_cards/ folder
TEMPLATE_DIRS = (Path(__file__).parent / "model_cards", Path(__file__).resolve().parents[2] / "model_cards")

LICENSE = "apache-2.0"
PIPELINE_TAG = "zero-shot-image-classification"
# library_name "transformers": the Hub's widget and "Use this model" snippets know transformers, and the folder loads
# with transformers alone through trust_remote_code; the `lightclip` tag finds every lightclip checkpoint.
LIBRARY_NAME = "transformers"
TAGS = ["lightclip", "clip", "zero-shot-image-classification", "vision", "synthetic-data", "custom_code"]

# top-level files that make up a model repository; sub-folders (training checkpoints, feature banks, logs) and
# anything pickled are never uploaded
UPLOAD_SUFFIXES = (".safetensors", ".json", ".py", ".md", ".txt", ".png", ".model")
NEVER_UPLOAD = ("train_log.jsonl",)
REQUIRED_FILES = ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
                  "tokenizer_config.json", "README.md")
# the inference code `trust_remote_code` users load; the package is its single source, copied in when a folder is
# packaged for upload (the shipped checkpoints in this repository keep only weights, JSON and the card)
REMOTE_CODE_FILES = ("configuration_lightclip.py", "modeling_lightclip.py", "modeling_lightclip_convnet.py",
                     "modeling_lightclip_outputs.py", "processing_lightclip.py", "presets.py")
# metadata every card must have; `datasets` and `model-index` are added when the data and results are known
CARD_KEYS = ("license", "library_name", "pipeline_tag", "tags")



# ------------------------------------------------------------------------------------------------------------------
# Reading a saved folder
# ------------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _read_eval_results(folder: Path) -> dict | None:
    """The folder's `eval_results.json` under the current metric names, so an older file makes the same card."""
    from .evaluation import load_results

    path = folder / "eval_results.json"
    return load_results(path) if path.is_file() else None


def human_size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    raise AssertionError


def weight_summary(folder: str | os.PathLike) -> dict:
    """Parameter counts per tower and the stored dtypes, read from the safetensors header (no tensor is loaded)."""
    from safetensors import safe_open

    counts = {"image": 0, "text": 0, "other": 0}
    dtypes: set[str] = set()
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            tensor_slice = f.get_slice(key)
            numel = 1
            for dim in tensor_slice.get_shape():
                numel *= dim
            dtypes.add(str(tensor_slice.get_dtype()))
            part = key.split(".", 1)[0]
            if part in ("vision_model", "visual_projection"):
                counts["image"] += numel
            elif part in ("text_model", "text_projection"):
                counts["text"] += numel
            else:
                counts["other"] += numel
    counts["total"] = counts["image"] + counts["text"] + counts["other"]
    return {"params": counts, "dtypes": sorted(dtypes)}


def add_remote_code(folder: str | os.PathLike) -> None:
    """Copy the package's inference files into `folder`, where `config.json`'s `auto_map` points for
    `trust_remote_code=True` (overwriting older copies, so an upload always carries the current code)."""
    import shutil

    for name in REMOTE_CODE_FILES:
        shutil.copyfile(Path(__file__).parent / name, Path(folder) / name)


def upload_files(folder: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(files to upload, files and folders left out): top-level model files only, by suffix; never pickles."""
    folder = Path(folder)
    keep, skip = [], []
    for path in sorted(folder.iterdir()):
        name = path.name
        ok = (path.is_file() and not name.startswith(".") and name.endswith(UPLOAD_SUFFIXES)
              and name not in NEVER_UPLOAD and not name.endswith(PICKLE_SUFFIXES))
        (keep if ok else skip).append(name + ("/" if path.is_dir() else ""))
    return keep, skip


# ------------------------------------------------------------------------------------------------------------------
# Model card
# ------------------------------------------------------------------------------------------------------------------


def find_template(template_path: str | os.PathLike | None = None) -> Path:
    if template_path is not None:
        return Path(template_path)
    for directory in TEMPLATE_DIRS:
        if (directory / TEMPLATE_NAME).is_file():
            return directory / TEMPLATE_NAME
    raise FileNotFoundError(f"model card template {TEMPLATE_NAME} not found in {[str(d) for d in TEMPLATE_DIRS]}")


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f} M ({n:,})" if n >= 1e5 else f"{n:,}"


def _objective_rows(config: dict) -> list[tuple[str, str]]:
    """One row per objective (its `card_row`), from the training-only settings of a `config.json` dict, under
    `pretraining_config`."""
    from .objectives import OBJECTIVE_CLASSES

    settings = LightClipConfig.from_dict(config).pretraining_config.settings_dict()
    rows = [OBJECTIVE_CLASSES[term].card_row(settings) for term in settings["objectives"]]
    rows.append(("training-only modules", "dropped at save: the checkpoint is a plain dual encoder"))
    return rows


def _training_rows(train: dict | None, eval_results: dict | None) -> list[tuple[str, str]]:
    if not train:
        return []
    data = train.get("train_data")
    if (benchmark := builtin_benchmark(data)) is not None:
        data = benchmark.describe_training_data(train)
    batch = train.get("per_device_train_batch_size")
    accumulation = train.get("gradient_accumulation_steps") or 1
    steps = (eval_results or {}).get("step") or train.get("max_train_steps")
    rows = [
        ("data", str(data)),
        ("steps", str(steps)),
        ("batch size", f"{batch} per device x {accumulation} accumulation"),
        ("images seen", f"{steps * batch * accumulation:,} (per device)" if steps and batch else "n/a"),
        ("optimiser", f"AdamW, lr {train.get('learning_rate')}, weight decay {train.get('weight_decay')}, cosine "
                      "schedule with warmup"),
        ("seed", str(train.get("seed"))),
        ("mixed precision", str(train.get("mixed_precision") or "no")),
    ]
    skipped = (eval_results or {}).get("skipped")
    if isinstance(skipped, dict):
        rows.append(("skipped samples", ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))
                     or "none"))
    return rows


def _eval_rows(eval_results: dict | None) -> list[tuple[str, str]]:
    """A built-in benchmark's main metrics when present, else every numeric entry (e.g. retrieval on other data)."""
    if not eval_results:
        return []
    benchmark = results_benchmark(eval_results)
    rows = [] if benchmark is None else [(label, f"{eval_results[key]:.4f}") for key, label in benchmark.CARD_METRICS
                                         if isinstance(eval_results.get(key), (int, float))]
    if rows:
        if benchmark.NUM_IMAGES_KEY in eval_results:
            rows.append(("test pictures", str(eval_results[benchmark.NUM_IMAGES_KEY])))
        return rows
    return [(key, f"{value:.4f}" if isinstance(value, float) else str(value))
            for key, value in sorted(eval_results.items())
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"]


def training_benchmark(train: dict | None, eval_results: dict | None):
    """The built-in benchmark a run trained on (from `train_config.json`), else the one its results hold."""
    if train is not None:
        return builtin_benchmark(train.get("train_data"))
    return results_benchmark(eval_results)


def trained_on_shapes(train: dict | None, eval_results: dict | None) -> bool:
    return training_benchmark(train, eval_results) is shapes


def model_card_data(folder: str | os.PathLike, model_name: str | None = None):
    """`huggingface_hub.ModelCardData` for a saved lightclip folder (metadata only)."""
    from huggingface_hub import EvalResult, ModelCardData

    folder = Path(folder)
    model_name = model_name or folder.resolve().name
    eval_results = _read_eval_results(folder) or {}
    train = _read_json(folder / "train_config.json")
    datasets = None
    benchmark = training_benchmark(train, eval_results)
    if benchmark is not None:
        datasets = [benchmark.DATASET_ID]
    elif train and isinstance(train.get("train_data"), str) and train["train_data"].count("/") == 1 \
            and not os.path.exists(train["train_data"]):
        datasets = [train["train_data"]]  # a Hub dataset id
    scored = results_benchmark(eval_results)
    results = [] if scored is None else [
        EvalResult(
            task_type=PIPELINE_TAG, task_name=scored.MODEL_INDEX_TASK, dataset_type=scored.DATASET_ID,
            dataset_name=scored.MODEL_INDEX_DATASET_NAME, dataset_split="test", metric_type="accuracy",
            metric_name=metric_name, metric_value=round(float(eval_results[key]), 4),
        )
        for key, metric_name in scored.MODEL_INDEX_METRICS
        if isinstance(eval_results.get(key), (int, float))
    ]
    tags = [t for t in TAGS if t != "synthetic-data" or (benchmark is not None and benchmark.SYNTHETIC)]
    return ModelCardData(
        language="en", license=LICENSE, library_name=LIBRARY_NAME, pipeline_tag=PIPELINE_TAG, tags=tags,
        datasets=datasets, model_name=model_name, eval_results=results or None,
    )


def _starting_point(train: dict) -> str:
    """What the training run started from, as `examples/pretrain.py` recorded it; reads after "trained"."""
    init = train.get("image_tower_init")
    if init == "imagenet":
        text = "from an image tower initialised with its released ImageNet-1k weights"
        if train.get("lock_image"):
            text += f" (locked except its last {train.get('lock_image_unlocked_groups', 0)} layer groups)"
        return text + " and a text tower from scratch"
    if init == "checkpoint":
        return f"from `{train.get('model')}`"
    return "from scratch"


def write_model_card(folder: str | os.PathLike, command: str | None = None, *, repo_id: str | None = None,
                     model_name: str | None = None, template_path: str | os.PathLike | None = None) -> Path:
    """Render the lightclip model card for a saved folder and write it as `<folder>/README.md`.

    Args:
        folder: a `save_pretrained` folder (model and processor) with `config.json`; `train_config.json` and
            `eval_results.json` are used when present. An `eval_results.json` holding a `"command"` key names the
            command that computed its numbers; otherwise they come from the end of the training run.
        command: the training command, shown in the card.
        repo_id: the Hub id used in the loading examples (default `<your-org>/<folder name>`).
    """
    from huggingface_hub import ModelCard

    folder = Path(folder)
    config = _read_json(folder / "config.json")
    if config is None:
        raise FileNotFoundError(f"{folder} has no config.json: save the model with save_pretrained first")
    train = _read_json(folder / "train_config.json")
    eval_results = _read_eval_results(folder)
    weights = weight_summary(folder)
    vision, text = config["vision_config"], config["text_config"]
    model_name = model_name or folder.resolve().name
    repo_id = repo_id or f"<your-org>/{model_name}"
    preset = (train or {}).get("model")

    if vision.get("backbone", "vit") == "vit":
        tower = (f"ViT, {vision['image_size']} px input, patch {vision['patch_size']}, width {vision['hidden_size']}, "
                 f"{vision['num_hidden_layers']} layers, {vision['num_attention_heads']} heads")
    elif vision["backbone"] == "convnet":
        widths = LightClipVisionConfig(**vision).convnet_widths()
        tower = (f"native CNN, {vision['image_size']} px input, {len(widths)} stages of widths "
                 f"{', '.join(map(str, widths))}")
    elif vision["backbone"] == "efficientnet-lite":
        lite = LightClipVisionConfig(**vision)
        kwargs, variant = lite.efficientnet_lite_kwargs(), lite.efficientnet_lite_variant()
        name = f"EfficientNet-{variant.capitalize()}" if variant else "EfficientNet-Lite"
        tower = (f"native {name}, {vision['image_size']} px input, width x{kwargs['width_multiplier']:g}, depth "
                 f"x{kwargs['depth_multiplier']:g}, 7 MBConv stages, {vision['hidden_size']}-d features")
    else:
        tower = f"{vision['backbone']} (transformers), {vision['image_size']} px input"
    details = [
        ("model type", "lightclip dual encoder (CLIP-style)"),
        ("starting point", _starting_point(train or {})),
        ("preset", f"`{preset}`" if preset else "n/a"),
        ("image tower", tower),
        ("text tower", f"{'causal ' if text.get('causal', True) else ''}transformer, width {text['hidden_size']}, "
                       f"{text['num_hidden_layers']} layers, {text['num_attention_heads']} heads, vocabulary "
                       f"{text['vocab_size']}, context {text['max_position_embeddings']} tokens"),
        ("embedding", f"{config['projection_dim']}-d, L2-normalised; learned logit scale"),
        ("weights on disk", f"{', '.join(weights['dtypes'])} safetensors, "
                            f"{human_size((folder / 'model.safetensors').stat().st_size)}"
                            + ("; loads as float32 (`dtype` in config.json)"
                               if "F32" not in weights["dtypes"] else "")),
        ("license", LICENSE),
    ]
    params = weights["params"]
    param_rows = [("image tower (incl. projection)", _fmt_count(params["image"])),
                  ("text tower (incl. projection)", _fmt_count(params["text"])),
                  ("logit scale", _fmt_count(params["other"])),
                  ("total", _fmt_count(params["total"]))]
    eval_command = (eval_results or {}).get("command")
    scored = results_benchmark(eval_results)
    benchmark = scored.BENCHMARK_TITLE if scored is not None else "Evaluation"
    if eval_command:
        eval_intro = f"{benchmark}, with these weights:"
    else:
        eval_intro = f"{benchmark}, at the end of training:"
        eval_command = command
    files = [(name, human_size((folder / name).stat().st_size)) for name in upload_files(folder)[0]
             if name != "README.md"]
    on_shapes = trained_on_shapes(train, eval_results)
    card_benchmark = training_benchmark(train, eval_results)

    card = ModelCard.from_template(
        model_card_data(folder, model_name),
        template_path=str(find_template(template_path)),
        model_name=model_name,
        summary=("A small CLIP-style image-text model trained with the lightclip package"
                 + (f", preset `{preset}`" if preset else "") + f": {_fmt_count(params['total'])} parameters."),
        details=details,
        param_rows=param_rows,
        training_rows=_training_rows(train, eval_results),
        objective_rows=_objective_rows(config),
        train_command=command,
        eval_intro=eval_intro,
        eval_rows=_eval_rows(eval_results),
        eval_command=eval_command,
        context_length=text["max_position_embeddings"],
        projection_dim=config["projection_dim"],
        repo_id=repo_id,
        files=files,
        shapes=on_shapes,
        example_image=(card_benchmark or shapes).CARD_EXAMPLE[0],
        example_labels=json.dumps((card_benchmark or shapes).CARD_EXAMPLE[1]),
        chance_note=card_benchmark.CARD_CHANCE_NOTE if card_benchmark is not None else None,
        train_data=(train or {}).get("train_data") or "data not recorded in this folder",
        starting_point=_starting_point(train or {}),
    )
    path = folder / "README.md"
    card.save(path)
    return path


# ------------------------------------------------------------------------------------------------------------------
# Validation and upload
# ------------------------------------------------------------------------------------------------------------------


def _synthetic_picture(size: int = 64):
    """A red disc on a white background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 30, 30))
    return image


def validate_folder(folder: str | os.PathLike) -> dict:
    """`push_folder`'s check before upload: what would be published loads as users load it, or `ValueError` lists
    every problem found and nothing is uploaded.

    Checks: the required files exist and no pickled weights are present; `pipeline("zero-shot-image-classification",
    model=folder)` loads it in float32 and classifies a synthetic picture with finite scores that sum to 1;
    `ModelCard.load` parses `README.md` and its metadata has the keys in `CARD_KEYS`. Returns a report dict (files,
    sizes, pipeline output, card metadata keys).
    """
    import torch
    from huggingface_hub import ModelCard
    from transformers import pipeline

    folder = Path(folder)
    problems = [f"missing {name}" for name in REQUIRED_FILES if not (folder / name).is_file()]
    pickled = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickled:
        problems.append(f"pickled files {pickled} (lightclip publishes safetensors only; remove them)")
    if problems:
        raise ValueError(f"{folder} is not ready to upload: " + "; ".join(problems))

    report: dict = {}
    classifier = pipeline(PIPELINE_TAG, model=str(folder))
    if classifier.model.dtype != torch.float32:
        problems.append(f"the pipeline loads it as {classifier.model.dtype}, expected torch.float32")
    labels = ["a red circle", "a blue square", "a green triangle"]
    scores = classifier(_synthetic_picture(), candidate_labels=labels)
    total = sum(s["score"] for s in scores)
    if len(scores) != len(labels) or not abs(total - 1.0) <= 1e-4:  # NaN scores (non-finite weights) fail too
        problems.append(f"pipeline returned {scores}")
    report["pipeline"] = scores

    card = ModelCard.load(folder / "README.md")
    metadata = card.data.to_dict()
    missing = [key for key in CARD_KEYS if not metadata.get(key)]
    if missing:
        problems.append(f"model card metadata lacks {missing}")
    report["card_keys"] = sorted(metadata)
    if problems:
        raise ValueError(f"{folder} is not ready to upload: " + "; ".join(problems))

    files, skipped = upload_files(folder)
    report["files"] = [(name, (folder / name).stat().st_size) for name in files]
    report["skipped"] = skipped
    report["total_bytes"] = sum(size for _, size in report["files"])
    return report


def resolve_token(token: str | None = None) -> str | None:
    """The explicit token, else `HF_TOKEN` / the stored login (huggingface_hub's own lookup)."""
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def push_folder(folder: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None,
                dry_run: bool = False, api=None, commit_message: str | None = None) -> dict:
    """Validate a saved lightclip folder and upload its model files to a Hub model repository.

    `HfApi().create_repo(repo_id, private=private, exist_ok=True, repo_type="model")`, then `HfApi.upload_folder`
    with the files of `upload_files(folder)` as `allow_patterns` (no sub-folders, logs or pickles). With
    `dry_run=True` it validates and prints what would be uploaded, and contacts nobody. `api` replaces the
    `HfApi` client (tests pass a fake). Returns the validation report, plus `repo_url` / `commit_url` after an upload.
    """
    folder = Path(folder)
    add_remote_code(folder)
    report = validate_folder(folder)
    verb = "would upload" if dry_run else "uploading"
    print(f"{folder}: valid. {verb} {len(report['files'])} files ({human_size(report['total_bytes'])}) "
          f"to {repo_id}{' (private)' if private else ''}:")
    for name, size in report["files"]:
        print(f"  {name:40s} {human_size(size):>10s}")
    if report["skipped"]:
        print(f"  left out: {', '.join(report['skipped'])}")
    if dry_run:
        return report

    token = resolve_token(token)
    if token is None:
        raise RuntimeError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type="model", token=token,
            allow_patterns=[name for name, _ in report["files"]],
            commit_message=commit_message or f"Upload {folder.resolve().name} with lightclip",
        )
    except Exception as error:  # offline mode, DNS, refused or timed-out connections, HTTP errors
        if not isinstance(error, OSError) and not type(error).__module__.startswith(("httpx", "requests", "urllib3")):
            raise
        raise RuntimeError(
            f"could not push {folder} to the Hub repository {repo_id}: {type(error).__name__}: {error}. Check the "
            "network connection, that HF_HUB_OFFLINE is not set, and that the token may write to that repository; "
            "the folder is unchanged, so run the push again."
        ) from error
    report["repo_url"] = str(repo_url)
    report["commit_url"] = getattr(commit, "commit_url", None)
    print(f"uploaded to {report['repo_url']}" + (f" ({report['commit_url']})" if report["commit_url"] else ""))
    return report


__all__ = ["add_remote_code", "model_card_data", "push_folder", "upload_files", "validate_folder", "weight_summary",
           "write_model_card"]
