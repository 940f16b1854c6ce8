import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(params=[0o022, 0o027], ids=["umask-022", "umask-027"])
def umask(request):
    """Run the test under this umask; the process's own is restored after."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)
