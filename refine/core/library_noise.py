"""Library noise of this process (Python warnings, the libraries' logging, transformers' loading and saving bars)
kept off the terminal: refine sends it to its log (``refine.console``), the trainer turns the bars off."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from refine.core.write import check_plain, open_append

LIBRARY_LOGGERS = ("transformers", "torch", "huggingface_hub", "accelerate", "datasets", "vllm", "faiss")


class _LazyFileHandler(logging.FileHandler):
    """Creates the log's folder only when something is logged (a run that logs nothing leaves no folder); opens
    the log through ``refine.core.write.open_append`` (never through a link planted at its name)."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return open_append(self.baseFilename, errors=self.errors or "strict")

    def emit(self, record) -> None:
        try:
            super().emit(record)
        except Exception:                    # noqa: BLE001 - a refused log (a link planted since) is no crash
            self.handleError(record)

    def handleError(self, record) -> None:   # a log that cannot be written is not the run's error
        pass


@contextlib.contextmanager
def library_noise_to(path: Path | None):
    """In this process, Python warnings and the libraries' logging go to ``path`` (None: left as they are) and
    transformers' loading/saving bars are off."""
    if path is None:
        yield
        return
    check_plain(path)                        # a link planted at the log: one line now, not a refusal mid-run
    handler = _LazyFileHandler(path, delay=True, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    names = ("py.warnings", *LIBRARY_LOGGERS)
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in names}
    with no_library_bars(default_handler=False):
        logging.captureWarnings(True)
        for n in names:
            logger = logging.getLogger(n)
            logger.handlers, logger.propagate = [handler], False
        try:
            yield
        finally:
            logging.captureWarnings(False)
            for n, (handlers, propagate) in saved.items():
                logging.getLogger(n).handlers, logging.getLogger(n).propagate = handlers, propagate
            handler.close()


@contextlib.contextmanager
def no_library_bars(default_handler: bool = True):
    """transformers' own progress bars (loading weights, writing model shards) off; ``default_handler`` False:
    its stderr handler off too."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger()                  # configures transformers' root logger (its stderr handler) now
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if not default_handler:
        hf_logging.disable_default_handler()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        if not default_handler:
            hf_logging.enable_default_handler()
