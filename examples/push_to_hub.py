#!/usr/bin/env python
"""Upload a saved lightclip model folder to the Hugging Face Hub, after checking that it loads.

    python examples/push_to_hub.py --folder checkpoints/lightclip-xxs-lite0-shapes \
        --repo_id your-org/lightclip-xxs-lite0-shapes
    python examples/push_to_hub.py --folder checkpoints/lightclip-xxs-lite0-shapes --repo_id your-org/x --dry_run

The folder is validated first (its files, the zero-shot pipeline on a synthetic picture, the model card's
metadata); --dry_run stops there and prints the files that would be uploaded. The token comes from
HF_TOKEN or `hf auth login`; it is never printed. See lightclip.hub.push_folder.
"""

from __future__ import annotations

import argparse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, help="a save_pretrained folder with a model card (README.md)")
    parser.add_argument("--repo_id", required=True,
                        help="target model repository, e.g. your-org/lightclip-xxs-lite0-shapes")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry_run", action="store_true", help="validate and list the files; upload nothing")
    parser.add_argument("--commit_message", default=None)
    parser.add_argument("--write_card", action="store_true",
                        help="(re)write README.md from the folder's configs and results before validating")
    return parser.parse_args(argv)


def main(argv=None, api=None) -> dict:
    args = parse_args(argv)
    import lightclip  # noqa: F401  (registers the model type for the validation's pipeline)
    from lightclip.hub import push_folder, write_model_card

    if args.write_card:
        write_model_card(args.folder, repo_id=args.repo_id)
    return push_folder(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run, api=api,
                       commit_message=args.commit_message)


if __name__ == "__main__":
    main()
