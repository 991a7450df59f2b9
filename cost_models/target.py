"""Target: one GPU and its host as the cost models see them (paper s.6 "Hardware SPEC.").

Hardware is data: built-in targets are TOML files in specontext_compiler/targets/, a user's own
target is a TOML file with the same keys. No logic anywhere branches on a GPU's name.
Bandwidths are decimal GB/s (1e9 bytes/s), memories are bytes.
"""
import math
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

from specontext_compiler.errors import TargetError


@dataclass(frozen=True)
class Target:
    """A GPU, its copy paths and its host memory."""

    name: str
    aliases: tuple[str, ...]
    gpu_memory_bytes: int        # Mem_GPU of the paper
    hbm_gbps: float              # effective device-memory bandwidth (a copy's read + write)
    h2d_gbps: float              # pinned host -> device copy (cudaMemcpyAsync)
    pinned_gather_gbps: float    # GPU kernel gathering scattered KV rows from pinned host memory
    bf16_tflops: float           # dense bf16 matmul throughput
    host_memory_bytes: int       # host DRAM available to this GPU for pinned KV
    launch_overhead_us: float    # CPU cost of one CUDA-graph replay (per launch)
    # Share of hbm_gbps that a decode step's kernels reach (GEMVs, split-K attention, small ops):
    # the roofline at full copy bandwidth under-predicts a real step by this factor.
    decode_hbm_efficiency: float = 1.0
    # Share of the pinned-gather and H2D rates that copies reach while the decode step computes
    # (they share HBM and SMs with it); the isolated copy measurements over-state them.
    overlapped_copy_efficiency: float = 1.0
    # Time of the small kernels every decoder layer runs whatever its bytes (norms, RoPE, residual
    # adds, index math: ~45 a layer, a few microseconds each), per layer, in microseconds.
    layer_fixed_us: float = 0.0
    # Copy/compute contention (step_dag.py): while a gather runs, the compute stream's kernels take
    # compute_slowdown_beside_gather times longer (they share HBM and SMs with it), and the gather
    # itself runs at gather_gbps_beside_compute instead of pinned_gather_gbps. Absent: the gather
    # beside compute is pinned_gather_gbps x overlapped_copy_efficiency and compute is not slowed.
    gather_gbps_beside_compute: float | None = None
    compute_slowdown_beside_gather: float = 1.0
    # Time of one offloaded layer's gather whatever its bytes, in microseconds: its launch and the
    # walk of the step's load list; the 128k steps at overlaps 0.7 and 0.9 are not proportional to
    # their copied bytes without it.
    gather_fixed_us: float = 0.0
    d2h_gbps: float | None = None   # pinned device -> host copy (the new token's write-through); absent: h2d_gbps
    unified_memory: bool = False  # host and GPU share one pool (Jetson): offloading frees nothing
    # GPU-to-GPU interconnect of a multi-GPU machine, for tensor-parallel plans (--gpus N > 1): one
    # GPU's bandwidth in one direction (a ring all-reduce's rate) and one all-reduce's fixed time.
    nvlink_gbps: float | None = None
    nvlink_latency_us: float | None = None
    # field name -> where the figure comes from (datasheet or measured); not part of equality
    sources: dict = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        """One line for logs and reports: '<name>: 80.0 GB, 2990 GB/s HBM, ...'."""
        return (f"{self.name}: {self.gpu_memory_bytes / 1e9:.1f} GB, {self.hbm_gbps:.0f} GB/s HBM, "
                f"{self.pinned_gather_gbps:.1f} GB/s pinned gather, {self.bf16_tflops:.0f} TFLOP/s bf16")

    @property
    def gather_gbps_overlapped(self) -> float:
        """The gather's rate while the compute stream runs beside it."""
        if self.gather_gbps_beside_compute is not None:
            return self.gather_gbps_beside_compute
        return self.pinned_gather_gbps * self.overlapped_copy_efficiency

    @property
    def write_through_gbps(self) -> float:
        """Rate of the new token's device -> host write-through."""
        return self.d2h_gbps if self.d2h_gbps is not None else self.h2d_gbps


_FRACTIONS = ("decode_hbm_efficiency", "overlapped_copy_efficiency")
_OPTIONAL_RATES = ("gather_gbps_beside_compute", "d2h_gbps", "nvlink_gbps")
INTERCONNECT_KEYS = ("nvlink_gbps", "nvlink_latency_us")   # read by tensor-parallel plans only
_OPTIONAL = ("unified_memory", "sources", "layer_fixed_us", "gather_fixed_us", "compute_slowdown_beside_gather",
             "nvlink_latency_us", *_OPTIONAL_RATES, *_FRACTIONS)
_REQUIRED = tuple(f.name for f in fields(Target) if f.name not in _OPTIONAL)
_VALID = tuple(f.name for f in fields(Target))
_INT_KEYS = ("gpu_memory_bytes", "host_memory_bytes")
_FLOAT_KEYS = ("hbm_gbps", "h2d_gbps", "pinned_gather_gbps", "bf16_tflops", "launch_overhead_us", "layer_fixed_us",
               "gather_fixed_us")
_FIXED_TIMES = ("layer_fixed_us", "gather_fixed_us")   # optional, default 0, never negative
_MAY_BE_ZERO = ("launch_overhead_us", *_FIXED_TIMES)


