"""The per-device table (gopd_kernels/tuning.py) on CPU, with a fake table and a fake device name: auto
picks what the table says, the kernels launch with its tiles (and still match the torch backend), an
unlisted device or other versions get the defaults, a malformed table is a clear error naming file and key."""

import json

import pytest
import torch

from gopd_kernels import backends, tuning
from gopd_kernels.backends import torch as torch_backend

from helpers import make_problem, triton_device

FAKE = "Fake GPU 9000"
IGNORE = -100


def _entry(**over):
    ver = tuning.versions()
    e = {"device": FAKE, "torch": ver["torch"], "triton": ver["triton"] or "0.0", "backend": "torch",
         "impl": {"16bit/1m/n<=4096": {"score": "onchip", "train_full": "chunked"}},
         "tiles": {"rows_forward": {"fp64/3m/n<=4096": {"block_v": 32, "num_warps": 2, "num_stages": 2}},
                   "rows_backward": {"fp64/3m/n<=4096": {"block_v": 16, "num_warps": 1}},
                   "onchip_forward": {"fp64/1m/n<=4096": {"block_n": 16, "block_v": 32, "block_d": 16,
                                                           "num_warps": 2}}}}
    e.update(over)
    return e


@pytest.fixture
def fake_table(tmp_path, monkeypatch):
    """Writes a table (default: one fake entry) and points the lookup at it, as FAKE."""
    def make(*entries, raw=None):
        path = tmp_path / "tuning.json"
        path.write_text(raw if raw is not None else json.dumps({"format": 1, "devices": list(entries or [_entry()])}))
        monkeypatch.setenv("GOPD_TUNING_TABLE", str(path))
        monkeypatch.setenv("GOPD_TUNING_DEVICE", FAKE)
        return path
    return make


