"""The package's shape: import names, the headless engine, the console script."""

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
