"""What an operator watches the proxy by: liveness and readiness (``/health``, ``/ready``), a
log line per request, and Prometheus metrics."""
