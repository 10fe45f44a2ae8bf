"""Trained weights that survive a power cut (tflm_ops/firmware/weight_store.h): a two-slot
flash store with sequence numbers and CRC-32, the commit record written last, the newest
valid slot loaded at boot.

On the host (gcc, ctypes): the store on a NOR flash simulated in a file (flash_file.h), the
power cut after and in the middle of every write of a commit, then a reboot (a new open of
the file): the complete old or the complete new state, never a mix. On the simulated
Cortex-M7 (QEMU, real TFLM): the training firmware commits its variable tensors after the
steps; the power goes after each flash write of a commit; the next boot loads exactly the
old or the new committed state and trains on bit-identically to the host pip TFLM
(`train_tflm`) continuing from that step. The QEMU test builds TFLM for the M7 if missing
(see tests/test_tflm_cortex_m.py).
"""
import ctypes
import pathlib
import shutil
import struct
import zlib

import numpy as np
import pytest

from dgst_tf.tflm_ops import host

WS_OK, WS_ERR_FLASH, WS_ERR_CONFIG = 0, -1, -2
RECORD = struct.Struct("<8I")  # magic, version, sequence, layout, bytes, crc, steps, crc


class Flash(ctypes.Structure):
    _fields_ = [("sector_bytes", ctypes.c_uint32), ("program_bytes", ctypes.c_uint32),
                ("sectors", ctypes.c_uint32), ("erase", ctypes.c_void_p),
                ("program", ctypes.c_void_p), ("read", ctypes.c_void_p),
                ("ctx", ctypes.c_void_p)]


class FlashFile(ctypes.Structure):
    _fields_ = [("flash", Flash), ("file", ctypes.c_void_p), ("writes", ctypes.c_uint32),
                ("erases", ctypes.c_uint32), ("cut_after", ctypes.c_uint32),
                ("torn_bytes", ctypes.c_uint32), ("dead", ctypes.c_int)]


class Slot(ctypes.Structure):
    _fields_ = [("valid", ctypes.c_int), ("sequence", ctypes.c_uint32),
                ("layout", ctypes.c_uint32), ("payload_bytes", ctypes.c_uint32),
                ("steps", ctypes.c_uint32)]


class Store(ctypes.Structure):
    _fields_ = [("flash", ctypes.c_void_p), ("layout", ctypes.c_uint32),
                ("payload_bytes", ctypes.c_uint32), ("slot_sectors", ctypes.c_uint32),
                ("slots", Slot * 2), ("newest", ctypes.c_int),
                ("commit_erases", ctypes.c_uint32), ("commit_programs", ctypes.c_uint32)]


class Segment(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("bytes", ctypes.c_uint32)]


@pytest.fixture(scope="module")
def lib():
    proc = host.make("host-store")
    assert proc.returncode == 0, f"make host-store failed:\n{proc.stdout}\n{proc.stderr}"
    lib = ctypes.CDLL(str(pathlib.Path(host.HERE) / "build" / "host" /
                          "libdgst_weight_store.so"))
    lib.ws_crc32.restype = ctypes.c_uint32
    lib.ws_crc32.argtypes = [ctypes.c_uint32, ctypes.c_char_p, ctypes.c_uint32]
    lib.ws_slot_sectors.restype = ctypes.c_uint32
    lib.ws_slot_sectors.argtypes = [ctypes.c_uint32] * 3
    return lib


class Device:
    """One boot of a device whose flash region is the file ``path``."""

    def __init__(self, lib, path, payload_bytes, *, sector=512, program=32, sectors=None,
                 layout=0x1234, cut=None):
        self.lib, self.store, self.file = lib, Store(), FlashFile()
        slot = lib.ws_slot_sectors(sector, program, payload_bytes)
        sectors = 2 * slot if sectors is None else sectors
        assert lib.flash_file_open(ctypes.byref(self.file), str(path).encode(), sector,
                                   program, sectors) == 0
        if cut is not None:
            lib.flash_file_cut_power(ctypes.byref(self.file), *cut)
        self.opened = lib.ws_open(ctypes.byref(self.store), ctypes.byref(self.file.flash),
                                  layout, payload_bytes)

    def close(self):
        assert self.lib.flash_file_close(ctypes.byref(self.file)) == 0

    def load(self, sizes):
        buffers = [ctypes.create_string_buffer(n) for n in sizes]
        status = self.lib.ws_load(ctypes.byref(self.store), _segments(buffers), len(buffers))
        return status, b"".join(b.raw for b in buffers)

    def commit(self, state: bytes, sizes, steps):
        buffers, offset = [], 0
        for n in sizes:
            buffers.append(ctypes.create_string_buffer(state[offset:offset + n], n))
            offset += n
        return self.lib.ws_commit(ctypes.byref(self.store), _segments(buffers), len(buffers),
                                  steps)


