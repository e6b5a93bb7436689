"""`activator litellm-config`: the LiteLLM proxy config for activator's models.

LiteLLM in front of activator routes each `model_name` to one deployment: activator. This
module writes that `model_list` from activator's own settings, so the two configs cannot
drift: every model name and alias becomes a `model_name`, routed to `openai/<name>` at
activator's `/v1`. Pure: settings in, a dict out; `render` makes it YAML.

What each deployment sets, and why (docs/litellm.md has the whole story):
- `timeout` / `stream_timeout`: longer than activator may keep a request waiting
  without a byte (a cold start held for its whole budget, then the engine's longest
  allowed silence), so LiteLLM never gives up on a request activator is still serving.
- `num_retries: 0`: activator already holds a request through a cold start; what LiteLLM
  would retry (429, 5xx) is activator saying "not now" with a Retry-After, and a retry of
  a failed start's 503 is a second start of the engine. The client decides.
- `cooldown_time: 0`: LiteLLM cools a deployment down after a 401, a 404 or a burst of
  failures (for the Retry-After it was given). Each model_name has only activator behind
  it, so a cooldown only turns away requests activator would have answered or woken for.
- `model_info.disable_background_health_check`: a LiteLLM health check is a real chat
  request; run every few minutes it would keep each model awake forever.
- `input_cost_per_token` / `output_cost_per_token`: the model's `cost:` prices per
  million tokens, per token, so LiteLLM's spend and budgets use activator's prices.
  `gpu_hour` has no LiteLLM twin: the GPU is paid while idle too, which only activator
  sees (activator_cost_dollars_total).
"""

from __future__ import annotations

import ipaddress
import math
from decimal import Decimal
from typing import Any

import yaml

from activator.config.settings import ModelSettings, Settings
from activator.model.lifecycle import HOLD_MARGIN

# The environment variable LiteLLM reads activator's API key from (`os.environ/NAME`: a
# reference, never the key). The same name config/example.yaml substitutes into
# server.api_keys, so one secret can feed both sides.
DEFAULT_KEY_ENV = "ACTIVATOR_API_KEY"
# LiteLLM's OpenAI client refuses to send a request without a key. Without server.api_keys
# activator checks none, so any value does; it is forwarded to an engine only when the
# model sets no upstream_api_key (then the engine must not want one either).
NO_KEY = "none"
# On top of the longest wait activator may impose: LiteLLM's own overhead and the time
# activator's answer (a 503 when a hold gives up) takes to arrive.
TIMEOUT_MARGIN = 30.0
# Addresses a server listens on that nobody can connect to as such.
WILDCARD_HOSTS = ("", "0.0.0.0", "::")

HEADER = """\
# LiteLLM proxy config for activator's models, written by `activator litellm-config`.
# Regenerate it whenever activator's config changes, rather than editing it by hand.
# Every model name and alias is a model_name routed to activator, which holds a request
# while the model starts. Per deployment: timeouts that outlast activator's own hold,
# no LiteLLM retries (a retried 503 is a second start) and no cooldowns (one deployment
# per model_name: nothing to fail over to). See docs/litellm.md.
"""


def longest_silence(model: ModelSettings) -> float:
    """Seconds activator may keep a request to `model` waiting before its first byte.

    A held request gives up after the model's hold timeout (`Model.hold_timeout`: the
    startup budget, the pool's wait and drain, the engine's stop grace, a margin); once
    forwarded, the engine may be silent for up to `upstream_read_timeout` (a non-streaming
    answer is silent until it is complete) before activator answers 504.
    """
    pooled = model.max_wait + model.drain_timeout if model.pool is not None else 0.0
    grace = model.process.stop_grace if model.process is not None else 0.0
    hold = model.startup_timeout + pooled + grace + HOLD_MARGIN
    return hold + model.upstream_read_timeout


def litellm_params(model: ModelSettings, *, api_base: str, api_key: str) -> dict[str, Any]:
    """The `litellm_params` of a deployment routed to `model` through activator: the
    one place per-model LiteLLM settings come from."""
    timeout = math.ceil(longest_silence(model) + TIMEOUT_MARGIN)
    params: dict[str, Any] = {
        # activator's own name: it resolves the model and rewrites it to served_model_name.
        "model": f"openai/{model.name}",
        "api_base": api_base,
        "api_key": api_key,
        "timeout": timeout,
        "stream_timeout": timeout,
        "num_retries": 0,
        "cooldown_time": 0,
    }
    cost = model.cost
    if cost is not None and cost.input_per_million is not None:
        params["input_cost_per_token"] = per_token(cost.input_per_million)
    if cost is not None and cost.output_per_million is not None:
        params["output_cost_per_token"] = per_token(cost.output_per_million)
    return params


def per_token(per_million: float) -> float:
    """A price per million tokens, per token, shifted in decimal: 0.4 -> 4e-07, not
    the 4.0000000000000003e-07 of a float division."""
    return float(Decimal(repr(per_million)).scaleb(-6))


def model_list(settings: Settings, *, url: str, key_env: str = DEFAULT_KEY_ENV) -> list[Any]:
    """One entry per model name and alias, in config order. Not the served names: those
    are the engine-facing names (activator accepts them too), while LiteLLM's model_name
    is what tenants see; the reference platform keeps the two apart."""
    api_base = url.rstrip("/") + "/v1"
    api_key = f"os.environ/{key_env}" if settings.server.api_keys else NO_KEY
    entries: list[Any] = []
    for model in settings.models.values():
        params = litellm_params(model, api_base=api_base, api_key=api_key)
        for name in (model.name, *model.aliases):
            entries.append(
                {
                    "model_name": name,
                    "litellm_params": dict(params),
                    "model_info": {"disable_background_health_check": True},
                }
            )
    return entries


def litellm_config(
    settings: Settings, *, url: str, key_env: str = DEFAULT_KEY_ENV
) -> dict[str, Any]:
    """The LiteLLM proxy config: its `model_list` for activator's models."""
    return {"model_list": model_list(settings, url=url, key_env=key_env)}


def server_url(settings: Settings) -> tuple[str, str | None]:
    """activator's own address from its config, and a warning when that address is a
    wildcard (0.0.0.0): LiteLLM needs one it can connect to, which only --url can say."""
    host, port = settings.server.host, settings.server.port
    warning = None
    if host in WILDCARD_HOSTS:
        warning = (
            f"server.host is {host or 'empty'} (every address): the config uses 127.0.0.1; "
            "pass --url with the address LiteLLM reaches activator at"
        )
        host = "127.0.0.1"
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a host name
    return f"http://{host}:{port}", warning


def render(config: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
