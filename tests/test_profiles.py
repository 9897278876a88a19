from __future__ import annotations

from pathlib import Path

import pytest

from agent.profiles import ProfileError, known_profiles, load_profile

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["jetson-nano", "jetson-orin-nano", "rpi4", "rpi5", "x86"]

VALID = """\
description = "test board"
backend = "tflite"
threads = 2
memory_budget_mb = 256
latency_slo_ms = 40

[thermal]
warm_c = 70
throttle_c = 80
critical_c = 85

[sensors]
thermal_zones = ["/sys/class/thermal/thermal_zone0/temp"]
"""


def write_profile(directory: Path, name: str, text: str = VALID) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads_with_sane_values(name):
    profile = load_profile(name)

    assert profile.name == name
    assert profile.path == REPO / "devices" / f"{name}.toml"
    assert profile.backend in ("onnxruntime", "tflite")
    assert profile.threads >= 1
    assert profile.thermal.warm_c < profile.thermal.throttle_c < profile.thermal.critical_c
    assert profile.memory_budget_mb > 0
    assert profile.latency_slo_ms > 0
    assert all(p.startswith("/") for p in profile.thermal_zones + profile.gpu_load_paths)


def test_known_profiles_lists_the_shipped_boards():
    assert set(SHIPPED) <= set(known_profiles())


def test_boards_get_their_own_cores_and_limits():
    rpi4, rpi5 = load_profile("rpi4"), load_profile("rpi5")
    nano, orin = load_profile("jetson-nano"), load_profile("jetson-orin-nano")

    assert rpi5.threads == 4 and rpi4.threads == 4 and nano.threads == 4 and orin.threads == 6
    assert rpi5.thermal.throttle_c == 80.0 and rpi5.thermal.critical_c == 85.0
    assert rpi5.vcgencmd and rpi5.throttled_paths and not rpi5.gpu_load_paths
    assert rpi5.providers == ["CPUExecutionProvider"] and orin.providers[0] == "TensorrtExecutionProvider"
    assert nano.gpu_load_paths and nano.power_rail_globs and not nano.vcgencmd
    assert load_profile("x86").thermal_zones == []


def test_unknown_profile_names_the_known_ones_and_where_it_looked(tmp_path):
    with pytest.raises(ProfileError) as error:
        load_profile("rpi6", search_dirs=[tmp_path])

    message = str(error.value)
    assert "'rpi6'" in message
    for name in SHIPPED:
        assert name in message
    assert str(tmp_path) in message and "/etc/edgeshift/devices" in message


def test_profile_error_is_a_value_error():
    assert issubclass(ProfileError, ValueError)


def test_loading_by_explicit_path(tmp_path):
    path = write_profile(tmp_path, "my-board")

    profile = load_profile(str(path))

    assert profile.name == "my-board"
    assert profile.backend == "tflite" and profile.threads == 2
    assert profile.thermal.warm_c == 70.0
    assert profile.thermal_zones == ["/sys/class/thermal/thermal_zone0/temp"]
    assert profile.throttled_paths == [] and profile.vcgencmd is False


def test_a_missing_profile_file_is_named(tmp_path):
    with pytest.raises(ProfileError, match="nowhere.toml"):
        load_profile(str(tmp_path / "nowhere.toml"))


def test_search_dirs_come_before_the_shipped_profiles(tmp_path):
    write_profile(tmp_path, "rpi5")
    write_profile(tmp_path, "lab-box")

    assert load_profile("rpi5", search_dirs=[tmp_path]).description == "test board"
    assert "lab-box" in known_profiles(search_dirs=[tmp_path])


def test_edgeshift_devices_environment_variable_adds_a_directory(tmp_path, monkeypatch):
    write_profile(tmp_path, "field-unit")
    monkeypatch.setenv("EDGESHIFT_DEVICES", str(tmp_path))

    assert load_profile("field-unit").threads == 2


def test_unknown_key_is_an_error_naming_file_and_key(tmp_path):
    path = write_profile(tmp_path, "typo", VALID.replace("warm_c = 70", "warm_c = 70\nwarn_c = 75"))

    with pytest.raises(ProfileError) as error:
        load_profile(str(path))

    assert str(path) in str(error.value)
    assert "thermal.'warn_c'" in str(error.value)


def test_unknown_top_level_key_is_an_error(tmp_path):
    path = write_profile(tmp_path, "extra", "gpu = true\n" + VALID)

    with pytest.raises(ProfileError, match=r"extra\.toml: unknown key 'gpu'"):
        load_profile(str(path))


def test_wrong_type_is_an_error_naming_file_and_key(tmp_path):
    path = write_profile(tmp_path, "x", VALID.replace("warm_c = 70", 'warm_c = "hot"'))

    with pytest.raises(ProfileError) as error:
        load_profile(str(path))

    assert str(error.value) == f"{path}: thermal.warm_c must be a number, got 'hot'"


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (("threads = 2", "threads = 0"), "threads"),
        (("threads = 2", "threads = true"), "threads"),
        (('backend = "tflite"', 'backend = "tensorrt"'), "backend"),
        (('backend = "tflite"', 'backend = "tflite"\nproviders = "CUDAExecutionProvider"'), "providers"),
        (("memory_budget_mb = 256", "memory_budget_mb = -1"), "memory_budget_mb"),
        (("latency_slo_ms = 40", "latency_slo_ms = []"), "latency_slo_ms"),
        (("critical_c = 85", "critical_c = 75"), "thermal limits must rise"),
        (('thermal_zones = ["/sys', 'thermal_zones = ["sys'), "sensors.thermal_zones[0]"),
        (("[sensors]", "[sensors]\nvcgencmd = 1"), "sensors.vcgencmd"),
        (("warm_c = 70\n", ""), "thermal.warm_c is missing"),
    ],
)
def test_bad_values_are_errors_naming_the_key(tmp_path, change, key):
    path = write_profile(tmp_path, "bad", VALID.replace(*change))

    with pytest.raises(ProfileError, match="bad.toml") as error:
        load_profile(str(path))

    assert key in str(error.value)


def test_invalid_toml_names_the_file(tmp_path):
    path = write_profile(tmp_path, "broken", "threads = = 4\n")

    with pytest.raises(ProfileError, match=r"broken\.toml: invalid TOML"):
        load_profile(str(path))
