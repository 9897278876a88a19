from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import psutil
import pytest

from agent.monitor import ResourceMonitor, Throttling, parse_throttled, thermal_state
from agent.profiles import load_profile

PI4_THROTTLED = "sys/devices/platform/soc/soc:firmware/get_throttled"
PI5_THROTTLED = "sys/devices/platform/soc@107c000000/soc@107c000000:firmware/get_throttled"


def write(root: Path, path: str, text: str) -> None:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def thermal_zone(root: Path, index: int, zone_type: str, millidegrees: str) -> None:
    write(root, f"sys/class/thermal/thermal_zone{index}/type", zone_type + "\n")
    write(root, f"sys/class/thermal/thermal_zone{index}/temp", millidegrees + "\n")


def fake_throttling_pi(root: Path) -> None:
    thermal_zone(root, 0, "cpu-thermal", "82500")
    write(root, PI4_THROTTLED, "50005\n")  # the kernel writes it with "%x", no 0x


def fake_jetson_nano(root: Path) -> None:
    thermal_zone(root, 0, "AO-therm", "41000")
    thermal_zone(root, 1, "CPU-therm", "52500")
    thermal_zone(root, 2, "GPU-therm", "49000")
    thermal_zone(root, 3, "PLL-therm", "47500")
    thermal_zone(root, 4, "PMIC-Die", "100000")  # always 100 °C on Jetsons: ignored
    write(root, "sys/devices/gpu.0/load", "734\n")
    ina = "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    for channel, (name, millivolts, milliamps) in enumerate(
        [("POM_5V_IN", 5000, 1200), ("POM_5V_GPU", 4984, 300)]
    ):
        write(root, f"{ina}/rail_name_{channel}", name + "\n")
        write(root, f"{ina}/in_voltage{channel}_input", f"{millivolts}\n")
        write(root, f"{ina}/in_current{channel}_input", f"{milliamps}\n")


def test_a_throttling_raspberry_pi(tmp_path):
    fake_throttling_pi(tmp_path)
    profile = load_profile("rpi4")

    snapshot = ResourceMonitor(profile, root=tmp_path).snapshot()

    assert snapshot.temperature_c == 82.5
    assert thermal_state(snapshot.temperature_c, profile.thermal) == "throttle"
    throttling = snapshot.throttling
    assert throttling is not None and throttling.active
    assert throttling.under_voltage and throttling.throttled
    assert not throttling.freq_capped and not throttling.soft_temp_limit
    assert throttling.under_voltage_since_boot and throttling.throttled_since_boot
    assert not throttling.freq_capped_since_boot and not throttling.soft_temp_limit_since_boot
    assert throttling.raw == 0x50005
    assert snapshot.gpu_load_percent is None and snapshot.power_mw == {}


def test_a_raspberry_pi_5_finds_its_own_firmware_node(tmp_path):
    thermal_zone(tmp_path, 0, "cpu-thermal", "48300")
    write(tmp_path, PI5_THROTTLED, "0\n")

    snapshot = ResourceMonitor(load_profile("rpi5"), root=tmp_path).snapshot()

    assert snapshot.temperature_c == pytest.approx(48.3)
    assert snapshot.throttling is not None and not snapshot.throttling.active
    assert snapshot.throttling.raw == 0


def test_a_jetson_nano_reports_the_hottest_zone_gpu_load_and_rails(tmp_path):
    fake_jetson_nano(tmp_path)
    profile = load_profile("jetson-nano")

    snapshot = ResourceMonitor(profile, root=tmp_path).snapshot()

    assert snapshot.temperature_c == 52.5  # CPU-therm; PMIC-Die's constant 100 is ignored
    assert thermal_state(snapshot.temperature_c, profile.thermal) == "ok"
    assert snapshot.gpu_load_percent == pytest.approx(73.4)
    assert snapshot.power_mw == pytest.approx({"POM_5V_IN": 6000.0, "POM_5V_GPU": 1495.2})
    assert snapshot.throttling is None


