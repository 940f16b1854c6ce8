import gc
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


@pytest.fixture
def process_group():
    """A one-process gloo group for the test, destroyed only after everything that holds it is freed.

    A DistributedDataParallel reducer that outlives `destroy_process_group` drops the group's last
    reference while it holds the GIL; the group's destructor then waits for gloo's worker threads, which
    need the GIL to free their finished work: a hang (seen in CI, torch 2.13). The test's own objects
    are freed when it returns, before this teardown; cycles (FSDP hooks) by the collection here.
    """
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    gc.collect()
    dist.destroy_process_group()
