"""`vidtune` command line: one table of subcommands (`COMMANDS`), each an argument builder and a runner that calls
into the package doing the job (training/, generation/, evaluation/, publishing/, datatools/, demo/).

Bad input (a recipe typo, a missing video, a malformed row) ends in one line saying what and where, exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from vidtune.data.conversation import DataError
from vidtune.train.quiet import quiet_libraries, verbose_requested

MAX_NEW_TOKENS = 128


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file, or a packaged recipe name such as demo/base")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.learning_rate=1e-4")
    p.add_argument(
        "--dry-run", action="store_true", help="print the resolved recipe, trainable audit and memory plan; no training"
    )
    p.add_argument("--num-processes", type=int, default=1, help="--dry-run: GPUs the memory plan shares states over")
    p.add_argument(
        "--zero-stage", type=int, default=0, choices=(0, 1, 2, 3), help="--dry-run: DeepSpeed ZeRO stage to plan for"
    )
    p.add_argument("--fsdp", action="store_true", help="--dry-run: plan for FSDP2 (launch/accelerate/fsdp2.yaml)")
    p.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        help="--dry-run: a GPU's memory, e.g. 24GB: say whether the plan fits and which changes would make it fit",
    )


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a trained output folder (adapter or full model), or a checkpoint id/path")
    p.add_argument("--base", help="base model for an adapter (default: the one it was trained on)")
    p.add_argument("--num-frames", type=int, help="frames per video (default: as in training)")
    p.add_argument("--fps", type=float, help="sample at this rate instead, capped at --num-frames")
    p.add_argument("--max-new-tokens", type=int, help=f"default {MAX_NEW_TOKENS}; benchmarks: their own (16)")


def _add_infer(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--video", help="the video file to ask about")
    p.add_argument(
        "--audio", help="a sound file to ask about (WAV, FLAC, MP3; models that hear), alone or with --video"
    )
    p.add_argument("--prompt", required=True, help="the question or instruction, e.g. 'Describe this video.'")


def _add_chat(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--video", required=True, help="the video file to talk about (/video PATH switches)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy, as infer; > 0: sampled")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when --temperature > 0")
    p.add_argument("--no-stream", action="store_true", help="print each reply whole instead of as it is generated")


def _add_serve(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: a free one, printed)")
    p.add_argument("--media-root", help="folder whose videos and images requests may name by path (default: none)")
    p.add_argument("--allow-urls", action="store_true", help="let requests name http(s) media URLs (fetched here)")
    p.add_argument("--max-body-mb", type=float, default=64, help="largest request body in MiB (413 above; default 64)")
    p.add_argument("--max-batch-size", type=int, default=8, help="queued requests generated together (default 8)")
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests in progress at once; 429 (retry) beyond (default 64)"
    )
    p.add_argument(
        "--decode-timeout-s", type=float, default=120.0, help="a request's media decode is stopped after (default 120)"
    )
    p.add_argument("--served-model-name", help="the model id /v1/models lists (default: the folder's name)")
    p.add_argument(
        "--log-requests", choices=("on", "off"), default="on", help="one line per request on stdout (default on)"
    )


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="corpus file (any supported format)")
    p.add_argument("--media-root", help="folder relative media paths resolve against (default: the file's folder)")
    p.add_argument(
        "--format",
        default="auto",
        help="corpus format: auto (told from the columns), llava, openai, caption, qa or multiple_choice",
    )
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")


def _add_predict(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    _add_corpus_args(p)
    p.add_argument("--out", required=True, help="output JSONL")


def _add_eval(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    _add_corpus_args(p)
    p.add_argument(
        "--task", choices=["qa", "multiple_choice", "caption", "recognition"], help="score your own corpus as this task"
    )
    p.add_argument(
        "--benchmark",
        choices=["mvbench", "videomme", "nextqa"],
        help="score a benchmark its own way (prompt, answer parsing, frames; accuracy by task/category); --data is "
        "its annotation file or folder, --media-root its videos",
    )
    p.add_argument("--media-template", help="benchmark video file from row columns (default: the benchmark's own)")
    p.add_argument("--classes", help="recognition: class descriptions separated by ';' (default: the labels)")
    p.add_argument("--prompt", default="", help="recognition: the question, '{classes}' = the class list")
    p.add_argument(
        "--mc-scoring",
        default="generate",
        choices=["generate", "loglik"],
        help="multiple choice: parse the generated letter (default), or pick the option of highest log-likelihood",
    )
    p.add_argument("--out", default="eval", help="folder for metrics.json, predictions.jsonl, confusion.png")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file, or a packaged recipe name")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def _add_check(p: argparse.ArgumentParser) -> None:
    _add_recipe_args(p)
    p.add_argument("--out", default="vidtune_check.json", help="JSON report path")
    p.add_argument("--decode", action="store_true", help="also decode the frames training would sample (slower)")
    p.add_argument(
        "--gpu-tokens",
        type=int,
        help="the most tokens of one sample a GPU trains (--dry-run): count the samples that need sequence parallelism",
    )


def _add_frames(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", help="a video file")
    p.add_argument("--num-frames", type=int, default=8, help="uniform sampling: this many frames (default 8)")
    p.add_argument("--fps", type=float, help="sample at this rate instead, capped at --num-frames")
    p.add_argument("--start", type=float, help="clip start, seconds")
    p.add_argument("--end", type=float, help="clip end, seconds")
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torchcodec", "decord", "pyav"],
        help="decoder (auto: TorchCodec, then decord, then PyAV, moving on when one cannot read the file right)",
    )
    p.add_argument("--shortest-edge", type=int, help="scale frames down so their shorter side is this many px")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="write the frames (frame_00.png, ...) and a contact sheet (sheet.png) here")
    p.add_argument(
        "--audio",
        action="store_true",
        help="also decode the sound of the sampled span (16 kHz mono, as a family that hears gets it); with --out, "
        "write it as audio.wav",
    )


def _add_show(p: argparse.ArgumentParser) -> None:
    _add_recipe_args(p)
    p.add_argument("--rows", type=int, default=8, help="how many rows of the training data (default 8)")
    p.add_argument("--out", default="vidtune_show", help="folder for index.html")


def _add_cache(p: argparse.ArgumentParser) -> None:
    _add_recipe_args(p)
    p.add_argument("--workers", type=int, default=2, help="decoding processes")


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished training output folder")
    p.add_argument("--to", help="export folder (default: RUN_DIR/export)")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the base weights (plain model)")
    p.add_argument("--push", metavar="REPO_ID", help="upload to this Hub repo (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to push to (created when missing)")
    p.add_argument("--message", help="commit message")
    p.add_argument("--dry-run", action="store_true", help="write the folder and list what would be uploaded; no push")
    p.add_argument(
        "--base-id",
        metavar="ORG/NAME",
        help="the Hub model a local base folder is a copy of: the card links it and the export loads it from the Hub",
    )


# The families with a tiny model (data/families FAMILIES and train/demo TINY_MODELS; a test keeps this in step),
# spelled out here so that `--help` need not import the model code.
TINY_FAMILIES = (
    "llava_next_video",
    "llava_onevision",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_5",
    "qwen2_5_omni",
    "internvl",
    "gemma4",
    "qwen3_omni_moe",
)
FAMILY_HELP = "model family of the tiny model (default llava_next_video)"


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", default="llava_next_video", choices=TINY_FAMILIES, help=FAMILY_HELP)
    p.add_argument(
        "--workdir", help="where the corpus, model and runs go (default vidtune-demo, vidtune-demo-FAMILY for others)"
    )
    p.add_argument(
        "--packing", action="store_true", help="train every stage with train.packing=true (the same losses, packed)"
    )
    p.add_argument(
        "--stages",
        help="comma-separated stages: base, instruct, chat, and dpo / grpo (the order question from preference "
        "pairs / rewards, after base), e.g. base,dpo (default base,instruct,chat; none with --audio)",
    )
    p.add_argument(
        "--audio",
        action="store_true",
        help="the sound proof (families that hear): 'Is the tone high or low?' on clips with identical pictures, "
        "trained hearing the sound and again with data.audio=off (recipe demo/tone); after --stages if given",
    )


def _add_env(p: argparse.ArgumentParser) -> None:
    pass  # no options


def _add_tiny_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="folder to write the model into")
    p.add_argument("--family", default="llava_next_video", choices=TINY_FAMILIES, help=FAMILY_HELP)


# ------------------------------------------------------------------------------------------------------ runners


def run_train(args: argparse.Namespace) -> None:
    from vidtune.train.datatools.inputs import check_recipe_inputs
    from vidtune.train.training.config import load_recipe, recipe_to_yaml, resolve_recipe_path

    recipe = load_recipe(resolve_recipe_path(args.recipe), args.overrides)
    if args.gpu_memory is not None and not args.dry_run:
        raise DataError(f"--gpu-memory {args.gpu_memory} plans a run: add --dry-run (nothing was trained)")
    if not args.dry_run:  # (a dry run reads no data: it shows a recipe before its files exist)
        check_recipe_inputs(recipe)  # a missing data file is a one-line error in a second, not after the model loads
    if args.dry_run:
        from vidtune.train.training.model import (
            apply_finetuning,
            build_on_meta,
            check_audit,
            format_audit,
            trainable_audit,
        )

        print(recipe_to_yaml(recipe))
        model, family = build_on_meta(recipe.model)
        if recipe.model.adapter:
            print(f"(adapter {recipe.model.adapter} is loaded at training time; audit shows a fresh adapter)")
            recipe.model.adapter = None
        model = apply_finetuning(model, family, recipe.finetune)
        audit = trainable_audit(model, family)
        print(format_audit(audit))
        check_audit(audit, recipe.finetune)
        print(
            dry_run_memory_plan(model, family, recipe, args.num_processes, args.zero_stage, args.fsdp, args.gpu_memory)
        )
        return
    from vidtune.train.training.loop import train

    output = train(recipe)
    if os.environ.get("RANK", "0") == "0":  # once per run, not once per process
        print(f"done: {output}  (loss curves: {output}/loss.png)")
        print(
            f"next: vidtune infer {output} --video CLIP.mp4 --prompt 'Describe this video.'\n"
            f"      vidtune chat {output} --video CLIP.mp4     vidtune serve {output}     vidtune export {output}"
        )


def dry_run_memory_plan(
    model: Any,
    family: Any,
    recipe: Any,
    processes: int,
    zero_stage: int,
    fsdp: bool = False,
    gpu_memory: str | None = None,
) -> str:
    from vidtune.train.training.distributed import resolve_mixed_precision
    from vidtune.train.training.memory_plan import Launch, fit_advice, parse_gpu_memory, plan_memory

    if processes < 1:
        raise DataError(f"--num-processes must be >= 1, got {processes}")
    if fsdp and zero_stage:
        raise DataError(f"--fsdp with --zero-stage {zero_stage}: a run uses one engine; give one of them")
    try:
        budget = parse_gpu_memory(gpu_memory) if gpu_memory is not None else None
    except ValueError as err:
        raise DataError(str(err)) from None

    def plan_for(planned: Any, launch: Launch) -> Any:
        return plan_memory(
            model,
            family,
            planned,
            processes=launch.processes,
            zero_stage=launch.zero_stage,
            deepspeed=launch.zero_stage > 0,
            mixed_precision=resolve_mixed_precision(planned.train.mixed_precision),
            fsdp=launch.fsdp,
        )

    launch = Launch(processes, zero_stage, fsdp)
    table = plan_for(recipe, launch).table()
    return table if budget is None else f"{table}\n{fit_advice(recipe, launch, budget, plan_for)}"


def run_eval(args: argparse.Namespace) -> None:
    if (args.task is None) == (args.benchmark is None):
        raise DataError("give either --task (your own corpus) or --benchmark (mvbench, videomme, nextqa)")
    if args.benchmark:
        run_benchmark(args)
        return
    from vidtune.data.sources import SourceConfig
    from vidtune.train.evaluation.tasks import evaluate_items, load_items, write_outputs
    from vidtune.train.training.config import EvalConfig

    classes = [c.strip() for c in args.classes.split(";") if c.strip()] if args.classes else []
    cfg = EvalConfig(
        task=args.task,
        max_new_tokens=args.max_new_tokens or MAX_NEW_TOKENS,
        mc_scoring=args.mc_scoring,
        classes=classes,
        prompt=args.prompt,
    )
    with _named_as_cli_flags():  # rows read and media paths checked before the model loads
        items = load_items([SourceConfig(path=args.data, format=args.format, media_root=args.media_root)], cfg)
    metrics, records = evaluate_items(_load(args), items, cfg, args.batch_size)
    folder = write_outputs(args.out, metrics, records)
    shown = {k: v for k, v in metrics.items() if not isinstance(v, list)}
    print(json.dumps(shown, indent=2))
    print(
        f"wrote {folder}/metrics.json and predictions.jsonl"
        + (" and confusion.png" if classes or args.task == "recognition" else "")
    )


def run_benchmark(args: argparse.Namespace) -> None:
    from vidtune.train.evaluation.benchmarks import (
        BENCHMARKS,
        accuracy_table,
        benchmark_sources,
        load_benchmark,
        score_benchmark,
    )
    from vidtune.train.evaluation.tasks import predict, write_outputs
    from vidtune.train.generation.infer import load_for_inference
    from vidtune.train.training.config import EvalConfig

    bench = BENCHMARKS[args.benchmark]
    items, bad = load_benchmark(bench, benchmark_sources(bench, args.data, args.media_root, args.media_template))
    num_frames = args.num_frames or bench.num_frames
    im = load_for_inference(args.model, base=args.base, num_frames=num_frames, fps=args.fps, announce=True)
    max_new_tokens = args.max_new_tokens or bench.max_new_tokens
    predictions = predict(im, items, EvalConfig(task="multiple_choice", max_new_tokens=max_new_tokens), args.batch_size)
    metrics, records = score_benchmark(bench, items, predictions)
    metrics.update(num_frames=num_frames, bad_rows=len(bad.bad), bad_row_reasons=[f"{w}: {r}" for w, r in bad.bad])
    folder = write_outputs(args.out, metrics, records)
    print(accuracy_table(metrics))
    if bad.bad:
        print(f"skipped {bad.summary()}")
    print(f"wrote {folder}/metrics.json and predictions.jsonl")


def run_export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from vidtune.train.publishing.export import export_folder, hub_token, push
    from vidtune.train.training.config import read_recipe_yaml

    saved = Path(args.run_dir) / "recipe.yaml"
    # The saved recipe as written, unresolved: the card shows `${oc.env:...}` values as that text, never what the
    # environment holds (and exporting does not need the training environment's variables).
    card = dict(read_recipe_yaml(saved).get("hub") or {}) if saved.is_file() else {}
    card["repo_id"] = args.push or card.get("repo_id")
    if args.base_id:
        card["base_id"] = args.base_id
    if args.push and not args.dry_run:
        hub_token()  # before the (possibly long) merge
    result = export_folder(args.run_dir, args.to, merge=args.merge, card=card)
    print(f"exported {result.folder}:")
    for name in result.files:
        print(f"  {name}  ({(result.folder / name).stat().st_size:,} bytes)")
    if result.note:
        print(result.note)
    if args.push and args.dry_run:
        privacy = "private" if args.private else "public (unless the repo exists and is private)"
        print(
            f"dry run: these {len(result.files)} files would be uploaded to {args.push} ({privacy}, revision "
            f"{args.revision or 'main'}); nothing was uploaded"
        )
    elif args.push:
        url = push(result, args.push, private=args.private, revision=args.revision, commit_message=args.message)
        print(f"pushed: {url}")


def _load(args: argparse.Namespace):
    from vidtune.train.datatools.inputs import check_model_path
    from vidtune.train.generation.infer import load_for_inference

    check_model_path(args.model)
    if args.base:
        check_model_path(args.base, "--base")
    return load_for_inference(args.model, base=args.base, num_frames=args.num_frames, fps=args.fps, announce=True)


def run_infer(args: argparse.Namespace) -> None:
    from vidtune.train.datatools.inputs import check_model_path, check_sound, check_video
    from vidtune.train.generation.infer import answer, model_family

    if not args.video and not args.audio:
        raise DataError("give --video, --audio (a model that hears) or both")
    check_model_path(args.model)
    if args.video:
        check_video(args.video)
    if args.audio:
        check_sound(args.audio)
        family = model_family(args.model, args.base)
        if not family.hears:
            raise DataError(f"--audio {args.audio}: {family.name} does not hear sound (ask about a video instead)")
    new_tokens = args.max_new_tokens or MAX_NEW_TOKENS
    print(answer(_load(args), args.video, args.prompt, new_tokens, audio=args.audio))


def run_serve(args: argparse.Namespace) -> None:
    from pathlib import Path

    from vidtune.train.serving.app import ServeSettings, serve
    from vidtune.train.serving.media import MediaPolicy

    if args.media_root and not Path(args.media_root).is_dir():
        raise DataError(f"--media-root {args.media_root}: no such folder")
    max_body_bytes = int(args.max_body_mb * (1 << 20))
    settings = ServeSettings(
        model_name=args.served_model_name or Path(args.model.rstrip("/")).name,
        policy=MediaPolicy(Path(args.media_root) if args.media_root else None, args.allow_urls, max_body_bytes),
        max_body_bytes=max_body_bytes,
        default_max_tokens=args.max_new_tokens or MAX_NEW_TOKENS,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        decode_timeout_s=args.decode_timeout_s,
        log_requests=args.log_requests == "on",
    )
    if args.max_queue < 1 or args.decode_timeout_s <= 0:
        raise DataError("--max-queue must be >= 1 and --decode-timeout-s > 0")
    from vidtune.train.serving.decode import Decoder

    decoder = Decoder()  # forked before the model loads and before any thread runs (decode.py says why)
    serve(_load(args), settings, args.host, args.port, decoder)


def run_chat(args: argparse.Namespace) -> None:
    from vidtune.train.datatools.inputs import check_model_path, check_video
    from vidtune.train.generation.chat import chat

    check_model_path(args.model)
    check_video(args.video)

    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise DataError("--temperature must be >= 0 and --top-p in (0, 1]")
    chat(
        _load(args),
        args.video,
        max_new_tokens=args.max_new_tokens or MAX_NEW_TOKENS,
        stream=None if args.no_stream else lambda text: print(text, end="", flush=True),
        temperature=args.temperature,
        top_p=args.top_p,
    )


@contextlib.contextmanager
def _named_as_cli_flags() -> Iterator[None]:
    """Errors about a --data file name the flag that fixes them, not the recipe key (`--media-root`)."""
    try:
        yield
    except DataError as err:
        raise DataError(str(err).replace("the source's media_root", "--media-root")) from None


def run_predict(args: argparse.Namespace) -> None:
    from vidtune.data.sources import SourceConfig, iter_conversations
    from vidtune.train.generation.predict import predict

    source = SourceConfig(path=args.data, format=args.format, media_root=args.media_root)
    with _named_as_cli_flags():  # every row read and its media paths checked before the model loads
        for _ in iter_conversations(source):
            pass
    count = predict(_load(args), source, args.out, args.batch_size, args.max_new_tokens or MAX_NEW_TOKENS)
    print(f"wrote {count} predictions to {args.out}")


def run_check(args: argparse.Namespace) -> None:
    from vidtune.train.datatools.check import run_check as check
    from vidtune.train.training.config import load_recipe, resolve_recipe_path

    path = resolve_recipe_path(args.recipe)
    _, ok = check(load_recipe(path, args.overrides), str(path), args.out, args.decode, args.gpu_tokens)
    if not ok:
        sys.exit(1)


def run_frames(args: argparse.Namespace) -> None:
    from vidtune.data.video import VideoError
    from vidtune.train.datatools.frames import (
        capped_note,
        describe,
        describe_audio,
        print_report,
        sample_video,
        write_frames,
    )

    try:
        clip = sample_video(
            args.video, args.num_frames, args.fps, args.start, args.end, args.backend, args.shortest_edge
        )
    except VideoError as err:  # one line, PATH: reason
        print(err, file=sys.stderr)
        sys.exit(1)
    report = describe(args.video, clip)
    if args.audio:
        try:
            report["audio"] = describe_audio(args.video, clip, args.out)
        except VideoError as err:
            print(err, file=sys.stderr)
            sys.exit(1)
    print_report(report, args.json)
    note = capped_note(clip, args.fps, args.num_frames, args.start, args.end)
    if note and not args.json:
        print(note)
    if args.out:
        write_frames(clip, args.out)
        if not args.json:
            print(f"  wrote {len(clip.frames)} frames and sheet.png to {args.out}")


def run_show(args: argparse.Namespace) -> None:
    from vidtune.train.datatools.show import run_show as show
    from vidtune.train.training.config import load_recipe, resolve_recipe_path

    path = resolve_recipe_path(args.recipe)
    page = show(load_recipe(path, args.overrides), str(path), args.rows, args.out)
    print(f"vidtune show: {page} (open it in a browser)")


def run_cache(args: argparse.Namespace) -> None:
    from vidtune.train.datatools.cache import fill_cache
    from vidtune.train.training.config import load_recipe, resolve_recipe_path

    result = fill_cache(load_recipe(resolve_recipe_path(args.recipe), args.overrides), args.workers)
    print(
        f"cached {result['clips']} clips in {result['seconds']:.1f}s into {result['dir']} "
        f"({result['cache_bytes'] / 1e6:.1f} MB)"
    )
    for failure in result["failed"]:
        print(f"  failed: {failure}")


def run_demo(args: argparse.Namespace) -> None:
    from vidtune.train.demo.stages import STAGES, parse_stages
    from vidtune.train.demo.stages import run_demo as demo

    overrides = ("train.packing=true",) if args.packing else ()
    stages = parse_stages(args.stages) if args.stages else () if args.audio else STAGES
    demo(args.workdir, family=args.family, overrides=overrides, stages=stages, audio=args.audio)


def run_env(args: argparse.Namespace) -> None:
    from vidtune.train.environment import environment_lines

    print("\n".join(environment_lines()))


def run_tiny_model(args: argparse.Namespace) -> None:
    from vidtune.train.demo.tiny_model import build_tiny_model

    print(build_tiny_model(args.out, family=args.family))


# ------------------------------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


COMMANDS = {
    "train": Command("train a recipe (resumes when the output folder holds a checkpoint)", _add_train, run_train),
    "infer": Command("answer one prompt about a video", _add_infer, run_infer),
    "chat": Command("talk about a video in the terminal (/video PATH, /reset, /quit)", _add_chat, run_chat),
    "serve": Command(
        "OpenAI-compatible API (/v1/chat/completions) and a web chat page (/) for a trained model",
        _add_serve,
        run_serve,
    ),
    "predict": Command("answer every row of a corpus file; writes JSONL predictions", _add_predict, run_predict),
    "eval": Command(
        "score a model on a corpus (qa, multiple_choice, caption, recognition) or a benchmark (mvbench, videomme, "
        "nextqa)",
        _add_eval,
        run_eval,
    ),
    "check": Command("preflight a recipe's data: unreadable files, token lengths, length drops", _add_check, run_check),
    "frames": Command(
        "the frames sampling picks from a video (backend, times; --out writes PNGs and a sheet)",
        _add_frames,
        run_frames,
    ),
    "show": Command("an HTML page of what training feeds the model: frames, prompt, label span", _add_show, run_show),
    "cache": Command(
        "decode a recipe's clips into its frame cache (data.frame_cache.dir) ahead", _add_cache, run_cache
    ),
    "export": Command(
        "write a run as a Hub-ready folder (model card included), optionally push it", _add_export, run_export
    ),
    "demo": Command("generate videos, build a tiny model, train base -> instruct -> chat on CPU", _add_demo, run_demo),
    "env": Command("versions, CUDA and GPUs, FFmpeg, and which video decoders work here", _add_env, run_env),
    "tiny-model": Command(
        "write a tiny random model folder of a family (for trying things out)", _add_tiny_model, run_tiny_model
    ),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vidtune")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    families = "LLaVA-NeXT-Video, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL and Qwen3.5"
    parser = argparse.ArgumentParser(
        prog="vidtune",
        description=f"Fine-tune video-language models: {families} (families: {', '.join(TINY_FAMILIES)}).",
    )
    parser.add_argument("--version", action="version", version=f"vidtune {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help))
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Options may come anywhere, before or after `key=value` overrides (`train R --dry-run a.b=1`). argparse's
    intermixed parsing does not support subparsers, so the command's own parser does it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        return build_parser().parse_args(argv)  # --help, or argparse's message for an unknown command
    name, command = argv[0], COMMANDS[argv[0]]
    parser = argparse.ArgumentParser(prog=f"vidtune {name}", description=command.help)
    command.add_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help="the libraries' warnings too (or VIDTUNE_LOG=debug)")
    args = parser.parse_intermixed_args(argv[1:])
    args.command = name
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not verbose_requested(getattr(args, "verbose", False)):
        quiet_libraries(loads_models=args.command not in ("frames", "env"))
    from vidtune.train.training.config import RecipeError
    from vidtune.train.training.health import TrainingError
    from vidtune.train.training.preemption import TrainingStopped

    try:
        COMMANDS[args.command].run(args)
    except (DataError, RecipeError) as err:
        print(f"vidtune {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as stop:  # preemption: saved, resumable; exit like a process killed by that signal
        print(f"vidtune {args.command}: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except TrainingError as err:
        print(f"vidtune {args.command}: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C outside training (which saves and stops on its own): no traceback
        print(f"\nvidtune {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
