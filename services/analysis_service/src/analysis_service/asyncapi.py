"""The AsyncAPI 3.0 document of the service's messages, generated from the pydantic contracts.

The document (``docs/asyncapi.yaml``) describes what the worker receives (requests on RabbitMQ)
and sends (results on RabbitMQ, progress on Redis pub/sub). Payload schemas come from
:mod:`service_shared.messages` through :func:`pydantic.json_schema.models_json_schema`, with
every shared definition under ``components/schemas``; exchange, queue and channel names are the
defaults of :class:`~analysis_service.settings.RabbitSettings` and
:class:`~analysis_service.settings.RedisSettings`. ``tests/unit/test_asyncapi.py`` fails while the
committed file differs from :func:`render_asyncapi`'s output. Regenerate with::

    uv run python -m analysis_service.asyncapi docs/asyncapi.yaml
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Final, Literal

import yaml
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from analysis_service.settings import RabbitSettings, RedisSettings
from service_shared.messages import AnalysisRequest, AnalysisResultMessage, ProgressMessage

ASYNCAPI_VERSION: Final = "3.0.0"
#: Version of the message contracts (their ``schema_version``), the document's ``info.version``.
CONTRACT_VERSION: Final = "1"
AMQP_BINDING_VERSION: Final = "0.3.0"
SCHEMA_REF: Final = "#/components/schemas/{model}"
#: Routing keys (and AMQP ``type``) of results: ``analysis.<status>``.
RESULT_STATUSES: Final = ("completed", "failed")

#: Message name in the document -> contract model.
MESSAGES: Final[dict[str, type[BaseModel]]] = {
    "AnalysisRequest": AnalysisRequest,
    "AnalysisResult": AnalysisResultMessage,
    "Progress": ProgressMessage,
}


def _schemas() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``(payload $ref per message name, component schemas)``."""
    mode: Literal["validation"] = "validation"
    refs, top = models_json_schema([(model, mode) for model in MESSAGES.values()], ref_template=SCHEMA_REF)
    payloads = {name: refs[(model, mode)] for name, model in MESSAGES.items()}
    return payloads, _reflow(dict(sorted(top.get("$defs", {}).items())))


