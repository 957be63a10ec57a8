"""NVIDIA GPUs through NVML: the one module that imports pynvml (the ``nvidia-ml-py`` package).

Two uses: ``gpu_inventory()`` lists this machine's GPUs (name, total and free memory) for a launch
pre-flight check, and ``GpuProbe`` reads one GPU's memory, utilisation, power, temperature, energy
and XID errors for the metrics exporter (launch/metrics.py). Where there is no NVIDIA driver (a CPU
machine, a container without the driver library) both answer "no GPU" -- ``[]`` and ``None`` --
rather than raising, and a reading a GPU does not support (power on some boards, XID events in
some containers) is ``None`` and its metric is simply not exported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def _nvml():  # type: ignore[no-untyped-def]
    """pynvml, initialised; None without an NVIDIA driver (or without nvidia-ml-py)."""
    try:
        import pynvml

        pynvml.nvmlInit()  # reference-counted: each successful call is paired with nvmlShutdown
    except Exception:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
        return None
    return pynvml


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML numbers it (physical index, not CUDA_VISIBLE_DEVICES order)."""

    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_free_bytes: int


def gpu_inventory() -> list[GpuInfo]:
    """Every NVIDIA GPU of this machine; [] where there is no NVIDIA driver."""
    nvml = _nvml()
    if nvml is None:
        return []
    try:
        gpus = []
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(GpuInfo(index=i, name=_str(nvml.nvmlDeviceGetName(h)), uuid=_str(nvml.nvmlDeviceGetUUID(h)),
                                memory_total_bytes=int(mem.total), memory_free_bytes=int(mem.free)))
        return gpus
    except nvml.NVMLError:
        return []
    finally:
        nvml.nvmlShutdown()


def _str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class GpuSample:
    """One reading of one GPU; None: not supported by this GPU or driver."""

    memory_used_bytes: int | None
    memory_total_bytes: int | None
    utilization_ratio: float | None  # fraction of the last sample period a kernel ran (NVML utilization.gpu / 100)
    power_watts: float | None
    temperature_celsius: float | None
    energy_joules: float | None  # cumulative since the driver was loaded (NVML total energy, mJ / 1000)
    xid_errors: int | None  # XID critical errors seen since the previous sample


def visible_device(local_device: int = 0) -> str:
    """NVML's name (index or UUID) of CUDA device ``local_device`` of this process: CUDA numbers
    the devices CUDA_VISIBLE_DEVICES lists, NVML numbers all of them."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[local_device] if local_device < len(visible) else str(local_device)


class GpuProbe:
    """Readings of one GPU (the one a rank trains on). ``open`` returns None without a driver."""

    def __init__(self, nvml, handle, index: int) -> None:  # type: ignore[no-untyped-def]
        self._nvml, self._h, self.index = nvml, handle, index
        self._events = self._xid_events()

    @classmethod
    def open(cls, device: str) -> GpuProbe | None:
        """``device``: an NVML index ("3") or UUID ("GPU-..."), e.g. from ``visible_device()``."""
        nvml = _nvml()
        if nvml is None:
            return None
        try:
            h = nvml.nvmlDeviceGetHandleByIndex(int(device)) if device.isdigit() else nvml.nvmlDeviceGetHandleByUUID(device)
            return cls(nvml, h, int(nvml.nvmlDeviceGetIndex(h)))
        except nvml.NVMLError:
            nvml.nvmlShutdown()
            return None

    def _xid_events(self):  # type: ignore[no-untyped-def]
        try:
            events = self._nvml.nvmlEventSetCreate()
            self._nvml.nvmlDeviceRegisterEvents(self._h, self._nvml.nvmlEventTypeXidCriticalError, events)
            return events
        except self._nvml.NVMLError:  # not supported (some containers, vGPUs)
            return None

    def _read(self, fn, *args):  # type: ignore[no-untyped-def]
        try:
            return fn(self._h, *args)
        except self._nvml.NVMLError:
            return None

    def _xids(self) -> int | None:
        if self._events is None:
            return None
        seen = 0
        while True:
            try:
                self._nvml.nvmlEventSetWait_v2(self._events, 0)  # timeout 0 ms: only what is pending
            except self._nvml.NVMLError:  # NVMLError_Timeout: none pending
                return seen
            seen += 1

    def sample(self) -> GpuSample:
        n = self._nvml
        mem = self._read(n.nvmlDeviceGetMemoryInfo)
        util = self._read(n.nvmlDeviceGetUtilizationRates)
        power_mw = self._read(n.nvmlDeviceGetPowerUsage)
        temp = self._read(n.nvmlDeviceGetTemperature, n.NVML_TEMPERATURE_GPU)
        energy_mj = self._read(n.nvmlDeviceGetTotalEnergyConsumption)
        return GpuSample(
            memory_used_bytes=int(mem.used) if mem is not None else None,
            memory_total_bytes=int(mem.total) if mem is not None else None,
            utilization_ratio=util.gpu / 100 if util is not None else None,
            power_watts=power_mw / 1000 if power_mw is not None else None,
            temperature_celsius=float(temp) if temp is not None else None,
            energy_joules=energy_mj / 1000 if energy_mj is not None else None,
            xid_errors=self._xids(),
        )

    def close(self) -> None:
        if self._events is not None:
            try:
                self._nvml.nvmlEventSetFree(self._events)
            except self._nvml.NVMLError:
                pass
        self._nvml.nvmlShutdown()
