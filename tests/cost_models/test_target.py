"""target.py: built-in TOML targets, aliases, sources, and the errors of bad user files."""
import pytest

from specontext_compiler.cost_models.target import list_targets, load_target, load_target_file
from specontext_compiler.errors import TargetError

NUMERIC = ("gpu_memory_bytes", "hbm_gbps", "h2d_gbps", "pinned_gather_gbps", "bf16_tflops",
           "host_memory_bytes", "launch_overhead_us")


def test_builtins_load_with_a_source_for_every_figure():
    names = list_targets()
    assert set(names) >= {"a100-40gb", "a100-80gb", "h100", "h200", "l40s", "rtx4090", "jetson-agx-orin-64gb"}
    for name in names:
        target = load_target(name)
        assert target.name == name
        for key in NUMERIC:
            assert getattr(target, key) > 0
            assert target.sources.get(key), f"{name}.{key} has no source"
        assert target.pinned_gather_gbps < target.h2d_gbps


def test_h100_uses_the_measured_figures():
    h100 = load_target("H100")
    assert (h100.hbm_gbps, h100.h2d_gbps, h100.pinned_gather_gbps, h100.bf16_tflops) == (2990, 51.6, 42.3, 754)
    assert "measured" in h100.sources["hbm_gbps"]


def test_aliases_and_unified_memory():
    assert load_target("a100").name == "a100-80gb"
    jetson = load_target("jetson")
    assert jetson.unified_memory and jetson.host_memory_bytes == jetson.gpu_memory_bytes
    assert not load_target("h100").unified_memory


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(TargetError, match="known targets: a100-40gb"):
        load_target("tpu-v5")


def _write(tmp_path, text):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    return path


GOOD = """name = "mine"
aliases = ["m"]
gpu_memory_bytes = 16_000_000_000
hbm_gbps = 500.0
h2d_gbps = 20
pinned_gather_gbps = 16.4
bf16_tflops = 80.0
host_memory_bytes = 64_000_000_000
launch_overhead_us = 6.0
"""


def test_user_file_loads(tmp_path):
    target = load_target(str(_write(tmp_path, GOOD)))
    assert target.name == "mine" and target.h2d_gbps == 20.0 and target.aliases == ("m",)


def test_unknown_and_missing_keys_are_named(tmp_path):
    path = _write(tmp_path, GOOD.replace("hbm_gbps", "hbm_bandwidth"))
    with pytest.raises(TargetError) as err:
        load_target_file(path)
    message = str(err.value)
    assert "hbm_bandwidth" in message and "missing keys ['hbm_gbps']" in message
    assert "valid keys" in message and "\n" not in message


def test_non_number_and_bad_syntax(tmp_path):
    with pytest.raises(TargetError, match="bf16_tflops"):
        load_target_file(_write(tmp_path, GOOD.replace("80.0", '"fast"')))
    with pytest.raises(TargetError, match="not valid TOML"):
        load_target_file(_write(tmp_path, GOOD + "oops = \n"))
    with pytest.raises(TargetError, match="does not exist"):
        load_target_file(tmp_path / "absent.toml")


def test_override_replaces_a_figure_and_rejects_unknown_keys():
    from specontext_compiler.cost_models.target import override_target
    h100 = load_target("h100")
    slower = override_target(h100, {"h2d_gbps": "48"})
    assert slower.h2d_gbps == 48.0 and slower.sources["h2d_gbps"] == "set by the user"
    assert h100.h2d_gbps == 51.6
    with pytest.raises(TargetError, match="unknown keys \\['pcie'\\]"):
        override_target(h100, {"pcie": "5"})


def test_decode_efficiency_is_optional_bounded_and_slows_the_roofline(tmp_path):
    from specontext_compiler.cost_models.latency import _ms
    plain = load_target_file(_write(tmp_path, GOOD))
    assert plain.decode_hbm_efficiency == 1.0
    derated = load_target_file(_write(tmp_path, GOOD + "decode_hbm_efficiency = 0.5\n"))
    assert _ms(0.0, 1e9, derated) == pytest.approx(2 * _ms(0.0, 1e9, plain))
    assert _ms(1e12, 0.0, derated) == _ms(1e12, 0.0, plain)          # compute time is not derated
    with pytest.raises(TargetError, match=r"decode_hbm_efficiency must be in \(0, 1\]"):
        load_target_file(_write(tmp_path, GOOD + "decode_hbm_efficiency = 1.5\n"))
    assert 0 < load_target("h100").decode_hbm_efficiency < 1


