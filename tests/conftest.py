"""Test set-up: 8 virtual CPU devices (set before jax is imported) and a persistent
compilation cache (for the subprocesses the tests start too), so multi-device code runs on
any machine and repeated compilations are loaded; the runs several tests share."""

import collections
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The persistent compilation cache, for the command-line runs the tests start as well: a run
# that repeats an earlier one's configuration (resumes, exports, generation) loads its
# compiled steps instead of compiling them again. Loaded executables give bitwise the same
# results.
# One cache per pytest-xdist worker: JAX writes cache entries in place, so a worker could
# read another's half-written entry.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.expanduser("~"), ".cache", "coach_jax",
    "jax-tests" + (f"-{os.environ['PYTEST_XDIST_WORKER']}"
                   if "PYTEST_XDIST_WORKER" in os.environ else "")))

import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


@pytest.fixture(scope="session")
def short_default_run(tmp_path_factory):
    """The README's run command cut to 3 steps without evals, through the command line:
    one run shared by test_main (it trains) and test_generate_modes (its checkpoint and
    export). Returns the workdir, the overrides it ran with and the finished process.
    Tests only read its workdir."""
    tmp = tmp_path_factory.mktemp("short_default_run")
    workdir = tmp / "run"
    # The default warmup (5 steps) outlasts these 3 steps: the run warns and goes on.
    overrides = ["--config.train.steps=3", "--config.train.log_every=1",
                 "--config.train.eval_every=0",
                 "--config.data.eval=", "--config.eval.generate_examples=0",
                 "--config.eval.reference=", f"--config.data.cache_dir={tmp / 'cache'}"]
    result = subprocess.run(
        [sys.executable, "-m", "coach_jax.main", "--config", "configs/default.py",
         "--workdir", str(workdir), *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    return workdir, overrides, result


@pytest.fixture
def encode_calls(monkeypatch):
    """Counts the examples coach_jax.data.cache encodes (rather than reads from the cache)."""
    from coach_jax.data import cache
    calls = collections.Counter()
    original = cache.encode_one

    def counting(*args, **kwargs):
        calls["encode"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(cache, "encode_one", counting)
    return calls