def _segments(buffers):
    return (Segment * len(buffers))(*[Segment(ctypes.cast(b, ctypes.c_void_p), len(b))
                                      for b in buffers])


def _state(seed, sizes):
    return np.random.default_rng(seed).integers(0, 256, sum(sizes), np.uint8).tobytes()


def _boot_load(lib, path, sizes, **kwargs):
    """(status, bytes, loaded slot info) of a fresh boot."""
    device = Device(lib, path, sum(sizes), **kwargs)
    assert device.opened == WS_OK
    status, data = device.load(sizes)
    slot = device.store.slots[device.store.newest] if device.store.newest >= 0 else None
    info = None if slot is None else (slot.sequence, slot.steps)
    device.close()
    return status, data, info


def _commit(lib, path, state, sizes, steps, **kwargs):
    device = Device(lib, path, sum(sizes), **kwargs)
    assert device.opened == WS_OK
    status = device.commit(state, sizes, steps)
    result = (status, device.store.commit_erases, device.store.commit_programs,
              device.file.writes, device.file.dead)
    device.close()
    return result


def test_crc32_is_zlibs(lib):
    data = _state(0, [1000])
    assert lib.ws_crc32(0, data, len(data)) == zlib.crc32(data)
    assert lib.ws_crc32(lib.ws_crc32(0, data[:333], 333), data[333:], 667) == zlib.crc32(data)
    assert lib.ws_crc32(0, b"", 0) == 0


def test_commits_alternate_slots_and_boot_loads_the_newest(lib, tmp_path):
    sizes = [100, 7, 489, 4]  # 600 bytes: 1 record unit + 19 units of 32 B = 2 sectors
    path = tmp_path / "flash.bin"
    assert _boot_load(lib, path, sizes) == (0, bytes(600), None)  # erased: nothing to load
    assert path.stat().st_size == 4 * 512
    for commit in range(1, 5):
        state = _state(commit, sizes)
        status, erases, programs, writes, _ = _commit(lib, path, state, sizes, 10 * commit)
        assert (status, erases, programs, writes) == (WS_OK, 2, 1 + 19, 2 + 20)
        assert _boot_load(lib, path, sizes) == (1, state, (commit, 10 * commit))
        # the documented record and payload, in slot (commit - 1) % 2
        raw = path.read_bytes()
        base = ((commit - 1) % 2) * 2 * 512
        assert RECORD.unpack_from(raw, base) == (
            0x53574744, 1, commit, 0x1234, 600, zlib.crc32(state), 10 * commit,
            zlib.crc32(raw[base:base + 28]))
        assert raw[base + 32:base + 32 + 600] == state  # from the second program unit
        assert raw[base + 32 + 600:base + 2 * 512] == b"\xff" * (2 * 512 - 32 - 600)


def test_every_power_cut_of_a_commit_leaves_the_old_or_the_new_state(lib, tmp_path):
    sizes = [64, 3, 400, 1, 150]  # 618 bytes: 20 program units of 32 B, 2 sectors of 512 B
    before = tmp_path / "before.bin"
    for commit in (1, 2):  # both slots hold a valid state; the commit overwrites the older
        assert _commit(lib, before, _state(commit, sizes), sizes, commit)[0] == WS_OK
    old, new = _state(2, sizes), _state(3, sizes)
    after = tmp_path / "after.bin"
    shutil.copyfile(before, after)
    status, erases, programs, writes, _ = _commit(lib, after, new, sizes, 3)
    assert (status, erases, programs) == (WS_OK, 2, 1 + 20) and writes == erases + programs
    seen = set()
    for cut in range(1, writes + 2):
        for torn in (0, 4, 16):  # the whole write, or only its first bytes (16: half a unit)
            path = tmp_path / f"cut_{cut}_{torn}.bin"
            shutil.copyfile(before, path)
            status, _, _, count, dead = _commit(lib, path, new, sizes, 3, cut=(cut, torn))
            if cut > writes:  # the commit needs no write after its last
                assert (status, count, dead) == (WS_OK, writes, 0)
                continue
            assert (status, count, dead) == (WS_ERR_FLASH, cut, 1), (cut, torn)
            if 1 < cut < writes or (cut == 1 and not torn):  # its first sector erased,
                # the slot being written has no record until the last write
                assert path.read_bytes()[:32] == b"\xff" * 32, (cut, torn)
            loaded = _boot_load(lib, path, sizes)
            # the commit record is the last write: only its completion makes the new state
            want = (1, new, (3, 3)) if cut == writes and not torn else (1, old, (2, 2))
            assert loaded == want, f"power cut after write {cut} (torn {torn})"
            seen.add(loaded[2])
            # and the device goes on: the next commit follows the loaded state
            assert _commit(lib, path, _state(4, sizes), sizes, 9)[0] == WS_OK
            assert _boot_load(lib, path, sizes) == (1, _state(4, sizes), (loaded[2][0] + 1, 9))
    assert seen == {(2, 2), (3, 3)}


