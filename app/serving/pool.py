"""The models being served: loaded from the store in the background, each with its batcher.

One entry that cannot load (missing or corrupt weights, a broken manifest, a forward pass
that raises at warm-up) is marked failed with the reason; the others still serve.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from app.config import Settings
from app.devices import resolve_device, resolve_dtype
from app.heap import freeze_heap, thaw_heap
from app.serving.batcher import DynamicBatcher
from app.serving.cuda_graphs import bucket_sizes
from app.serving.decode import BatchDecoder
from app.serving.labels import class_names
from app.serving.metrics import Metrics
from app.serving.nvimgcodec_jpeg import NvImageCodecJpeg
from app.serving.preprocess import Preprocessor
from app.serving.runner import ModelRunner
from app.store import Manifest, ModelStore
from app.store.errors import UnknownModel, WeightsMissing
from app.store.pull import pull

log = logging.getLogger(__name__)

GPU_MEMORY_EVERY_S = 1.0  # how often the inference thread samples torch's memory figures


class ModelState(StrEnum):
    ABSENT = "absent"  # declared in the store, weights not present
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class ServedModel:
    name: str
    state: ModelState
    manifest: Manifest | None = None
    reason: str | None = None
    runner: ModelRunner | None = None  # the first replica (device/dtype shown in /models)
    runners: list[ModelRunner] = field(default_factory=list)
    decoders: list[BatchDecoder] = field(default_factory=list)  # one per runner
    batcher: DynamicBatcher | None = None
    preprocessor: Preprocessor | None = None
    labels: tuple[str, ...] = ()
    devices: list[str] = field(default_factory=list)  # where it serves, once ready
    dtype: str | None = None


class ModelPool:
    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        metrics: Metrics,
        *,
        reports_worker_ready: bool = True,
    ) -> None:
        """``reports_worker_ready``: this pool is an HTTP worker's own (inline), so its
        readiness counts in ``vitserve_workers_ready``; an engine's pool does not."""
        self.settings, self.store, self.metrics = settings, store, metrics
        self.reports_worker_ready = reports_worker_ready
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.models: dict[str, ServedModel] = {}
        self._loader: asyncio.Task[None] | None = None
        self._reloading = asyncio.Lock()
        # Pillow's share of every model's decode stage, and compare mode's decodes.
        self.decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="pillow")
        # nvImageCodec decoders per (device, backend), found once
        self._nvimgcodec: dict[tuple[torch.device, str], NvImageCodecJpeg | None] = {}

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Declare every selected entry, then load them in the background (default first)."""
        threads = self.settings.cpu_threads or (1 if self.device.type == "cuda" else None)
        if threads:
            torch.set_num_threads(threads)
        names = self.selected_names()
        for name in names:
            self.models[name] = ServedModel(name, ModelState.LOADING)
            self.metrics.declare_model(name)
        self._loader = asyncio.create_task(self._load_all(names), name="model-loader")

    def selected_names(self) -> list[str]:
        """The entries this pool serves, default first (known before anything loads)."""
        return selected_names(self.settings, self.store)

    async def reload(self) -> dict[str, str]:
        """See the store as it is now: declare entries written since start (by ``compress``,
        ``store build``, an import) and load again every entry that is absent or failed.
        Ready models keep serving untouched. Returns every model's state."""
        async with self._reloading:
            await self.wait_loaded()
            todo = []
            for name in self.selected_names():
                model = self.models.get(name)
                if model is None:
                    self.models[name] = model = ServedModel(name, ModelState.LOADING)
                    self.metrics.declare_model(name)
                elif model.state in (ModelState.ABSENT, ModelState.FAILED):
                    model.state, model.reason = ModelState.LOADING, None
                else:
                    continue
                todo.append(model)
            for model in todo:
                await self._load(model)
            self.metrics.workers_ready.set(1 if self.readiness()[0] else 0)
            return {name: model.state.value for name, model in self.models.items()}

    async def wait_loaded(self) -> None:
        if self._loader:
            await self._loader

    async def stop(self) -> None:
        """Finish every queued request, then release the models."""
        if self._loader and not self._loader.done():
            self._loader.cancel()
        await asyncio.gather(*(m.batcher.stop() for m in self.models.values() if m.batcher))
        self.decode_pool.shutdown(wait=True)
        thaw_heap()

    # ---- queries -------------------------------------------------------------------------
    def get(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModel(
                f"unknown model {name!r}; available: {sorted(self.models)}"
            ) from None

    def is_ready(self, name: str) -> bool:
        model = self.models.get(name)
        return model is not None and model.state is ModelState.READY

    def engines(self) -> list[dict] | None:
        """The engine processes behind this pool: none, its models run in this process."""
        return None

    def readiness(self) -> tuple[bool, str]:
        """Ready when the default model serves and no entry with weights is still loading."""
        default = self.models.get(self.settings.default_model)
        if default is None or default.state is not ModelState.READY:
            state = default.state if default else "missing"
            reason = f": {default.reason}" if default and default.reason else ""
            return False, f"default model {self.settings.default_model!r} is {state}{reason}"
        loading = [m.name for m in self.models.values() if m.state is ModelState.LOADING]
        if loading:
            return False, f"still loading: {loading}"
        return True, "ready"

    # ---- loading -------------------------------------------------------------------------
    async def _load_all(self, names: list[str]) -> None:
        for name in names:
            await self._load(self.models[name])
        frozen = freeze_heap()  # the models and imports stay: full collections skip them
        log.info("%d objects frozen out of garbage collection", frozen)
        if self.reports_worker_ready:
            self.metrics.workers_ready.set(1 if self.readiness()[0] else 0)

    async def _load(self, model: ServedModel) -> None:
        try:
            await asyncio.to_thread(self._prepare, model)
        except WeightsMissing as exc:
            model.state, model.reason = ModelState.ABSENT, str(exc)
            log.warning("%s", exc)
            return
        except Exception as exc:  # noqa: BLE001 - any load failure is isolated to this model
            model.state, model.reason = ModelState.FAILED, f"{type(exc).__name__}: {exc}"
            log.error("model %s failed to load: %s", model.name, model.reason)
            return
        model.batcher = self.new_batcher(model)
        model.batcher.start()
        model.devices = [str(runner.device) for runner in model.runners]
        model.dtype = str(self.dtype).removeprefix("torch.")
        model.state = ModelState.READY
        self.metrics.model_ready(model.name, model.manifest, self.device, self.dtype)
        if self.device.type == "cuda":
            self.metrics.sample_gpu_memory(self.device)  # weights + warm-up, before traffic
        log.info("model %s ready on %s (%s)", model.name, self.device, self.dtype)

    def new_batcher(
        self,
        model: ServedModel,
        *,
        max_batch_size: int | None = None,
        decode_threads: int | None = None,
    ) -> DynamicBatcher:
        """A dynamic batcher over a loaded model's runners and decoders, as the settings
        make it; a benchmark may vary its batch and decode threads."""
        s = self.settings
        return DynamicBatcher(
            model.name,
            [self._predict_fn(runner) for runner in model.runners],
            decode=model.decoders,
            top_k=s.max_top_k,
            max_batch_size=max_batch_size or s.max_batch_size,
            max_delay_s=s.max_delay_ms / 1000,
            queue_size=s.queue_size,
            metrics=self.metrics,
            decode_threads=decode_threads or s.decode_threads,
            pipelined=self.device.type != "cpu",
        )

    def _predict_fn(self, runner: ModelRunner) -> Callable[[torch.Tensor], torch.Tensor]:
        """The batcher's forward; on CUDA it also samples torch's memory figures, on the
        inference thread after a batch, at most every ``GPU_MEMORY_EVERY_S`` (the allocator
        query needs no sync, but walks its statistics in Python: per batch it showed up)."""
        if runner.device.type != "cuda":
            return runner.predict
        sampled = 0.0

        def predict(images: torch.Tensor) -> torch.Tensor:
            nonlocal sampled
            try:
                return runner.predict(images)
            finally:
                if (now := time.monotonic()) - sampled >= GPU_MEMORY_EVERY_S:
                    sampled = now
                    self.metrics.sample_gpu_memory(runner.device)

        return predict

    def nvimgcodec_jpeg(self, device: torch.device, backend: str) -> NvImageCodecJpeg | None:
        """nvImageCodec's ``backend`` decoder ("hardware": the JPEG engines; "cuda": its nvjpeg
        decoder) of ``device`` where the settings ask for it and it runs; found once."""
        if (device, backend) not in self._nvimgcodec:
            found = NvImageCodecJpeg.asked(self.settings, device, backend)
            self._nvimgcodec[device, backend] = found
        return self._nvimgcodec[device, backend]

    def _prepare(self, model: ServedModel) -> None:
        """Blocking part of a load: (pull,) verify, build, move to device, warm up."""
        name = model.name
        if name not in self.store.names():
            raise UnknownModel(f"model {name!r} is not in store {self.store.root}")
        manifest = self.store.manifest(name)
        model.manifest = manifest
        if (
            name == self.settings.default_model
            and self.settings.auto_pull
            and manifest.source.kind == "timm-pretrained"
            and not self.store.has_weights(name)
        ):
            log.info("pulling weights of default model %s", name)
            manifest = pull(self.store, manifest.architecture, name=name)
        loaded = self.store.load(name)
        model.manifest = loaded.manifest
        devices = [resolve_device(d) for d in self.settings.replica_devices or ()] or [self.device]
        model.runners = [
            ModelRunner(
                copy.deepcopy(loaded.module) if i else loaded.module,
                device=device,
                dtype=self.dtype,
                input_size=loaded.manifest.preprocessing.input_size,
                compile=self.settings.compile,
                graph_buckets=bucket_sizes(self.settings.max_batch_size)
                if self.settings.cuda_graphs
                else (),
            )
            for i, device in enumerate(devices)
        ]
        for runner in model.runners:
            runner.warm_up((1, self.settings.max_batch_size))
        model.runner = model.runners[0]
        model.preprocessor = Preprocessor(
            loaded.manifest.preprocessing, self.settings.max_image_pixels
        )
        model.decoders = [
            BatchDecoder(
                model.preprocessor,
                device=runner.device,
                dtype=runner.dtype,
                pool=self.decode_pool,
                nvjpeg=self.settings.gpu_decode,
                hardware=self.nvimgcodec_jpeg(runner.device, "hardware"),
                cuda_jpeg=self.nvimgcodec_jpeg(runner.device, "cuda"),
            )
            for runner in model.runners
        ]
        for decoder in model.decoders:
            decoder.warm_up()
        model.labels = class_names(loaded.manifest.labels)


def selected_names(settings: Settings, store: ModelStore) -> list[str]:
    """The entries a server with ``settings`` serves, default first: known from the
    settings and the store's listing alone, so the CLI can check names before it starts."""
    names = list(settings.models or store.names())
    if settings.default_model not in names:
        names = [settings.default_model, *names]
    names.sort(key=lambda n: n != settings.default_model)
    return names
