"""Methods are configuration: which scales are trained, how many experts, and where S1 applies."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import TuneQDMError
from ..quant.bits import Bits
from ..quant.quantizer import check_init


@dataclass(frozen=True)
class MethodSpec:
    train_s_in: bool  # MCSU: separable input-channel scales
    experts: str  # "one", "many" (K > 1) or "any"
    default_experts: int
    help: str


METHODS = {
    "peqa": MethodSpec(False, "one", 1, "output-channel scales only (PEQA baseline)"),
    "tuneqdm": MethodSpec(True, "any", 4, "separable scales (MCSU) with K timestep experts (TAS)"),
    "mcsu": MethodSpec(True, "one", 1, "ablation: separable scales, one set"),
    "tas": MethodSpec(False, "many", 4, "ablation: output scales, K timestep experts"),
    "s1": MethodSpec(True, "one", 1, "TuneQDM v1 S1: one tuned set used only inside chosen timestep intervals"),
}


def experts_problem(method: str, experts, num_train_timesteps: int | None = None) -> str | None:
    """The rule that K = ``experts`` breaks for ``method``, or None: "one" (the method has one scale set: K must be
    1), "positive" (K must be an integer >= 1), "many" (the method needs K >= 2) or "beyond" (more experts than the
    scheduler's T training timesteps, when T is known: an expert without a timestep never trains, and each costs a
    copy of every scale). One rule; QuantConfig and the CLI each word it their own way."""
    spec = METHODS[method]
    if spec.experts == "one" and experts != 1:
        return "one"
    if not isinstance(experts, int) or experts < 1:
        return "positive"
    if spec.experts == "many" and experts < 2:
        return "many"
    if num_train_timesteps is not None and experts > num_train_timesteps:
        return "beyond"
    return None


def interval_problem(a: int, b: int, num_train_timesteps: int | None = None) -> str | None:
    """The rule S1's interval [a, b) breaks, or None: "order" (it needs 0 <= a < b) or "beyond" (b <= T, when the
    scheduler's T is known). One rule; QuantConfig and the CLI each word it their own way."""
    if not 0 <= a < b:
        return "order"
    if num_train_timesteps is not None and b > num_train_timesteps:
        return "beyond"
    return None


def _patterns(value) -> tuple[str, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass
class QuantConfig:
    """What ``quantize_`` does to a model.

    bits: weight bit width (2, 4 or 8). method: one of ``METHODS``. experts: K scale sets (default per method).
    init: quantizer initialisation, ``"minmax"`` or ``"mse"``. include/exclude: fnmatch patterns on module names.
    intervals: S1's half-open timestep intervals [a, b). num_train_timesteps: T of the scheduler.
    train_bias: also train the (otherwise frozen) biases.
    """

    bits: int = 4
    method: str = "tuneqdm"
    experts: int | None = None
    init: str = "mse"
    include: str | tuple[str, ...] | None = None
    exclude: str | tuple[str, ...] | None = None
    intervals: tuple[tuple[int, int], ...] = field(default_factory=tuple)
    num_train_timesteps: int = 1000
    train_bias: bool = False

    def __post_init__(self):
        self.bits = Bits(self.bits)
        if self.method not in METHODS:
            raise TuneQDMError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        check_init(self.init)
        if self.experts is None:
            self.experts = METHODS[self.method].default_experts
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int) or \
                self.num_train_timesteps < 1:
            raise TuneQDMError(f"num_train_timesteps must be a positive integer, got {self.num_train_timesteps!r}")
        problem = experts_problem(self.method, self.experts, self.num_train_timesteps)
        if problem is not None:
            raise TuneQDMError({"positive": f"experts must be an integer >= 1, got {self.experts!r}",
                                "one": f"method {self.method!r} uses one scale set; got experts={self.experts}",
                                "many": f"method {self.method!r} needs experts >= 2; got experts={self.experts}",
                                "beyond": f"experts={self.experts} is more than the {self.num_train_timesteps} "
                                          "training timesteps it routes (num_train_timesteps)"}[problem])
        self.include, self.exclude = _patterns(self.include), _patterns(self.exclude)
        self.intervals = tuple((int(a), int(b)) for a, b in self.intervals)
        if self.method == "s1" and not self.intervals:
            raise TuneQDMError("method 's1' needs intervals, e.g. intervals=[(0, 250)]")
        if self.method != "s1" and self.intervals:
            raise TuneQDMError(f"intervals apply to method 's1' only, not {self.method!r}")
        T = self.num_train_timesteps
        for a, b in self.intervals:
            if interval_problem(a, b, T):
                raise TuneQDMError(f"interval [{a}, {b}) is outside the timesteps [0, {T}): need 0 <= a < b <= {T}")

    @property
    def train_s_in(self) -> bool:
        return METHODS[self.method].train_s_in

    def to_dict(self) -> dict:
        return {
            "bits": self.bits, "method": self.method, "experts": self.experts, "init": self.init,
            "include": list(self.include) if self.include else None,
            "exclude": list(self.exclude) if self.exclude else None,
            "intervals": [list(i) for i in self.intervals], "num_train_timesteps": self.num_train_timesteps,
            "train_bias": self.train_bias,
        }

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        d = dict(d)
        d["intervals"] = tuple(tuple(i) for i in d.get("intervals") or ())
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
