"""The library screen's import dialog (pilot tests): a small GGUF imported and quantized through
the dialog shows up in the library table and in models.toml; a bad path or a missing one is a
sentence in the dialog; Cancel mid-import leaves nothing behind; progress shows the stage and
the tensor while the import runs in its thread."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_import_hf import sentencepiece_model  # noqa: E402
from tui_support import SIZE, make_app, notifications, ready, wait_for  # noqa: E402
from test_tui_snapshots import library  # noqa: E402,F401  (the alpha/beta library fixture)

from textual.command import CommandInput, CommandList, CommandPalette  # noqa: E402

from llamachat.model_store import importers, paths  # noqa: E402
from llamachat.model_store.library import Library  # noqa: E402
from llamachat.runtime.gguf.reader import GGUFFile  # noqa: E402
from llamachat.runtime.gguf.writer import write_gguf  # noqa: E402
from llamachat.tui.screens.import_dialog import ImportDialog  # noqa: E402
from llamachat.tui.screens.library import LibraryScreen  # noqa: E402


@pytest.fixture
def small_gguf(tmp_path, monkeypatch):
    """A tiny llama F16 GGUF (random weights, a real SentencePiece vocabulary), made by importing
    an HF folder into a throw-away home so the test's own library stays as the fixture left it."""
    home = tmp_path / "maker-home"
    with monkeypatch.context() as m:
        m.setenv("LLAMACHAT_HOME", str(home))
        sentencepiece_model(tmp_path / "hf", added=False)
        made = importers.run_import(tmp_path / "hf", name="maker").path
    out = tmp_path / "tiny-llama.gguf"
    shutil.copyfile(made, out)
    return out


IMPORT = 300  # seconds for a real import: a first run compiles the quantize kernels (numba)


def models_files() -> list[str]:
    d = paths.models_dir()
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


async def open_dialog(pilot, app) -> ImportDialog:
    await ready(pilot, app)
    await pilot.press("ctrl+l")
    await wait_for(pilot, lambda: isinstance(app.screen, LibraryScreen) and app.screen.selected == "alpha")
    await pilot.press("ctrl+o")
    await wait_for(pilot, lambda: isinstance(app.screen, ImportDialog) and app.screen.query_one("#import-path").has_focus)
    return app.screen


def fill(dialog: ImportDialog, path="", name="", quant=None) -> None:
    dialog.query_one("#import-path").value = str(path)
    dialog.query_one("#import-name").value = name
    if quant is not None:
        dialog.query_one("#import-quant").value = quant


async def click_start(pilot, dialog: ImportDialog) -> None:
    """Click Start as a user does. Textual's Button ignores a click while it still shows the last
    press (its "-active" effect, 0.2 s): wait for that to end, or the click is lost."""
    button = dialog.query_one("#import-start")
    await wait_for(pilot, lambda: not button.has_class("-active"), "the Start button's press effect to end")
    assert await pilot.click("#import-start")


def error_text(dialog: ImportDialog) -> str:
    return str(dialog.query_one("#import-error").render())


def highlighted_command(palette: CommandPalette) -> str:
    results = palette.query(CommandList)
    if not results or results.first().highlighted is None or results.first().option_count == 0:
        return ""
    return str(results.first().get_option_at_index(results.first().highlighted).prompt)


def test_quant_choices_are_the_quantize_codes_own():
    from llamachat.runtime.gguf.quantize_model import QUANT_TYPES
    from llamachat.tui.screens.import_dialog import quant_type_names

    assert quant_type_names() == list(QUANT_TYPES) and "Q4_K_M" in quant_type_names()


async def test_import_a_gguf_with_a_quant_type_through_the_dialog(library, small_gguf):
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        dialog = await open_dialog(pilot, app)
        fill(dialog, small_gguf, quant="Q8_0")
        await click_start(pilot, dialog)
        await wait_for(pilot, lambda: isinstance(app.screen, LibraryScreen) and app.screen.selected == "tiny-llama-q8_0",
                       "the import to finish", timeout=IMPORT)
        screen = app.screen
        table = screen.query_one("#library-table")
        assert "tiny-llama-q8_0" in [str(table.get_row_at(i)[1]) for i in range(table.row_count)]
        await wait_for(pilot, lambda: any(n.startswith("Imported tiny-llama-q8_0") for n in notifications(app)))
        # the sidebar's model picker knows it too
        select = app.chat_screen.sidebar.query_one("#model-select")
        assert any("tiny-llama-q8_0" in str(p) for p, _ in select._options)
    entry = Library.load().models["tiny-llama-q8_0"]
    assert "tiny-llama-q8_0" in Library.load().file.read_text()  # models.toml
    assert entry.path == paths.models_dir() / "tiny-llama-q8_0.gguf"
    with GGUFFile(entry.path) as g:
        assert g.tensors["blk.0.attn_q.weight"].ggml_type.name == "Q8_0"
    assert models_files() == ["tiny-llama-q8_0.gguf"]


