"""Code that runs on an instance, inside or beside labdeck's jobs (standard library only, Python 3.8+).

``labdeck.py`` is the module training code imports (``import labdeck``): it is
copied verbatim into each run directory's ``lib/`` and put on ``PYTHONPATH``.
``agent.py`` is the per-instance monitoring agent.
"""
