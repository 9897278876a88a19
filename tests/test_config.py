"""agent.toml: the shipped example loads; typos and wrong types are errors naming the key."""
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
MINIMAL = 'device = "rpi5"\nportfolio = "/p"\nstate_dir = "/s"\n'


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_shipped_example_loads():
    config = load_config(REPO / "systemd" / "agent.toml")
    assert config.device == "rpi5" and config.policy.latency_slo_ms == 50.0 and config.mqtt is None


def test_minimal_config_takes_the_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.http.listen == "127.0.0.1:8080" and config.preload == "all" and config.policy.cooldown_s == 30


def test_mqtt_section_enables_the_fleet_link(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + '[mqtt]\nhost = "broker"\ndevice_id = "pi-1"\n'))
    assert config.mqtt.host == "broker" and config.mqtt.port == 1883 and config.mqtt.device_id == "pi-1"


def test_providers_override_the_profiles_preference(tmp_path):
    config = load_config(write(tmp_path, 'providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]\n' + MINIMAL))
    assert config.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize("text, message", [
    (MINIMAL + "colour = 3\n", "unknown key 'colour'"),
    (MINIMAL + 'providers = "CUDAExecutionProvider"\n', "providers must be a list of names"),
    (MINIMAL + "[policy]\nlatency_slo = 5\n", "unknown key 'policy.latency_slo'"),
    (MINIMAL + '[policy]\nlatency_slo_ms = "fast"\n', "policy.latency_slo_ms must be a number"),
    (MINIMAL + "[http]\nlisten = 8080\n", "http.listen must be a string"),
    (MINIMAL + '[http]\nlisten = "nowhere"\n', "http.listen must look like 127.0.0.1:8080"),
    (MINIMAL + 'preload = "some"\n', "preload must be all, neighbours or lazy"),
    (MINIMAL + "[mqtt]\nprotocol = 4\n", "mqtt.protocol must be 5 or 3"),
    ('device = "rpi5"\nportfolio = "/p"\n', "'state_dir' is required"),
    (MINIMAL + "[policy\n", "not valid TOML"),
])
def test_bad_config_names_file_key_and_expectation(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(write(tmp_path, text))
    assert "agent.toml" in str(error.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "absent.toml")