def test_a_jetson_orin_nano_reads_hwmon_rails_and_drops_gated_zones(tmp_path):
    thermal_zone(tmp_path, 0, "cpu-thermal", "61250")
    thermal_zone(tmp_path, 1, "gpu-thermal", "58000")
    thermal_zone(tmp_path, 2, "cv0-thermal", "-256000")  # no DLA on the Orin Nano
    write(tmp_path, "sys/devices/platform/bus@0/17000000.gpu/load", "0\n")
    hwmon = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    for channel, name, millivolts, milliamps in [(1, "VDD_IN", 5072, 1312), (2, "VDD_CPU_GPU_CV", 5064, 240)]:
        write(tmp_path, f"{hwmon}/in{channel}_label", name + "\n")
        write(tmp_path, f"{hwmon}/in{channel}_input", f"{millivolts}\n")
        write(tmp_path, f"{hwmon}/curr{channel}_input", f"{milliamps}\n")
    write(tmp_path, f"{hwmon}/in4_input", "5240\n")  # a shunt voltage in µV, not a rail
    write(tmp_path, f"{hwmon}/curr4_input", "1552\n")

    snapshot = ResourceMonitor(load_profile("jetson-orin-nano"), root=tmp_path).snapshot()

    assert snapshot.temperature_c == 61.25
    assert snapshot.gpu_load_percent == 0.0
    assert snapshot.power_mw == pytest.approx({"VDD_IN": 5072 * 1.312, "VDD_CPU_GPU_CV": 5064 * 0.240})


def test_a_bare_x86_box_reports_what_it_can_without_errors(tmp_path):
    monitor = ResourceMonitor(load_profile("x86"), root=tmp_path)

    snapshot = monitor.snapshot()

    assert monitor.host_sensors is False  # psutil's temperatures are this machine's, not the tree's
    assert snapshot.temperature_c is None
    assert snapshot.throttling is None
    assert snapshot.gpu_load_percent is None
    assert snapshot.power_mw == {}
    assert snapshot.battery_percent is None and snapshot.on_battery is None


def test_without_a_profile_the_generic_thermal_zones_are_read(tmp_path):
    thermal_zone(tmp_path, 0, "acpitz", "27800")
    thermal_zone(tmp_path, 1, "x86_pkg_temp", "64000")

    snapshot = ResourceMonitor(root=tmp_path).snapshot()

    assert snapshot.temperature_c == 64.0
    assert snapshot.throttling is None and snapshot.power_mw == {}


def test_garbage_in_sensor_files_reads_as_unknown(tmp_path):
    thermal_zone(tmp_path, 0, "cpu-thermal", "abc")
    write(tmp_path, PI4_THROTTLED, "not a number\n")

    snapshot = ResourceMonitor(load_profile("rpi4"), root=tmp_path).snapshot()

    assert snapshot.temperature_c is None
    assert snapshot.throttling is None
    assert thermal_state(snapshot.temperature_c, load_profile("rpi4").thermal) == "unknown"


def test_garbage_jetson_gpu_and_rail_values_are_left_out(tmp_path):
    fake_jetson_nano(tmp_path)
    write(tmp_path, "sys/devices/gpu.0/load", "\x00\xff")
    write(tmp_path, "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/in_current1_input", "n/a\n")

    snapshot = ResourceMonitor(load_profile("jetson-nano"), root=tmp_path).snapshot()

    assert snapshot.gpu_load_percent is None
    assert snapshot.power_mw == pytest.approx({"POM_5V_IN": 6000.0})


def test_an_unreadable_sensor_reads_as_unknown(tmp_path):
    write(tmp_path, "sys/class/thermal/thermal_zone0", "")  # a file where a folder should be
    write(tmp_path, "sys/devices/platform/soc/soc:firmware/get_throttled/x", "")  # a folder

    snapshot = ResourceMonitor(load_profile("rpi4"), root=tmp_path).snapshot()

    assert snapshot.temperature_c is None and snapshot.throttling is None


