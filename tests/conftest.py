"""Test set-up: 8 virtual CPU devices (set before jax is imported) and a persistent
compilation cache, so multi-device code runs on any machine and reruns compile less."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.expanduser("~"), ".cache", "coach_jax", "jax-tests"))

REALWORLD = os.environ.get("COACH_JAX_REALWORLD") or os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "realworld")


@pytest.fixture(scope="session")
def realworld() -> str:
    """../shared/realworld (or $COACH_JAX_REALWORLD): skipped where absent, a failure under
    CI=true."""
    path = os.path.abspath(REALWORLD)
    if not os.path.isdir(path):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing under CI=true")
        pytest.skip(f"{path} not present")
    return path
