"""vidtune.train: everything that uses a model, grouped by job.

    training/    the training run: recipe config, model setup and trainable audit, building loaders and optimizer,
                 the loop, checkpoints and resuming, processes and devices, preemption, step health, run outputs,
                 metric logging
    objectives/  what a step optimises: supervised fine-tuning, DPO on preference pairs, GRPO from rewards
    generation/  answers from a trained model: load and generate (infer), terminal chat, batch predict
    evaluation/  scored answers: tasks (qa, multiple choice, caption, recognition) and their metrics
    publishing/  a run made shareable: export folder, model card, Hub push
    datatools/   a recipe's data before training: `vidtune check` (preflight) and `vidtune cache` (frame cache)
    serving/     `vidtune serve`: OpenAI-compatible chat API and web chat page (FastAPI + uvicorn)
    demo/        `vidtune demo` and its fixtures: tiny models built from config, synthetic clips, the demo corpus
    environment.py  `vidtune env`: versions, CUDA and GPUs, FFmpeg, which video decoders work
    quiet.py     library warnings and progress bars hidden on the happy path (--verbose / VIDTUNE_LOG=debug)
    cli.py       the `vidtune` command: one table of subcommands calling into the packages above

Model-specific code lives in vidtune.data.families, never here.
"""
