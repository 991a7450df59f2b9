"""targets --probe on a machine without CUDA: the TOML it writes, and the refusals."""
import importlib.util
from pathlib import Path

import pytest
import torch

from specontext_compiler import targets_probe
from specontext_compiler.cost_models.target import load_target, load_target_file
from specontext_compiler.errors import SpecontextError
from specontext_compiler.targets_probe import Figure

FIGURES = [Figure("gpu_memory_bytes", 150_118_400_000, "cudaMemGetInfo total"),
           Figure("host_memory_bytes", 135_000_000_000, "/proc/meminfo MemTotal"),
           Figure("hbm_gbps", 4310.5, "2 GiB bf16 device-to-device copy, read + write counted"),
           Figure("h2d_gbps", 55.3, "512 MiB pinned host -> device copy"),
           Figure("d2h_gbps", 54.9, "512 MiB device -> pinned host copy"),
           Figure("bf16_tflops", 790.2, "8192^3 bf16 matmul, random data"),
           Figure("pinned_gather_gbps", 33.0, "the runtime's elastic gather, alone"),
           Figure("gather_gbps_beside_compute", 21.5, "the runtime's elastic gather, beside a decode-like loop"),
           Figure("compute_slowdown_beside_gather", 1.5, "a decode-like loop: beside / alone"),
           Figure("decode_hbm_efficiency", 0.9, "a decode-like loop's read rate over hbm_gbps"),
           Figure("layer_fixed_us", 61.2, "CUDA-graph replay of 45 small kernels"),
           Figure("launch_overhead_us", 4.1, "host time of one CUDA-graph replay call")]


def test_written_toml_loads_as_a_target_with_a_source_per_figure(tmp_path):
    text = targets_probe.target_toml(targets_probe.target_name("NVIDIA H200"), "NVIDIA H200", FIGURES,
                                     date="2026-12-02")
    path = tmp_path / "probe.toml"
    path.write_text(text)
    target = load_target_file(path)
    assert target.name == "nvidia-h200-probe"
    for figure in FIGURES:
        assert getattr(target, figure.key) == pytest.approx(figure.value)
        assert target.sources[figure.key].startswith("specontext targets --probe, 2026-12-02, NVIDIA H200: ")
        assert figure.how in target.sources[figure.key]
    assert target.gather_gbps_overlapped == 21.5 and target.write_through_gbps == 54.9
    line = next(line for line in text.splitlines() if line.startswith("pinned_gather_gbps"))
    assert "# probe: the runtime's elastic gather, alone" in line        # a comment beside each figure


def test_comparison_table_puts_the_builtin_beside_the_probe():
    table = targets_probe.comparison_table(FIGURES, "h200")
    row = next(line for line in table.splitlines() if line.startswith("| pinned_gather_gbps"))
    assert "33.0" in row and str(load_target("h200").pinned_gather_gbps) in row
    assert f"| gather_gbps_beside_compute | 21.5 | {load_target('h200').gather_gbps_beside_compute} |" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_probe_without_cuda_is_a_one_line_refusal():
    with pytest.raises(SpecontextError, match="has none; run `specontext targets --probe"):
        targets_probe.probe()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cli_probe_refuses_on_cpu_and_never_overwrites(tmp_path):
    spec = importlib.util.spec_from_file_location("_cli_tests", Path(__file__).parents[1] / "test_cli.py")
    cli_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli_tests)
    cli_tests.assert_one_line_error(cli_tests.invoke("targets", "--probe", "-o", str(tmp_path / "g.toml")),
                                    "CUDA GPU")
    assert not (tmp_path / "g.toml").exists()
    existing = tmp_path / "mine.toml"
    existing.write_text("keep me\n")
    cli_tests.assert_one_line_error(cli_tests.invoke("targets", "--probe", "-o", str(existing)), "exists")
    assert existing.read_text() == "keep me\n"
    cli_tests.assert_one_line_error(cli_tests.invoke("targets", "-o", str(tmp_path / "x.toml")), "--probe")
    assert targets_probe.main(["-o", str(tmp_path / "m.toml")]) == 2


@pytest.mark.gpu
def test_probe_measures_this_gpu(tmp_path):
    device, figures = targets_probe.probe()
    path = tmp_path / "gpu.toml"
    path.write_text(targets_probe.target_toml(targets_probe.target_name(device), device, figures))
    target = load_target_file(path)
    assert target.hbm_gbps > target.h2d_gbps > 1 and target.pinned_gather_gbps > 1
    assert target.compute_slowdown_beside_gather >= 1


def test_the_probed_gather_copies_the_rows_it_counts(monkeypatch):
    # the probe's gather set-up at a small shape on the CPU (Triton interpreter): the runtime's
    # kernel moves exactly the rows the probe divides its bytes by
    from specontext_compiler.runtime.kernels import elastic_load
    monkeypatch.setattr(targets_probe, "GATHER_SHAPE",
                        {"batch": 2, "heads": 2, "seq": 300, "dim": 128, "width": 40, "overlap": 0.75})
    gather = targets_probe._Gather(torch.device("cpu"))
    gather.host_k.normal_(), gather.host_v.normal_()
    assert gather.span_bytes == 2 * 2 * 2 * 300 * 128 * 2
    assert gather.count == int(gather.loads.count) == 2 * 2 * 10
    assert gather.bytes == gather.count * 2 * 128 * 2
    want_k, want_v = gather.buf_k.clone(), gather.buf_v.clone()
    elastic_load.gather_compact_reference(gather.host_k, gather.host_v, want_k, want_v, gather.loads, 2)
    gather()
    assert torch.equal(gather.buf_k, want_k) and torch.equal(gather.buf_v, want_v)
    assert int((gather.buf_k != 0).any(dim=-1).sum()) == gather.count


def test_long_span_is_a_power_of_two_per_tensor_under_the_pinnable_share():
    seq = targets_probe.large_span_seq(128 * 2 ** 30)
    s = targets_probe.GATHER_SHAPE
    per_tensor = seq * s["batch"] * s["heads"] * s["dim"] * 2
    assert per_tensor == 32 * 2 ** 30                   # K and V: 64 GiB of a 128 GiB host
    assert targets_probe.large_span_seq(125 * 2 ** 30) == seq     # MemTotal a little under 128 GiB
    assert targets_probe.large_span_seq(2 ** 30) == s["seq"]     # a small host: never below the small span
