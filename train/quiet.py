"""Quiet by default: the libraries under vidtune talk to their developers (deprecation notices, "Loading weights"
bars, DeepSpeed's accelerator guess, bitsandbytes' kernel fetch, fallback notices), which buries a one-word answer.
The commands keep their errors and vidtune's own lines; `--verbose` or `VIDTUNE_LOG=debug` brings the rest back."""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Loggers whose warnings are advice to library developers; errors still show.
LIBRARY_LOGGERS = ("accelerate", "bitsandbytes", "datasets", "huggingface_hub", "peft", "torch", "fla", "kernels")
# Libraries whose UserWarnings (about their own internals) are hidden too.
WARNING_MODULES = r"(accelerate|bitsandbytes|datasets|deepspeed|peft|torch|torchcodec|torchvision|transformers)(\.|$)"


def verbose_requested(flag: bool = False) -> bool:
    return flag or os.environ.get("VIDTUNE_LOG", "").lower() == "debug"


def errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet_libraries(loads_models: bool) -> None:
    """Call before the command runs. The environment variables reach launched ranks and workers as well."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not sys.stderr.isatty():  # a log file: no \r-redrawn bars of dataset passes ("Filter", "measuring samples")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=WARNING_MODULES)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    deepspeed_logger = logging.getLogger("DeepSpeed")  # it sets its own level when imported (later): a filter stays
    if errors_only not in deepspeed_logger.filters:
        deepspeed_logger.addFilter(errors_only)
    if loads_models:  # these commands import transformers anyway; the others stay fast
        import transformers.utils.logging

        transformers.utils.logging.set_verbosity_error()  # if it was imported before (a test calling main())
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" (the Hub's download bars stay)
        if "datasets" in sys.modules and not sys.stderr.isatty():
            import datasets

            datasets.disable_progress_bars()
