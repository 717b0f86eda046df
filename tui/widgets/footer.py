"""The key footer: Textual's Footer, made again only when the keys it shows change.

Footer recomposes (every key widget made, bound and styled anew) on each bindings update of its
screen, and a screen publishes one for every focus change and binding refresh: nine times while
the chat screen first shows, mostly for the same keys, about a tenth of the app's CPU before the
model is ready. This one skips an update that would show what is shown, and makes one recompose
of several updates that come before it runs (it shows the keys of its own time).
"""

from __future__ import annotations

from textual.widgets import Footer


class KeyFooter(Footer):
    _composed: tuple | None = None  # what the last compose showed (None: nothing yet)
    _pending = False  # a recompose is on its way

    def _shown(self, screen) -> tuple:
        keys = tuple((binding.key, binding.description, binding.action, enabled, tooltip)
                     for (_, binding, enabled, tooltip) in screen.active_bindings.values() if binding.show)
        return keys, self.show_command_palette

    def compose(self):
        if self._bindings_ready:
            self._composed = self._shown(self.screen)
        return super().compose()

    def bindings_changed(self, screen) -> None:
        self._bindings_ready = True
        if not screen.app.app_focus or not self.is_attached or screen is not self.screen:
            return
        if self._pending or self._shown(screen) == self._composed:
            return
        self._pending = True
        self.call_after_refresh(self._recompose_once)

    async def _recompose_once(self) -> None:
        self._pending = False
        await self.recompose()

    def watch_show_command_palette(self) -> None:
        # (Footer shows the change only at its next bindings update: a resize to 80 columns kept
        # the palette key, over f1 Help and ^q Quit)
        if self._composed is not None:
            self.bindings_changed(self.screen)
