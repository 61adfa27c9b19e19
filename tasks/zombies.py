"""Killed runs become Crashed, and the `crashed` alert goes out, although nothing of them is left.

A process killed by the kernel (OOM, `kill -9`, a lost node) runs no `finally:` and no Prefect hook:
its flow run would stay "Running" forever. So the evidence has to be the *absence* of something,
judged by the Prefect server:

- every pipeline flow run sends `prefect.flow-run.heartbeat` events
  (`PREFECT_FLOWS_HEARTBEAT_FREQUENCY`, which `loraflow run`/`serve` and the deployment set to
  `HEARTBEAT_SECONDS`, Prefect's minimum);
- one server-wide automation (`ensure_zombie_automation`, created by `loraflow server` and
  `loraflow deploy`) expects, after each heartbeat of a `loraflow-pipeline` run, another heartbeat
  or a terminal state within `ZOMBIE_WINDOW_SECONDS`, and otherwise sets the run Crashed (the
  recipe of Prefect's "detect zombie flows" guide);
- a per-config automation (`sync_crash_alert`, created before the run starts by `loraflow run`,
  `serve` and `deploy` when `notify.events` has `crashed`) reacts to that Crashed state event
  (and to any other crash, e.g. SIGTERM) and sends the `tasks/notify.py` body to the config's
  webhook (through a Prefect Webhook block holding the URL) and/or its notification block.

The alert is sent by the server, so it needs one: in Prefect's ephemeral mode (no
`PREFECT_API_URL`) the server dies with the run and nothing is set up.
"""

from __future__ import annotations

import json
import os
import re
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from tasks.config import RunConfig

if TYPE_CHECKING:
    from prefect.automations import Automation

FLOW_NAME = "loraflow-pipeline"
# Prefect's minimum (flow_engine.MINIMUM_HEARTBEAT_INTERVAL): the quickest a zombie can be seen.
HEARTBEAT_SECONDS = 30
# Three heartbeats: a busy machine that delays one heartbeat does not crash a live run.
ZOMBIE_WINDOW_SECONDS = 3 * HEARTBEAT_SECONDS
ZOMBIE_AUTOMATION = "loraflow: mark zombie pipeline runs Crashed"
TERMINAL_EVENTS = ("Completed", "Failed", "Cancelled", "Crashed")


