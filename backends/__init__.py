"""labdeck backends: everything that talks to the world.

This package never imports ``textual`` or ``tui`` (an import-linter contract
in the tests holds it to that), so the CLI, the tests and the benchmarks can
drive it with no terminal at all.
"""

__version__ = "0.1.0"
