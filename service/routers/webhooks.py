"""/v1/webhook-secret: the tenant's signing secret, to verify the webhooks it receives."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from service import webhooks
from service.deps import SessionDep, SettingsDep, TenantDep
from service.openapi import SECRET_EXAMPLE, json_response

router = APIRouter(prefix="/v1/webhook-secret", tags=["webhooks"])

VERIFY = """

Verify a delivery: take the raw request body `body` (bytes, before any JSON parsing) and the
header `Gradwatch-Signature: t=<unix>,v1=<hex>[,v1=<hex>]`; compute
`hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()` and accept if it
equals one of the `v1` values (`hmac.compare_digest`) and `t` is within 5 minutes of your clock
(replays are refused). `gradwatch.client.verify_webhook(body, header, secret)` does exactly this.
Dedupe on `Gradwatch-Delivery` (the same for every attempt of one event)."""


@router.get("", summary="The webhook signing secret",
            description="The secret this tenant's webhooks are signed with (created on first use)." + VERIFY,
            responses={200: json_response("The secret.", SECRET_EXAMPLE)})
def get_webhook_secret(session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    row = webhooks.get_secret(session, tenant)
    session.commit()
    return webhooks.secret_json(row)


@router.post("/rotate", summary="Rotate the webhook signing secret",
             description="A new secret signs every delivery from now on. The previous one keeps signing too "
                         "(a second `v1=` in `Gradwatch-Signature`) for `grace_seconds` (default "
                         "`GRADWATCH_WEBHOOK_SECRET_GRACE_SECONDS`, a day), so receivers can switch without "
                         "dropping a delivery; `grace_seconds=0` retires it at once (a leaked secret)." + VERIFY,
             responses={200: json_response("The new secret.", {**SECRET_EXAMPLE, "rotated_at": "2025-01-02T08:00:00Z",
                                                               "previous_secret_expires_at": "2025-01-03T08:00:00Z"})})
def rotate_webhook_secret(
    session: SessionDep, tenant: TenantDep, settings: SettingsDep,
    grace_seconds: Annotated[float | None, Query(ge=0, le=30 * 86400,
                                                 description="How long the previous secret keeps signing.")] = None,
) -> dict[str, Any]:
    grace = settings.webhook_secret_grace_seconds if grace_seconds is None else grace_seconds
    row = webhooks.rotate_secret(session, tenant, grace)
    session.commit()
    return webhooks.secret_json(row)
