"""Energy per inference: each sensor's code path on recorded readings laid out as the board exposes them."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgekd.bench.energy import NO_SENSOR, RaplMeter, SampledMeter, find_meter, measure, pmic_watts

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_rapl_counters_give_energy_across_a_wrap(tmp_path):
    zone = tmp_path / "sys/class/powercap/intel-rapl:0"
    _write(zone / "name", "package-0")
    _write(zone / "max_energy_range_uj", "262143328850")
    _write(zone / "energy_uj", "262143320000")  # 8,850 uJ before the counter wraps
    _write(tmp_path / "sys/class/powercap/intel-rapl:0:0/energy_uj", "5")  # a subzone: not summed again
    meter, why = find_meter(str(tmp_path), vcgencmd=lambda: None)
    assert isinstance(meter, RaplMeter) and why == "" and len(meter.zones) == 1

    def loop() -> int:
        _write(zone / "energy_uj", "1150")  # wrapped: 8,850 + 1,150 = 10,000 uJ
        time.sleep(0.05)
        return 100

    out = measure(meter, why, loop)
    assert out["energy_mj"] == pytest.approx(10_000 / 1e3 / 100)  # 0.1 mJ per inference
    assert out["avg_power_w"] == pytest.approx(0.01 / 0.05, rel=0.5) and out["energy_sensor"] == "intel-rapl"


def test_unreadable_rapl_says_why(tmp_path):
    zone = tmp_path / "sys/class/powercap/intel-rapl:0"
    zone.mkdir(parents=True)
    meter, why = find_meter(str(tmp_path), vcgencmd=lambda: None)
    assert meter is None and "not readable" in why
    assert measure(meter, why, lambda: 1) == {"energy_mj": None, "avg_power_w": None, "energy_not_measured": why}


def test_jetson_ina3221_reads_the_board_input_rail(tmp_path):
    hw = tmp_path / "sys/class/hwmon/hwmon3"
    _write(hw / "name", "ina3221")
    for n, label, mv, ma in ((1, "VDD_IN", 5080, 1480), (2, "VDD_CPU_GPU_CV", 5072, 392), (3, "VDD_SOC", 5080, 512)):
        _write(hw / f"in{n}_label", label)
        _write(hw / f"in{n}_input", str(mv))
        _write(hw / f"curr{n}_input", str(ma))
    meter, _ = find_meter(str(tmp_path), vcgencmd=lambda: None)
    assert isinstance(meter, SampledMeter) and meter.name == "ina3221"
    assert meter.read_watts() == pytest.approx(5.080 * 1.480)  # VDD_IN alone: the rails below it are inside it

    def loop() -> int:
        time.sleep(0.1)
        return 50

    out = measure(meter, "", loop)
    assert out["avg_power_w"] == pytest.approx(7.5184, rel=1e-6)
    assert out["energy_mj"] == pytest.approx(7.5184 * 0.1 * 1e3 / 50, rel=0.2)


def test_raspberry_pi_5_pmic_rails_sum_current_times_voltage():
    text = (FIXTURES / "pmic_read_adc.txt").read_text()
    watts = pmic_watts(text)
    # Recorded on a Pi 5: VDD_CORE alone is 0.717 A x 0.881 V; EXT5V has a voltage but no current: left out.
    assert watts == pytest.approx(1.7325, abs=1e-3)
    assert pmic_watts("VDD_CORE_A current(7)=1.0A\n") is None  # no voltage for the rail
    meter, _ = find_meter("/nonexistent", vcgencmd=lambda: watts)
    assert meter is not None and meter.name == "rpi5-pmic"


def test_no_sensor_is_null_with_the_reason(tmp_path):
    meter, why = find_meter(str(tmp_path), vcgencmd=lambda: None)
    assert meter is None and why == NO_SENSOR
    calls = []
    out = measure(meter, why, lambda: calls.append(1) or 3)
    assert calls == [1] and out["energy_mj"] is None and out["energy_not_measured"] == NO_SENSOR
