"""The chat app's screens: chat, help, saved chats, model library, first run, confirm."""
