"""`llamachat serve`: an OpenAI-compatible HTTP server for the local engine.

protocol.py checks requests and shapes errors, host.py keeps the resident model and its
worker thread, app.py is the Starlette app and the uvicorn server around it. The command
itself (flags, start-up banner) is tui/commands/serve.py.
"""