class _Spy:
    """Stands in for a @triton.jit kernel: records each launch's keyword arguments, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_the_committed_table_is_well_formed():
    data = tuning.load(tuning.TABLE_PATH)
    assert data["format"] == tuning.FORMAT and isinstance(data["devices"], list)


def test_auto_follows_the_table_and_an_unlisted_device_gets_the_defaults(fake_table, monkeypatch):
    fake_table()
    cpu = torch.device("cpu")
    assert backends.resolve("auto", cpu) == "torch"  # the table's winner, ahead of "cpu"
    monkeypatch.delenv("GOPD_TUNING_DEVICE")  # a CUDA device is looked up by name with or without a GPU
    assert backends.resolve("auto", torch.device("cuda")) in backends.BACKENDS
    monkeypatch.setenv("GOPD_TUNING_DEVICE", FAKE)
    assert tuning.fused_impl(cpu, torch.bfloat16, 1, 2048, "score") == "onchip"
    assert tuning.fused_impl(cpu, torch.bfloat16, 1, 2048, "train_full") == "chunked"
    assert tuning.fused_impl(cpu, torch.bfloat16, 1, 8192, "score") == "chunked"  # class not in the table
    assert tuning.tiles("rows_forward", cpu, torch.float64, 3, 100) == {"block_v": 32, "num_warps": 2, "num_stages": 2}
    assert tuning.tiles("rows_forward", cpu, torch.float32, 3, 100) == {}
    monkeypatch.setenv("GOPD_TUNING_DEVICE", "Another GPU")
    assert tuning.entry(cpu) is None and tuning.tiles("rows_forward", cpu, torch.float64, 3, 100) == {}
    default = "cpu" if backends.is_available("cpu") else "torch"
    assert backends.resolve("auto", cpu) == default
    assert tuning.fused_impl(cpu, torch.bfloat16, 1, 2048, "score") == "chunked"
    with pytest.raises(ValueError, match="use: expected one of"):
        tuning.fused_impl(cpu, torch.bfloat16, 1, 2048, "train")


def test_an_entry_for_other_versions_is_not_used(fake_table):
    fake_table(_entry(torch="1.0"))
    assert tuning.entry(torch.device("cpu")) is None
    assert tuning.tiles("rows_forward", "cpu", torch.float64, 3, 100) == {}


def test_the_row_kernels_launch_with_the_tables_tiles(fake_table, monkeypatch):
    _triton, device = triton_device()
    if device != "cpu":
        pytest.skip("the fake device name is for CPU tensors under the interpreter")
    from gopd_kernels.triton import rows

    fake_table()
    fwd, bwd = _Spy(rows._rows_forward_kernel), _Spy(rows._rows_backward_kernel)
    monkeypatch.setattr(rows, "_rows_forward_kernel", fwd)
    monkeypatch.setattr(rows, "_rows_backward_kernel", bwd)
    zs, zt, zr, y = make_problem(5, 70, seed=1)
    stats = rows.rows_forward(zs, zt, zr, y, 1.0, 1.0, 1.0, IGNORE)
    torch.testing.assert_close(stats, torch_backend.rows_forward(zs, zt, zr, y, 1.0, 1.0, 1.0, IGNORE))
    g = torch.ones(5, dtype=torch.float64)
    out = rows.rows_backward(zs, zt, zr, y, stats, g, g, 1.25, 1.0, 1.0, 1.0, IGNORE, torch.empty_like(zs))
    want = torch_backend.rows_backward(zs, zt, zr, y, stats, g, g, 1.25, 1.0, 1.0, 1.0, IGNORE, torch.empty_like(zs))
    torch.testing.assert_close(out, want)
    (f,), (b,) = fwd.launches, bwd.launches
    assert (f["BLOCK_V"], f["num_warps"], f["num_stages"]) == (32, 2, 2)
    assert (b["BLOCK_V"], b["num_warps"]) == (16, 1) and "num_stages" not in b
    # An unlisted device: today's defaults (the whole 70-column row in one tile, no num_stages).
    monkeypatch.setenv("GOPD_TUNING_DEVICE", "Another GPU")
    rows.rows_forward(zs, zt, zr, y, 1.0, 1.0, 1.0, IGNORE)
    assert fwd.launches[-1]["BLOCK_V"] == 128 and "num_stages" not in fwd.launches[-1]
    # An explicit block_v wins over the table.
    monkeypatch.setenv("GOPD_TUNING_DEVICE", FAKE)
    rows.rows_forward(zs, zt, zr, y, 1.0, 1.0, 1.0, IGNORE, block_v=64)
    assert fwd.launches[-1]["BLOCK_V"] == 64


def test_the_onchip_kernel_launches_with_the_tables_tiles(fake_table, monkeypatch):
    _triton, device = triton_device()
    if device != "cpu":
        pytest.skip("the fake device name is for CPU tensors under the interpreter")
    from gopd_kernels.triton import onchip

    fake_table()
    spy = _Spy(onchip._onchip_forward_kernel)
    monkeypatch.setattr(onchip, "_onchip_forward_kernel", spy)
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(20, 24, generator=g, dtype=torch.float64), torch.randn(50, 24, generator=g, dtype=torch.float64)
    y = torch.randint(0, 50, (20,), generator=g)
    stats, _ = onchip.onchip_forward(h, w, None, None, None, None, y, 1.0, 1.0, 1.0, IGNORE)
    launch = spy.launches[-1]
    assert (launch["BLOCK_N"], launch["BLOCK_V"], launch["BLOCK_D"], launch["num_warps"]) == (16, 32, 16, 2)
    want = torch_backend.rows_forward(h @ w.T, None, None, y, 1.0, 1.0, 1.0, IGNORE)
    torch.testing.assert_close(stats, want)
    monkeypatch.setenv("GOPD_TUNING_DEVICE", "Another GPU")
    onchip.onchip_forward(h, w, None, None, None, None, y, 1.0, 1.0, 1.0, IGNORE)
    launch = spy.launches[-1]
    assert (launch["BLOCK_N"], launch["BLOCK_V"], launch["BLOCK_D"], launch["num_warps"]) == (
        onchip.BLOCKS["block_n"], onchip.BLOCKS["block_v"], onchip.BLOCKS["block_d"], onchip._WARPS)


@pytest.mark.parametrize("change, key", [
    (dict(raw="{not json"), "(top level)"),
    (dict(raw=json.dumps({"format": 2, "devices": []})), "format"),
    (dict(raw=json.dumps({"format": 1, "devices": {}})), "devices"),
    (dict(entry=_entry(backend="tpu")), "devices[0].backend"),
    (dict(entry=_entry(device="")), "devices[0].device"),
    (dict(entry=_entry(colour="red")), "devices[0].colour"),
    (dict(entry=_entry(tiles={"rows_forward": {"fp32/3m/n<=4096": {"block_v": 100}}})),
     "devices[0].tiles.rows_forward['fp32/3m/n<=4096'].block_v"),
    (dict(entry=_entry(tiles={"rows_forward": {"fp32/3m/n<=4096": {"block_n": 64}}})),
     "devices[0].tiles.rows_forward['fp32/3m/n<=4096'].block_n"),
    (dict(entry=_entry(tiles={"onchip_forward": {"fp32/3m/n<=4096": {"num_warps": 3}}})),
     "devices[0].tiles.onchip_forward['fp32/3m/n<=4096'].num_warps"),
    (dict(entry=_entry(tiles={"onchip_forward": {"bf16/3m": {}}})), "devices[0].tiles.onchip_forward['bf16/3m']"),
    (dict(entry=_entry(tiles={"matmul": {}})), "devices[0].tiles.matmul"),
    (dict(entry=_entry(impl={"16bit/3m/n>4096": {"train_full": "fast"}})),
     "devices[0].impl['16bit/3m/n>4096'].train_full"),
])
def test_a_malformed_table_names_the_file_and_the_key(fake_table, change, key):
    path = fake_table(change["entry"]) if "entry" in change else fake_table(raw=change["raw"])
    for call in (lambda: tuning.tiles("rows_forward", "cpu", torch.float32, 3, 10),
                 lambda: backends.resolve("auto", torch.device("cpu"))):
        with pytest.raises(tuning.TableError) as err:
            call()
        assert str(path) in str(err.value) and key in str(err.value), str(err.value)


def test_no_table_forced_tiles_and_writing_an_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("GOPD_TUNING_TABLE", "none")
    monkeypatch.setenv("GOPD_TUNING_DEVICE", FAKE)
    assert tuning.entry("cpu") is None
    monkeypatch.setenv("GOPD_TUNING_TABLE", str(tmp_path / "missing.json"))  # named but absent: an error
    with pytest.raises(tuning.TableError, match="missing.json: cannot be read"):
        tuning.entry("cpu")
    monkeypatch.setenv("GOPD_TUNING_TABLE", "none")
    with tuning.forced({"rows_backward": {"block_v": 64}}):
        assert tuning.tiles("rows_backward", "cpu", torch.float32, 1, 10) == {"block_v": 64}
    assert tuning.tiles("rows_backward", "cpu", torch.float32, 1, 10) == {}
    with pytest.raises(tuning.TableError, match="forced rows_backward.block_v"):
        with tuning.forced({"rows_backward": {"block_v": 3}}):
            pass
    # gpu-check replaces the entry for the same device and versions and keeps the others.
    old = _entry(backend="triton")
    other = _entry(device="Other GPU")
    table = tuning.with_entry({"format": 1, "devices": [old, other]}, _entry(backend="cuda"))
    assert [(e["device"], e["backend"]) for e in table["devices"]] == [("Other GPU", "torch"), (FAKE, "cuda")]
    path = tuning.write(tmp_path / "t.json", table)
    monkeypatch.setenv("GOPD_TUNING_TABLE", str(path))
    assert tuning.entry("cpu")["backend"] == "cuda"
    with pytest.raises(tuning.TableError, match="devices\\[1\\].backend"):
        tuning.write(tmp_path / "bad.json", tuning.with_entry(table, _entry(backend="gpu")))
