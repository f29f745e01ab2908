"""Finding and being found: Nostr listings (kind 38421) and the /v1/providers directory."""
