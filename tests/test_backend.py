"""numba is loaded at first use, and its kernel cache works from a read-only install."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from softtopk import _backend

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = Path(_backend.__file__).resolve().parent


def run_python(code: str, env: dict[str, str] | None = None) -> str:
    """Runs ``code`` in a fresh interpreter with this checkout's sources first on the path."""
    full_env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    full_env["PYTHONPATH"] = os.pathsep.join([str(SRC), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# In the child, the package's source folders count as read-only (the tests run as any user,
# root included, for whom chmod would not stop a write).
READ_ONLY_PACKAGE = """
    from pathlib import Path
    from softtopk import _backend
    package = Path(_backend.__file__).resolve().parent
    writable = _backend._writable
    _backend._writable = lambda f: not Path(f).resolve().is_relative_to(package) and writable(f)
"""


def read_only_package(code: str) -> str:
    return textwrap.dedent(READ_ONLY_PACKAGE) + textwrap.dedent(code)


def test_cache_dir_is_numbas_choice_where_it_works(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(_backend, "_writable", lambda folder: True)
    assert _backend.kernel_cache_dir(PACKAGE / "threshold") is None
    monkeypatch.setattr(_backend, "_writable", lambda folder: False)
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert _backend.kernel_cache_dir(PACKAGE / "threshold") is None


def test_cache_dir_of_a_read_only_package_is_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("SOFTTOPK_CACHE", str(tmp_path / "cache"))
    _backend._fallback_cache_dir.cache_clear()
    writable = _backend._writable
    monkeypatch.setattr(_backend, "_writable", lambda f: not Path(f).is_relative_to(PACKAGE) and writable(f))
    try:
        folder = _backend.kernel_cache_dir(PACKAGE / "threshold")
        assert folder == tmp_path / "cache" / "numba"
        assert folder.is_dir()
        _backend._fallback_cache_dir.cache_clear()
        monkeypatch.setattr(_backend, "_writable", lambda f: False)
        temporary = _backend.kernel_cache_dir(PACKAGE / "threshold")
        assert temporary is not None and temporary.is_dir()
        assert not temporary.is_relative_to(PACKAGE) and temporary != folder
    finally:
        _backend._fallback_cache_dir.cache_clear()


def test_import_leaves_numba_unloaded_and_a_read_only_package_caches_kernels_in_the_user_cache(tmp_path):
    first = """
        import sys
        import softtopk, softtopk.nn, softtopk.losses, softtopk.metrics, softtopk.registry
        print("numba" in sys.modules)
    """
    code = textwrap.dedent(first) + read_only_package(
        """
        module = _backend.kernels("isotonic._pav_cpu")
        print("numba" in sys.modules, _backend.kernels("isotonic._pav_cpu") is module)
        import numba
        print(module._logaddexp._cache._cache_path)
        print(repr(numba.config.CACHE_DIR))
        """
    )
    lines = run_python(code, {"SOFTTOPK_CACHE": str(tmp_path)}).splitlines()
    assert lines[0] == "False"  # import softtopk does not load numba
    assert lines[1].split() == ["True", "True"]  # the first kernel does, once
    assert Path(lines[2]).is_relative_to(tmp_path / "numba")
    assert lines[3] == "''"  # numba's own setting is put back: other packages' caches stay where they were


def test_import_leaves_dynamo_unloaded_until_an_eager_only_op_is_compiled():
    """torch._dynamo costs over a second to import; only compiling brings it in."""
    code = """
        import sys
        import torch
        import softtopk, softtopk.nn, softtopk.losses, softtopk.metrics, softtopk.registry
        x = torch.randn(2, 6)
        softtopk.topk_mask(x, 2, method="perturbed", generator=torch.Generator().manual_seed(0))
        print("torch._dynamo" in sys.modules)
    """
    assert run_python(code).split() == ["False"]


@pytest.mark.slow
def test_read_only_package_compiles_once_then_loads_from_the_user_cache(tmp_path):
    code = read_only_package(
        """
        import torch, softtopk
        y = softtopk.soft_rank(torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64))
        stats = _backend.kernels("isotonic._pav_cpu")._rank_forward.stats
        print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
        """
    )
    env = {"SOFTTOPK_CACHE": str(tmp_path)}
    assert run_python(code, env).split() == ["0", "1"]  # compiled, and written to the user cache
    assert list((tmp_path / "numba").glob("isotonic_*/_pav_cpu._rank_forward-*.nbi"))
    assert run_python(code, env).split() == ["1", "0"]  # a new process loads it
