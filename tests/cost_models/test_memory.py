"""memory.py: hand-computed sizes, the paper's Eqs. 6-7 and Alg. 2, and float/PuLP agreement."""
import random

from specontext_compiler.cost_models import memory
from specontext_compiler.cost_models import solver as lp
from specontext_compiler.cost_models.workload import Workload


def test_kv_bytes_per_token_llama_by_hand(llama):
    # 2 tensors (K, V) x 32 layers x 8 KV heads x 128 dims x 2 bytes
    assert memory.kv_bytes_per_token(llama) == 2 * 32 * 8 * 128 * 2 == 131072
    assert memory.kv_bytes_per_token_layer(llama) == 4096


def test_weight_and_head_bytes_by_hand(llama):
    w = Workload(max_len=131072, prompt_len=2048)
    assert memory.weight_bytes(llama) == 8030261248 * 2 == 16_060_522_496
    # EAGLE-3 q_proj (8192 -> 32x128) + k_proj (8192 -> 8x128), bf16
    assert memory.head_weight_bytes(llama, w) == (8192 * 4096 + 8192 * 1024) * 2 == 83_886_080
    assert memory.head_k_cache_bytes(llama, w, 1000) == 1000 * 8 * 128 * 2


def test_budget_buffer_by_hand(llama):
    w = Workload(max_len=131072, prompt_len=2048, batch=4, budget=2048, sink_tokens=1, recent_tokens=16)
    # 4 requests x (2048 + 1 + 16) rows x 4096 bytes, per offloaded layer
    assert memory.budget_buffer_bytes(llama, w, 1) == 4 * 2065 * 4096 == 33_832_960
    assert memory.budget_buffer_bytes(llama, w, 3) == 3 * 33_832_960


def test_resident_and_host_kv_at_128k(llama):
    w = Workload(max_len=131072, prompt_len=2048, batch=2)
    per_layer = 2 * 131072 * 4096          # 1 GiB per layer for two requests
    assert memory.resident_kv_bytes(llama, w, 32, 131072) == 32 * per_layer
    assert memory.host_bytes(llama, w, 5, 131072) == 5 * per_layer


def test_gpu_bytes_is_the_sum_of_its_parts(llama):
    w = Workload(max_len=65536, prompt_len=1024, batch=3)
    S, gpu = 40000, 20
    parts = (memory.weight_bytes(llama) + memory.head_weight_bytes(llama, w)
             + memory.head_k_cache_bytes(llama, w, S) + memory.resident_kv_bytes(llama, w, gpu, S)
             + memory.budget_buffer_bytes(llama, w, 32 - gpu) + memory.workspace_bytes(llama, w, S))
    assert memory.gpu_bytes(llama, w, gpu, S) == parts
    assert memory.workspace_bytes(llama, w, S) > memory.FIXED_RESERVE_BYTES


def test_gpu_bytes_accepts_pulp_expressions(llama):
    rng = random.Random(7)
    for _ in range(3):
        w = Workload(max_len=131072, prompt_len=1024, batch=rng.randint(1, 16), budget=rng.randint(64, 4096))
        seq_len, num_gpu = rng.randint(2048, 131072), rng.randint(1, 31)
        problem = lp.Problem("expr")
        x = problem.continuous("num_gpu", 0, 32)
        expr = memory.gpu_bytes(llama, w, x, seq_len) * 1e-9
        problem.constrain(x >= num_gpu, "fix")
        problem.minimize(x)
        assert problem.solve(5).status == "optimal"
        assert abs(lp.value(expr) - memory.gpu_bytes(llama, w, num_gpu, seq_len) * 1e-9) < 1e-6


def test_eq7_without_offload_is_eq6(llama):
    w = Workload(max_len=131072, prompt_len=2048, batch=4)
    assert memory.eq7_partial_bytes(llama, w, 50000, 0) == memory.eq6_all_gpu_bytes(llama, w, 50000)
    # "the coefficient of KV cache is 4": 4·R·(L+1+α)·S·H·D with α = 4 for Llama-3.1-8B
    expected_kv = 4 * 4 * (32 + 1 + 4) * 50000 * 8 * 128
    assert memory.eq6_all_gpu_bytes(llama, w, 50000) == 1.3 * (16_060_522_496 + 83_886_080) + expected_kv


def test_alg2_thresholds_are_roots_of_eq7(llama):
    w = Workload(max_len=131072, prompt_len=2048, batch=4)
    mem = 80 * 1024 ** 3
    thresholds = memory.alg2_thresholds(llama, w, mem)
    assert len(thresholds) == 33
    assert thresholds == sorted(thresholds)
    for i, limit in enumerate(thresholds):
        assert memory.eq7_partial_bytes(llama, w, limit, i) <= mem
        assert memory.eq7_partial_bytes(llama, w, limit + 1, i) > mem


def test_alg2_printed_factor_one_overstates_thresholds(llama):
    w = Workload(max_len=131072, prompt_len=2048, batch=4)
    eq7 = memory.alg2_thresholds(llama, w, 80 * 1024 ** 3)
    printed = memory.alg2_thresholds(llama, w, 80 * 1024 ** 3, b_term_factor=1)
    assert printed[0] == eq7[0]
    assert all(p >= e for p, e in zip(printed[1:], eq7[1:]))
    assert printed[-1] > eq7[-1]


def test_paper_offloaded_layers_reads_alg1_consistently():
    thresholds = [100, 120, 150, 200]
    assert memory.paper_offloaded_layers(thresholds, 99) == 0
    assert memory.paper_offloaded_layers(thresholds, 100) == 1
    assert memory.paper_offloaded_layers(thresholds, 160) == 3
    assert memory.paper_offloaded_layers(thresholds, 500) == 3


def test_min_offloaded_layers_grows_with_length(llama):
    w = Workload(max_len=131072, prompt_len=2048, batch=4)
    mem = 80 * 1024 ** 3
    counts = [memory.min_offloaded_layers(llama, w, mem, s) for s in (8192, 32768, 65536, 131072)]
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] > 0
    assert memory.min_offloaded_layers(llama, w, 10 * 1024 ** 3, 131072) is None
