"""The `llamachat` command line and the Textual chat app."""
