"""Route a stage's logging, warnings and progress bars (stderr) into its rule's log file."""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path


@contextlib.contextmanager
def log_to(path: str):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as stream, contextlib.redirect_stderr(stream):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        try:
            yield
            log_peak_cuda_memory()
        except BaseException:
            logging.getLogger("moesweep").exception("stage failed")
            raise
        finally:
            root.removeHandler(handler)


def log_peak_cuda_memory() -> None:
    """One line with the stage's peak GPU memory (PyTorch's allocator: every tensor and Triton buffer of the
    process), for the stage records of benchmarks/gpu_sweep. Nothing when the stage never touched CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    logging.getLogger("moesweep").info("peak CUDA memory: allocated %d bytes, reserved %d bytes",
                                       torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())


def progress(iterable, **kwargs):
    """tqdm progress bar on stderr (inside `log_to`, the rule's log)."""
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, mininterval=5, **kwargs)