def test_corrupt_slots_fall_back_to_the_other_and_sequence_numbers_wrap(lib, tmp_path):
    sizes = [40]
    path = tmp_path / "flash.bin"
    for commit in (1, 2):
        assert _commit(lib, path, _state(commit, sizes), sizes, commit, sector=256)[0] == WS_OK
    raw = bytearray(path.read_bytes())
    assert _boot_load(lib, path, sizes, sector=256)[2] == (2, 2)
    for offset in (256 + 32 + 39, 256 + 8, 256 + 28):  # payload, record, record CRC
        broken = bytearray(raw)
        broken[offset] ^= 0x01
        path.write_bytes(broken)
        assert _boot_load(lib, path, sizes, sector=256) == (1, _state(1, sizes), (1, 1)), offset
    broken = bytearray(raw)  # slot 0 holds the newest if its sequence wrapped past slot 1's
    for slot, sequence in ((0, 0), (1, 0xFFFFFFFF)):
        words = list(RECORD.unpack_from(broken, 256 * slot))
        words[2] = sequence
        words[7] = zlib.crc32(RECORD.pack(*words)[:28])
        RECORD.pack_into(broken, 256 * slot, *words)
    path.write_bytes(broken)
    assert _boot_load(lib, path, sizes, sector=256) == (1, _state(1, sizes), (0, 1))
    assert _commit(lib, path, _state(5, sizes), sizes, 5, sector=256)[0] == WS_OK
    assert _boot_load(lib, path, sizes, sector=256) == (1, _state(5, sizes), (1, 5))


def test_another_layout_is_not_loaded_and_bad_setups_fail(lib, tmp_path):
    sizes = [40, 8]
    path = tmp_path / "flash.bin"
    assert _commit(lib, path, _state(1, sizes), sizes, 1, sector=256)[0] == WS_OK
    assert _boot_load(lib, path, sizes, sector=256, layout=0x9999) == (0, bytes(48), (1, 1))
    # the next commit of the other model still goes after the newest sequence
    assert _commit(lib, path, _state(2, sizes), sizes, 7, sector=256, layout=0x9999)[0] == 0
    assert _boot_load(lib, path, sizes, sector=256, layout=0x9999)[::2] == (1, (2, 7))
    # a region too small for two slots, a program unit above the store's buffer, segments
    # that do not add up to the payload
    assert Device(lib, tmp_path / "a.bin", 48, sector=256, sectors=1).opened == WS_ERR_CONFIG
    assert Device(lib, tmp_path / "b.bin", 48, sector=1024, program=512,
                  sectors=4).opened == WS_ERR_CONFIG
    device = Device(lib, path, 48, sector=256)
    assert device.load([40])[0] == WS_ERR_CONFIG
    assert device.commit(bytes(40), [40], 1) == WS_ERR_CONFIG
    device.close()


def test_flash_file_is_nor_flash(lib, tmp_path):
    """Programs only clear bits (a store that forgot to erase would not read back) and must
    be whole aligned program units; a dead device changes nothing."""
    path = tmp_path / "nor.bin"
    f = FlashFile()
    assert lib.flash_file_open(ctypes.byref(f), str(path).encode(), 64, 16, 2) == 0
    program = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_char_p,
                               ctypes.c_uint32)(f.flash.program)
    erase = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32)(f.flash.erase)
    ctx = ctypes.addressof(f)
    assert program(ctx, 16, b"\xf0" * 16, 16) == 0
    assert program(ctx, 16, b"\x3c" * 16, 16) == 0
    assert program(ctx, 8, b"\x00" * 16, 16) == -1 and program(ctx, 0, b"\x00" * 8, 8) == -1
    assert program(ctx, 128, b"\x00" * 16, 16) == -1 and erase(ctx, 2) == -1
    lib.flash_file_cut_power(ctypes.byref(f), 4, 16)  # 2 writes done: the 4th is torn
    assert erase(ctx, 1) == 0 and f.writes == 3
    assert program(ctx, 64, b"\x00" * 32, 32) == -1 and f.dead == 1
    assert erase(ctx, 0) == -1 and f.writes == 4
    assert lib.flash_file_close(ctypes.byref(f)) == 0
    raw = path.read_bytes()
    assert raw == b"\xff" * 16 + b"\x30" * 16 + b"\xff" * 32 + b"\x00" * 16 + b"\xff" * 48


