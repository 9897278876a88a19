"""The systems the agent runs on: on ARM, 64-bit ones only.

PyPI has no 32-bit ARM (armv7l, armv6l) wheels of onnxruntime or ai-edge-litert (nor of numpy or
psutil), so the agent refuses a 32-bit system at start, with the fix, rather than fail later. A Pi 4
or 5 running 32-bit Raspberry Pi OS boots a 64-bit kernel, so platform.machine() says aarch64 there:
the size of a pointer in this Python is what tells the 32-bit userland apart.
"""
from __future__ import annotations

import platform
import struct

_32_BIT_ARM_MACHINES = {"armv6l", "armv7l", "armv8l", "armhf", "armel", "arm"}
_64_BIT_ARM_MACHINES = {"aarch64", "arm64"}


class UnsupportedPlatform(RuntimeError):
    """A system the agent's inference runtimes are not published for."""


def unsupported_platform_reason(machine: str | None = None, pointer_bits: int | None = None) -> str | None:
    """One line on why the agent cannot run here, or None when it can.

    `machine` defaults to platform.machine(), `pointer_bits` to this Python's pointer size.
    """
    machine = platform.machine() if machine is None else machine
    pointer_bits = struct.calcsize("P") * 8 if pointer_bits is None else pointer_bits
    if machine.lower() in _32_BIT_ARM_MACHINES:
        system = machine
    elif machine.lower() in _64_BIT_ARM_MACHINES and pointer_bits == 32:
        system = f"a 32-bit userland on an {machine} kernel"
    else:
        return None
    return (
        f"this is a 32-bit ARM system ({system}), for which PyPI has no onnxruntime or ai-edge-litert "
        "wheels: install a 64-bit OS (on a Raspberry Pi 4 or 5, 64-bit Raspberry Pi OS)"
    )


def require_supported_platform() -> None:
    reason = unsupported_platform_reason()
    if reason is not None:
        raise UnsupportedPlatform(reason)
