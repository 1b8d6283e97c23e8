"""Energy per inference from the board's own power sensors (standard library only, Python 3.8: it travels
with runner.py).

- Intel: RAPL package energy counters (powercap sysfs, `intel-rapl:N/energy_uj`, wrapping at
  `max_energy_range_uj`); the counters integrate in hardware, so a reading before and after the timed
  loop gives the energy.
- Jetson: the INA3221 monitors through hwmon (`name` ina3221, `inN_label`, `inN_input` in mV,
  `currN_input` in mA); the board input rail (VDD_IN) where labelled, else the sum of the channels,
  sampled in a thread while the loop runs.
- Raspberry Pi 5: the PMIC's rails from `vcgencmd pmic_read_adc` (each rail's `_A current` times its
  `_V volt`), sampled in a thread.

Figures are the whole package's or board's power while the model runs, idle draw included: what the
board spends per inference, not the model alone. Where no sensor is readable: None and the reason.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable

NO_SENSOR = "no power sensor readable here (Intel RAPL, Jetson INA3221, Raspberry Pi 5 PMIC)"
_PMIC_LINE = re.compile(r"^\s*(?P<rail>\S+?)_(?P<kind>[AV])\s+(?:current|volt)\(\d+\)=(?P<value>[-+0-9.eE]+)[AV]\s*$")


class Meter:
    """Measures the energy spent between start() and stop(): (joules, seconds)."""

    name = ""
    scope = ""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> tuple[float, float]:
        raise NotImplementedError


class RaplMeter(Meter):
    """Intel RAPL package counters (every package, summed), read before and after."""

    name = "intel-rapl"
    scope = "CPU package(s), RAPL"

    def __init__(self, zones: list[str]):
        self.zones = zones
        self.ranges = [int(_read(os.path.join(z, "max_energy_range_uj")) or 0) for z in zones]

    def _counters(self) -> list[int]:
        return [int(_read(os.path.join(z, "energy_uj")) or 0) for z in self.zones]

    def start(self) -> None:
        self.t0, self.c0 = time.perf_counter(), self._counters()

    def stop(self) -> tuple[float, float]:
        c1, t1 = self._counters(), time.perf_counter()
        total_uj = 0
        for a, b, wrap in zip(self.c0, c1, self.ranges):  # noqa: B905 - Python 3.8 on JetPack 5
            total_uj += b - a if b >= a else b + wrap - a  # the counter wrapped once
        return total_uj / 1e6, t1 - self.t0


class SampledMeter(Meter):
    """Power read every `period_s` in a thread; energy = mean power x elapsed time."""

    def __init__(self, name: str, scope: str, read_watts: Callable[[], float | None], period_s: float):
        self.name, self.scope, self.read_watts, self.period_s = name, scope, read_watts, period_s
        self.samples: list[float] = []

    def _loop(self) -> None:
        while not self._done.is_set():
            w = self.read_watts()
            if w is not None:
                self.samples.append(w)
            self._done.wait(self.period_s)

    def start(self) -> None:
        self.samples = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.t0 = time.perf_counter()
        self._thread.start()

    def stop(self) -> tuple[float, float]:
        seconds = time.perf_counter() - self.t0
        self._done.set()
        self._thread.join()
        if not self.samples:
            raise OSError(f"{self.name}: no power reading during the measurement")
        return sum(self.samples) / len(self.samples) * seconds, seconds


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def rapl_zones(root: str = "/") -> tuple[list[str], str | None]:
    """The readable top-level RAPL package zones, or ([], why not)."""
    zones = sorted(z for z in glob.glob(os.path.join(root, "sys/class/powercap/intel-rapl:*"))
                   if re.fullmatch(r"intel-rapl:\d+", os.path.basename(z)))
    if not zones:
        return [], None
    readable = [z for z in zones if _read(os.path.join(z, "energy_uj")) is not None]
    if not readable:
        return [], "Intel RAPL counters exist but are not readable (root only since Linux 5.10)"
    return readable, None


def ina3221_watts(root: str = "/") -> Callable[[], float | None] | None:
    """A reader of board power from the INA3221 hwmon channels (VDD_IN where labelled), or None."""
    for hw in sorted(glob.glob(os.path.join(root, "sys/class/hwmon/hwmon*"))):
        if _read(os.path.join(hw, "name")) != "ina3221":
            continue
        channels = []
        for label_file in sorted(glob.glob(os.path.join(hw, "in*_label"))):
            n = re.findall(r"in(\d+)_label$", label_file)[0]
            if os.path.exists(os.path.join(hw, f"curr{n}_input")):
                channels.append((_read(label_file) or "", os.path.join(hw, f"in{n}_input"),
                                 os.path.join(hw, f"curr{n}_input")))
        total = [c for c in channels if c[0].upper() in ("VDD_IN", "POM_5V_IN")]
        use = total or channels
        if not use:
            continue

        def read(use: list = use) -> float | None:
            watts = 0.0
            for _, volt, curr in use:
                mv, ma = _read(volt), _read(curr)
                if mv is None or ma is None:
                    return None
                watts += float(mv) * float(ma) / 1e6
            return watts

        return read
    return None


def pmic_watts(text: str) -> float | None:
    """Total power of `vcgencmd pmic_read_adc` output: the sum over rails of current x voltage."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        m = _PMIC_LINE.match(line)
        if m:
            (amps if m["kind"] == "A" else volts)[m["rail"]] = float(m["value"])
    rails = amps.keys() & volts.keys()
    return sum(amps[r] * volts[r] for r in rails) if rails else None


def _vcgencmd_watts() -> float | None:
    try:
        out = subprocess.run(["vcgencmd", "pmic_read_adc"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return pmic_watts(out.stdout) if out.returncode == 0 else None


def find_meter(root: str = "/", vcgencmd: Callable[[], float | None] | None = None) -> tuple[Meter | None, str]:
    """The first power sensor this machine exposes: (meter, "") or (None, why there is none)."""
    zones, why = rapl_zones(root)
    if zones:
        return RaplMeter(zones), ""
    reader = ina3221_watts(root)
    if reader is not None and reader() is not None:
        return SampledMeter("ina3221", "board input (INA3221 VDD_IN)", reader, 0.02), ""
    probe = vcgencmd or _vcgencmd_watts
    if (vcgencmd is not None or root == "/") and probe() is not None:
        return SampledMeter("rpi5-pmic", "Raspberry Pi 5 PMIC rails (vcgencmd pmic_read_adc)", probe, 0.1), ""
    return None, why or NO_SENSOR


def measure(meter: Meter | None, why: str, run: Callable[[], int]) -> dict:
    """Run `run` (returns the number of inferences it made) under `meter`: energy per inference (mJ),
    average power (W) and the sensor, or nulls with the reason."""
    if meter is None:
        run()
        return {"energy_mj": None, "avg_power_w": None, "energy_not_measured": why}
    try:
        meter.start()
    except OSError as e:
        run()
        return {"energy_mj": None, "avg_power_w": None, "energy_not_measured": f"{meter.name}: {e}"}
    n = run()
    try:
        joules, seconds = meter.stop()
    except OSError as e:
        return {"energy_mj": None, "avg_power_w": None, "energy_not_measured": str(e)}
    return {"energy_mj": round(joules * 1e3 / max(n, 1), 6), "avg_power_w": round(joules / seconds, 4),
            "energy_sensor": meter.name, "energy_scope": meter.scope}
