"""Flash and RAM of a Cortex-M firmware from its GNU ld map (``-Wl,-Map=firmware.map``):
the allocated output sections, and every input section attributed to a part of the
firmware (the embedded model, the TFLM tensor arena, TFLM, CMSIS-NN, the dgst ops, the C
and C++ runtime, the firmware's own code, constant strings (merged across parts by ld),
stack, heap, alignment).

    from dgst_tf.tflm_ops.mcu import linker_map

    mem = linker_map.read_map("fw/firmware.map")
    mem.flash_bytes, mem.ram_bytes, mem.flash_parts["model"], mem.ram_parts["tensor arena"]
    mem.over_budget()        # {"flash": bytes over 1 MB, "ram": bytes over 320 KB}; <= 0 fits

Flash = the allocated sections below RAM's origin plus the load image of ``.data``; RAM =
the sections at or above it (``.data``, ``.bss``, heap, stack), as ``--print-memory-usage``
counts them.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re

__all__ = ["STM32F746_FLASH", "STM32F746_RAM", "FirmwareMemory", "read_map"]

STM32F746_FLASH = 1024 * 1024
STM32F746_RAM = 320 * 1024
RAM_ORIGIN = 0x20000000
HERE = pathlib.Path(__file__).resolve().parent.parent
# the dgst sources compiled into TFLM's library (archive members named after them)
DGST_OBJECTS = frozenset(p.stem for p in [*HERE.glob("core/*.c"), *HERE.glob("tflm/*.cc")])
_NOT_ALLOCATED = (".comment", ".debug", ".ARM.attributes", ".stab", ".gnu.attributes")
_HEX = r"0x([0-9a-fA-F]+)"
_OUTPUT = re.compile(rf"^(\.\S+|/DISCARD/)(?:\s+{_HEX}\s+{_HEX})?")
_INPUT = re.compile(rf"^ (\S+)(?:\s+{_HEX}\s+{_HEX}\s*(.*))?$")
_NEXT_LINE = re.compile(rf"^\s+{_HEX}\s+{_HEX}\s*(.*)$")


@dataclasses.dataclass
class FirmwareMemory:
    """Flash and RAM bytes of a firmware, in total and per part (see the module doc)."""

    flash_bytes: int
    ram_bytes: int
    sections: dict  # allocated output section -> bytes
    flash_parts: dict  # part -> bytes
    ram_parts: dict

    def over_budget(self, flash: int = STM32F746_FLASH, ram: int = STM32F746_RAM) -> dict:
        """Bytes above the budget (negative: headroom), STM32F746 by default."""
        return {"flash": self.flash_bytes - flash, "ram": self.ram_bytes - ram}


def _part(output: str, section: str, origin: str) -> str:
    """The part of the firmware an input section of ``output`` belongs to."""
    if "tensor_arena" in section:
        return "tensor arena"
    if section == "*fill*":  # heap and stack are reserved space, the rest padding
        return output[1:] if output in (".heap", ".stack") else "alignment"
    if section.startswith(".rodata.str"):  # ld merges equal strings of every part
        return "strings"
    name = origin.strip()
    member = re.search(r"\(([^()]+)\.o\)$", name)
    if "libtensorflow-microlite.a" in name and member:
        if member[1] in DGST_OBJECTS:
            return "dgst ops"
        return "CMSIS-NN" if member[1].startswith("arm_") else "TFLM"
    if name.endswith("model_data.o"):
        return "model"
    if re.search(r"lib(c|m|gcc|stdc\+\+|rdimon|nosys)[_a-z]*\.a\(", name):
        return "C/C++ runtime"
    if name.endswith(".o"):
        return "firmware"
    return "other"


def _entries(lines) -> tuple[dict, list]:
    """The memory map's output sections (name -> (address, size)) and input sections
    [(output section, input section, address, size, origin file)]. A long section name
    puts its address and size on the next line."""
    outputs, inputs = {}, []
    output, held = None, None
    for line in lines:
        if held is not None:
            kind, name = held
            held = None
            found = _NEXT_LINE.match(line)
            if found and kind == "output":
                outputs[name] = (int(found[1], 16), int(found[2], 16))
            elif found:
                inputs.append((output, name, int(found[1], 16), int(found[2], 16), found[3]))
            continue
        found = _OUTPUT.match(line)
        if found:
            output = found[1]
            if found[2] is None:
                held = ("output", output)
            else:
                outputs[output] = (int(found[2], 16), int(found[3], 16))
            continue
        found = _INPUT.match(line)
        if found and output is not None and not found[1].startswith("*("):
            if found[2] is None:
                held = ("input", found[1])
            else:
                inputs.append((output, found[1], int(found[2], 16), int(found[3], 16),
                               found[4]))
    return outputs, inputs


def _allocated(name: str) -> bool:
    return name != "/DISCARD/" and not name.startswith(_NOT_ALLOCATED)


def read_map(path) -> FirmwareMemory:
    """Parse a GNU ld map file into a `FirmwareMemory`. Raises ValueError if ``path`` has no
    memory map (not a linker map)."""
    text = pathlib.Path(path).read_text(errors="replace")
    start = text.find("Linker script and memory map")
    if start < 0:
        raise ValueError(f"read_map: {path} is not a GNU ld map (no 'Linker script and "
                         "memory map')")
    outputs, inputs = _entries(text[start:].splitlines())
    outputs = {name: where for name, where in outputs.items() if _allocated(name)}
    parts = {"flash": {}, "ram": {}}

    def add(memory, part, size):
        parts[memory][part] = parts[memory].get(part, 0) + size

    covered = dict.fromkeys(outputs, 0)
    for output, section, address, size, origin in inputs:
        if output not in outputs or size == 0:
            continue
        part = _part(output, section, origin)
        add("ram" if address >= RAM_ORIGIN else "flash", part, size)
        if output == ".data":  # its initial values are in flash too
            add("flash", part, size)
        covered[output] += size
    for output, (address, size) in outputs.items():
        # the map lists strings before merging (rest < 0); alignment not shown as *fill*
        rest = size - covered[output]
        if rest:
            part = "strings" if rest < 0 else "alignment"
            add("ram" if address >= RAM_ORIGIN else "flash", part, rest)
            if output == ".data":
                add("flash", part, rest)
    ram = sum(size for address, size in outputs.values() if address >= RAM_ORIGIN)
    flash = sum(size for address, size in outputs.values() if address < RAM_ORIGIN)
    flash += outputs.get(".data", (0, 0))[1]
    return FirmwareMemory(flash, ram, {name: size for name, (_, size) in outputs.items()},
                          parts["flash"], parts["ram"])
