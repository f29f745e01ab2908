"""The ledger's tables, declared with peewee: what each row means and which indexes it has.

Peewee makes the tables and serves the admin queries; the statements on every request's path
are fixed SQL strings run on the connection directly (``accounts``, ``dialects``).
"""

from __future__ import annotations

from collections.abc import Sequence

import peewee

__all__ = ["EXTRA_INDEXES", "MODELS", "UNIT_MSAT", "AdminAction", "AdminLoginFailure",
           "AdminSession", "ApiKey", "Instance", "Invoice", "KeysetCounter", "LedgerEntry",
           "LockedProof", "ModelOverride", "NodePayment", "Payment", "Payout", "PendingSwap",
           "RateHit", "Refund", "Reservation", "StoredProof", "UpstreamOverride",
           "UpstreamProvider"]

UNIT_MSAT = {"sat": 1000, "msat": 1}  # the ecash units the proxy takes and stores, in msat


class _Base(peewee.Model):
    class Meta:
        legacy_table_names = False


class ApiKey(_Base):
    key_hash = peewee.CharField(max_length=64, primary_key=True)
    balance_msat = peewee.BigIntegerField(default=0)
    reserved_msat = peewee.BigIntegerField(default=0)
    total_spent_msat = peewee.BigIntegerField(default=0)
    total_requests = peewee.BigIntegerField(default=0)
    created_at = peewee.DoubleField()
    expires_at = peewee.DoubleField(null=True)
    refund_address = peewee.TextField(null=True)
    label = peewee.TextField(null=True)
    disabled = peewee.BooleanField(default=False)
    # Funded with ecash (tokens, Lightning): withdrawable, and backed by the wallet's proofs.
    # Keys the operator funds by hand are prepaid credit: spendable, not withdrawable.
    backed = peewee.BooleanField(default=False)
    # A child key spends its parent's balance (its own stays 0); see ``ledger.limits``.
    parent_key_hash = peewee.CharField(max_length=64, null=True)
    # Limited or a child: the request path's one-statement reservation refuses it, and the
    # reservation takes the limits' transaction instead (keys without limits pay nothing).
    restricted = peewee.BooleanField(default=False, constraints=[peewee.SQL("DEFAULT FALSE")])
    limit_rpm = peewee.IntegerField(null=True)  # requests per minute
    limit_concurrent = peewee.IntegerField(null=True)  # requests in flight at once
    limit_models = peewee.TextField(null=True)  # allowed models, comma-separated
    limit_budget_msat = peewee.BigIntegerField(null=True)  # spendable per period (a ceiling)
    limit_period = peewee.TextField(null=True)  # daily | weekly | monthly | <seconds>; none: manual
    limit_spent_msat = peewee.BigIntegerField(  # charged in the current period
        default=0, constraints=[peewee.SQL("DEFAULT 0")])
    limit_window_start = peewee.DoubleField(null=True)  # when the current period began

    class Meta:
        table_name = "api_keys"
        constraints = (
            peewee.Check("balance_msat >= 0"),
            peewee.Check("reserved_msat >= 0"),
            peewee.Check("reserved_msat <= balance_msat"),
        )


class LedgerEntry(_Base):
    """One change of a key's balance and/or reserved amount. Rows are never updated.

    ``id`` grows with time, so time ranges are found through it. Indexes cost every request
    a page write per commit, so there are none on ``created_at`` or ``request_id``: admin
    queries do without (per key, the (key_hash, id) index serves).
    """

    id = peewee.BigAutoField()
    created_at = peewee.DoubleField()
    key_hash = peewee.CharField(max_length=64)
    kind = peewee.CharField(max_length=16)  # credit, reserve, charge, release, debit
    amount_msat = peewee.BigIntegerField()  # change of balance_msat
    reserved_msat = peewee.BigIntegerField(default=0)  # change of reserved_msat
    request_id = peewee.CharField(max_length=64, null=True)
    model = peewee.TextField(null=True)
    prompt_tokens = peewee.IntegerField(null=True)
    completion_tokens = peewee.IntegerField(null=True)
    note = peewee.TextField(null=True)

    class Meta:
        table_name = "ledger_entries"
        indexes = ((("key_hash", "id"), False),)


class Reservation(_Base):
    """A request in flight: the amount held on its key until it is charged or released.

    ``owner`` is the proxy process (``Instance``) serving it; ``touched_at``, ``delivered``
    (characters of text that reached the client) and ``prompt_tokens`` (an estimate) are kept
    up to date while a stream flows, so a reservation left by a crash can be settled from what
    the ledger knows.
    """

    request_id = peewee.CharField(max_length=64, primary_key=True)
    key_hash = peewee.CharField(max_length=64)
    amount_msat = peewee.BigIntegerField()
    model = peewee.TextField(null=True)
    created_at = peewee.DoubleField()
    touched_at = peewee.DoubleField()
    owner = peewee.CharField(max_length=80, null=True)
    delivered = peewee.BigIntegerField(default=0)
    prompt_tokens = peewee.IntegerField(default=0)
    # The limited key (or child) the request was made with, when it is not simply the key
    # that pays: its requests in flight are counted from here (a partial index).
    limit_key = peewee.CharField(max_length=64, null=True)

    class Meta:
        table_name = "reservations"


