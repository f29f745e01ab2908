"""Upstream providers: who the proxy forwards to, what each offers at which price, which one
serves a request now, and trying the next one when a provider fails before answering.

``providers`` reads the configuration, ``catalog`` keeps the priced models of every provider
(OpenRouter's list refreshed in the background, a snapshot on disk), ``health`` holds one
circuit breaker per provider, ``router`` orders the candidates of a request, and ``failover``
is the in-process hop that tries them in turn for one request.
"""
