"""Alerts: a message leaves the machine when something an operator must know happens.

`notify:` picks the events (`failed`, `not_promoted`, `promoted`, `budget_exceeded`) and the
targets: a plain webhook (HTTP POST of the JSON body, with urllib) and/or a saved Prefect
notification block (Slack, email, Teams, ...; loaded by name only when a message is sent). Secrets
stay out of the config: the webhook URL can come from an environment variable (`url_env`), a
block holds its own credentials.

The body, the same for every target (a block gets it as indented JSON text):
`{"event", "config", "run", "flow_run_id", "ui_url", "stage", "state", "reason", "metrics", "sent_at"}`;
`ui_url` is the flow run's page when `PREFECT_UI_URL` is set.

A message that cannot be delivered is logged and never fails the run: the run's own outcome is
what matters, and an alert outage must not turn a promoted model into a failed run.
(`crashed` is sent by the Prefect server, not from here: the process that would send it is dead;
see tasks/zombies.py.)
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from datetime import datetime, timezone
from typing import Any

from tasks.config import RunConfig

log = logging.getLogger("loraflow.notify")


def message(
    cfg: RunConfig, event: str, stage: str | None, state: str, reason: str, metrics: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON body of an alert, with the flow run's name and UI link when inside a flow run."""
    run_name, run_id = _flow_run()
    ui = os.environ.get("PREFECT_UI_URL") or _prefect_setting("PREFECT_UI_URL")
    return {
        "event": event,
        "config": cfg.name,
        "run": run_name,
        "flow_run_id": run_id,
        "ui_url": f"{ui.rstrip('/')}/runs/flow-run/{run_id}" if ui and run_id else None,
        "stage": stage,
        "state": state,
        "reason": reason,
        "metrics": metrics or {},
        "sent_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def send(cfg: RunConfig, event: str, stage: str | None, state: str, reason: str, metrics: dict[str, Any] | None = None) -> list[str]:
    """Sends the event to every configured target if the config picks it; returns the targets
    reached ("webhook", "block:NAME"). Delivery failures are logged, never raised."""
    settings = cfg.notify
    if settings is None or event not in settings.events:
        return []
    body = message(cfg, event, stage, state, reason, metrics)
    reached = []
    if settings.webhook is not None:
        try:
            post_json(_webhook_url(settings.webhook), body, settings.webhook.timeout)
            reached.append("webhook")
        except Exception as error:  # an alert outage must not fail the run
            log.warning("notify: %s not delivered to the webhook (%s)", event, _without_url(error, settings.webhook))
    if settings.block:
        try:
            _send_block(settings.block, body)
            reached.append(f"block:{settings.block}")
        except Exception as error:
            log.warning("notify: %s not delivered to the Prefect block %r (%s: %s)", event, settings.block, type(error).__name__, error)
    if reached:
        log.info("notify: %s sent to %s", event, ", ".join(reached))
    return reached


def post_json(url: str, body: dict[str, Any], timeout: float) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", "User-Agent": "loraflow"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (the operator's own URL)
        response.read()


def _webhook_url(webhook: Any) -> str:
    if webhook.url:
        return webhook.url
    url = os.environ.get(webhook.url_env, "")
    if not url:
        raise LookupError(f"the environment variable {webhook.url_env} named by notify.webhook.url_env is not set")
    return url


def _without_url(error: Exception, webhook: Any) -> str:
    """The error, without a URL that may carry a token."""
    text = f"{type(error).__name__}: {error}"
    url = webhook.url or os.environ.get(webhook.url_env or "", "")
    return text.replace(url, "<notify.webhook url>") if url else text


def _send_block(name: str, body: dict[str, Any]) -> None:
    from prefect.blocks.core import Block

    block = Block.load(name)
    subject = f"loraflow {body['config']}: {body['event']}" + (f" ({body['stage']})" if body.get("stage") else "")
    block.notify(body=json.dumps(body, indent=2), subject=subject)


def _flow_run() -> tuple[str | None, str | None]:
    try:
        from prefect.runtime import flow_run

        return flow_run.name, flow_run.id
    except Exception:  # outside a flow run (a plain function call)
        return None, None


def _prefect_setting(name: str) -> str | None:
    try:
        from prefect.settings import PREFECT_UI_URL

        return PREFECT_UI_URL.value() if name == "PREFECT_UI_URL" else None
    except Exception:
        return None
