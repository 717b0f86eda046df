"""The `llamachat` command puts numba's on-disk cache under LLAMACHAT_HOME (issue #18: all of
it lives there when the variable is set), and runtime.numba_cache drops stale entries in that
folder, not in the package's __pycache__. Run in subprocesses: numba reads NUMBA_CACHE_DIR once."""

import os
import subprocess
import sys
import textwrap

from llamachat.runtime import numba_cache

RUNTIME_DIR = os.path.dirname(os.path.abspath(numba_cache.__file__))

SCRIPT = textwrap.dedent("""
    import json, os, sys
    from llamachat.tui import cli
    assert "numba" not in sys.modules, "numba imported before the cache folder was chosen"
    chosen = cli.place_numba_cache()
    from numba import njit
    from numba.core import config
    from llamachat.runtime.numba_cache import cache_dir_for

    @njit(cache=True)
    def twice(x):
        return 2 * x

    twice(3)
    print(json.dumps({"chosen": chosen, "numba": config.CACHE_DIR,
                      "runtime_cache": cache_dir_for(sys.argv[1]),
                      "func_cache": twice._cache._cache_path}))
""")


def _run(tmp_path, env_extra, drop=()):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "LLAMACHAT_HOME", "LLAMACHAT_CACHE_DIR")}
    env.update(env_extra)
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script), RUNTIME_DIR], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cache_goes_under_llamachat_home_and_stale_entries_are_dropped_there(tmp_path):
    home = tmp_path / "home"
    folder = home / "cache" / "numba"
    # a stale entry of the engine where numba will look for it, with a stamp that no longer matches
    env = {"LLAMACHAT_HOME": str(home), "NUMBA_CACHE_DIR": str(folder)}
    old = dict(os.environ)
    try:
        os.environ.update(env)
        runtime_cache = numba_cache.cache_dir_for(RUNTIME_DIR)
    finally:
        os.environ.clear()
        os.environ.update(old)
    os.makedirs(runtime_cache)
    with open(os.path.join(runtime_cache, "numba-sources.stamp"), "w") as fh:
        fh.write("an older release")
    stale = os.path.join(runtime_cache, "matmul.kernel-1.py311.nbi")
    with open(stale, "w") as fh:
        fh.write("index of old code")

    got = _run(tmp_path, {"LLAMACHAT_HOME": str(home)})
    assert got["chosen"] == str(folder) == got["numba"]
    assert got["runtime_cache"] == runtime_cache
    assert got["func_cache"].startswith(str(folder))  # numba itself writes there
    assert any(f.endswith(".nbi") for f in os.listdir(got["func_cache"]))
    assert not os.path.exists(stale)  # dropped where numba reads it
    assert os.path.exists(os.path.join(runtime_cache, "numba-sources.stamp"))


def test_cache_dir_alone_also_moves_it(tmp_path):
    got = _run(tmp_path, {"LLAMACHAT_CACHE_DIR": str(tmp_path / "c")})
    assert got["numba"] == str(tmp_path / "c" / "numba")


def test_users_own_numba_cache_dir_wins(tmp_path):
    mine = str(tmp_path / "mine")
    got = _run(tmp_path, {"LLAMACHAT_HOME": str(tmp_path / "home"), "NUMBA_CACHE_DIR": mine})
    assert got["chosen"] is None and got["numba"] == mine
    assert got["func_cache"].startswith(mine)


def test_without_home_numba_keeps_its_default(tmp_path):
    got = _run(tmp_path, {})
    assert got["chosen"] is None and got["numba"] == ""
    assert got["runtime_cache"] == os.path.join(RUNTIME_DIR, "__pycache__")
