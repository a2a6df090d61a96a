"""The run configuration: one typed, validated view of `[tool.flwr.app.config]`.

The defaults here equal those in pyproject.toml (a test keeps them in step). The
ServerApp builds a `RunConfig` from the run config, resolves it (run name, `norm`, what
the method derives from the federation) and hands it to each site once per run, naming it
by digest in every message (core/settings.py), so server and sites always train with the
same settings.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from core.methods import DEFAULT_METHOD, METHODS
from core.protocol import PROTOCOLS, Protocol

DEVICES = ("auto", "cpu", "cuda")
PARTITION_SCHEMES = ("dirichlet-equal", "dirichlet", "pathological", "iid")
AE_ARCHS = ("bottleneck", "unet")
NORMS = ("auto", "batch-recal", "batch", "group")  # auto: the method's own (MethodContract.default_norm)
AE_OPTIMIZERS = ("adam", "sgd")
REC_LOSSES = ("image-sum", "pixel-mean")
FRAUG_DISTANCES = ("mse", "mmd")  # FRAug's distances: mean squared error, or kernel MMD (client_app/trainers/fraug.py)
LR_SCHEDULES = ("constant", "cosine")
AGGREGATIONS = ("mean", "median", "trimmed-mean", "krum")  # strategies/robust.py
#: the fewest sites for secure aggregation: with two, each reads the other's update from the sum
MIN_SECURE_SITES = 3


class ConfigError(ValueError):
    """An invalid or impossible run configuration."""


@dataclass(frozen=True)
class RunConfig:
    method: str = DEFAULT_METHOD
    dataset: str = "bloodmnist"
    data_root: str = "data/medmnist"
    image_size: int = 28
    download: bool = True
    partition: str = "dirichlet-equal"
    alpha: float = 0.05
    classes_per_client: int = 2
    num_server_rounds: int = 5
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    local_epochs: int = 3
    warmup_epochs: int = 2
    batch_size: int = 32
    lr: float = 0.05
    lr_schedule: str = "cosine"
    lr_ae: float = 0.003
    ae_optimizer: str = "adam"
    ae_lr_ramp: int = 10
    warmup_min_steps: int = 100
    shared_encoder_init: bool = True
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lambda_rec: float = 1.0
    rec_loss: str = "image-sum"
    dz: int = 16
    ae_arch: str = "unet"
    norm: str = "auto"  # resolved in __post_init__: the method's own (batch-recal; FuseFL batch)
    task_aware: bool = True
    weighted: bool = True
    proximal_mu: float = 0.01
    head_blocks: int = 0
    fedrep_head_epochs: int = 1
    ditto_mu: float = 0.1
    ditto_personal_epochs: int = 1
    fraug_gamma: float = 0.01
    fraug_lambda_g: float = 1.0
    fraug_lambda_ft: float = 1.0
    fraug_lr_aux: float = 0.05
    fraug_distance_g: str = "mse"
    fraug_distance_ft: str = "mse"
    fusefl_blocks: int = 0  # 0: num-server-rounds - 1 (core/stages.py)
    fusefl_columns: int = 0  # 0: the sites connected when the run starts
    fusefl_calibration_samples: int = 500
    measure_gamma: bool = False
    gamma_batch_size: int = 256
    eval_every: int = 1
    seed: int = 0
    device: str = "auto"
    num_threads: int = 0
    results_dir: str = "results"
    run_name: str = ""
    min_replies: int = 1
    round_timeout: float = 3600.0
    resume_from: str = ""
    keep_checkpoints: int = 3
    track_tensorboard: bool = True
    track_mlflow: bool = False
    protocol: str = "standard"
    l2sp_lambda: float = 0.0
    dp_clip_norm: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_delta: float = 1e-5
    aggregation: str = "mean"
    trim_fraction: float = 0.2
    krum_byzantine: int = 1
    max_update_norm: float = 0.0
    max_examples: int = 0
    secure_aggregation: bool = False
    secagg_neighbours: int = 0  # 0: every other site
    secagg_threshold: float = 0.5
    secagg_clip: float = 8.0
    secagg_quantization: int = 2**22

    def __post_init__(self) -> None:
        """`norm = "auto"` becomes the method's own normalisation here, once, so that
        config.json, the sites and every later reader see a concrete value."""
        if self.norm == "auto" and self.method in METHODS:
            object.__setattr__(self, "norm", METHODS[self.method].default_norm)

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> RunConfig:
        """Build from kebab-case keys (unknown keys are an error, missing keys take defaults)."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        kwargs = {}
        for key, value in values.items():
            field = known[key]
            kwargs[field.name] = _coerce(key, value, type(getattr(cls(), field.name)))
        protocol = PROTOCOLS.get(kwargs.get("protocol", "standard"))
        if protocol is not None and protocol.fixed:
            kwargs = {**kwargs, **protocol.fixed}
        config = cls(**kwargs).derived(num_sites=None)
        config.validate()
        return config

    def derived(self, num_sites: int | None) -> RunConfig:
        """This configuration with the settings its method derives (0 = automatic) filled in:
        from the rest of the run, and from the number of sites once the server knows it."""
        contract = METHODS.get(self.method)
        changes = contract.settings_from_federation(self.to_mapping(), num_sites) if contract else {}
        return self.replace(**{key.replace("-", "_"): value for key, value in changes.items()})

    def for_federation(self, num_sites: int) -> RunConfig:
        """The run's configuration for the `num_sites` sites connected at its start (checked)."""
        config = self.derived(num_sites)
        config.validate()
        if config.secure_aggregation and num_sites < MIN_SECURE_SITES:
            raise ConfigError(
                f"secure-aggregation = true with {num_sites} site(s): with fewer than {MIN_SECURE_SITES}, a site "
                f"subtracts its own update from the sum and reads the other's; connect at least {MIN_SECURE_SITES} sites or set "
                "secure-aggregation = false"
            )
        return config

    def to_mapping(self) -> dict[str, Any]:
        """Kebab-case keys, ready for a Flower ConfigRecord or config.json."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        contract = METHODS.get(self.method)
        unprotected = [e.name for e in contract.to_server] if contract else []
        checks = [
            (self.method in METHODS, f"method must be one of {tuple(METHODS)}, got {self.method!r}"),
            (
                self.partition in PARTITION_SCHEMES,
                f"partition must be one of {PARTITION_SCHEMES}, got {self.partition!r}",
            ),
            (self.alpha > 0, f"alpha must be > 0, got {self.alpha}"),
            (self.classes_per_client >= 1, f"classes-per-client must be >= 1, got {self.classes_per_client}"),
            (self.num_server_rounds >= 1, f"num-server-rounds must be >= 1, got {self.num_server_rounds}"),
            (0 < self.fraction_train <= 1, f"fraction-train must be in (0, 1], got {self.fraction_train}"),
            (
                0 < self.fraction_evaluate <= 1,
                f"fraction-evaluate must be in (0, 1], got {self.fraction_evaluate}",
            ),
            (self.local_epochs >= 1, f"local-epochs must be >= 1, got {self.local_epochs}"),
            (self.warmup_epochs >= 0, f"warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (self.warmup_min_steps >= 0, f"warmup-min-steps must be >= 0, got {self.warmup_min_steps}"),
            (self.ae_lr_ramp >= 0, f"ae-lr-ramp must be >= 0, got {self.ae_lr_ramp}"),
            (self.batch_size >= 1, f"batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and self.lr_ae > 0, f"lr and lr-ae must be > 0, got lr={self.lr}, lr-ae={self.lr_ae}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight-decay must be >= 0, got {self.weight_decay}"),
            (self.lambda_rec >= 0, f"lambda-rec must be >= 0, got {self.lambda_rec}"),
            (self.dz >= 1, f"dz must be >= 1, got {self.dz}"),
            (self.ae_arch in AE_ARCHS, f"ae-arch must be one of {AE_ARCHS}, got {self.ae_arch!r}"),
            (self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}"),
            (
                self.ae_optimizer in AE_OPTIMIZERS,
                f"ae-optimizer must be one of {AE_OPTIMIZERS}, got {self.ae_optimizer!r}",
            ),
            (self.rec_loss in REC_LOSSES, f"rec-loss must be one of {REC_LOSSES}, got {self.rec_loss!r}"),
            (
                self.lr_schedule in LR_SCHEDULES,
                f"lr-schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}",
            ),
            (
                contract is None or contract.share_batchnorm or self.norm != "group",
                f"method {self.method!r} keeps BatchNorm layers private; norm = 'group' has none (use norm = "
                "'batch' or 'batch-recal')",
            ),
            (self.proximal_mu >= 0, f"proximal-mu must be >= 0, got {self.proximal_mu}"),
            (
                0 <= self.head_blocks <= 9,
                f"head-blocks must be in 0..9 (the classifier's blocks), got {self.head_blocks}",
            ),
            (self.fedrep_head_epochs >= 1, f"fedrep-head-epochs must be >= 1, got {self.fedrep_head_epochs}"),
            (self.ditto_mu >= 0, f"ditto-mu must be >= 0, got {self.ditto_mu}"),
            (self.fraug_gamma >= 0, f"fraug-gamma must be >= 0, got {self.fraug_gamma}"),
            (
                self.fraug_lambda_g >= 0 and self.fraug_lambda_ft >= 0,
                f"fraug-lambda-g and fraug-lambda-ft must be >= 0, got {self.fraug_lambda_g}, {self.fraug_lambda_ft}",
            ),
            (self.fraug_lr_aux > 0, f"fraug-lr-aux must be > 0, got {self.fraug_lr_aux}"),
            (
                self.fraug_distance_g in FRAUG_DISTANCES,
                f"fraug-distance-g must be one of {FRAUG_DISTANCES}, got {self.fraug_distance_g!r}",
            ),
            (
                self.fraug_distance_ft in FRAUG_DISTANCES,
                f"fraug-distance-ft must be one of {FRAUG_DISTANCES}, got {self.fraug_distance_ft!r}",
            ),
            (
                self.fusefl_calibration_samples >= 1,
                f"fusefl-calibration-samples must be >= 1, got {self.fusefl_calibration_samples}",
            ),
            (
                self.ditto_personal_epochs >= 1,
                f"ditto-personal-epochs must be >= 1, got {self.ditto_personal_epochs}",
            ),
            (self.gamma_batch_size >= 1, f"gamma-batch-size must be >= 1, got {self.gamma_batch_size}"),
            (self.eval_every >= 1, f"eval-every must be >= 1, got {self.eval_every}"),
            (self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}"),
            (self.num_threads >= 0, f"num-threads must be >= 0 (0 = automatic), got {self.num_threads}"),
            (self.min_replies >= 1, f"min-replies must be >= 1, got {self.min_replies}"),
            (self.round_timeout > 0, f"round-timeout must be > 0 seconds, got {self.round_timeout}"),
            (self.protocol in PROTOCOLS, f"protocol must be one of {tuple(PROTOCOLS)}, got {self.protocol!r}"),
            (self.l2sp_lambda >= 0, f"l2sp-lambda must be >= 0, got {self.l2sp_lambda}"),
            (self.keep_checkpoints >= 0, f"keep-checkpoints must be >= 0 (0 = all), got {self.keep_checkpoints}"),
            (self.dp_clip_norm >= 0, f"dp-clip-norm must be >= 0 (0 = off), got {self.dp_clip_norm}"),
            (
                self.dp_noise_multiplier >= 0,
                f"dp-noise-multiplier must be >= 0 (0 = no noise), got {self.dp_noise_multiplier}",
            ),
            (0 < self.dp_delta < 1, f"dp-delta must be between 0 and 1 (exclusive), got {self.dp_delta}"),
            (
                self.aggregation in AGGREGATIONS,
                f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}",
            ),
            (0 <= self.trim_fraction < 0.5, f"trim-fraction must be in [0, 0.5), got {self.trim_fraction}"),
            (self.krum_byzantine >= 0, f"krum-byzantine must be >= 0, got {self.krum_byzantine}"),
            (self.max_update_norm >= 0, f"max-update-norm must be >= 0 (0 = off), got {self.max_update_norm}"),
            (self.max_examples >= 0, f"max-examples must be >= 0 (0 = off), got {self.max_examples}"),
            (
                self.aggregation == "mean" or not self.dp,
                f"aggregation = {self.aggregation!r} with differential privacy: the noise is calibrated to the "
                "plain mean; use aggregation = 'mean'",
            ),
            (
                self.aggregation == "mean" or not unprotected,
                f"aggregation = {self.aggregation!r} with {self.method}: it also aggregates {unprotected} as a "
                "mean, which a robust rule for the arrays would not protect",
            ),
            (
                self.dp_noise_multiplier == 0 or self.dp_clip_norm > 0,
                f"dp-noise-multiplier = {self.dp_noise_multiplier} needs dp-clip-norm > 0: the noise is "
                "calibrated to the clip norm (std = noise multiplier * clip norm / replies)",
            ),
            (
                not self.dp or not unprotected,
                f"differential privacy (dp-clip-norm > 0) clips and noises only the shared arrays, but {self.method} "
                f"also sends {list(unprotected)}, which it would leave unprotected",
            ),
            (
                not self.dp or not self.measure_gamma,
                "differential privacy (dp-clip-norm > 0) does not cover measure-gamma's classifier gradients; "
                "turn measure-gamma off",
            ),
        ]
        if self.secure_aggregation:
            checks += self.secure_aggregation_checks(contract)
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        problem = contract.config_problem(self.to_mapping())
        if problem:
            raise ConfigError(f"method {self.method!r}: {problem}")

    def secure_aggregation_checks(self, contract: Any) -> list[tuple[bool, str]]:
        """What `secure-aggregation = true` needs: a method whose server needs only the
        weighted sum of the shared arrays, and nothing that reads one site's update."""
        need = contract.needs_each_update if contract else ""
        return [
            (not need, f"secure-aggregation = true with {self.method}: {need}"),
            (
                self.aggregation == "mean",
                f"secure-aggregation = true with aggregation = {self.aggregation!r}: a robust rule needs each "
                "site's update, the server learns only their sum; use aggregation = 'mean'",
            ),
            (
                self.max_update_norm == 0,
                "secure-aggregation = true with max-update-norm > 0: the server cannot bound an update it never "
                "sees; sites clip their own under differential privacy (dp-clip-norm)",
            ),
            (
                not self.measure_gamma,
                "secure-aggregation = true with measure-gamma: Gamma needs each site's gradients in the clear",
            ),
            (self.secagg_neighbours >= 0, f"secagg-neighbours must be >= 0 (0 = all), got {self.secagg_neighbours}"),
            (
                0 < self.secagg_threshold <= 1,
                f"secagg-threshold must be in (0, 1] (a share of each site's neighbourhood), got {self.secagg_threshold}",
            ),
            (self.secagg_clip > 0, f"secagg-clip must be > 0, got {self.secagg_clip}"),
            (
                2 <= self.secagg_quantization <= 2**24,
                f"secagg-quantization must be in 2..2**24 (the sum of the sites' values stays below 2**32), "
                f"got {self.secagg_quantization}",
            ),
        ]

    def describe_model(self) -> str:
        """One line for the run's start-up and summary: the autoencoder that runs (and
        whether `dz` applies to it) and which BatchNorm statistics score the model."""
        parts = []
        if self.fused:
            if self.ae_arch == "unet":
                parts.append(
                    f"autoencoder: unet (the reference code's U-Net, no latent vector: dz = {self.dz} does not apply)"
                )
            else:
                parts.append(f"autoencoder: {self.ae_arch} (latent vector of dz = {self.dz})")
        scoring = {
            "batch-recal": "BatchNorm statistics recomputed on each site's training images before it evaluates",
            "batch": "the model's own (averaged or calibrated) BatchNorm statistics",
            "group": "GroupNorm, no running statistics",
        }[self.norm]
        parts.append(f"norm: {self.norm} (scored with {scoring})")
        return "; ".join(parts)

    @property
    def fused(self) -> bool:
        """The model has a private encoder and a shared decoder (FusedSpaceFed)."""
        return METHODS[self.method].uses_encoder

    @property
    def rules(self) -> Protocol:
        """What the run's protocol changes (core/protocol.py)."""
        return PROTOCOLS[self.protocol]

    @property
    def classifier_norm(self) -> str:
        """The classifier's normalisation layers: 'batch' or 'group' ('batch-recal' is
        BatchNorm whose running statistics a site recomputes before it evaluates)."""
        return "group" if self.norm == "group" else "batch"

    @property
    def recalibrate_bn(self) -> bool:
        """A site recomputes the BatchNorm running statistics on its own training images
        before evaluating (a forward pass, no labels; nothing leaves the site)."""
        return self.norm == "batch-recal"

    def round_lr(self, server_round: int) -> float:
        """The classifier's learning rate in `server_round` (1-based): constant, or a cosine
        decay over the run's rounds down to 1 % of `lr` in the last round."""
        if self.lr_schedule == "constant" or self.num_server_rounds <= 1:
            return self.lr
        progress = (max(server_round, 1) - 1) / (self.num_server_rounds - 1)
        return self.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))

    @property
    def dp(self) -> bool:
        """Differential privacy is on: sites clip their shared update, the server adds noise."""
        return self.dp_clip_norm > 0

    @property
    def weighted_mean(self) -> bool:
        """Example-weighted averaging (`weighted`), except under the reference protocol or
        differential privacy (whose noise calibration assumes the plain mean)."""
        return self.weighted and self.rules.weighted_mean and not self.dp

    def default_run_name(self, simulated: bool = True) -> str:
        """The name of a run without `run-name`. A simulation's partition settings make its
        data, so they are in the name; a deployment's sites bring their own data, which the
        run config does not describe (`site-data` in its place)."""
        if not simulated:
            return f"{self.method}-{self.dataset}-site-data-s{self.seed}"
        spread = partition_tag(self.partition, self.alpha, self.classes_per_client)
        return f"{self.method}-{self.dataset}-{self.partition}-{spread}-s{self.seed}"


def partition_tag(partition: str, alpha: float, classes_per_client: int) -> str:
    """How skewed a partition is, for run names: `a0.05`, `k2` or `iid`."""
    if partition.startswith("dirichlet"):
        return f"a{alpha:g}"
    if partition == "pathological":
        return f"k{classes_per_client}"
    return "iid"


def _coerce(key: str, value: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r} must be {kind.__name__}, got {value!r}") from None