class Instance(_Base):
    """A running proxy process, with its heartbeat: whose reservations are whose."""

    id = peewee.CharField(max_length=80, primary_key=True)
    host = peewee.TextField()
    pid = peewee.IntegerField()
    started_at = peewee.DoubleField()
    seen_at = peewee.DoubleField()

    class Meta:
        table_name = "instances"


class StoredProof(_Base):
    """A Cashu proof the proxy holds or held (its secret is the bearer value: keep it private).

    ``state``: ``unspent`` (the operator's pool), ``held`` (redeemed for one x-cashu request,
    ``owner`` = its id, until its change is cut), ``reserved`` (picked for a refund or payout,
    ``owner`` = its id), ``sent`` (handed to a user as change or refund), ``spent`` (used as
    input of a swap or melt).
    """

    secret = peewee.TextField(primary_key=True)
    mint = peewee.TextField()
    unit = peewee.CharField(max_length=8)
    keyset_id = peewee.CharField(max_length=80)
    amount = peewee.BigIntegerField()
    c = peewee.TextField()
    dleq = peewee.TextField(null=True)
    state = peewee.CharField(max_length=10)
    owner = peewee.CharField(max_length=64, null=True, index=True)
    created_at = peewee.DoubleField()
    updated_at = peewee.DoubleField()

    class Meta:
        table_name = "proofs"
        indexes = ((("mint", "unit", "state"), False),)


class Payment(_Base):
    """An incoming token, redeemed once: what it credited, and (x-cashu) the change returned."""

    token_hash = peewee.CharField(max_length=64, primary_key=True)
    kind = peewee.CharField(max_length=16)  # key | create | topup | xcashu | lightning
    key_hash = peewee.CharField(max_length=64, index=True)
    mint = peewee.TextField()
    unit = peewee.CharField(max_length=8)
    amount = peewee.BigIntegerField()  # in the unit, as received
    fee = peewee.BigIntegerField()  # the mint's input fee, in the unit
    msat = peewee.BigIntegerField()  # credited
    request_id = peewee.CharField(max_length=64, null=True)
    change = peewee.TextField(null=True)  # the change token (x-cashu)
    change_msat = peewee.BigIntegerField(default=0)
    # A stream's change known at its start (the token less the reserved maximum), sent in the
    # X-Cashu response header; ``change`` is then the rest, sent before [DONE].
    early_change = peewee.TextField(null=True)
    early_change_msat = peewee.BigIntegerField(default=0)
    created_at = peewee.DoubleField()

    class Meta:
        table_name = "payments"


class Refund(_Base):
    """A withdrawal of a key's balance as a token: debited first, the token made after."""

    id = peewee.CharField(max_length=64, primary_key=True)
    key_hash = peewee.CharField(max_length=64, index=True)
    msat = peewee.BigIntegerField()
    mint = peewee.TextField()
    unit = peewee.CharField(max_length=8)
    token = peewee.TextField(null=True)
    fee = peewee.BigIntegerField(default=0)
    state = peewee.CharField(max_length=10)  # pending | done
    created_at = peewee.DoubleField()
    updated_at = peewee.DoubleField()

    class Meta:
        table_name = "refunds"


class Payout(_Base):
    """Ecash melted to pay a Lightning invoice: the operator's earnings, or a user's refund.

    ``pending`` from before the melt is asked until its outcome is known; an ambiguous melt
    stays pending and is settled from the mint's quote state, so it is never paid twice nor
    counted as paid when it was not. ``outputs`` names the blank outputs (keyset, first
    counter, count) that take the melt's change, so it can be had again after a crash.
    """

    id = peewee.CharField(max_length=64, primary_key=True)
    kind = peewee.CharField(max_length=8)  # payout | refund
    key_hash = peewee.CharField(max_length=64, null=True)  # the refunded key
    destination = peewee.TextField()  # the Lightning address
    mint = peewee.TextField()
    unit = peewee.CharField(max_length=8)
    amount = peewee.BigIntegerField()  # of the invoice, in the unit
    fee_reserve = peewee.BigIntegerField(default=0)
    fee_paid = peewee.BigIntegerField(default=0)
    msat = peewee.BigIntegerField(default=0)  # debited from the key (refunds)
    bolt11 = peewee.TextField()
    quote = peewee.TextField(null=True)
    outputs = peewee.TextField(null=True)
    state = peewee.CharField(max_length=8)  # pending | paid | failed
    error = peewee.TextField(null=True)
    created_at = peewee.DoubleField()
    updated_at = peewee.DoubleField()

    class Meta:
        table_name = "payouts"
        indexes = ((("state",), False),)


