#!/usr/bin/env python
"""Train and package the tiny checkpoints shipped in `checkpoints/`: the exact commands, and how they were packaged.

    python utils/train_checkpoints.py                                  # both, one after the other
    python utils/train_checkpoints.py --only lightclip-xxs-lite0-shapes             # one
    python utils/train_checkpoints.py --only lightclip-xxs-lite0-shapes --package_only   # re-package an existing run

Each checkpoint is trained by `examples/pretrain.py` (on the data its command names) into `runs/checkpoints/<name>`
(ignored by git), then `package_checkpoint` (below) copies the model files into `checkpoints/<name>` (weights,
config, processor, copied code, train_config.json, training_curves.png), re-evaluates the packaged weights on the
test split of their benchmark into `eval_results.json`, and writes the model card (`README.md`).

Choices (see docs/checkpoints.md):

- `lightclip-xxs-lite0-shapes`: preset `lightclip-xxs-lite0` (EfficientNet-Lite0 at 64 px started from its ImageNet
  weights, with the xxs text tower) at the default budget (500 steps of batch 64, seed 0), trained with `clip` and
  feature distillation (`fd`) from a teacher trained first: preset `lightclip-efficientnet-lite0` at 64 px (the same
  image tower with a 6-layer text tower and 256-d embeddings), `clip`, 1000 steps, whose embeddings
  `examples/precompute_teacher.py` stores once. The teacher is a training aid and is not shipped. Stored in float16
  (7.7 MB; loads as float32).
- `lightclip-lite0-clipart`: the training default `lightclip-lite0-56px` trained on the Open Clip Art Library
  (`apt-get install -y openclipart-png openclipart-svg`) with the recipe recommended for real data, `clip-ping`
  (docs/results.md), at the budget of that comparison (300 steps of batch 64, seed 0); the feature bank is built
  by the default teachers on first use. Stored in float16.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from lightclip.hub import REMOTE_CODE_FILES, upload_files, write_model_card

ROOT = Path(__file__).resolve().parents[1]

CHECKPOINTS: dict[str, dict] = {
    "lightclip-xxs-lite0-shapes": {
        # the teacher, then its stored embeddings; each a command run before the checkpoint's own training
        "before": [
            ["python", "examples/pretrain.py", "--model", "lightclip-efficientnet-lite0", "--image_size", "64",
             "--objectives", "clip", "--max_train_steps", "1000", "--learning_rate", "2e-3", "--cpu_threads", "1",
             "--output_dir", "runs/checkpoints/teacher-lite0-64px", "--overwrite_output_dir"],
            ["python", "examples/precompute_teacher.py", "--distill_model", "runs/checkpoints/teacher-lite0-64px",
             "--model", "lightclip-xxs-lite0", "--output_dir", "runs/checkpoints/teacher-lite0-64px-embeddings",
             "--overwrite"],
        ],
        "args": ["--model", "lightclip-xxs-lite0", "--objectives", "clip,fd",
                 "--distill_embeddings", "runs/checkpoints/teacher-lite0-64px-embeddings",
                 "--learning_rate", "2e-3", "--seed", "0", "--cpu_threads", "1"],
        "dtype": "float16",
    },
    "lightclip-lite0-clipart": {
        "args": ["--train_data", "openclipart", "--max_train_steps", "300", "--objectives", "clip-ping",
                 "--neighbors", "runs/checkpoints/openclipart-bank", "--learning_rate", "2e-3", "--seed", "0"],
        "dtype": "float16",
    },
}


def train_command(name: str) -> list[str]:
    return ["python", "examples/pretrain.py", *CHECKPOINTS[name]["args"],
            "--output_dir", f"runs/checkpoints/{name}", "--overwrite_output_dir"]


def command_text(name: str) -> str:
    """The training and packaging commands as shown in the model card and docs."""
    before = "".join(f"{shlex.join(command)}\n" for command in CHECKPOINTS[name].get("before", []))
    return (f"{before}{shlex.join(train_command(name))}\n"
            f"python utils/train_checkpoints.py --only {name} --package_only  # copy, {CHECKPOINTS[name]['dtype']}, "
            "evaluate, card")


def package_checkpoint(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32",
                       train_command: str | None = None, evaluate: bool = True,
                       eval_command: str | None = None) -> Path:
    """Copy a training run's model files into a clean folder to publish, optionally storing the weights in float16.

    Only the files `upload_files` selects are copied (no training checkpoints, logs or feature banks). With
    `dtype="float16"` every floating tensor of `model.safetensors` is stored in half precision (half the size);
    `config.json` keeps `dtype: float32`, so `from_pretrained` and the pipeline (`dtype="auto"`) upcast on load and
    the model computes in float32 as it was trained. With `evaluate=True` the packaged weights are evaluated on the
    built-in benchmark of the run's training data (shapes, openclipart) and `eval_results.json` is rewritten with the
    numbers and `eval_command`.
    Finally the model card is written.
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{run_dir} has no model.safetensors")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for name in upload_files(run_dir)[0]:
        if name != "README.md" and name not in REMOTE_CODE_FILES:  # push_folder adds the current code
            shutil.copyfile(run_dir / name, out_dir / name)
    train_config = out_dir / "train_config.json"
    if train_config.is_file():  # the paths of the machine it ran on, as the repository's relative paths
        text = train_config.read_text().replace(f"{ROOT}/", "")
        train_config.write_text(text)
    if dtype == "float16":
        from safetensors.torch import load_file, save_file

        tensors = load_file(run_dir / "model.safetensors")
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    if evaluate:
        import json

        from lightclip import LightClipModel, LightClipProcessor
        from lightclip.data import builtin_benchmark
        from lightclip.evaluation import load_results, save_results

        data = json.loads((run_dir / "train_config.json").read_text()).get("train_data", "shapes")
        model = LightClipModel.from_pretrained(out_dir).eval()
        processor = LightClipProcessor.from_pretrained(out_dir)
        results = builtin_benchmark(data).evaluate_benchmark(model, processor)
        previous = load_results(run_dir / "eval_results.json") if (run_dir / "eval_results.json").is_file() else {}
        results["step"] = previous.get("step")
        results["command"] = eval_command or f"python examples/run_evaluation.py --model {out_dir} --data {data}"
        save_results(results, out_dir / "eval_results.json")
    write_model_card(out_dir, command=train_command)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(CHECKPOINTS), action="append", help="checkpoint(s) to build")
    parser.add_argument("--package_only", action="store_true", help="skip training; package runs/checkpoints/<name>")
    parser.add_argument("--print_commands", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    names = args.only or list(CHECKPOINTS)
    if args.print_commands:
        for name in names:
            print(f"# {name}\n{command_text(name)}")
        return
    os.chdir(ROOT)
    for name in names:
        if not args.package_only:
            for command in [*CHECKPOINTS[name].get("before", []), train_command(name)]:
                command = [sys.executable, *command[1:]]
                print("+", shlex.join(command), flush=True)
                subprocess.run(command, check=True)
        out = package_checkpoint(f"runs/checkpoints/{name}", f"checkpoints/{name}", dtype=CHECKPOINTS[name]["dtype"],
                                 train_command=command_text(name))
        sizes = {p.name: p.stat().st_size for p in out.iterdir()}
        print(f"{out}: {sum(sizes.values()) / 1e6:.1f} MB in {len(sizes)} files "
              f"(model.safetensors {sizes['model.safetensors'] / 1e6:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
