"""The OpenAI-compatible HTTP server (the ``[server]`` extra).

Layout: see ``_app``'s docstring; the reference for users is ``docs/server.md``.
"""

from ._app import ServerSettings, create_app, serve

__all__ = ["ServerSettings", "create_app", "serve"]
