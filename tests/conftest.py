import logging
import sys
from pathlib import Path

import pytest

# Lets tests import the shared builders in tests/helpers.py.
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_configure(config):
    # `make test` runs everything (CI too); `pytest tests -m "not slow"` skips the tests that start
    # processes or train for many steps (about a minute or more each on 2 CPU cores).
    config.addinivalue_line("markers", "slow: starts processes or trains for many steps")


@pytest.fixture
def restore_loggers():
    """main() runs Detectron2's setup_logger, which adds handlers and turns propagation off; undo it
    so that later tests (caplog included) see the loggers as they were."""
    names = ("detectron2", "fvcore", "e3va")
    loggers = {n: logging.getLogger(n) for n in names}
    saved = {n: (list(log.handlers), log.propagate, log.level) for n, log in loggers.items()}
    yield
    for name, (handlers, propagate, level) in saved.items():
        log = logging.getLogger(name)
        for h in log.handlers:
            if h not in handlers:
                h.close()
        log.handlers[:] = handlers
        log.propagate, log.level = propagate, level