# ----------------------------------------------------------------------------- on QEMU
STEPS = 2  # training steps per boot
LR = 0.05
SCHEME = {"head": "bias", "project": 0.5, "depthwise": "bias"}


@pytest.fixture(scope="module")
def device_training(tmp_path_factory):
    """A tiny residual CNN's training step with DGSU traversal selection on device (its state:
    trainable tensors, the visited bitmask, sgd/step), the M7 firmware, and host TFLM's
    reference run of 3 * STEPS steps."""
    from small_models import batch, residual_cnn
    from test_kernels_mcu import require_tools

    from dgst_tf.core.bn_folding import fold_batchnorm
    from dgst_tf.export.training import export_training, train_tflm
    from dgst_tf.tflm_ops import cortex_m
    from dgst_tf.training.scheme import UpdateScheme

    require_tools()
    folder = tmp_path_factory.mktemp("weight_store")
    x, y = batch(32)
    info = export_training(fold_batchnorm(residual_cnn()), UpdateScheme(SCHEME), x,
                           folder / "train.tflite", learning_rate=LR, policy="traversal")
    spec = info.manifest["inputs"][0]
    images = np.clip(np.round(x[:3 * STEPS] / spec["scale"]) + spec["zero_point"], -128,
                     127).astype(np.int8)[:, None]
    labels = y[:3 * STEPS].astype(np.int32).reshape(-1, 1)
    host_run = train_tflm(info.path, images, labels)
    elf = cortex_m.build_firmware(info.path, folder / "fw", arena_bytes=64 * 1024)
    return info, images, labels, host_run, elf


