import sys

import pytest


@pytest.fixture(autouse=True, scope="session")
def _plain_argv():
    """The CLI is driven through ``main(args)``; pytest's own argv must not look like CLI arguments."""
    saved = sys.argv
    sys.argv = ["atspeed"]
    yield
    sys.argv = saved
