from __future__ import annotations

import openai

from activator.app import HTTP
from tests.conftest import ActivatorFactory
from tests.harness import model_config, unique, wait_for


async def test_stopping_a_model_drops_its_pooled_engine_connections(
    activator: ActivatorFactory,
) -> None:
    # Behind a Kubernetes Service a deleted pod never closes its keep-alive connections;
    # reusing one would hang until the read timeout. So they go when the engine does.
    served = unique("pooled")
    running = await activator(
        {"models": {"m": model_config(served), "other": model_config(unique("other"))}}
    )
    http = running.app[HTTP]
    async with openai.AsyncOpenAI(base_url=running.v1, api_key="x", max_retries=0) as sdk:
        await sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}])
        await sdk.chat.completions.create(
            model="other", messages=[{"role": "user", "content": "b"}]
        )
        before, other = http.session("m"), http.session("other")
        async with running.session.post(running.url + "/admin/models/m/stop") as resp:
            assert resp.status == 202
        await wait_for(lambda: running.model("m").state == "stopped", what="m stopped")
        assert before.closed
        assert not other.closed  # another model's pool is left alone
        reply = await sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "again"}]
        )
    assert reply.choices[0].message.content
    assert http.session("m") is not before