@pytest.mark.slow
def test_firmware_state_survives_a_power_cut_at_every_flash_write(device_training, tmp_path):
    from dgst_tf.export.tflite_file import read_tflite
    from dgst_tf.tflm_ops import cortex_m

    info, images, labels, host_run, elf = device_training
    names = info.manifest["outputs"]

    def boot(flash, first, steps, **kwargs):
        """One boot training `steps` steps on the inputs of host step `first` onwards; its
        outputs must be host TFLM's at those steps, bit for bit."""
        run = cortex_m.run_firmware(elf, [images[first:first + steps],
                                          labels[first:first + steps]], flash=flash, **kwargs)
        for name, got, want in zip(names, run.outputs, host_run.result.outputs):
            np.testing.assert_array_equal(got, want[first:first + steps],
                                          err_msg=f"{name}, steps from {first}")
        return run

    old_flash, new_flash = tmp_path / "old.bin", tmp_path / "new.bin"
    first = boot(old_flash, 0, STEPS)  # a new device: initial weights, then a commit
    assert first.loaded is None
    assert first.commit == {"slot": 0, "sequence": 1, "steps": STEPS, "erases": 1,
                            "programs": 3}
    shutil.copyfile(old_flash, new_flash)
    second = boot(new_flash, STEPS, STEPS)  # reboot: trains on from the committed state
    assert second.loaded == {"slot": 0, "sequence": 1, "steps": STEPS}
    assert second.commit == {"slot": 1, "sequence": 2, "steps": 2 * STEPS, "erases": 1,
                             "programs": 3}
    old_state = second.loaded_state
    new_state = boot(new_flash, 0, 0).loaded_state

    # the stored state is every variable tensor: the trainable ones hold host TFLM's values
    # after the committed step, sgd/step the number of steps
    tensors = read_tflite(info.path)[1].subgraphs[0].tensors
    layout = second.state_tensors
    assert [i for i, _ in layout] == [i for i, t in enumerate(tensors) if t.isVariable]
    assert sum(n for _, n in layout) == len(old_state) == len(new_state) == 326
    offsets = dict(zip([i for i, _ in layout], np.cumsum([0] + [n for _, n in layout])))
    for state, step in ((old_state, STEPS), (new_state, 2 * STEPS)):
        for param in info.manifest["params"]:
            want = host_run.result.outputs[param["output"]][step - 1]
            got = state[offsets[param["tensor"]]:offsets[param["tensor"]] + want.nbytes]
            assert got == want.tobytes(), f"{param['layer']}/{param['param']} after {step}"
        step_tensor = next(i for i, t in enumerate(tensors) if t.name == b"sgd/step")
        assert state[offsets[step_tensor]:offsets[step_tensor] + 4] == struct.pack("<i", step)
    assert old_state != new_state
    # the commit record in flash.bin (slot 1 of two 32 KB sectors), as weight_store.h says;
    # its layout id: CRC-32 of (index, TfLiteType, bytes) of each state tensor
    types = {0: 1}  # flatbuffer TensorType -> TfLiteType (FLOAT32 differs; the rest agree)
    layout_id = zlib.crc32(b"".join(struct.pack("<3I", i, types.get(tensors[i].type,
                                                                    tensors[i].type), n)
                                    for i, n in layout))
    assert f"layout {layout_id}\n" in second.log
    raw = new_flash.read_bytes()
    assert len(raw) == 2 * 32768
    assert RECORD.unpack_from(raw, 32768)[:7] == (0x53574744, 1, 2, layout_id, 326,
                                                   zlib.crc32(new_state), 2 * STEPS)
    assert raw[32768 + 256:32768 + 256 + 326] == new_state

    writes = second.commit["erases"] + second.commit["programs"]
    outcomes = {}
    for cut in range(1, writes + 1):
        for torn in (0, 16):  # the whole write, or its first 16 bytes (half the record)
            flash = tmp_path / f"cut_{cut}_{torn}.bin"
            shutil.copyfile(old_flash, flash)
            run = boot(flash, STEPS, STEPS, power_cut=(cut, torn))
            assert run.power_cut_after == cut and run.commit is None, run.log[-500:]
            loaded = boot(flash, 0, 0)  # reboot without training: what is in flash
            is_new = cut == writes and not torn  # the commit record is the last write
            assert loaded.loaded_state == (new_state if is_new else old_state), (cut, torn)
            assert loaded.loaded["steps"] == (2 * STEPS if is_new else STEPS)
            # and training goes on from there, as on the host from that step
            resumed = boot(flash, loaded.loaded["steps"], STEPS)
            assert resumed.commit["sequence"] == loaded.loaded["sequence"] + 1
            outcomes[(cut, torn)] = "new" if is_new else "old"
    print(f"\ncommit of {len(new_state)} state bytes: {second.commit['erases']} sector "
          f"erase(s) of 32 KB + {second.commit['programs']} programs of 256 B = {writes} "
          f"flash writes; power cut after/during each: {outcomes}")


@pytest.mark.slow
def test_a_firmware_of_another_model_starts_fresh_after_the_stored_sequence(device_training,
                                                                            tmp_path):
    from dgst_tf.core.bn_folding import fold_batchnorm
    from dgst_tf.export.training import export_training, train_tflm
    from dgst_tf.tflm_ops import cortex_m
    from dgst_tf.training.scheme import UpdateScheme
    from small_models import batch, residual_cnn

    info, images, labels, _, elf = device_training
    flash = tmp_path / "flash.bin"
    cortex_m.run_firmware(elf, [images[:STEPS], labels[:STEPS]], flash=flash)
    cortex_m.run_firmware(elf, [images[:STEPS], labels[:STEPS]], flash=flash)
    # the same network with static selection: other variable tensors (no visited bitmask)
    x, _ = batch(32)
    other = export_training(fold_batchnorm(residual_cnn()), UpdateScheme(SCHEME), x,
                            tmp_path / "first.tflite", learning_rate=LR, selection="first")
    other_elf = cortex_m.build_firmware(other.path, tmp_path / "fw", arena_bytes=64 * 1024)
    run = cortex_m.run_firmware(other_elf, [images[:STEPS], labels[:STEPS]], flash=flash)
    assert "store other_layout" in run.log and run.loaded is None
    want = train_tflm(other.path, images[:STEPS], labels[:STEPS]).result.outputs
    for got, expected in zip(run.outputs, want):  # trained from its initial weights
        np.testing.assert_array_equal(got, expected)
    assert run.commit["sequence"] == 3 and run.commit["slot"] == 0
    again = cortex_m.run_firmware(other_elf, [images[:0], labels[:0]], flash=flash)
    assert again.loaded == {"slot": 0, "sequence": 3, "steps": STEPS}
    with pytest.raises(ValueError, match=r"power_cut=\(0, ...\): flash writes are numbered"):
        cortex_m.run_firmware(elf, [images, labels], power_cut=(0, 0))