def zombie_automation(window_seconds: int = ZOMBIE_WINDOW_SECONDS) -> Automation:
    """After a heartbeat of a pipeline run, another heartbeat (or a terminal state) must arrive
    within `window_seconds`, per flow run; if none does, the run is set Crashed."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    return Automation(
        name=ZOMBIE_AUTOMATION,
        description=f"Flow runs of {FLOW_NAME} that stop sending heartbeats (killed process, lost machine) become Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{state}" for state in TERMINAL_EVENTS)},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=window_seconds),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"no heartbeat for {window_seconds} s: the process running this flow run was killed or its machine was lost",
        )],
    )


def ensure_zombie_automation(window_seconds: int = ZOMBIE_WINDOW_SECONDS) -> str:
    """Creates the zombie automation on the server of PREFECT_API_URL, or brings an existing one
    (found by name) up to date; returns "created" or "updated"."""
    return _upsert(zombie_automation(window_seconds))


def run_tag(config_path: str | os.PathLike[str]) -> str:
    """The tag every pipeline flow run of a config carries (`loraflow run`, `serve`, the
    deployments in prefect.yaml): how the server tells one config's runs from another's."""
    return f"config:{os.path.splitext(os.path.basename(config_path))[0]}"


def crash_alert_name(tag: str) -> str:
    return f"loraflow: crashed alert for {tag}"


def sync_crash_alert(cfg: RunConfig, tag: str) -> list[str]:
    """Makes the server send the config's `crashed` alert for its runs (flow runs tagged `tag`):
    creates or updates the automation when `notify.events` has `crashed`, deletes a stale one when
    it no longer has. Returns what was done, as lines for the console."""
    name = crash_alert_name(tag)
    settings = cfg.notify
    if settings is None or "crashed" not in settings.events:
        return [f"removed the automation {name!r} (`crashed` is not in notify.events)"] if _delete(name) else []
    from prefect.events.actions import CallWebhook, SendNotification

    body = alert_body_template(cfg)
    actions: list[Any] = []
    lines: list[str] = []
    if settings.webhook is not None:
        url = settings.webhook.url or os.environ.get(settings.webhook.url_env or "", "")
        if url:
            actions.append(CallWebhook(block_document_id=_save_webhook_block(cfg, url), payload=body))
        else:
            lines.append(f"note: `crashed` alerts cannot reach the webhook: {settings.webhook.url_env} "
                         "(notify.webhook.url_env) is not set here")
    if settings.block:
        from prefect.blocks.core import Block

        block_id = Block.load(settings.block)._block_document_id
        actions.append(SendNotification(block_document_id=block_id, subject=f"loraflow {cfg.name}: crashed", body=body))
    if not actions:
        _delete(name)
        return lines
    outcome = _upsert(_crash_alert_automation(name, tag, actions))
    return [*lines, f"`crashed` alerts for {tag}: automation {outcome}"]


def _crash_alert_automation(name: str, tag: str, actions: list[Any]) -> Automation:
    from prefect.automations import Automation
    from prefect.events.schemas.automations import EventTrigger, Posture

    return Automation(
        name=name,
        description="Sends loraflow's `crashed` alert when a pipeline run of this config becomes Crashed.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=[
                {"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME},
                {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{tag}"},
            ],
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=actions,
    )


def alert_body_template(cfg: RunConfig) -> str:
    """The body of `tasks/notify.py` as a Jinja template the server renders from the Crashed flow
    run: the same keys, so one receiver reads every event. The stage is unknown to the server (null)."""
    fields = {
        "event": _literal("crashed"),
        "config": _literal(cfg.name),
        "run": "{{ flow_run.name|tojson }}",
        "flow_run_id": '"{{ flow_run.id }}"',
        "ui_url": "{{ flow_run|ui_url|tojson }}",
        "stage": "null",
        "state": "{{ flow_run.state.name|tojson }}",
        "reason": "{{ flow_run.state.message|tojson }}",
        "metrics": "{}",
        "sent_at": "\"{{ event.occurred.isoformat(timespec='seconds') }}\"",
    }
    return "{\n" + ",\n".join(f'  "{key}": {value}' for key, value in fields.items()) + "\n}"


def _literal(value: str) -> str:
    """A JSON string that Jinja leaves alone: braces escaped as JSON \\u escapes."""
    return json.dumps(value).replace("{", "\\u007b").replace("}", "\\u007d")


def _save_webhook_block(cfg: RunConfig, url: str) -> Any:
    """A Prefect Webhook block holding the URL (a secret field), named after the config; the
    server's CallWebhook action posts through it."""
    from prefect.blocks.webhook import Webhook

    name = "loraflow-crashed-" + (re.sub(r"[^a-z0-9-]+", "-", cfg.name.lower()).strip("-") or "run")
    headers = {"Content-Type": "application/json", "User-Agent": "loraflow"}
    return Webhook(method="POST", url=url, headers=headers).save(name, overwrite=True)


def _upsert(automation: Automation) -> str:
    """Creates the automation, or updates the one of that name when its definition differs;
    returns "created", "updated" or "unchanged". An unchanged one is left alone: an update may
    reset the trigger's per-run state, and a zombie whose heartbeats had already stopped would
    then never be seen."""
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    # Without owner_resource, as prefect.automations.Automation.update sends it (the API refuses it there).
    core = AutomationCore(**automation.model_dump(exclude={"id", "owner_resource"}))
    with get_client(sync_client=True) as client:
        first, *duplicates = client.read_automations_by_name(automation.name) or [None]
        for duplicate in duplicates:  # two setups that raced: keep one
            client.delete_automation(duplicate.id)
        if first is None:
            client.create_automation(core)
            return "created"
        if AutomationCore(**first.model_dump(exclude={"id", "owner_resource"})).model_dump(mode="json") == core.model_dump(mode="json"):
            return "unchanged"
        client.update_automation(first.id, core)
        return "updated"


def _delete(name: str) -> bool:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(name)
        for automation in existing:
            client.delete_automation(automation.id)
    return bool(existing)