def test_overlapped_copy_efficiency_slows_only_the_copy_stream(tmp_path):
    from specontext_compiler.cost_models.latency import layer_transfer_ms, step_components
    from specontext_compiler.cost_models.workload import Workload
    from specontext_compiler.models import resolve_model, spec_from_config
    source = resolve_model("llama-3.1-8b")
    spec = spec_from_config(source.config, source.name)
    work = Workload(max_len=32768, prompt_len=30000, batch=4, selection_overlap=0.5)
    plain = load_target_file(_write(tmp_path, GOOD))
    slow = load_target_file(_write(tmp_path, GOOD + "overlapped_copy_efficiency = 0.5\n"))
    assert layer_transfer_ms(spec, work, slow, 30000) == pytest.approx(2 * layer_transfer_ms(spec, work, plain, 30000))
    assert step_components(spec, work, slow, 30000).layer_ms == step_components(spec, work, plain, 30000).layer_ms
    with pytest.raises(TargetError, match=r"overlapped_copy_efficiency must be in \(0, 1\]"):
        load_target_file(_write(tmp_path, GOOD + "overlapped_copy_efficiency = 0\n"))


def test_layer_fixed_cost_is_optional_non_negative_and_adds_per_layer(tmp_path, llama):
    from specontext_compiler.cost_models.latency import step_components
    from specontext_compiler.cost_models.workload import Workload
    plain = load_target_file(_write(tmp_path, GOOD))
    assert plain.layer_fixed_us == 0.0
    fixed = load_target_file(_write(tmp_path, GOOD + "layer_fixed_us = 100.0\n"))
    work = Workload(max_len=16384, prompt_len=8192, batch=2, budget=2048)
    delta = step_components(llama, work, fixed, 8192).layer_ms - step_components(llama, work, plain, 8192).layer_ms
    assert delta == pytest.approx(0.1)
    with pytest.raises(TargetError, match="layer_fixed_us must be >= 0"):
        load_target_file(_write(tmp_path, GOOD + "layer_fixed_us = -1\n"))
    with pytest.raises(TargetError, match="layer_fixed_us = 'a lot' is not a number"):
        load_target_file(_write(tmp_path, GOOD + "layer_fixed_us = 'a lot'\n"))


def test_contention_figures_are_optional_and_checked(tmp_path):
    plain = load_target_file(_write(tmp_path, GOOD))
    assert plain.compute_slowdown_beside_gather == 1.0 and plain.gather_gbps_beside_compute is None
    assert plain.gather_gbps_overlapped == plain.pinned_gather_gbps      # overlapped_copy_efficiency 1
    assert plain.write_through_gbps == plain.h2d_gbps
    given = load_target_file(_write(tmp_path, GOOD + "gather_gbps_beside_compute = 9.5\n"
                                    "compute_slowdown_beside_gather = 1.4\nd2h_gbps = 18\n"))
    figures = (given.gather_gbps_overlapped, given.compute_slowdown_beside_gather, given.write_through_gbps)
    assert figures == (9.5, 1.4, 18)
    with pytest.raises(TargetError, match=r"compute_slowdown_beside_gather must be >= 1"):
        load_target_file(_write(tmp_path, GOOD + "compute_slowdown_beside_gather = 0.5\n"))
    with pytest.raises(TargetError, match="gather_gbps_beside_compute must be positive"):
        load_target_file(_write(tmp_path, GOOD + "gather_gbps_beside_compute = 0\n"))
    with pytest.raises(TargetError, match="d2h_gbps = 'fast' is not a number"):
        load_target_file(_write(tmp_path, GOOD + "d2h_gbps = 'fast'\n"))
