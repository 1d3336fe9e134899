"""The node's HTTP side inside ``serve``: status page, job detail, thumbnails, ``/metrics``, ``/healthz``.

``server`` (standard-library HTTP server, routing, token), ``status`` (the page's figures), ``page`` (HTML),
``thumbs`` (PNG thumbnails of the node's pictures), ``metrics`` (Prometheus collector over the database),
``health`` (what ``/healthz`` checks). Configured by ``[http]`` (:class:`node.config.HttpConfig`).
"""

from node.http.health import Liveness
from node.http.server import StatusServer, start_http

__all__ = ["Liveness", "StatusServer", "start_http"]