class PendingSwap(_Base):
    """A token's swap whose answer was lost (the mint may have done it): the outputs, to ask
    the mint for their signatures (NUT-09) when the same token comes back."""

    token_hash = peewee.CharField(max_length=64, primary_key=True)
    mint = peewee.TextField()
    unit = peewee.CharField(max_length=8)
    amount = peewee.BigIntegerField()
    fee = peewee.BigIntegerField()
    outputs = peewee.TextField()
    created_at = peewee.DoubleField()

    class Meta:
        table_name = "pending_swaps"


class Invoice(_Base):
    """A Lightning invoice (a mint quote at the primary mint) that funds a key once paid.

    ``id_hash`` is the SHA-256 of the invoice id the client holds (the id is a bearer secret:
    for ``create`` it leads to the new key). ``outputs`` keeps the blinded messages sent to
    the mint while minting, so a crash between minting and crediting can be recovered (NUT-09).
    """

    id_hash = peewee.CharField(max_length=64, primary_key=True)
    quote = peewee.TextField()
    mint = peewee.TextField()
    unit = peewee.CharField(max_length=8)
    amount = peewee.BigIntegerField()
    bolt11 = peewee.TextField()
    purpose = peewee.CharField(max_length=8)  # create | topup
    key_hash = peewee.CharField(max_length=64)
    state = peewee.CharField(max_length=10)  # unpaid | minting | credited | expired
    outputs = peewee.TextField(null=True)
    paid_at = peewee.DoubleField(null=True)  # when it was credited
    expires_at = peewee.DoubleField(null=True)
    created_at = peewee.DoubleField()
    updated_at = peewee.DoubleField()

    class Meta:
        table_name = "invoices"
        indexes = ((("state",), False),)


class RateHit(_Base):
    """A request admitted on a key with a requests-per-minute limit, kept one minute: the
    sliding window every process counts in the same transaction that admits the next."""

    id = peewee.BigAutoField()
    key_hash = peewee.CharField(max_length=64)
    at = peewee.DoubleField()

    class Meta:
        table_name = "rate_hits"
        indexes = ((("key_hash", "at"), False),)


class LockedProof(_Base):
    """A proof received locked to the proxy's payment key (NUT-11), accepted offline from its
    DLEQ proof (NUT-12) and not yet swapped at its mint.

    ``y`` (hash_to_curve of the secret, as the mint knows the proof) is the primary key: the
    same proof can be accepted once, whatever token carries it and however many processes
    race. ``state``: ``received`` → ``redeeming`` (in a batch swap, ``batch`` = its id, outputs
    saved in ``pending_swaps`` under that id) → ``redeemed``; or ``lost`` when the mint says it
    was spent by someone else. ``locktime``: the swap must happen before it (None: never
    expires)."""

    y = peewee.CharField(max_length=66, primary_key=True)
    secret = peewee.TextField()
    mint = peewee.TextField()
    unit = peewee.CharField(max_length=8)
    keyset_id = peewee.CharField(max_length=80)
    amount = peewee.BigIntegerField()
    c = peewee.TextField()
    dleq = peewee.TextField(null=True)
    locktime = peewee.BigIntegerField(null=True)
    token_hash = peewee.CharField(max_length=64)
    state = peewee.CharField(max_length=10)
    batch = peewee.CharField(max_length=64, null=True, index=True)
    created_at = peewee.DoubleField()
    updated_at = peewee.DoubleField()

    class Meta:
        table_name = "locked_proofs"
        indexes = ((("state", "locktime"), False),)


class KeysetCounter(_Base):
    """The next unused NUT-13 derivation counter of a keyset: the wallet's secrets are derived
    from its seed and these, and a counter is never used twice (see ``ledger.counters``)."""

    keyset_id = peewee.CharField(max_length=80, primary_key=True)
    counter = peewee.BigIntegerField(default=0)

    class Meta:
        table_name = "keyset_counters"


class UpstreamOverride(_Base):
    """An operator's live change to a provider (``model`` ""), or to one of its models: off,
    or re-priced (USD per token). Every process on the database follows it."""

    provider = peewee.CharField(max_length=64)
    model = peewee.CharField(max_length=200, default="")
    disabled = peewee.BooleanField(default=False)
    prompt = peewee.CharField(max_length=40, null=True)
    completion = peewee.CharField(max_length=40, null=True)
    updated_at = peewee.DoubleField()

    class Meta:
        table_name = "upstream_overrides"
        primary_key = peewee.CompositeKey("provider", "model")


