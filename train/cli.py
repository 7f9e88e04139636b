"""`vidtune` command line: train | infer | chat | predict | demo | tiny-model.

Bad input (a recipe typo, a missing video, a malformed row) ends in one line saying what and where, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from vidtune.data.conversation import DataError


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a recipe (resumes when the output folder holds a checkpoint)")
    p.add_argument("recipe", help="recipe YAML file, or a packaged recipe name such as demo/base")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.learning_rate=1e-4")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and trainable audit; no training")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a trained output folder (adapter or full model), or a checkpoint id/path")
    p.add_argument("--base", help="base model for an adapter (default: the one it was trained on)")
    p.add_argument("--num-frames", type=int, help="frames per video (default: as in training)")
    p.add_argument("--fps", type=float, help="sample at this rate instead, capped at --num-frames")
    p.add_argument("--max-new-tokens", type=int, default=128)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidtune", description="Fine-tune video-language models (LLaVA-NeXT-Video).")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    p = sub.add_parser("infer", help="answer one prompt about a video")
    _add_model_args(p)
    p.add_argument("--video", required=True)
    p.add_argument("--prompt", required=True)
    p = sub.add_parser("chat", help="talk about a video in the terminal (/video PATH, /reset, /quit)")
    _add_model_args(p)
    p.add_argument("--video", required=True)
    p = sub.add_parser("predict", help="answer every row of a corpus file; writes JSONL predictions")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="corpus file (any supported format)")
    p.add_argument("--media-root", help="folder relative media paths resolve against (default: the file's folder)")
    p.add_argument("--format", default="auto")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--batch-size", type=int, default=8)
    p = sub.add_parser("eval", help="score a model's answers on a corpus (qa, multiple_choice, caption, recognition)")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="corpus file (any supported format)")
    p.add_argument("--task", required=True, choices=["qa", "multiple_choice", "caption", "recognition"])
    p.add_argument("--media-root", help="folder relative media paths resolve against (default: the file's folder)")
    p.add_argument("--format", default="auto")
    p.add_argument("--classes", help="recognition: class descriptions separated by ';' (default: the labels)")
    p.add_argument("--prompt", default="", help="recognition: the question, '{classes}' = the class list")
    p.add_argument("--mc-scoring", default="generate", choices=["generate", "loglik"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="eval", help="folder for metrics.json, predictions.jsonl, confusion.png")
    p = sub.add_parser("check", help="preflight a recipe's data: unreadable files, token lengths, length drops")
    p.add_argument("recipe", help="recipe YAML file, or a packaged recipe name")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--out", default="vidtune_check.json", help="JSON report path")
    p.add_argument("--decode", action="store_true", help="also decode the frames training would sample (slower)")
    p = sub.add_parser("cache", help="decode a recipe's clips into its frame cache (data.frame_cache.dir) ahead")
    p.add_argument("recipe", help="recipe YAML file, or a packaged recipe name")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p = sub.add_parser("export", help="write a run as a Hub-ready folder (model card included), optionally push it")
    p.add_argument("run_dir", help="a finished training output folder")
    p.add_argument("--to", help="export folder (default: RUN_DIR/export)")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the base weights (plain model)")
    p.add_argument("--push", metavar="REPO_ID", help="upload to this Hub repo (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to push to (created when missing)")
    p.add_argument("--message", help="commit message")
    p.add_argument("--dry-run", action="store_true", help="write the folder and list what would be uploaded; no push")
    p = sub.add_parser("demo", help="generate videos, build a tiny model, train base -> instruct -> chat on CPU")
    p.add_argument("--workdir", default="vidtune-demo", help="where the corpus, model and runs go")
    p = sub.add_parser("tiny-model", help="write a tiny random LLaVA-NeXT-Video folder (for trying things out)")
    p.add_argument("out")
    return parser


def run_train(args: argparse.Namespace) -> None:
    from vidtune.train.config import load_recipe, recipe_to_yaml, resolve_recipe_path

    recipe = load_recipe(resolve_recipe_path(args.recipe), args.overrides)
    if args.dry_run:
        from vidtune.train.model import apply_finetuning, build_on_meta, check_audit, format_audit, trainable_audit

        print(recipe_to_yaml(recipe))
        model, family = build_on_meta(recipe.model)
        if recipe.model.adapter:
            print(f"(adapter {recipe.model.adapter} is loaded at training time; audit shows a fresh adapter)")
            recipe.model.adapter = None
        model = apply_finetuning(model, family, recipe.finetune)
        audit = trainable_audit(model, family)
        print(format_audit(audit))
        check_audit(audit, recipe.finetune)
        return
    from vidtune.train.loop import train

    output = train(recipe)
    if os.environ.get("RANK", "0") == "0":  # once per run, not once per process
        print(f"done: {output}")


def run_eval(args: argparse.Namespace) -> None:
    from vidtune.data.sources import SourceConfig
    from vidtune.train.config import EvalConfig
    from vidtune.train.evaluate import evaluate_items, load_items, write_outputs

    classes = [c.strip() for c in args.classes.split(";") if c.strip()] if args.classes else []
    cfg = EvalConfig(
        task=args.task,
        max_new_tokens=args.max_new_tokens,
        mc_scoring=args.mc_scoring,
        classes=classes,
        prompt=args.prompt,
    )
    items = load_items([SourceConfig(path=args.data, format=args.format, media_root=args.media_root)], cfg)
    metrics, records = evaluate_items(_load(args), items, cfg, args.batch_size)
    folder = write_outputs(args.out, metrics, records)
    shown = {k: v for k, v in metrics.items() if not isinstance(v, list)}
    print(json.dumps(shown, indent=2))
    print(
        f"wrote {folder}/metrics.json and predictions.jsonl"
        + (" and confusion.png" if classes or args.task == "recognition" else "")
    )


def run_export(args: argparse.Namespace) -> None:
    import dataclasses
    from pathlib import Path

    from vidtune.train.config import load_recipe
    from vidtune.train.export import export_folder, hub_token, push

    saved = Path(args.run_dir) / "recipe.yaml"
    card = dataclasses.asdict(load_recipe(saved).hub) if saved.is_file() else {}
    card["repo_id"] = args.push or card.get("repo_id")
    if args.push and not args.dry_run:
        hub_token()  # before the (possibly long) merge
    result = export_folder(args.run_dir, args.to, merge=args.merge, card=card)
    print(f"exported {result.folder}:")
    for name in result.files:
        print(f"  {name}  ({(result.folder / name).stat().st_size:,} bytes)")
    if args.push and args.dry_run:
        print(f"dry run: these {len(result.files)} files would be uploaded to {args.push}; nothing was uploaded")
    elif args.push:
        url = push(result, args.push, private=args.private, revision=args.revision, commit_message=args.message)
        print(f"pushed: {url}")


def _load(args: argparse.Namespace):
    from vidtune.train.infer import load_for_inference

    return load_for_inference(args.model, base=args.base, num_frames=args.num_frames, fps=args.fps)


def run_command(args: argparse.Namespace) -> None:
    if args.command == "train":
        run_train(args)
    elif args.command == "infer":
        from vidtune.train.infer import answer

        print(answer(_load(args), args.video, args.prompt, args.max_new_tokens))
    elif args.command == "chat":
        from vidtune.train.infer import chat

        chat(_load(args), args.video, max_new_tokens=args.max_new_tokens)
    elif args.command == "predict":
        from vidtune.data.sources import SourceConfig
        from vidtune.train.infer import predict

        source = SourceConfig(path=args.data, format=args.format, media_root=args.media_root)
        count = predict(_load(args), source, args.out, args.batch_size, args.max_new_tokens)
        print(f"wrote {count} predictions to {args.out}")
    elif args.command == "eval":
        run_eval(args)
    elif args.command == "check":
        from vidtune.train.check import run_check
        from vidtune.train.config import load_recipe, resolve_recipe_path

        path = resolve_recipe_path(args.recipe)
        _, ok = run_check(load_recipe(path, args.overrides), str(path), args.out, args.decode)
        if not ok:
            sys.exit(1)
    elif args.command == "cache":
        from vidtune.train.config import load_recipe, resolve_recipe_path
        from vidtune.train.fill_cache import fill_cache

        result = fill_cache(load_recipe(resolve_recipe_path(args.recipe), args.overrides), args.workers)
        print(
            f"cached {result['clips']} clips in {result['seconds']:.1f}s into {result['dir']} "
            f"({result['cache_bytes'] / 1e6:.1f} MB)"
        )
        for failure in result["failed"]:
            print(f"  failed: {failure}")
    elif args.command == "export":
        run_export(args)
    elif args.command == "demo":
        from vidtune.train.demo import run_demo

        run_demo(args.workdir)
    elif args.command == "tiny-model":
        from vidtune.train.tiny_model import build_tiny_model

        print(build_tiny_model(args.out))


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from vidtune.train.config import RecipeError
    from vidtune.train.guards import TrainingError, TrainingStopped

    try:
        run_command(args)
    except (DataError, RecipeError) as err:
        print(f"vidtune {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as stop:  # preemption: saved, resumable; exit like a process killed by that signal
        print(f"vidtune {args.command}: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except TrainingError as err:
        print(f"vidtune {args.command}: error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
