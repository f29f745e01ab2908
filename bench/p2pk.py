"""Per-proof CPU of accepting ecash locked to the proxy's key offline (``ecash/p2pk.py``).

    python -m bench.p2pk [--rounds 7] [--number 300] [--json] [--no-wait]

No mint process and no network: a keyset is made here and its proofs are signed with
nutshell's own mint-side functions (``step2_bob``, DLEQ included), each locked to the payment
key as cashu-ts locks them. Then, per proof unless said otherwise:

* DLEQ (NUT-12): ``p2pk.verify_dleq`` (hash_to_curve included) against nutshell's
  ``carol_verify_dleq`` fed from the proof's hex as a wallet has it (``PrivateKey`` for e, s
  and r, ``PublicKey`` for C, as ``MintWallet.verify_incoming`` does), and against
  ``carol_verify_dleq`` on ready-made key objects (its bare arithmetic);
* the secret: ``parse_lock`` + ``check_lock`` against nutshell's ``parse_spending_condition``
  (loguru's sinks removed: its DEBUG line per secret is formatted but not written);
* ``hash_to_curve``: ours against nutshell's;
* the Schnorr witness to spend one later (``PaymentKey.witness``);
* the whole offline check (``verify_payment``) of a 3-proof and an 8-proof token, per token
  and per proof, next to ``parse_token`` of the same token (nutshell's models; it computes Y
  too).

Each figure is the median over the rounds of (time of ``number`` calls / number), rounds of the
compared functions interleaved so that drift hits both alike; the best round is shown too.
Waits first for a quiet moment (the CPU is shared): ``--no-wait`` skips that.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from typing import Any

from routstr_addon.ecash.p2pk import (
    LockPolicy,
    MintKeys,
    MintKeyset,
    PaymentKey,
    check_lock,
    hash_to_curve,
    parse_lock,
    verify_dleq,
    verify_payment,
)
from routstr_addon.ecash.tokens import nutshell, parse_token, serialize_token

from .common import fmt, table, wait_quiet

MINT_URL = "http://127.0.0.1:3338"
KEYSET_ID = "00b2d4c6a8e0f1a3"


def _setup() -> dict[str, Any]:
    nutshell()
    from cashu.core.base import DLEQWallet, Proof
    from cashu.core.crypto import b_dhke
    from cashu.core.crypto.secp import PrivateKey

    key = PaymentKey(secrets.token_bytes(32))
    private = {2**i: PrivateKey(secrets.token_bytes(32)) for i in range(8)}
    keyset = MintKeyset(KEYSET_ID, "sat", {a: k.public_key.format().hex()
                                           for a, k in private.items()})

    def locked(amount: int) -> Proof:
        secret = json.dumps(["P2PK", {"nonce": secrets.token_hex(32), "data": key.public_hex,
                                      "tags": []}], separators=(",", ":"))
        b_, r = b_dhke.step1_alice(secret)
        c_, e, s = b_dhke.step2_bob(b_, private[amount])
        c = b_dhke.step3_alice(c_, r, private[amount].public_key)
        return Proof(id=KEYSET_ID, amount=amount, secret=secret, C=c.format().hex(),
                     dleq=DLEQWallet(e=e.to_hex(), s=s.to_hex(), r=r.to_hex()))

    three = [locked(a) for a in (1, 4, 16)]
    eight = [locked(2**i) for i in range(8)]
    return {"key": key, "keyset": keyset, "mint": MintKeys(MINT_URL, [keyset]),
            "private": private, "three": three, "eight": eight,
            "token3": serialize_token(MINT_URL, "sat", three),
            "token8": serialize_token(MINT_URL, "sat", eight)}


def _cases(env: dict[str, Any]) -> dict[str, tuple[Callable[[], object], int]]:
    """name -> (one call, proofs per call)."""
    from cashu.core.crypto import b_dhke
    from cashu.core.crypto.secp import PrivateKey, PublicKey
    from cashu.core.nuts.nut10 import parse_spending_condition

    proof = env["eight"][5]
    keyset: MintKeyset = env["keyset"]
    a = env["private"][proof.amount].public_key
    dleq = proof.dleq

    def nutshell_from_hex() -> bool:
        return bool(b_dhke.carol_verify_dleq(
            secret_msg=proof.secret, C=PublicKey(bytes.fromhex(proof.C)),
            r=PrivateKey(bytes.fromhex(dleq.r)), e=PrivateKey(bytes.fromhex(dleq.e)),
            s=PrivateKey(bytes.fromhex(dleq.s)), A=a))

    ready = {"secret_msg": proof.secret, "C": PublicKey(bytes.fromhex(proof.C)),
             "r": PrivateKey(bytes.fromhex(dleq.r)), "e": PrivateKey(bytes.fromhex(dleq.e)),
             "s": PrivateKey(bytes.fromhex(dleq.s)), "A": a}
    policy = LockPolicy(env["key"].public_hex)
    mint: MintKeys = env["mint"]
    token3, token8 = parse_token(env["token3"]), parse_token(env["token8"])
    secret = proof.secret.encode()
    now = time.time()
    assert verify_dleq(proof, keyset) and nutshell_from_hex()
    assert verify_payment(token8, mint, policy, now).amount == 255
    return {
        "DLEQ: p2pk.verify_dleq (with hash_to_curve)": (lambda: verify_dleq(proof, keyset), 1),
        "DLEQ: nutshell carol_verify_dleq, from hex": (nutshell_from_hex, 1),
        "DLEQ: nutshell carol_verify_dleq, objects ready": (
            lambda: b_dhke.carol_verify_dleq(**ready), 1),
        "secret: parse_lock + check_lock": (
            lambda: check_lock(parse_lock(proof.secret), policy.pubkey, now), 1),
        "secret: nutshell parse_spending_condition": (
            lambda: parse_spending_condition(proof.secret), 1),
        "hash_to_curve: p2pk": (lambda: hash_to_curve(secret), 1),
        "hash_to_curve: nutshell": (lambda: b_dhke.hash_to_curve(secret), 1),
        "witness: PaymentKey.witness (Schnorr)": (lambda: env["key"].witness(proof.secret), 1),
        "verify_payment, 3-proof token": (lambda: verify_payment(token3, mint, policy, now), 3),
        "verify_payment, 8-proof token": (lambda: verify_payment(token8, mint, policy, now), 8),
        "parse_token, 3-proof token": (lambda: parse_token(env["token3"]), 3),
        "parse_token, 8-proof token": (lambda: parse_token(env["token8"]), 8),
    }


def measure(rounds: int, number: int) -> list[dict[str, Any]]:
    from loguru import logger

    logger.remove()  # nutshell logs each parsed secret at DEBUG: time it without a sink
    cases = _cases(_setup())
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):  # interleaved: every case once per round
        for name, (call, _) in cases.items():
            samples[name].append(timeit.timeit(call, number=number) / number * 1e6)
    rows = []
    for name, (_, proofs) in cases.items():
        median, best = statistics.median(samples[name]), min(samples[name])
        rows.append({"case": name, "proofs": proofs, "median_us": median, "best_us": best,
                     "per_proof_us": median / proofs})
    return rows


def render(rows: list[dict[str, Any]], busy: float) -> str:
    body = [[r["case"], str(r["proofs"]), fmt(r["median_us"], 1), fmt(r["best_us"], 1),
             fmt(r["per_proof_us"], 1)] for r in rows]
    return table(f"Offline acceptance of P2PK-locked proofs (µs; {busy:.2f} cores busy before)",
                 ["case", "proofs", "median", "best", "per proof"], body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--number", type=int, default=300, help="calls per round and case")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-wait", action="store_true", help="do not wait for a quiet moment")
    args = p.parse_args(argv)
    busy = 0.0 if args.no_wait else wait_quiet(120, lambda m: print(m, file=sys.stderr))
    rows = measure(args.rounds, args.number)
    if args.json:
        print(json.dumps({"busy_cores": busy, "rows": rows}))
    else:
        print(render(rows, busy))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
