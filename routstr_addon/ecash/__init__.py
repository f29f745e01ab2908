"""Cashu mechanics: tokens, the mint client, the NUT-13 seed, the wallet and its proofs."""
