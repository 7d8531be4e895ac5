"""The OpenAI-compatible HTTP server (the ``[server]`` extra).

Layout: ``_app`` settings, the app factory (routes, error mapping, lifespan) and ``serve()``;
``_openai`` the request models and response bodies of the OpenAI wire format; ``_asgi`` the gate
middleware (metrics, body limit, drain, auth) and the SSE response.
"""

from ._app import ServerSettings, create_app, serve

__all__ = ["ServerSettings", "create_app", "serve"]
