"""Progress of long work, and quiet third-party libraries while surgery works.

Long stages (tracing, exporting, verifying an export in onnxruntime, drawing, the calibration pass of sparse
masks, `surgery validate --model`) log their start and their duration through the standard `logging` module,
on the logger named "surgery" (INFO), e.g. `export onnx: done in 41.2 s`. The library only adds a
`NullHandler`, so from Python nothing shows unless the application configures logging:

    import logging
    logging.basicConfig(level=logging.INFO)            # every library's INFO messages
    logging.getLogger("surgery").setLevel(logging.INFO)  # or only surgery's (with a handler configured)

The command line shows them on stderr (`-q/--quiet` hides them). Where the work has a known length (calibration
batches) a `tqdm` bar is shown too, when tqdm is installed, INFO is enabled for "surgery" and stderr is a
terminal.

`quiet_libraries()` keeps what torch, onnxscript and torchao print while surgery calls them (warnings and their
own loggers' warnings, e.g. "torchvision is not installed" during an ONNX export) out of the user's terminal;
levels and filters are restored when the block ends.
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

logger = logging.getLogger("surgery")
logger.addHandler(logging.NullHandler())

T = TypeVar("T")

# Loggers of libraries surgery calls that warn about things the user did not do (torch's ONNX exporter about
# torchvision ops, torchao about CUDA kernels it cannot load, torch's pytree about torchao's registrations).
NOISY_LOGGERS = ("torch.onnx", "torch.utils._pytree", "torch._export", "torch.export", "onnxscript", "onnx_ir",
                 "torchao")
NOISY_MODULES = r"(torch|onnx|onnxscript|onnx_ir|onnxruntime|torchao)(\.|$)"   # warnings attributed to these


@contextlib.contextmanager
def stage(what: str) -> Iterator[None]:
    """Log `what ...` when the work starts and `what: done in X s` (wall seconds) when it ends (INFO)."""
    if not logger.isEnabledFor(logging.INFO):
        yield
        return
    logger.info("%s ...", what)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        logger.info("%s: failed after %.1f s", what, time.perf_counter() - start)
        raise
    logger.info("%s: done in %.1f s", what, time.perf_counter() - start)


def progress(items: Iterable[T], description: str) -> Iterable[T]:
    """`items`, with a tqdm bar on stderr when the length is known, tqdm is installed, INFO is enabled for the
    "surgery" logger and stderr is a terminal; otherwise `items` unchanged."""
    if not logger.isEnabledFor(logging.INFO):
        return items
    try:
        total = len(items)  # type: ignore[arg-type]
    except TypeError:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc=description, unit="batch", leave=False, disable=None)


@contextlib.contextmanager
def quiet_libraries(*extra_loggers: str) -> Iterator[None]:
    """Within the block, warnings raised from torch, onnx(script/runtime) or torchao code and the WARNING-level
    messages of `NOISY_LOGGERS` (and `extra_loggers`) are not shown; errors still are. Logger levels and
    warning filters are restored afterwards."""
    saved: list[tuple[logging.Logger, int]] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=NOISY_MODULES)
        try:
            for name in NOISY_LOGGERS + extra_loggers:
                log = logging.getLogger(name)
                saved.append((log, log.level))
                if log.getEffectiveLevel() < logging.ERROR:
                    log.setLevel(logging.ERROR)
            yield
        finally:
            for log, level in reversed(saved):
                log.setLevel(level)

