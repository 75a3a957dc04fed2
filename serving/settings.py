"""Serving settings: one frozen object read from ``BRAINTUMOR_*`` environment variables.

The gateway runs inside BentoML's worker processes and the gRPC server in its own; both read the same variables,
which `braintumor serve` sets for its children. Defaults are what a single CPU host wants.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from ..export.contract import DEFAULT_NAME, LAYOUTS
from .api_key import ApiKeys

PREFIX = "BRAINTUMOR_"
BACKENDS: tuple[str, ...] = ("triton", "onnxruntime")  # who runs the model (ServeSettings.backend)
# The header Triton's inference, model-config and metadata APIs need (its restricted-API groups). `braintumor serve`
# makes a random value per run and gives it only to its front doors; a separately run Triton takes it from the same
# variables as the front doors (BRAINTUMOR_TRITON_KEY or BRAINTUMOR_TRITON_KEY_FILE). Health stays open for probes.
TRITON_KEY_HEADER = "braintumor-triton-key"
# Triton's gRPC endpoint expects the same header under this prefix (its restricted-protocol convention).
TRITON_GRPC_KEY_HEADER = "triton-grpc-protocol-" + TRITON_KEY_HEADER
BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def parse_value(kind: type, raw: str):
    """An environment string as ``kind``: ``bool("false")`` is True, so booleans are read from :data:`BOOLEANS`."""
    if kind is bool:
        try:
            return BOOLEANS[raw.strip().lower()]
        except KeyError:
            raise ValueError(f"{raw!r} is not a boolean") from None
    return kind(raw)


@dataclass(frozen=True)
class ServeSettings:
    triton_url: str = "127.0.0.1:8001"  # Triton's gRPC endpoint (host:port)
    # Who runs the model: "triton" (the default and the production path) or "onnxruntime" (in each front door's own
    # process, from model_repository: single-host installs; serving/local_model.py)
    backend: str = "triton"
    model_repository: str = ""  # the repository the onnxruntime backend loads
    layout: str = "latency"  # which of the repository's model configs the onnxruntime backend reads
    # The value of TRITON_KEY_HEADER sent on every Triton call but health ("" = none: a Triton that does not restrict)
    triton_key: str = ""
    triton_key_file: str = ""  # or a file holding it (the one `braintumor triton` writes, a mounted secret)
    model_name: str = DEFAULT_NAME
    model_version: str = ""  # "" = the newest ready version
    api_key: str = ""  # "" = no authentication; else callers send it as `x-api-key` / `authorization: Bearer`
    api_keys_file: str = ""  # `name:key` lines, one caller each (serving/api_key.py); with api_key, all are accepted
    max_body_bytes: int = 20 * 1024 * 1024  # largest accepted request / gRPC message
    # HTTP bodies held at once by one gateway worker (uploads being read or processed); beyond it: 429 busy
    max_buffered_bytes: int = 128 * 1024 * 1024
    body_timeout_s: float = 60.0  # to receive a whole HTTP body; a body that stalls 15 s is cut off sooner (408)
    max_batch_images: int = 64  # images per /analyze_batch request or per AnalyzeStream window
    max_in_flight: int = 64  # pipeline calls running or queued at once; more get Busy (429 / RESOURCE_EXHAUSTED)
    triton_timeout_s: float = 30.0  # per Triton call
    lime_num_samples: int = 300  # documented defaults: quality at bounded cost (see README, explanations)
    lime_max_samples: int = 2000
    shap_max_evals: int = 300
    shap_max_max_evals: int = 2000
    explain_batch_size: int = 32  # perturbed images per Triton request (the classifier's max_batch_size)
    explain_cache_size: int = 128  # explanations kept, keyed by image hash and options (LRU)
    explain_workers: int = 2  # concurrent LIME/SHAP computations
    explain_task_ttl_s: float = 3600.0  # an /explain/submit task (pixels, options, result) is deleted after this

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServeSettings:
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            kind = type(f.default)
            try:
                values[f.name] = parse_value(kind, raw)
            except ValueError as exc:
                raise ValueError(f"{PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.__name__}"
                                 + (f" ({', '.join(BOOLEANS)})" if kind is bool else "")) from exc
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        positive = ("max_body_bytes", "max_buffered_bytes", "max_batch_images", "max_in_flight", "lime_num_samples", "lime_max_samples",
                    "shap_max_evals", "shap_max_max_evals", "explain_batch_size", "explain_workers")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{PREFIX}{name.upper()} must be >= 1, got {getattr(self, name)}")
        for name in ("triton_timeout_s", "body_timeout_s", "explain_task_ttl_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{PREFIX}{name.upper()} must be > 0, got {getattr(self, name)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"{PREFIX}BACKEND={self.backend!r}: use one of {', '.join(BACKENDS)}")
        if self.backend == "onnxruntime" and not self.model_repository:
            raise ValueError(f"{PREFIX}BACKEND=onnxruntime needs {PREFIX}MODEL_REPOSITORY or --model-repository: "
                             "the directory written by `braintumor export`")
        if self.layout not in LAYOUTS:
            raise ValueError(f"{PREFIX}LAYOUT={self.layout!r}: use one of {', '.join(LAYOUTS)}")
        self.triton_client_key()  # a Triton key file that cannot be read fails at start, not on the first request
        self.api_keys()  # a keys file that cannot be used fails here, naming the file and line
        if self.max_buffered_bytes < self.max_body_bytes:
            raise ValueError(f"{PREFIX}MAX_BUFFERED_BYTES ({self.max_buffered_bytes}) must be at least "
                             f"{PREFIX}MAX_BODY_BYTES ({self.max_body_bytes}), or no full-size request could pass")

    def api_keys(self) -> ApiKeys:
        """The keys callers may present (read from the keys file each call: load once per process)."""
        return ApiKeys.load(self.api_key, self.api_keys_file)

    def triton_client_key(self) -> str:
        """The key for Triton's restricted APIs, "" when none is set (read from the key file each call: call once
        per process)."""
        key = self.triton_key
        if not key and self.triton_key_file:
            try:
                key = open(self.triton_key_file, encoding="utf-8").read().strip()
            except OSError as exc:
                raise ValueError(f"{PREFIX}TRITON_KEY_FILE={self.triton_key_file!r} cannot be read "
                                 f"({exc.strerror or exc}); point it at the key file `braintumor triton` wrote") from exc
            if not key:
                raise ValueError(f"{PREFIX}TRITON_KEY_FILE={self.triton_key_file!r} is empty")
        return key

    @property
    def authenticates(self) -> bool:
        return bool(self.api_key or self.api_keys_file)

    def to_env(self) -> dict[str, str]:
        """The variables that reproduce these settings in a child process."""
        return {PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in fields(self)}


def is_loopback(host: str) -> bool:
    """True for an address only this host can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def exposure_warning(host: str, authenticates: bool) -> str | None:
    """The warning for binding ``host`` without an API key, or None when only this host can reach it or keys are set
    (``ServeSettings.authenticates``). One rule for `serve` (which refuses without --allow-unauthenticated) and
    `grpc-server` (which warns)."""
    if authenticates or is_loopback(host):
        return None
    return (f"listening on {host or 'every interface'} WITHOUT an API key: anyone who can reach this host can send "
            "images and read results. Set BRAINTUMOR_API_KEY or BRAINTUMOR_API_KEYS_FILE, or bind to 127.0.0.1 and "
            "put an authenticating proxy in front.")