def test_parse_throttled_reads_vcgencmd_output():
    word = parse_throttled("throttled=0x50005\n")

    assert word == Throttling(
        under_voltage=True, freq_capped=False, throttled=True, soft_temp_limit=False,
        under_voltage_since_boot=True, freq_capped_since_boot=False,
        throttled_since_boot=True, soft_temp_limit_since_boot=False,
        raw=0x50005,
    )
    assert word.active


def test_parse_throttled_reads_sysfs_text_and_rejects_garbage():
    assert parse_throttled("0x80008").soft_temp_limit_since_boot
    assert parse_throttled("50000").raw == 0x50000  # hex, as the kernel writes it
    assert parse_throttled("50000").active is False
    assert parse_throttled("throttled=0x0").raw == 0
    assert parse_throttled("abc xyz") is None
    assert parse_throttled("") is None
    assert parse_throttled("throttled=") is None


def test_vcgencmd_is_the_fallback_and_runs_at_most_every_few_seconds(tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    script = tmp_path / "bin" / "vcgencmd"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho x >> "{calls}"\necho "throttled=0x50000"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    monitor = ResourceMonitor(load_profile("rpi5"), root=tmp_path / "no-sysfs", host_sensors=True)

    first, second = monitor.snapshot(), monitor.snapshot()

    assert first.throttling is not None and first.throttling.throttled_since_boot
    assert not first.throttling.active
    assert second.throttling == first.throttling
    assert calls.read_text().count("x") == 1


def test_thermal_state_steps_through_the_profile_limits():
    limits = load_profile("rpi4").thermal  # 75 / 80 / 85

    assert thermal_state(None, limits) == "unknown"
    assert thermal_state(55.0, limits) == "ok"
    assert thermal_state(75.0, limits) == "warm"
    assert thermal_state(82.5, limits) == "throttle"
    assert thermal_state(85.0, limits) == "critical"


def test_psutil_fields_are_real_on_this_machine(tmp_path):
    monitor = ResourceMonitor(root=tmp_path)

    first, second = monitor.snapshot(), monitor.snapshot()

    for snapshot in (first, second):
        assert 0.0 <= snapshot.cpu_percent <= 100.0
        assert len(snapshot.per_core_percent) == psutil.cpu_count()
        assert all(0.0 <= p <= 100.0 for p in snapshot.per_core_percent)
        assert 0 < snapshot.mem_available_mb <= snapshot.mem_total_mb
        assert snapshot.rss_mb > 0
        assert snapshot.load_avg is not None and len(snapshot.load_avg) == 3
    assert second.time >= first.time


def test_rss_of_another_process(tmp_path):
    parent = ResourceMonitor(root=tmp_path, pid=os.getppid())

    assert parent.snapshot().rss_mb > 0


def test_snapshot_to_dict_is_plain_json(tmp_path):
    fake_throttling_pi(tmp_path)
    snapshot = ResourceMonitor(load_profile("rpi4"), root=tmp_path).snapshot()

    data = json.loads(json.dumps(snapshot.to_dict()))

    assert data["temperature_c"] == 82.5
    assert data["throttling"]["active"] is True and data["throttling"]["raw"] == 0x50005
    assert isinstance(data["load_avg"], list) and len(data["load_avg"]) == 3
    assert set(data) == {
        "time", "cpu_percent", "per_core_percent", "load_avg", "mem_available_mb", "mem_total_mb",
        "rss_mb", "temperature_c", "throttling", "gpu_load_percent", "power_mw",
        "battery_percent", "on_battery",
    }


def test_the_monitor_never_imports_torch():
    import subprocess
    import sys

    code = "import sys, agent.monitor, agent.profiles; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "False"
