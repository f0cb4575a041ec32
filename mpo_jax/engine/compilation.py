"""Count XLA compilations: recompiles are the main hidden cost of a JAX training loop."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import jax

_LOGGER = "jax._src.dispatch"


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Finished XLA compilation of "):
            self.names.append(message[len("Finished XLA compilation of "):].split(" in ")[0])


@contextlib.contextmanager
def count_compilations() -> Iterator[list[str]]:
    """Collect the names of the functions XLA compiles inside the block (a list, filled live)."""
    collector = _Collector()
    logger = logging.getLogger(_LOGGER)
    previous_level, previous_flag = logger.level, jax.config.jax_log_compiles
    logger.addHandler(collector)
    logger.setLevel(logging.DEBUG)
    jax.config.update("jax_log_compiles", True)
    try:
        yield collector.names
    finally:
        jax.config.update("jax_log_compiles", previous_flag)
        logger.removeHandler(collector)
        logger.setLevel(previous_level)
