"""The real-controller tier: one ``lmcache_controller`` process for the whole session.

It runs when ``PIXIU_KV_LMCACHE_CONTROLLER`` names the executable (see
``scripts/provision-lmcache.sh``); otherwise these tests are skipped, unless
``PIXIU_KV_REQUIRE_INTEGRATION=1`` (CI), which turns the skip into a failure.
Tests must deregister every worker they register: the controller hangs on dead workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from real_controller_support import RealController, run_real_controller


@pytest.fixture(scope="session")
def real_controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealController]:
    with run_real_controller(tmp_path_factory.mktemp("lmcache")) as controller:
        yield controller
