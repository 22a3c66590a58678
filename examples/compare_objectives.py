"""Train the same model on the built-in shapes data under the same step budget and seed with each objective set,
then print the README results table (zero-shot top-1 on seen / unseen compositions, retrieval R@1).

    python examples/compare_objectives.py --seed 0 --output_dir runs/compare-seed0        # every set, default run
    python examples/compare_objectives.py --sets clip clip-ping --model lightclip-xxs-lite0 --max_train_steps 500

Every run is `accelerate launch examples/pretrain.py ...`; the CLIP-PING runs share one feature bank built with the
default teachers (MiniLM text encoder; EfficientNet-Lite0 ImageNet-1k image encoder, or the non-learned colour-HOG
descriptor without `lightclip[teachers]`). Extra arguments go to every run.
"""

import argparse
import subprocess
import sys
from pathlib import Path

from lightclip.evaluation import load_results

ROOT = Path(__file__).resolve().parents[1]
SETS = ["clip", "soft", "siglip", "token", "mlm", "lightclip", "clip-ping", "all"]
COLUMNS = [
    ("shape top-1 seen", "shapes/shape/acc1_seen"), ("shape top-1 unseen", "shapes/shape/acc1_unseen"),
    ("colour top-1 seen", "shapes/colour/acc1_seen"), ("colour top-1 unseen", "shapes/colour/acc1_unseen"),
    ("I→T R@1", "shapes/retrieval/text_retrieval_recall@1"), ("T→I R@1", "shapes/retrieval/image_retrieval_recall@1"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/compare")
    parser.add_argument("--sets", nargs="+", default=SETS)
    parser.add_argument("--max_train_steps", type=int, default=None, help="default: pretrain.py's")
    parser.add_argument("--seed", type=int, default=0)
    args, extra = parser.parse_known_args()
    out = Path(args.output_dir)
    rows = []
    for name in args.sets:
        run_dir = out / name
        if not (run_dir / "eval_results.json").exists():
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "examples" / "pretrain.py"),
                   "--objectives", name, "--output_dir", str(run_dir), "--seed", str(args.seed),
                   "--neighbors", str(out / "neighbors"), *extra]
            if args.max_train_steps is not None:
                cmd += ["--max_train_steps", str(args.max_train_steps)]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        results = load_results(run_dir / "eval_results.json")  # an older run's top1 keys read as acc1
        rows.append((name, results))
    header = "| objectives | " + " | ".join(c for c, _ in COLUMNS) + " |"
    print("\n" + header + "\n|" + "---|" * (len(COLUMNS) + 1))
    for name, results in rows:
        print(f"| `{name}` | " + " | ".join(f"{100 * results[k]:.1f}" for _, k in COLUMNS) + " |")


if __name__ == "__main__":
    main()
