"""labdeck's terminal UI (Textual) and CLI. Everything that talks to the world is in ``backends``."""
