"""VM configuration files: validation errors name the field, JSON and TOML agree, the schema is current."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from refvmm.config import ConfigError, VMConfig, json_schema, load_config, parse_config, parse_number

ROOT = Path(__file__).resolve().parent.parent
VM_DIR = ROOT / "corpus" / "vm"


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"memory": {"size": "3K"}}, "memory.size"),
        ({"memory": {"size": "lots"}}, "memory.size"),
        ({"memory": {"regions": [{"gpa": "0x1001", "size": "4K"}]}}, "memory.regions[0]"),
        ({"paging": "bogus"}, "paging"),
        ({"budget": 0}, "budget"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"mmio": [{"gpa": "0xFEB00000", "device": "nope"}]}, "mmio[0].device"),
        ({"hooks": [{"kind": "msr"}]}, "hooks[0].msr.index"),
        ({"hooks": [{"kind": "port", "port": "0x10000"}]}, "hooks[0].port.port"),
        ({"hooks": [{"kind": "teleport"}]}, "hooks[0]"),
        ({"cpuid": {"hide": ["warp-drive"]}}, "cpuid.hide[0]"),
        ({"cpuid": {"vendor": "a-vendor-string-too-long"}}, "cpuid.vendor"),
        ({"devices": [{"kind": "uart16550"}, {"kind": "uart16550"}]}, "devices"),
        ({"devices": [{"kind": "gpu"}]}, "devices[0].kind"),
        ({"devices": [{"kind": "debugcon", "port": "0x3F8"}]}, "devices[0]"),
        ({"devices": [{"kind": "uart16550", "ports": ["0xE9"]}]}, "devices[0]"),
        ({"image": {"kind": "flat"}}, "image.flat.path"),
        ({"entry": {"mode": "v86"}}, "entry.mode"),
    ],
)
def test_bad_config_is_one_line_naming_the_field(doc: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(doc, "vm.json")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("vm.json: invalid VM config: ")
    assert f" {field}:" in msg, msg


def test_defaults() -> None:
    c = parse_config({})
    assert c.paging == "nested" and c.memory.size == 2 << 20 and c.budget == 1_000_000
    assert [d.kind for d in c.devices] == ["uart16550", "debugcon"]
    assert set(c.cpuid.hide) == {"pku", "la57", "apic"} and c.cpuid.hypervisor_bit


@given(st.integers(0, 1 << 40))
def test_numbers_in_every_notation(n: int) -> None:
    assert parse_number(n) == n
    assert parse_number(hex(n)) == n
    assert parse_number(str(n)) == n
    if n % 1024 == 0:
        assert parse_number(f"{n // 1024}K") == n


def test_size_suffixes() -> None:
    assert parse_number("2M") == 2 << 20 and parse_number("1G") == 1 << 30 and parse_number("0x1_000") == 0x1000
    with pytest.raises(ValueError):
        parse_number(True)


def test_json_and_toml_examples_load(tmp_path: Path) -> None:
    files = sorted(VM_DIR.glob("*.json")) + sorted(VM_DIR.glob("*.toml"))
    assert any(f.suffix == ".toml" for f in files) and any(f.suffix == ".json" for f in files)
    for f in files:
        cfg = load_config(f)
        assert cfg.image is not None and Path(cfg.image.path).is_file(), f  # image paths are relative to the file


def test_toml_and_json_mean_the_same(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('paging = "shadow"\nbudget = 500\n[memory]\nsize = "1M"\n'
                                     '[[hooks]]\nkind = "msr"\nindex = "0xC0011029"\nvalue = 7\n')
    (tmp_path / "a.json").write_text(json.dumps({"paging": "shadow", "budget": 500, "memory": {"size": "1M"},
                                                 "hooks": [{"kind": "msr", "index": "0xC0011029", "value": 7}]}))
    assert load_config(tmp_path / "a.toml") == load_config(tmp_path / "a.json")


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"(?i)no such file"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.toml"
    bad.write_text("paging = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected an object"):
        load_config(bad)


def test_committed_vm_schema_is_current() -> None:
    """corpus/schema/vm.schema.json must match VMConfig (regenerate with `refvmm schema --out corpus/schema`)."""
    committed = json.loads((ROOT / "corpus" / "schema" / "vm.schema.json").read_text())
    assert committed == json_schema()
    assert committed["title"] == VMConfig.__name__
