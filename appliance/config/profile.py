"""Hardware profile schema: what a box can run, in preference order, and what it costs in watts."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BACKENDS = ("onnxruntime", "openvino", "tensorrt")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Candidate(_Strict):
    backend: Literal["onnxruntime", "openvino", "tensorrt"]
    device: str = "CPU"
    precision: Literal["fp32", "fp16", "int8"]


class Threads(_Strict):
    inference: int = Field(ge=1, le=256)
    streams: int = Field(default=1, ge=1, le=64)


class PowerMode(_Strict):
    """A way of running that trades speed for watts; the scheduler picks one per power state."""

    name: str
    threads: int = Field(ge=1, le=256)
    watts: float = Field(gt=0)
    nvpmodel: int | None = None
    use_on: list[Literal["mains", "battery"]] = Field(default_factory=lambda: ["mains"])


class HardwareProfile(_Strict):
    name: str
    description: str
    arch: Literal["x86_64", "aarch64"]
    accelerator: Literal["none", "nvidia", "jetson", "intel-igpu"]
    memory_ceiling_mb: int = Field(ge=256)
    candidates: list[Candidate] = Field(min_length=1)
    threads: Threads
    idle_watts: float = Field(ge=0)
    watts: dict[str, float] = Field(description="estimated box draw while inferring, per backend")
    power_modes: list[PowerMode] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> HardwareProfile:
        for backend in self.watts:
            if backend not in BACKENDS:
                raise ValueError(f"watts names unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
        for cand in self.candidates:
            if cand.backend not in self.watts:
                raise ValueError(f"candidate backend {cand.backend!r} has no watts estimate")
        if not any("mains" in mode.use_on for mode in self.power_modes):
            raise ValueError("no power mode is marked for use on mains")
        return self

    def mode_for(self, on_battery: bool) -> PowerMode:
        wanted = "battery" if on_battery else "mains"
        for mode in self.power_modes:
            if wanted in mode.use_on:
                return mode
        return self.power_modes[-1]
