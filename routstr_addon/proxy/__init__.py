"""mitmproxy glue only: the hooks, the upstream request built from what was priced, the
stream adapter, mitmweb scrubbing."""
