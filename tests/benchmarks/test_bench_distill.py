"""benchmarks/bench_distill.py on the CPU: the same code path as the 8B GPU run, on a tiny model."""
import json

import bench_distill
import pytest


def test_bench_runs_the_whole_distillation_and_writes_its_table(tmp_path, capsys):
    result = bench_distill.main(["--config", "tiny", "--device", "cpu", "--sequences", "2", "--seq-len", "512",
                                 "--epochs", "1", "--queries", "32", "--out", str(tmp_path)])
    assert set(result["stages_s"]) == {"layers", "teacher", "training", "total"}
    assert all(seconds > 0 for seconds in result["stages_s"].values())
    assert result["stages_s"]["total"] >= sum(v for k, v in result["stages_s"].items() if k != "total") - 1e-6
    assert result["teacher_layers"] and max(result["teacher_layers"]) < 8 and result["head_params"] > 0
    assert 0 < result["validation_after"]["recall@128"] <= 1 + 1e-3
    saved = json.loads((tmp_path / "bench_distill.json").read_text())
    assert saved["stages_s"] == result["stages_s"]
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("| peak max_memory_allocated") and "| teacher |" in "\n".join(printed)


def test_the_8b_config_is_llama_3_1_8b():
    from specontext_compiler.models import load_preset_config
    config = load_preset_config("llama-3.1-8b")
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.hidden_size, config.vocab_size) == (32, 32, 8, 4096, 128256)


@pytest.mark.gpu
def test_the_8b_model_builds_in_bf16_on_the_gpu():
    import torch
    model = bench_distill.build_model("llama-3.1-8b", "cuda")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) > 8e9