async def test_missing_and_bad_paths_are_sentences_in_the_dialog(library, tmp_path):
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        dialog = await open_dialog(pilot, app)
        await click_start(pilot, dialog)
        await wait_for(pilot, lambda: "Type the path of a .gguf file" in error_text(dialog), showing=lambda: error_text(dialog))
        fill(dialog, tmp_path / "nothing-here")
        await click_start(pilot, dialog)
        await wait_for(pilot, lambda: "nothing-here: no such file or folder" in error_text(dialog), showing=lambda: error_text(dialog))
        notes = tmp_path / "notes.txt"
        notes.write_text("hello")
        fill(dialog, notes)
        await click_start(pilot, dialog)
        await wait_for(pilot, lambda: "notes.txt: not a GGUF file" in error_text(dialog), showing=lambda: error_text(dialog))
        assert app.screen is dialog and not dialog.running  # nothing started, the app goes on
        # an error only the import itself finds (an unsupported architecture) arrives from the worker
        gpt2 = tmp_path / "gpt2.gguf"
        write_gguf(gpt2, {"general.architecture": "gpt2"}, [("w", (32,), 0, np.zeros(32, np.float32))])
        fill(dialog, gpt2)
        await click_start(pilot, dialog)
        await wait_for(pilot, lambda: "architecture 'gpt2' is not supported" in error_text(dialog))
        assert not dialog.running and not dialog.query_one("#import-start").disabled
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, LibraryScreen))
    assert sorted(Library.load().models) == ["alpha", "beta"] and models_files() == []


async def test_cancel_mid_import_leaves_nothing(library, small_gguf, monkeypatch):
    """The import is held at its third tensor (a test hook around the real import_model) until
    the dialog's Cancel button sets the cancel event; meanwhile the progress shows that tensor."""
    real = importers.import_model
    calls = []

    def held_import(source, *, progress, cancel, **kwargs):
        def slow(stage, done, total, what=""):
            calls.append((stage, done))
            progress(stage, done, total, what)
            if stage == "quantize" and done == 3:
                assert cancel.wait(60)

        return real(source, progress=slow, cancel=cancel, **kwargs)

    monkeypatch.setattr(importers, "import_model", held_import)
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        dialog = await open_dialog(pilot, app)
        fill(dialog, small_gguf, name="tiny", quant="Q4_K_M")
        await click_start(pilot, dialog)
        await wait_for(pilot, lambda: "Quantizing 3/" in str(dialog.query_one("#import-stage").render()),
                       "the import to reach the third tensor", timeout=IMPORT)
        stage = str(dialog.query_one("#import-stage").render())
        assert ".weight" in stage  # the tensor's name is shown
        bar = dialog.query_one("#import-progress")
        assert bar.display and bar.progress == 3 and bar.total > 3
        assert dialog.query_one("#import-path").disabled
        await pilot.click("#import-cancel")
        await wait_for(pilot, lambda: not dialog.running)
        assert app.screen is dialog
        assert "was cancelled; nothing was imported" in error_text(dialog)
        assert max(d for s, d in calls if s == "quantize") == 3
        # progress was drawn by the timer, not once per callback
        assert 1 <= dialog.updates <= len(calls)
    assert sorted(Library.load().models) == ["alpha", "beta"] and models_files() == []


async def test_import_is_in_the_command_palette(library):
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, LibraryScreen) and app.screen.selected == "alpha")
        app.action_command_palette()
        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette) and any(w.has_focus for w in app.screen.query(CommandInput)),
                       "the command palette to be open")
        await pilot.press(*"import a model")
        # the palette searches in a worker: wait until the import command is the highlighted hit
        await wait_for(pilot, lambda: highlighted_command(app.screen).startswith("Import a model"))
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ImportDialog))


def test_import_dialog_snapshot(snap_compare, library):
    app, _ = make_app()

    async def run_before(pilot):
        dialog = await open_dialog(pilot, app)
        app.screen_stack[-2].query_one("#library-file").update("models.toml")  # the real path is a temp dir
        fill(dialog, "/nowhere/model.gguf", quant="Q4_K_M")
        await click_start(pilot, dialog)
        await wait_for(pilot, lambda: "/nowhere/model.gguf" in error_text(dialog))
        # the Start button shows its press for 0.2 s: a snapshot taken inside that draws it darker
        start = dialog.query_one("#import-start")
        await wait_for(pilot, lambda: not start.has_class("-active"), "the Start button's press effect to end")
        dialog.query_one("#import-path").cursor_blink = False
        dialog.query_one("#import-path").focus()
        await wait_for(pilot, lambda: dialog.query_one("#import-path").has_focus)

    assert snap_compare(app, terminal_size=(100, 32), run_before=run_before)
