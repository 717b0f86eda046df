"""The quality figures measured at import (models.toml `quality`, issue #20 part 3) in the app:
the library screen's table and form, and the line under the sidebar's model picker; nothing
for a model without figures."""

from __future__ import annotations

from tui_support import SIZE, make_app, make_library, ready, wait_for

from textual.widgets import DataTable, Static

from llamachat.model_store.library import Library
from llamachat.tui.screens.library import LibraryScreen

# what `llamachat import --quant Q4_0 --report` writes (importers.quality_entry)
QUALITY_TOML = """
[models.alpha.quality]
ppl = 18.2345
source_ppl = 17.9012
kl = 0.012345
top_agree = 0.9612
tokens = 2048
source = "F16"
"""


def library_with_figures(folder):
    """alpha with figures (written as import writes them), beta without."""
    lib = make_library(folder)
    with open(lib.file, "a", encoding="utf-8") as f:
        f.write(QUALITY_TOML)
    lib = Library.load()
    assert not lib.warnings, lib.warnings
    assert lib.models["alpha"].quality["kl"] == 0.012345 and not lib.models["beta"].quality
    return lib


def text_of(widget) -> str:
    return str(widget.render())


async def test_the_picker_shows_the_chosen_models_figures_and_nothing_without(tmp_path):
    library_with_figures(tmp_path)
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        line = app.chat_screen.sidebar.query_one("#model-quality", Static)
        await wait_for(pilot, lambda: "KL 0.0123 top 96.1%" in text_of(line))
        assert line.display
        app.switch_model("beta")
        await wait_for(pilot, lambda: app.entry.name == "beta" and app.engine.loaded and not app.loading)
        await pilot.pause(0.1)
        assert app.chat_screen.sidebar.query_one("#model-select").value == "beta"
        assert text_of(line).strip() == "" and not line.display
        app.switch_model("alpha")
        await wait_for(pilot, lambda: "KL 0.0123" in text_of(line) and line.display)


async def test_the_library_screen_shows_the_figures_in_its_table_and_form(tmp_path):
    library_with_figures(tmp_path)
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, LibraryScreen) and app.screen.selected == "alpha")
        screen = app.screen
        table = screen.query_one(DataTable)
        quality_column = [str(c.label) for c in table.columns.values()].index("quality")
        assert str(table.get_row("alpha")[quality_column]) == "KL 0.0123 top 96.1%"
        assert str(table.get_row("beta")[quality_column]) == "-"
        details = screen.query_one("#lib-quality", Static)
        shown = text_of(details)
        for figure in ("KL 0.0123", "top 96.1%", "perplexity 18.2345", "F16 source 17.9012", "2048 tokens"):
            assert figure in shown, (figure, shown)
        assert details.display
        screen.show_form("beta")
        await pilot.pause()
        assert text_of(details).strip() == "" and not details.display
        # the figures are read-only: saving the form keeps them
        screen.show_form("alpha")
        screen.query_one("#lib-description").value = "with figures"
        screen.action_save()
        assert Library.load().models["alpha"].quality["top_agree"] == 0.9612
