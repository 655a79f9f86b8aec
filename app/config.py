"""Service settings, read from the environment (prefix ``VITSERVE_``) or a ``.env`` file."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service. ``VITSERVE_MAX_BATCH_SIZE=64`` sets ``max_batch_size``."""

    model_config = SettingsConfigDict(env_prefix="VITSERVE_", env_file=".env", extra="ignore")

    # model store
    store_dir: Path = Field(Path("model_store"), description="Folder holding one entry per model.")
    default_model: str = Field("deit_tiny_patch16_224", description="Model used without ?model=.")
    models: list[str] | None = Field(
        None, description="Entries to load (JSON list); default: every entry whose weights exist."
    )
    auto_pull: bool = Field(
        True, description="At start, pull the default model's missing weights via timm/HF hub."
    )

    # compute
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: CUDA if present, else CPU."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU."
    )
    compile: bool = Field(False, description="torch.compile each model at load.")
    cuda_graphs: bool = Field(
        True,
        description="On CUDA, replay each model's forward from CUDA graphs captured at load "
        "(one per batch-size bucket): a batch costs one launch instead of hundreds.",
    )
    replica_devices: list[str] | None = Field(
        None,
        description='One replica of each model per device (JSON list, e.g. ["cuda:0", '
        '"cuda:1"]); each batch goes to whichever replica is free. Default: one, on `device`.',
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads; default: torch's on CPU, 1 on CUDA, where the "
        "host only ranks top-k (more threads would only compete with HTTP and decoding).",
    )

    # batching
    max_batch_size: int = Field(32, ge=1, le=4096, description="Images per batch, at most.")
    max_delay_ms: float = Field(5.0, ge=0, description="Wait after the first request of a batch.")
    queue_size: int = Field(512, ge=1, description="Images waiting per model; beyond: 429.")
    request_timeout_s: float = Field(30.0, gt=0, description="Deadline; expired before run: 504.")
    decode_workers: int = Field(
        4, ge=1, description="Threads decoding on the CPU (each batch's non-nvjpeg images)."
    )
    decode_threads: int = Field(
        2,
        ge=1,
        le=16,
        description="Batches one replica decodes at once, each on its own thread (and CUDA "
        "stream): one engine decodes for every HTTP worker, so one thread would cap the "
        "service at what one thread decodes.",
    )
    gpu_decode: bool = Field(
        True,
        description="On CUDA replicas, decode baseline JPEGs with nvjpeg (batched, on the GPU); "
        "other formats, and every image on CPU, use Pillow.",
    )
    gpu_jpeg_decoder: Literal["torchvision", "nvimgcodec"] = Field(
        "torchvision",
        description="Who runs nvjpeg's CUDA decode of baseline JPEGs: torchvision (one "
        "process-wide lock, its Huffman pass on the calling thread) or, with the `hwdecode` "
        "extra, nvImageCodec (the Huffman pass on `nvimgcodec_threads` threads of its own). "
        "Without nvImageCodec, torchvision.",
    )
    nvimgcodec_threads: int = Field(
        8, ge=1, le=64, description="Host threads of each nvImageCodec CUDA decoder."
    )
    hardware_decode: bool = Field(
        False,
        description="With the `hwdecode` extra (nvImageCodec) on a GPU with JPEG engines "
        "(A100, H100, H200), the engines decode a share of each batch's baseline JPEGs beside "
        "nvjpeg, the share following what each measured. Off: on the H200 the service served "
        "fewer images with it than nvjpeg alone (docs/performance.md).",
    )

    # input limits
    max_upload_bytes: int = Field(
        20 * 1024 * 1024, ge=1024, description="Request body limit; beyond: 413."
    )
    max_image_pixels: int = Field(40_000_000, ge=1, description="Width x height cap (bombs).")
    max_request_pixels: int = Field(
        100_000_000,
        ge=1,
        description="Decoded-pixel budget of one request (sum of width x height over its "
        "images); beyond: 413. Keeps a few requests of many large images from taking every "
        "core and the memory.",
    )
    max_images_per_request: int = Field(64, ge=1, description="Multipart parts per request.")
    max_top_k: int = Field(20, ge=1, le=1000, description="Largest top_k a request may ask.")

    # experiments: compare, A/B routing, shadow traffic
    max_compare_models: int = Field(4, ge=2, description="Most variants in one /compare.")
    ab_weights: dict[str, float] | None = Field(
        None,
        description="Traffic weights by model for /classify without ?model= (JSON object); "
        "unset: the default model serves.",
    )
    ab_sticky_header: str | None = Field(
        None,
        description="Request header whose value's hash pins a client to one A/B variant.",
    )
    shadow: dict[str, str] = Field(
        default_factory=dict,
        description="Primary model -> shadow model (JSON object): what the primary serves on "
        "/classify is also run, off the response path, on the shadow, and the two compared.",
    )
    shadow_queue_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="A shadow copy is dropped once the shadow model's queue holds this "
        "fraction of VITSERVE_QUEUE_SIZE, so shadow traffic never crowds out its own.",
    )
    shadow_max_pending: int = Field(
        64, ge=1, description="Shadow requests in flight at once; beyond: dropped."
    )

    # HTTP
    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, ge=0, le=65535, description="Bind port.")
    workers: int = Field(
        1,
        ge=1,
        description="HTTP worker processes (uvicorn --workers). With the process engine they "
        "only speak HTTP and all feed the engine; inline, each holds its own models. Metrics "
        "aggregate across processes through PROMETHEUS_MULTIPROC_DIR (a temporary one is made).",
    )
    engine: Literal["process", "inline"] = Field(
        "inline",
        description="inline: each HTTP worker loads and runs its own models; process: "
        "`vitserve serve` runs one engine process per device that owns the models, batching "
        "and decoding for every HTTP worker, which only speak HTTP (restarted if it dies). "
        "Inline stays the default until the engine's decode stage outruns it (see "
        "docs/performance.md).",
    )
    engines_per_device: int = Field(
        1,
        ge=1,
        le=8,
        description="With the process engine: engine processes per device, each with its own "
        "queue, decoder and CUDA context. One engine decodes JPEGs one batch at a time "
        "(torchvision's nvjpeg holds a process-wide lock), so on one GPU several engines "
        "served more than one (docs/performance.md); each holds its own copy of the models.",
    )
    http_server: Literal["uvicorn", "granian"] = Field(
        "uvicorn",
        description="The ASGI server of the HTTP workers: uvicorn, or granian (Rust's hyper "
        "under the same FastAPI app; the `granian` extra) where uvicorn's per-request cost "
        "sets the pace (docs/performance.md).",
    )
    log_level: str = Field("info", description="Log level (debug, info, warning, error).")
    access_log: bool = Field(
        False,
        description="A log line per request from the HTTP server. Off by default: /metrics "
        "counts every request by model, route and status, and at thousands of requests a "
        "second the lines cost the workers CPU and flood the log.",
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token of POST /admin/reload (see docs/store.md); unset: the "
        "endpoint answers 404.",
    )
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="Port of the Open Inference Protocol's gRPC service (KServe v2, as Triton "
        "speaks it); 0: no gRPC. With several workers each binds it with SO_REUSEPORT and the "
        "kernel spreads connections over them.",
    )

    @property
    def drain_timeout_s(self) -> int:
        """How long the server drains on SIGTERM: the longest a request may still wait, plus
        5 s to answer it. A supervisor's grace period (Kubernetes) must cover it."""
        return int(self.request_timeout_s) + 5

    @field_validator("ab_weights")
    @classmethod
    def _weights_are_a_distribution(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        """Refused at start: a typo here would silently send all traffic to one variant."""
        if v is None:
            return v
        bad = {name: w for name, w in v.items() if not math.isfinite(w) or w < 0}
        if bad:
            raise ValueError(f"A/B weights must be finite and >= 0; got {bad}")
        if not any(v.values()):
            raise ValueError(f"A/B weights are empty or all zero: {v}")
        return v

    @field_validator("shadow")
    @classmethod
    def _no_self_shadow(cls, v: dict[str, str]) -> dict[str, str]:
        same = [name for name, shadow in v.items() if name == shadow]
        if same:
            raise ValueError(f"a model cannot shadow itself: {same}")
        return v


@lru_cache
def get_settings() -> Settings:
    return Settings()
