"""What the routes share: settings, the loaded models, metrics and the scheduler."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from eta_guard.server.errors import APIError, not_ready
from eta_guard.server.metrics import Metrics
from eta_guard.server.scheduler import Scheduler
from eta_guard.server.settings import ServerSettings

if TYPE_CHECKING:
    from eta_guard.config import ETAConfig
    from eta_guard.evaluators.eta_evaluator import ETAEvaluator
    from eta_guard.pipeline import ETA

log = logging.getLogger("eta_guard.server")

#: Returns ``(eta, evaluator)``; ``eta`` is None in moderation-only mode.
Loader = Callable[[], "tuple[ETA | None, ETAEvaluator]"]


@dataclass
class ServerState:
    settings: ServerSettings
    moderation_only: bool
    metrics: Metrics = field(default_factory=Metrics)
    eta: ETA | None = None
    evaluator: ETAEvaluator | None = None
    load_failed: bool = False
    scheduler: Scheduler = field(init=False)
    _ready: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.scheduler = Scheduler(
            self.settings.max_queue, self.metrics, self.settings.max_concurrent_calls
        )

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def set_models(self, eta: ETA | None, evaluator: ETAEvaluator) -> None:
        """Install loaded models; the server never lets requests read local files."""
        self.eta = eta
        self.evaluator = evaluator.with_config(safe_config(evaluator.config))
        self._ready.set()

    def load_in_background(self, loader: Loader) -> threading.Thread:
        def run() -> None:
            try:
                self.set_models(*loader())
                log.info("models loaded; ready")
            except BaseException:
                self.load_failed = True
                log.exception("loading the models failed; /health stays unhealthy")

        thread = threading.Thread(target=run, daemon=True, name="eta-guard-load")
        thread.start()
        return thread

    def config(self) -> ETAConfig:
        assert self.evaluator is not None
        return self.evaluator.config

    def require_ready(self) -> None:
        if not self.ready:
            raise not_ready(failed=self.load_failed)

    def require_eta(self) -> ETA:
        self.require_ready()
        if self.eta is None:
            raise APIError(
                404,
                "this server runs in moderation-only mode: no VLM is loaded",
                code="moderation_only",
            )
        return self.eta

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.served_model_name:
            shown = name if len(name) <= 80 else name[:77] + "..."
            raise APIError(
                404,
                f"the model {shown!r} does not exist here; this server serves "
                f"{self.settings.served_model_name!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )


def safe_config(config: Any) -> Any:
    return config.with_overrides(allow_local_image_files=False)
