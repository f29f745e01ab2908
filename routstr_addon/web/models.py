"""``/v1/models``: the models offered, with USD prices and their price in sats now."""

from __future__ import annotations

from typing import Any

from mitmproxy import http

from routstr_addon.errors import ApiError, json_response
from routstr_addon.metering.pricing import ModelPrice
from routstr_addon.web import Peer, Services


def describe(services: Services, model: ModelPrice) -> dict[str, Any]:
    entry = {"object": "model", "owned_by": model.id.split("/")[0] if "/" in model.id else "",
             **model.info}
    if services.config.model_based_pricing:
        entry["sats_pricing"] = services.pricing.sats_pricing(model)
    else:
        fixed = services.config.cost_per_request_msat / 1000
        entry["sats_pricing"] = {"prompt": 0.0, "completion": 0.0, "request": fixed,
                                 "max_cost": fixed}
    return entry


def list_models(services: Services, request: http.Request, peer: Peer) -> http.Response:
    models = services.pricing.models.values()
    return json_response(200, {"object": "list", "data": [describe(services, m) for m in models]})


def get_model(services: Services, request: http.Request, peer: Peer) -> http.Response:
    name = request.path.split("?", 1)[0].removeprefix("/v1/models/")
    model = services.pricing.resolve(name)
    if model is None:
        return ApiError(404, f"The model {name!r} is not offered here.",
                        code="model_not_found", param="model").response()
    return json_response(200, describe(services, model))
