import json

import pytest

from wafer_actors import DeviceSpec, DeviceSpecError, Wafer, preset


def test_wse2_preset_has_the_papers_figures():
    """The wse2 preset carries the WSE-2 numbers of the reference digest."""
    d = preset("wse2")
    assert (d.width, d.height) == (757, 996)
    assert d.sram_bytes == 48 * 1024
    assert d.clock_hz == 1.1e9
    assert d.routes_per_core == 24
    assert d.link_bytes_per_cycle == 4.0
    assert d.seconds(1.1e9) == pytest.approx(1.0)


def test_wse3_preset_has_its_own_figures_and_says_it_is_not_calibrated(capsys):
    """wse3: the WSE-3 fabric the authors compile for, about the vendor's 44 GB of SRAM, its own clock (not
    WSE-2's); ``wafer-llm devices`` says that wse2 is calibrated and wse3 is not."""
    from llm.cli import main

    d, wse2 = preset("wse3"), preset("wse2")
    assert (d.width, d.height) == (762, 1172)
    assert d.width * d.height * d.sram_bytes == pytest.approx(44e9, rel=0.01)
    assert d.clock_hz != wse2.clock_hz
    assert main(["devices"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("wse2:") and lines[1].strip().startswith("calibrated:")
    assert lines[2].startswith("wse3:") and "1.09 GHz" in lines[2]
    assert lines[3].strip().startswith("not calibrated")


def test_unknown_preset_lists_the_presets():
    """Asking for a preset that does not exist names the valid ones."""
    with pytest.raises(DeviceSpecError, match=r"unknown device preset 'wse9'.*wse2.*wse3"):
        preset("wse9")


def test_device_from_toml_starts_from_a_base(tmp_path):
    """A TOML file with base = "wse2" changes only the fields it gives."""
    f = tmp_path / "fast.toml"
    f.write_text('base = "wse2"\nalpha = 2.0\nbeta = 5\n[fmacs_per_cycle]\nfloat32 = 4.0\n')
    d = DeviceSpec.from_file(f)
    assert (d.name, d.alpha, d.beta, d.rate("float32"), d.sram_bytes) == ("fast", 2.0, 5, 4.0, 48 * 1024)


def test_device_from_json_with_every_field(tmp_path):
    """A JSON file without a base must give every field, and then builds a device."""
    fields = dict(name="tiny", width=8, height=8, sram_bytes=1024, clock_hz=1e9, fmacs_per_cycle={"float32": 1},
                  link_bytes_per_cycle=4, alpha=1, beta=3, routes_per_core=4, power_watts=10)
    f = tmp_path / "tiny.json"
    f.write_text(json.dumps(fields))
    assert DeviceSpec.from_file(f).routes_per_core == 4
    del fields["beta"]
    f.write_text(json.dumps(fields))
    with pytest.raises(DeviceSpecError, match=r"missing field\(s\) \['beta'\]"):
        DeviceSpec.from_file(f)


@pytest.mark.parametrize(
    "text, match",
    [
        ('base = "wse2"\nmax_worker = 3\n', r"unknown key\(s\) \['max_worker'\]"),
        ('base = "wse2"\nsram_bytes = 0\n', r"field 'sram_bytes' must be a positive integer, got 0"),
        ('base = "wse2"\nwidth = -4\n', r"field 'width' must be a positive integer, got -4"),
        ('base = "wse2"\nalpha = -1.0\n', r"field 'alpha' must be a number >= 0, got -1.0"),
        ('base = "wse2"\ntask_overhead = -5\n', r"field 'task_overhead' must be a number >= 0, got -5"),
        ('base = "wse2"\nclock_hz = 0\n', r"field 'clock_hz' must be a positive number, got 0"),
        ('base = "wse2"\n[fmacs_per_cycle]\nfloat16 = 0\n', r"field 'fmacs_per_cycle.float16' must be a positive number"),
        ('base = "wse2"\nrouting = [1\n', r"cannot read device file"),
    ],
)
def test_invalid_device_file_names_the_field(tmp_path, text, match):
    """Each invalid value in a device file is refused with the field's name."""
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(DeviceSpecError, match=match):
        DeviceSpec.from_file(f)


def test_mesh_larger_than_the_fabric_is_refused():
    """A mesh taller than the device's fabric is refused before any tile starts."""
    with pytest.raises(DeviceSpecError, match=r"y size 997 > fabric height 996"):
        Wafer((997, 4), device="wse2")
    tiny = preset("wse2").replace(name="tiny", width=4, height=4)
    with pytest.raises(DeviceSpecError, match=r"x size 5 > fabric width 4"):
        Wafer((4, 5), device=tiny)


def test_missing_compute_rate_is_a_clear_error():
    """A dtype the device has no rate for is named, with the known dtypes."""
    with pytest.raises(DeviceSpecError, match=r"no compute rate for dtype 'int8'; known: \['float16', 'float32'\]"):
        preset("wse2").rate("int8")
