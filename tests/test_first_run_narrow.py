"""What an 80x24 terminal showed in a tmux run of the first five minutes (issue 18, "Done when"):
the status line lost its end (the "Esc stops" hint and the dropped-turns mark) while a reply was
being written."""

from __future__ import annotations

from first_run_support import FakeScript, make_app, make_library, ready, reply_done, send, templated_factory, wait_for


def status_line(app) -> str:
    """The status line as drawn: what the terminal shows, cut where the widget ends."""
    status = app.chat_screen.query_one("#status")
    return status.render_line(0).text


async def test_status_line_at_80_columns_keeps_esc_stops_and_the_meter(tmp_path):
    make_library(tmp_path)
    words = " ".join(f"w{i}" for i in range(30))
    # the fifth reply holds after 3 tokens until stopped: it is being written when looked at
    script = FakeScript(replies=[words] * 5)
    app, _ = make_app(["-c", "128", "-n", "16", "--system", "Be brief."], script=script, model="alpha")
    app.engine._factory = templated_factory(script)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        for i in range(4):
            await send(pilot, app, f"question {i} " + words)
            await reply_done(pilot, app)
        assert app.conv.memory_start > 0  # the chat outgrew n_ctx 128: the oldest turns are left out
        script.hold_after = 3
        await send(pilot, app, "one more " + words)
        await wait_for(pilot, lambda: app.engine.n_tokens() > 0 and app.generating)
        app.update_status()
        await pilot.pause(0.1)
        shown = status_line(app)
        assert "Esc stops" in shown and "oldest" in shown and "ctx " in shown, shown
        assert shown.rstrip().endswith("Esc stops"), shown  # nothing cut after it
        await pilot.press("escape")
        await reply_done(pilot, app)
        # the full line, everything in it, where there is room
        await pilot.resize_terminal(140, 45)
        await wait_for(pilot, lambda: status_line(app).rstrip().endswith("(full: stop) · oldest turns dropped │ chat"))
