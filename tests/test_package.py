"""The package's shape: import names, the headless engine, the console script."""

import os
import subprocess
import sys


def test_runtime_does_not_import_textual():
    code = (
        "import sys, llamachat.runtime, llamachat.runtime.params, llamachat.model_store.paths\n"
        "bad = sorted(m for m in sys.modules if m == 'textual' or m.startswith(('textual.', 'llamachat.tui')))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_namespace_layout():
    import llamachat.model_store
    import llamachat.prompts
    import llamachat.runtime
    import llamachat.tui

    assert llamachat.runtime.__name__ == "llamachat.runtime"
    assert "alpaca" in llamachat.prompts.shipped_prompt_names()


def test_cli_help_and_unknown_flag():
    ok = subprocess.run([sys.executable, "-m", "llamachat.tui.cli", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "inspect" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "llamachat.tui.cli", "--no-such-flag"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_real_model_is_fetched_and_verified(smollm2_path, reference):
    from llamachat.model_store.pull import sha256_of

    assert sha256_of(smollm2_path) == reference["model"]["sha256"]


def test_importing_the_runtime_changes_no_environment_and_no_umask():
    """OpenMP/OpenBLAS settings are applied by the `llamachat` command and by Llama(...), not as a
    side effect of an import; nor does any import change the process umask."""
    code = (
        "import os\n"
        "os.umask(0o027)\n"
        "before = dict(os.environ)\n"
        "import llamachat.runtime, llamachat.runtime.model.model, llamachat.runtime.model.forward, llamachat.model_store.library\n"
        "assert dict(os.environ) == before, sorted(set(os.environ.items()) ^ set(before.items()))\n"
        "assert os.umask(0o022) == 0o027\n"
        "from llamachat.runtime import apply_thread_env\n"
        "apply_thread_env()\n"
        "assert os.environ['GOMP_SPINCOUNT'] == '200000' and os.environ['OPENBLAS_THREAD_TIMEOUT'] == '12'\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
