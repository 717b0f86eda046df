"""The chat app's own widgets: the message input, a chat message, the settings sidebar."""