def _reflow(node: Any) -> Any:
    """Docstring-derived descriptions with their hard line breaks joined (paragraphs kept)."""
    if isinstance(node, dict):
        return {
            key: re.sub(r"(?<!\n)\n(?!\n)", " ", value)
            if key == "description" and isinstance(value, str)
            else _reflow(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_reflow(item) for item in node]
    return node


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _exchange(name: str, kind: str) -> dict[str, Any]:
    return {"name": name, "type": kind, "durable": True, "autoDelete": False, "vhost": "/"}


def asyncapi_document(
    rabbit: RabbitSettings | None = None, redis: RedisSettings | None = None
) -> dict[str, Any]:
    """The AsyncAPI document as a plain mapping.

    Parameters
    ----------
    rabbit, redis : settings, optional
        Where the names of exchanges, queues and channels come from; default: the settings'
        defaults (the committed document uses those).

    Returns
    -------
    dict
        An AsyncAPI 3.0.0 document (JSON-compatible).
    """
    rabbit = rabbit or RabbitSettings()
    redis = redis or RedisSettings()
    payloads, schemas = _schemas()
    prefix = redis.key_prefix

    def message(name: str, title: str, summary: str, description: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "title": title,
            "summary": summary,
            "description": description,
            "contentType": "application/json",
            "payload": payloads[name],
            **extra,
        }

    amqp_properties = (
        "AMQP properties: `delivery_mode` 2 (persistent), `message_id` = `request_id`, "
        "`correlation_id`, `content_type` `application/json`"
    )
    messages = {
        "AnalysisRequest": message(
            "AnalysisRequest",
            "Analysis request",
            "Analyse one file of the media library.",
            f"{amqp_properties}, `priority` = the body's `priority` (the broker orders by the "
            "property), `timestamp`. A body that breaks the contract still gets a result, "
            "`failed` with `error.code` `invalid_request`.",
            correlationId={"location": "$message.payload#/correlation_id"},
        ),
        "AnalysisResult": message(
            "AnalysisResult",
            "Analysis result",
            "The outcome of one request: completed with the analysis, or failed with an error code.",
            f"{amqp_properties}, `type` = the routing key. Published with publisher confirms "
            "after the outcome is stored; exactly one per request id is stored, a redelivered "
            "request may publish its outcome again.",
            correlationId={"location": "$message.payload#/correlation_id"},
        ),
        "Progress": message(
            "Progress",
            "Progress update",
            "The state of one request; at least once a second while it is analysed.",
            f"Also stored in the Redis hash `{prefix}:progress:{{request_id}}` (expiring "
            f"{redis.progress_ttl_s} s after its last update). Best effort: an update can be "
            "lost while Redis is unavailable, the result message is the record.",
            correlationId={"location": "$message.payload#/correlation_id"},
        ),
    }

    request_queue_args = {
        "x-max-priority": rabbit.max_priority,
        "x-dead-letter-exchange": rabbit.dead_letter_exchange,
        "x-consumer-timeout": rabbit.consumer_timeout_ms,
    }

    def request_channel(address: str, title: str, description: str) -> dict[str, Any]:
        """A channel producers publish requests to, on the request exchange with ``address``."""
        return {
            "address": address,
            "title": title,
            "description": description,
            "servers": [{"$ref": "#/servers/rabbitmq"}],
            "messages": {"AnalysisRequest": {"$ref": "#/components/messages/AnalysisRequest"}},
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": _exchange(rabbit.request_exchange, "direct"),
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
        }

    channels: dict[str, Any] = {
        "requests": request_channel(
            rabbit.request_routing_key,
            "Requests",
            f"Publish requests to the direct exchange `{rabbit.request_exchange}` with routing key "
            f"`{rabbit.request_routing_key}`; they wait in the priority queue "
            f"`{rabbit.request_queue}` (arguments {request_queue_args}) that the workers consume.",
        ),
        **(
            {
                "urgentRequests": request_channel(
                    rabbit.urgent_routing_key,
                    "Urgent requests",
                    f"Requests of priority {rabbit.urgent_priority} or higher: publish them to "
                    f"`{rabbit.request_exchange}` with routing key `{rabbit.urgent_routing_key}`. "
                    f"They wait in `{rabbit.urgent_queue}` (the same arguments), which every worker "
                    "consumes on a channel of its own, so they are delivered while the request "
                    "queue's deliveries fill the workers, and run in the workers' urgent slots.",
                )
            }
            if rabbit.urgent_queue
            else {}
        ),
        "deadLetters": {
            "address": rabbit.dead_letter_queue,
            "title": "Dead-lettered requests",
            "description": (
                "Requests that failed permanently (their failed result was published first), "
                f"dead-lettered through the fanout exchange `{rabbit.dead_letter_exchange}`, kept for "
                "inspection and replay."
            ),
            "servers": [{"$ref": "#/servers/rabbitmq"}],
            "messages": {"AnalysisRequest": {"$ref": "#/components/messages/AnalysisRequest"}},
            "bindings": {
                "amqp": {
                    "is": "queue",
                    "queue": {
                        "name": rabbit.dead_letter_queue,
                        "durable": True,
                        "exclusive": False,
                        "autoDelete": False,
                        "vhost": "/",
                    },
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
        },
        "results": {
            "address": "analysis.{status}",
            "title": "Results",
            "description": (
                f"One result per request on the topic exchange `{rabbit.results_exchange}`, routing key "
                f"`analysis.completed` or `analysis.failed`; bind a queue with `analysis.#` for all. "
                + (
                    f"The queue `{rabbit.results_queue}` is bound to every result."
                    if rabbit.results_queue
                    else "No queue is declared by the service."
                )
            ),
            "servers": [{"$ref": "#/servers/rabbitmq"}],
            "parameters": {
                "status": {"enum": list(RESULT_STATUSES), "description": "The result's `status`."}
            },
            "messages": {"AnalysisResult": {"$ref": "#/components/messages/AnalysisResult"}},
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": _exchange(rabbit.results_exchange, "topic"),
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
        },
        "requestProgress": {
            "address": f"{prefix}:progress:{{request_id}}",
            "title": "Progress of one request",
            "description": "Redis pub/sub channel of one request (subscribe without pattern matching).",
            "servers": [{"$ref": "#/servers/redis"}],
            "parameters": {"request_id": {"description": "The request's `request_id`."}},
            "messages": {"Progress": {"$ref": "#/components/messages/Progress"}},
        },
        "allProgress": {
            "address": f"{prefix}:progress",
            "title": "Progress of every request",
            "description": "Redis pub/sub channel receiving every update (for gateways and dashboards).",
            "servers": [{"$ref": "#/servers/redis"}],
            "messages": {"Progress": {"$ref": "#/components/messages/Progress"}},
        },
    }

    def operation(
        action: str, channel: str, message_name: str, summary: str, amqp: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        result: dict[str, Any] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel}"},
            "summary": summary,
            "messages": [{"$ref": f"#/channels/{channel}/messages/{message_name}"}],
        }
        if amqp is not None:
            result["bindings"] = {"amqp": {**amqp, "bindingVersion": AMQP_BINDING_VERSION}}
        return result

    operations = {
        "receiveRequest": operation(
            "receive",
            "requests",
            "AnalysisRequest",
            "Workers consume requests, highest priority first; each is acked once its outcome is "
            "stored and published.",
            {"ack": True},
        ),
        **(
            {
                "receiveUrgentRequest": operation(
                    "receive",
                    "urgentRequests",
                    "AnalysisRequest",
                    "Workers consume urgent requests beside the others, highest priority first.",
                    {"ack": True},
                )
            }
            if rabbit.urgent_queue
            else {}
        ),
        "sendDeadLetter": operation(
            "send", "deadLetters", "AnalysisRequest", "A request that failed permanently is dead-lettered."
        ),
        "sendResult": operation(
            "send",
            "results",
            "AnalysisResult",
            "The outcome of each request, once it is stored.",
            {"deliveryMode": 2, "mandatory": True},
        ),
        "sendRequestProgress": operation(
            "send", "requestProgress", "Progress", "Progress updates of one request."
        ),
        "sendAllProgress": operation("send", "allProgress", "Progress", "Every progress update."),
    }

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "analysis-service messages",
            "version": CONTRACT_VERSION,
            "description": (
                "Requests the analysis workers consume, the results they publish and the progress "
                "updates they send. Generated from the pydantic models in "
                "`shared/src/service_shared/messages.py` by `analysis_service.asyncapi`; do not edit "
                "by hand. See docs/messages.md for the delivery semantics."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "rabbitmq": {
                "host": "rabbitmq:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "The broker (`ANALYSIS_RABBITMQ__URL`).",
            },
            "redis": {
                "host": "redis:6379",
                "protocol": "redis",
                "description": "Progress pub/sub (`ANALYSIS_REDIS__URL`).",
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def render_asyncapi(rabbit: RabbitSettings | None = None, redis: RedisSettings | None = None) -> str:
    """:func:`asyncapi_document` as YAML text (stable key order, as committed)."""
    header = (
        "# Generated by analysis_service.asyncapi from the pydantic models; do not edit.\n"
        "# Regenerate: uv run python -m analysis_service.asyncapi docs/asyncapi.yaml\n"
    )
    body = yaml.dump(
        asyncapi_document(rabbit, redis),
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        width=100,
        default_flow_style=False,
    )
    return header + body


def write_asyncapi(path: Path) -> Path:
    """Write :func:`render_asyncapi` to ``path`` (folders created); return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_asyncapi(), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m analysis_service.asyncapi [PATH]``: write the document (default docs/asyncapi.yaml)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1:
        print("usage: python -m analysis_service.asyncapi [PATH]", file=sys.stderr)
        return 2
    path = write_asyncapi(Path(args[0] if args else "docs/asyncapi.yaml"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover - command-line entry
    raise SystemExit(main())
