"""Which models exist, by client-facing name and alias. Built once from config."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from activator.errors import ModelNotFound
from activator.lifecycle import Model
from activator.pool import PoolScheduler


class ModelRegistry:
    def __init__(self, models: Sequence[Model], schedulers: Sequence[PoolScheduler]) -> None:
        self.models = {m.name: m for m in models}
        self.schedulers = list(schedulers)
        self._by_name: dict[str, Model] = {}
        for m in models:
            for name in m.settings.names:
                self._by_name[name] = m

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
            raise ModelNotFound(
                f"model {shown!r} does not exist; available: {', '.join(sorted(self._by_name))}",
                param=param,
            )
        return model

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
        return {"object": "list", "data": data}
