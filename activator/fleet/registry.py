"""Which models exist, by client-facing name and alias (and their LoRA adapters', which
`route` finds), and which pool decides for each.

Built from config at start; a reload (activator.reload, the only caller of the methods
that change it) adds and removes models and pools, and re-indexes the names."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from activator.core.errors import ModelNotFound
from activator.fleet.pool import PoolScheduler
from activator.model.lifecycle import Model


@dataclass(frozen=True)
class Route:
    """Where a client's model name leads: a model, and the LoRA adapter of it the name
    means (None: the model itself)."""

    model: Model
    adapter: str | None = None


class ModelRegistry:
    def __init__(self, models: Sequence[Model], schedulers: Sequence[PoolScheduler]) -> None:
        self.models = {m.name: m for m in models}
        self.schedulers = list(schedulers)
        self._by_name: dict[str, Model] = {}
        self._adapters: dict[str, Route] = {}  # an adapter's name or alias -> its route
        self.reindex()

    def reindex(self) -> None:
        """Names as the config gives them now. A model being removed has none: a new
        request for it is a 404 (or the model that took the name over). A served name a
        running engine still answers to, changed for its next start, is kept while no
        other model has it: replies carried it, and clients send it back."""
        by_name: dict[str, Model] = {}
        serving = [m for m in self.models.values() if m.retiring is None]
        for m in serving:
            for name in m.configured.names:
                by_name[name] = m
        for m in serving:
            by_name.setdefault(m.settings.served_model_name, m)
        self._by_name = by_name
        self._adapters = {
            name: Route(m, adapter)
            for m in serving
            for adapter, settings in m.configured.adapters.items()
            for name in (adapter, *settings.aliases)
        }

    def add(self, model: Model) -> None:
        self.models[model.name] = model
        self.reindex()

    def remove(self, model: Model) -> None:
        del self.models[model.name]
        self.reindex()

    def pool(self, name: str) -> PoolScheduler | None:
        """A configured pool's scheduler (not a model's own), by name."""
        return next((s for s in self.pools() if s.name == name), None)

    def __iter__(self) -> Iterator[Model]:
        return iter(self.models.values())

    def resolve(self, name: object, *, param: str = "model") -> Model:
        """The model named `name` or one of its aliases; 404 (listing every name) if it is
        not configured, with `param` naming where the name came from. The one lookup for
        clients and the admin API alike. A configured model is never a 404, whatever its
        state."""
        model = self._by_name.get(name) if isinstance(name, str) else None
        if model is None:
            shown = name if isinstance(name, str) and len(name) <= 200 else "(invalid)"
            known = ", ".join(sorted([*self._by_name, *self._adapters]))
            raise ModelNotFound(f"model {shown!r} does not exist; available: {known}", param=param)
        return model

    def route(self, name: object) -> Route:
        """A client's model name: a LoRA adapter (by name or alias) of a model, or a
        model as `resolve` finds it (404 otherwise)."""
        if isinstance(name, str) and (route := self._adapters.get(name)) is not None:
            return route
        return Route(self.resolve(name))

    def scheduler_of(self, model: Model) -> PoolScheduler:
        return next(s for s in self.schedulers if model in s.models)

    def pools(self) -> list[PoolScheduler]:
        return [s for s in self.schedulers if s.capacity is not None]

    def openai_models(self) -> dict[str, Any]:
        """GET /v1/models: every configured name and alias, with state. Wakes nothing."""
        data = []
        for name, model in self._by_name.items():
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "activator",
                    "activator": {
                        "model": model.name,
                        "alias": name != model.name,
                        "state": "unknown" if model.unknown else model.state,
                    },
                }
            )
        for name, route in self._adapters.items():
            model, adapter = route.model, route.adapter
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "activator",
                    "parent": model.name,  # vLLM's shape for an adapter
                    "activator": {
                        "model": model.name,
                        "adapter": adapter,
                        "alias": name != adapter,
                        "loaded": adapter in model.adapters.loaded,
                        "state": "unknown" if model.unknown else model.state,
                    },
                }
            )
        return {"object": "list", "data": data}