class UpstreamProvider(_Base):
    """A provider an operator added while the proxy runs (``routstr upstreams add``, the admin
    API): ``entry`` is its providers-file entry as JSON, key included as the operator gave it
    (``api_key`` in clear, or ``api_key_env``). Every process on the database follows it."""

    name = peewee.CharField(max_length=64, primary_key=True)
    entry = peewee.TextField()
    updated_at = peewee.DoubleField()

    class Meta:
        table_name = "upstream_providers"


class NodePayment(_Base):
    """A token sent to another Routstr node with one request (``X-Cashu``), and what came
    back: the cost of that request to this proxy is ``sent - change``. ``loss``: change the
    node kept beyond the cost it reported. ``state``: sent (in flight) | settled | recovered
    (the node never took the token: received back into the wallet) | lost."""

    id = peewee.BigAutoField()
    request_id = peewee.CharField(max_length=64)  # the user's request (one per node tried)
    provider = peewee.TextField()
    mint = peewee.TextField()
    unit = peewee.CharField(max_length=8)
    token = peewee.TextField()  # the token sent: to take it back if the node never used it
    sent_msat = peewee.BigIntegerField()
    change_msat = peewee.BigIntegerField(default=0)
    reported_msat = peewee.BigIntegerField(null=True)  # the node's cost header, if any
    cost_msat = peewee.BigIntegerField(default=0)
    loss_msat = peewee.BigIntegerField(default=0)
    state = peewee.CharField(max_length=16)
    created_at = peewee.DoubleField()
    settled_at = peewee.DoubleField(null=True)

    class Meta:
        table_name = "node_payments"
        indexes = ((("request_id",), False), (("state",), False))
class AdminSession(_Base):
    """An open /admin session, shared by every process on the database (``adminstore``)."""

    id_hash = peewee.CharField(max_length=64, primary_key=True)  # SHA-256 of the cookie's id
    csrf = peewee.TextField()
    tag = peewee.CharField(max_length=64)  # keyed digest of the password it was opened with
    created_at = peewee.DoubleField()
    expires_at = peewee.DoubleField()
    flash = peewee.TextField(null=True)  # messages shown once, as JSON

    class Meta:
        table_name = "admin_sessions"


class AdminLoginFailure(_Base):
    """A failed /admin login (or admin API token) from a client address, for the limiter."""

    id = peewee.BigAutoField()
    address = peewee.TextField()
    at = peewee.DoubleField()

    class Meta:
        table_name = "admin_login_failures"
        indexes = ((("address", "at"), False),)


class ModelOverride(_Base):
    """The operator's word on one model (admin API): offered or not, and prices (USD, as in
    models.json) replacing the catalog's. Read by every process when it publishes its models."""

    model_id = peewee.TextField(primary_key=True)
    enabled = peewee.BooleanField(default=True)
    pricing = peewee.TextField(null=True)  # JSON: {"prompt", "completion", "request"}
    updated_at = peewee.DoubleField()

    class Meta:
        table_name = "model_overrides"


class AdminAction(_Base):
    """A change the operator made (dashboard or admin API): append-only."""

    id = peewee.BigAutoField()
    at = peewee.DoubleField()
    actor = peewee.CharField(max_length=16)  # admin (the dashboard) | api
    action = peewee.CharField(max_length=32)
    target = peewee.TextField()
    detail = peewee.TextField()

    class Meta:
        table_name = "admin_actions"


MODELS: Sequence[type[peewee.Model]] = (ApiKey, LedgerEntry, Reservation, Instance, StoredProof,
                                        Payment, Refund, Invoice, KeysetCounter, Payout,
                                        PendingSwap, RateHit, LockedProof, AdminSession,
                                        AdminLoginFailure, AdminAction,
                                        ModelOverride, NodePayment, UpstreamOverride,
                                        UpstreamProvider)

# Indexes made (if missing) on tables old and new, partial where only a few rows need one:
# a plain key's reservation never touches the limit_key index.
EXTRA_INDEXES: Sequence[tuple[str, str, str]] = (  # (table, name, statement)
    ("api_keys", "api_keys_parent", "CREATE INDEX IF NOT EXISTS api_keys_parent ON api_keys "
     "(parent_key_hash) WHERE parent_key_hash IS NOT NULL"),
    ("reservations", "reservations_limit_key", "CREATE INDEX IF NOT EXISTS "
     "reservations_limit_key ON reservations (limit_key) WHERE limit_key IS NOT NULL"),
    # The change pool picks unspent proofs by amount on the request path (locked payments).
    ("proofs", "proofs_by_amount", "CREATE INDEX IF NOT EXISTS proofs_by_amount "
     "ON proofs (mint, unit, state, amount)"),
)
