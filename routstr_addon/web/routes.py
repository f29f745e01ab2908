"""Which local endpoint answers a path: a dictionary lookup on the exact path (plus
``/v1/models/{id}``, invoice status and everything under ``/admin``), cheap enough for every
request."""

from __future__ import annotations

from collections.abc import Mapping

from routstr_addon.web import Handler, admin, adminapi, balance, children, info, models, providers

__all__ = ["ROUTES", "lookup"]


def _table() -> dict[str, dict[str, Handler]]:
    table: dict[str, dict[str, Handler]] = {
        "/": {"GET": info.info},
        "/health": {"GET": info.health},
        "/ready": {"GET": info.ready},
        "/metrics": {"GET": info.metrics},
        "/v1/info": {"GET": info.info},
        "/v1/models": {"GET": models.list_models},
        "/v1/providers": {"GET": providers.providers},
        "/v1/providers/": {"GET": providers.providers},
    }
    for base in ("/v1/balance", "/v1/wallet"):
        table[f"{base}/info"] = {"GET": balance.info}
        table[f"{base}/"] = {"GET": balance.info}
        table[base] = {"GET": balance.info}
        table[f"{base}/create"] = {"POST": balance.create, "GET": balance.create}
        table[f"{base}/topup"] = {"POST": balance.topup}
        table[f"{base}/refund"] = {"POST": balance.refund}
        table[f"{base}/lightning/invoice"] = {"POST": balance.lightning_invoice}
        table[f"{base}/lightning/recover"] = {"POST": balance.lightning_recover}
        table[f"{base}/child-key"] = {"POST": children.create_children}
        table[f"{base}/child-key/reset"] = {"POST": children.reset_child}
        table[f"{base}/child-key/limits"] = {"POST": children.limit_child}
        table[f"{base}/history"] = {"GET": children.history}
    # The Routstr protocol's Lightning paths (RIP-08) at the root, as its clients call them.
    table["/lightning/invoice"] = {"POST": balance.lightning_invoice}
    table["/lightning/recover"] = {"POST": balance.lightning_recover}
    return table


ROUTES: Mapping[str, Mapping[str, Handler]] = _table()
_MODEL: Mapping[str, Handler] = {"GET": models.get_model}
_INVOICE_STATUS: Mapping[str, Handler] = {"GET": balance.lightning_status}
_INVOICE_BASES = ("/v1/balance/lightning/invoice/", "/v1/wallet/lightning/invoice/",
                  "/lightning/invoice/")
_ADMIN_API: Mapping[str, Handler] = dict.fromkeys(("GET", "POST", "PATCH", "PUT", "DELETE"),
                                                  adminapi.handle)


def lookup(path: str) -> Mapping[str, Handler] | None:
    """The handlers (by method) for a local path, or None if the path is forwarded."""
    found = ROUTES.get(path)
    if found is not None:
        return found
    if path.startswith(adminapi.PREFIX):  # the admin API for scripts
        return _ADMIN_API
    if path.startswith("/admin"):  # the dashboard; nothing under it goes out
        return admin.HANDLERS
    if path.startswith("/v1/models/"):
        return _MODEL
    if path.endswith("/status") and path.startswith(_INVOICE_BASES):
        return _INVOICE_STATUS
    return None