def _target_from_dict(data: dict, where: str) -> Target:
    """Validate the keys and types of one parsed TOML table and build the Target."""
    unknown = sorted(set(data) - set(_VALID))
    missing = [k for k in _REQUIRED if k not in data]
    if unknown or missing:
        problem = "; ".join(filter(None, [
            f"unknown keys {unknown}" if unknown else "",
            f"missing keys {missing}" if missing else ""]))
        raise TargetError(f"{where}: {problem}; valid keys are {list(_VALID)}")
    values = dict(data)
    for key in _FIXED_TIMES:
        values.setdefault(key, 0.0)
    try:
        for key in _FLOAT_KEYS + _INT_KEYS:
            values[key] = float(values[key])
            if not math.isfinite(values[key]):      # nan passes `<= 0`; inf plans a GPU that cannot exist
                raise TargetError(f"{where}: {key} = {data[key]!r} is not a finite number; write e.g. {key} = 1.0e3")
            if key in _INT_KEYS:
                values[key] = int(values[key])
    except (TypeError, ValueError, OverflowError):
        raise TargetError(f"{where}: {key} = {data[key]!r} is not a number; write e.g. {key} = 1.0e3") from None
    for key in _INT_KEYS + _FLOAT_KEYS:
        if values[key] <= 0 and key not in _MAY_BE_ZERO:
            raise TargetError(f"{where}: {key} must be positive, got {values[key]}")
    _check_contention(values, data, where)
    for key in _FIXED_TIMES:
        if values[key] < 0:
            raise TargetError(f"{where}: {key} must be >= 0, got {values[key]}")
    for key in _FRACTIONS:
        try:
            values[key] = float(values.get(key, 1.0))
        except (TypeError, ValueError):
            raise TargetError(f"{where}: {key} = {data[key]!r} is not a number; write a fraction such as 0.8")
        if not 0 < values[key] <= 1:
            raise TargetError(f"{where}: {key} must be in (0, 1], got {values[key]}")
    values["name"] = str(values["name"]).lower()
    unified = values.get("unified_memory", False)
    if isinstance(unified, str):   # from --set unified_memory=true
        unified = unified.strip().lower() in ("1", "true", "yes")
    values["unified_memory"] = bool(unified)
    if not isinstance(values.get("sources", {}), dict):
        raise TargetError(f"{where}: sources must be a table of figure = \"where it comes from\"")
    if not isinstance(values.get("aliases", ()), (list, tuple)):
        raise TargetError(f"{where}: aliases must be a list of names, e.g. aliases = [\"a100\"]")
    values["sources"] = {str(k): str(v) for k, v in values.get("sources", {}).items()}
    values["aliases"] = tuple(str(a).lower() for a in values.get("aliases", ()))
    return Target(**values)


def _check_contention(values: dict, data: dict, where: str) -> None:
    """The optional contention figures: rates positive when given, the slowdown at least 1."""
    key = "compute_slowdown_beside_gather"
    try:
        for key in _OPTIONAL_RATES:
            if values.get(key) is not None:
                values[key] = float(values[key])
                if values[key] <= 0:
                    raise TargetError(f"{where}: {key} must be positive, got {values[key]}")
        key = "nvlink_latency_us"
        if values.get(key) is not None:
            values[key] = float(values[key])
            if not values[key] >= 0:
                raise TargetError(f"{where}: {key} must be >= 0, got {values[key]}")
        key = "compute_slowdown_beside_gather"
        values[key] = float(values.get(key, 1.0))
    except (TypeError, ValueError):
        raise TargetError(f"{where}: {key} = {data[key]!r} is not a number; write e.g. {key} = 1.5")
    if values[key] < 1:
        raise TargetError(f"{where}: {key} must be >= 1 (1 = no slowdown), got {values[key]}")


def load_target_file(path: str | Path) -> Target:
    """Load a target from a user's TOML file with the keys of Target (a [sources] table optional)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise TargetError(f"target file {path} does not exist; pass a built-in name "
                          f"({', '.join(list_targets())}) or a .toml path")
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"target file {path} is not valid TOML ({exc}); fix the syntax") from None
    except UnicodeDecodeError:
        raise TargetError(f"target file {path} is not UTF-8 text; save it as UTF-8 TOML") from None
    except IsADirectoryError:
        raise TargetError(f"target file {path} is a directory; pass a .toml file") from None
    except OSError as exc:
        raise TargetError(f"target file {path} cannot be read ({exc.strerror}); check the path") from None
    return _target_from_dict(data, str(path))


def _builtin_targets() -> dict[str, Target]:
    """All built-in targets by name, read from the package data (works installed or editable)."""
    folder = resources.files("specontext_compiler") / "targets"
    found = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            target = _target_from_dict(tomllib.loads(entry.read_text()), f"built-in {entry.name}")
            found[target.name] = target
    return found


def list_targets() -> list[str]:
    """Names of the built-in targets, sorted."""
    return sorted(_builtin_targets())


def load_target(name_or_path: str) -> Target:
    """A built-in target by name or alias (case-insensitive), or a TOML file if given a path."""
    if str(name_or_path).endswith(".toml"):
        return load_target_file(name_or_path)
    key = str(name_or_path).strip().lower()
    for target in _builtin_targets().values():
        if key == target.name or key in target.aliases:
            return target
    raise TargetError(f"unknown target {name_or_path!r}; known targets: {', '.join(list_targets())}"
                      " (or pass a .toml file with the same keys)")


def override_target(target: Target, assignments: dict[str, str | float]) -> Target:
    """A copy of target with some figures replaced (--set h2d_gbps=48); the source says 'user'."""
    data = {f.name: getattr(target, f.name) for f in fields(Target)}
    data["sources"] = dict(target.sources)
    for key, text in assignments.items():
        if key in ("name", "aliases", "sources"):
            raise TargetError(f"--set {key} is not a figure; valid keys are {list(_INT_KEYS + _FLOAT_KEYS)}")
        data[key] = text
        data["sources"][key] = "set by the user"
    return _target_from_dict(data, f"{target.name} with --set")
