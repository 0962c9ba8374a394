"""The CAM cost model (paper reference point, scaling laws, coefficient files) and the uint64 sign packing."""

import json
import math

import numpy as np
import pytest
import torch

from had_hf.export import cam, cam_report
from had_hf.export.cam import AttentionGeometry, CoefficientError, cam_cost_report, load_coefficients
from had_hf.export.uint64_words import binary_scores, hamming_distance, pack_signs, popcount, unpack_signs

# The HAD paper's table: component -> (area BF16, area HAD, power BF16, power HAD)
PAPER_TABLE = {
    "qk": (15.880, 1.108, 12.730, 0.127),
    "topn": (0.000, 0.008, 0.000, 0.009),
    "softmax": (0.035, 0.017, 0.031, 0.024),
    "av": (15.880, 5.591, 12.730, 3.141),
}
PAPER_POINT = AttentionGeometry(num_layers=1, num_heads=1, head_dim=1024)


def _default_document() -> dict:
    return json.loads(cam.default_coefficients_path().read_text())


def _write(tmp_path, document, name="coefficients.json"):
    path = tmp_path / name
    path.write_text(json.dumps(document))
    return path


# ---------------------------------------------------------------------------------------------- reference point


def test_reference_point_reproduces_the_paper_table_exactly():
    layer = cam_cost_report(PAPER_POINT, context_length=256, top_n=30)["per_layer"]
    for component, (area_bf16, area_had, power_bf16, power_had) in PAPER_TABLE.items():
        assert layer["bf16"][component]["area_mm2"] == pytest.approx(area_bf16, abs=1e-12)
        assert layer["had"][component]["area_mm2"] == pytest.approx(area_had, abs=1e-12)
        assert layer["bf16"][component]["power_w"] == pytest.approx(power_bf16, abs=1e-12)
        assert layer["had"][component]["power_w"] == pytest.approx(power_had, abs=1e-12)
    assert layer["bf16"]["total"]["area_mm2"] == pytest.approx(31.795, abs=1e-9)
    assert layer["bf16"]["total"]["power_w"] == pytest.approx(25.491, abs=1e-9)
    assert layer["had"]["total"]["area_mm2"] == pytest.approx(6.724, abs=1e-9)
    assert layer["had"]["total"]["power_w"] == pytest.approx(3.301, abs=1e-9)


def test_reference_point_gives_the_papers_reductions():
    report = cam_cost_report(PAPER_POINT, context_length=256, top_n=30)
    reduction = report["model_total"]["reduction_percent"]["total"]
    # the paper prints 78.9% and 87.0%; the table's rounded figures give 78.85% and 87.05%
    assert abs(reduction["area_mm2"] - 78.9) < 0.06
    assert abs(reduction["power_w"] - 87.0) < 0.06
    assert report["model_total"]["ratio_had_over_bf16"]["total"]["area_mm2"] == pytest.approx(6.724 / 31.795)
    assert report["per_layer"]["ratio_had_over_bf16"]["topn"]["area_mm2"] is None  # BF16 has no top-N


# ---------------------------------------------------------------------------------------------- scaling laws


def test_scaling_laws_match_hand_computation():
    geometry = AttentionGeometry(num_layers=2, num_heads=3, head_dim=40, hidden_size=120)
    n, kept = 1000, 60
    report = cam_cost_report(geometry, context_length=n, top_n=kept)
    layer, model = report["per_layer"], report["model_total"]
    keys_times_width = n * 3 * 40 / (256 * 1024)
    per_head_keys = 3 * n / 256
    expected_area = {
        ("bf16", "qk"): 15.880 * keys_times_width,
        ("had", "qk"): 1.108 * keys_times_width,
        ("had", "topn"): 0.008 * per_head_keys * math.log2(60) / math.log2(30),
        ("bf16", "softmax"): 0.035 * per_head_keys,
        ("had", "softmax"): 0.017 * per_head_keys,
        ("bf16", "av"): 15.880 * keys_times_width,
        ("had", "av"): 5.591 * (60 * 120) / (30 * 1024),
    }
    for (design, component), area in expected_area.items():
        assert layer[design][component]["area_mm2"] == pytest.approx(area, rel=1e-12), (design, component)
        assert model[design][component]["area_mm2"] == pytest.approx(2 * area, rel=1e-12)
    assert layer["had"]["av"]["power_w"] == pytest.approx(3.141 * (60 * 120) / (30 * 1024), rel=1e-12)
    # energy per token = power x 1 cycle / 500 MHz = power x 2 ns
    assert layer["had"]["qk"]["energy_per_token_nj"] == pytest.approx(0.127 * keys_times_width * 2.0, rel=1e-12)
    # latency: BF16 MAC 4 cycles x (1 + ceil log2 L); CAM search 1 + ADC 2; 6 cycles per top-N halving stage;
    # softmax = scaler 2 + LUT 1 + divider 3 + ceil(log2 entries) accumulator levels
    expected_cycles = {
        ("bf16", "qk"): 4 * (1 + 6),
        ("had", "qk"): 3,
        ("bf16", "topn"): 0,
        ("had", "topn"): 6 * 5,  # 1000 -> 60 takes ceil(log2(1000 / 60)) = 5 halvings
        ("bf16", "softmax"): 6 + 10,
        ("had", "softmax"): 6 + 6,
        ("bf16", "av"): 4 * (1 + 10),
        ("had", "av"): 4 * (1 + 6),
    }
    for (design, component), cycles in expected_cycles.items():
        assert layer[design][component]["latency_cycles"] == cycles, (design, component)
    assert model["had"]["total"]["latency_cycles"] == 2 * sum(
        cycles for (design, _), cycles in expected_cycles.items() if design == "had"
    )
    assert report["cam_bits"]["per_layer"] == n * 3 * 40
    assert report["cam_bits"]["model"] == 2 * n * 3 * 40
    assert report["cam_bits"]["bf16_key_bits_per_layer"] == 16 * n * 3 * 40


def test_doubling_context_doubles_dense_terms_and_keeps_had_av_at_fixed_n():
    geometry = AttentionGeometry(num_layers=4, num_heads=8, head_dim=64)
    short = cam_cost_report(geometry, 512, top_n=30)["per_layer"]
    long = cam_cost_report(geometry, 1024, top_n=30)["per_layer"]
    for design, component in (("bf16", "qk"), ("had", "qk"), ("bf16", "av"), ("bf16", "softmax"), ("had", "topn")):
        assert long[design][component]["area_mm2"] == pytest.approx(2 * short[design][component]["area_mm2"])
    assert long["had"]["av"]["area_mm2"] == pytest.approx(short["had"]["av"]["area_mm2"])


def test_ratio_rule_and_grouped_query_attention():
    geometry = AttentionGeometry(num_layers=1, num_heads=8, head_dim=64, num_kv_heads=2)
    report = cam_cost_report(geometry, 1000, top_n_ratio=0.117)
    assert report["operating_point"]["top_n"] == math.ceil(0.117 * 1000)
    assert report["cam_bits"]["per_layer"] == 1000 * 2 * 64  # each key/value head stored once
    assert report["cam_bits"]["query_bits_per_token_per_layer"] == 8 * 64
    assert cam_cost_report(geometry, 10, top_n=30)["operating_point"]["top_n"] == 10  # N capped at n
    with pytest.raises(ValueError, match="exactly one"):
        cam_cost_report(geometry, 100, top_n=3, top_n_ratio=0.1)
    with pytest.raises(ValueError, match="context_length"):
        cam_cost_report(geometry, 0, top_n=3)


def test_grouped_query_attention_stores_keys_per_kv_head_and_searches_per_query_head():
    grouped = AttentionGeometry(num_layers=1, num_heads=9, head_dim=64, num_kv_heads=3)
    full = AttentionGeometry(num_layers=1, num_heads=9, head_dim=64)
    n, kept = 2048, 240
    grouped_layer = cam_cost_report(grouped, n, top_n=kept)["per_layer"]
    full_layer = cam_cost_report(full, n, top_n=kept)["per_layer"]
    # the CAM holds n x 3 x 64 key bits and is searched by 9 query heads
    assert grouped_layer["had"]["qk"]["area_mm2"] == pytest.approx(1.108 * n * 3 * 64 / (256 * 1024), rel=1e-12)
    assert grouped_layer["had"]["qk"]["power_w"] == pytest.approx(0.127 * n * 9 * 64 / (256 * 1024), rel=1e-12)
    assert grouped_layer["had"]["qk"]["area_mm2"] == pytest.approx(full_layer["had"]["qk"]["area_mm2"] / 3)
    assert grouped_layer["had"]["qk"]["latency_cycles"] == 3 * 1 + 2  # three searches of one CAM, one ADC
    for design, component in (("bf16", "qk"), ("bf16", "av"), ("had", "av"), ("had", "topn"), ("had", "softmax")):
        for metric in ("area_mm2", "power_w"):  # everything else computes per query head, as without GQA
            assert grouped_layer[design][component][metric] == full_layer[design][component][metric]
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        AttentionGeometry(num_layers=1, num_heads=9, head_dim=64, num_kv_heads=2)


def test_generation_costs_of_smollm2s_geometry_from_its_config_alone():
    from transformers import LlamaConfig

    from had_hf.export.cam_generation import DEFAULT_GENERATION_LENGTHS, check_generation_lengths, generation_costs

    config = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)
    geometry = AttentionGeometry.from_config(config)
    assert (geometry.num_layers, geometry.num_heads, geometry.num_kv_heads, geometry.head_dim) == (30, 9, 3, 64)
    rows = generation_costs(geometry, top_n_ratio=0.117)
    assert [row["context_length"] for row in rows] == list(DEFAULT_GENERATION_LENGTHS) == [1024, 2048, 4096, 8192]
    for row in rows:  # each row is the whole model's cost model at (n, N)
        n = row["context_length"]
        assert row["top_n"] == math.ceil(0.117 * n)
        model = cam_cost_report(geometry, n, top_n_ratio=0.117)["model_total"]
        for design in ("bf16", "had"):
            for metric in ("area_mm2", "power_w", "energy_per_token_nj", "latency_cycles"):
                assert row[design][metric] == pytest.approx(model[design]["total"][metric], rel=1e-12)
        assert row["cam_key_bits"] == n * 3 * 64 * 30
    assert check_generation_lengths((4096, 1024, 1024)) == [1024, 4096]
    for bad in ([], [0], [1024, -1], [True], [1.5], "1024", 1024, None):
        with pytest.raises(ValueError, match="generation_lengths must be"):
            check_generation_lengths(bad)


def test_geometry_from_transformers_configs():
    from transformers import BertConfig, LlamaConfig, T5Config

    bert = AttentionGeometry.from_config(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4))
    assert (bert.num_layers, bert.num_heads, bert.head_dim, bert.num_kv_heads, bert.hidden_size) == (2, 4, 8, 4, 32)
    t5 = AttentionGeometry.from_config(T5Config(d_model=32, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=3))
    assert (t5.num_layers, t5.head_dim) == (2 + 2 * 3, 8)  # encoder self + decoder self + cross
    llama = AttentionGeometry.from_config(
        LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)
    )
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim) == (8, 2, 8)
    with pytest.raises(ValueError, match="num_attention_heads"):
        AttentionGeometry.from_config(object())


# ---------------------------------------------------------------------------------------------- coefficient files


def test_default_file_lists_every_coefficient_with_unit_and_source():
    coefficients = load_coefficients()
    assert set(coefficients.entries) == set(cam.REQUIRED_COEFFICIENTS)
    for name, entry in coefficients.entries.items():
        assert entry.unit and entry.source, name
    assert "CAMformer" in coefficients.entries["cycles.topn_merge"].source
    assert "paper" in coefficients.entries["had.av.power_w"].source


def test_custom_coefficient_file_round_trip(tmp_path):
    document = _default_document()
    document["coefficients"]["had.qk.area_mm2"] = {"value": 2.216, "unit": "mm2", "source": "our 7 nm synthesis"}
    document["coefficients"]["clock_mhz"]["value"] = 1000
    path = _write(tmp_path, document)
    coefficients = load_coefficients(path)
    report = cam_cost_report(PAPER_POINT, 256, top_n=30, coefficients=coefficients)
    assert report["per_layer"]["had"]["qk"]["area_mm2"] == pytest.approx(2.216)
    assert report["per_layer"]["had"]["total"]["area_mm2"] == pytest.approx(6.724 - 1.108 + 2.216)
    assert report["per_layer"]["bf16"]["total"]["energy_per_token_nj"] == pytest.approx(25.491)  # 1 ns per token
    assert report["coefficients"]["had.qk.area_mm2"]["source"] == "our 7 nm synthesis"
    assert report["coefficients_file"] == str(path)
    # the report carries its coefficients: writing it back out reloads the same figures
    again = cam.parse_coefficients({"coefficients": report["coefficients"]})
    assert again.to_dict() == coefficients.to_dict()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.pop("had.av.power_w"), "missing the coefficient.*had.av.power_w"),
        (lambda c: c.update({"had.av.powr_w": c["had.av.power_w"]}), "unknown coefficient.*had.av.powr_w"),
        (lambda c: c["cycles.adc"].update(value="two"), "'cycles.adc'.*finite numeric"),
        (lambda c: c["had.qk.area_mm2"].update(value=-1.0), "'had.qk.area_mm2'.*>= 0"),
        (lambda c: c["clock_mhz"].update(value=0), "'clock_mhz'.*> 0"),
        (lambda c: c["cell.area_um2"].update(value=float("nan")), "'cell.area_um2'.*finite"),
        (lambda c: c["cell.area_um2"].pop("source"), "'cell.area_um2'.*'source'"),
    ],
)
def test_bad_coefficient_file_names_the_key(tmp_path, edit, message):
    document = _default_document()
    edit(document["coefficients"])
    with pytest.raises(CoefficientError, match=message):
        load_coefficients(_write(tmp_path, document))


def test_unreadable_coefficient_files(tmp_path):
    with pytest.raises(CoefficientError, match="does not exist"):
        load_coefficients(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(CoefficientError, match="not valid JSON"):
        load_coefficients(broken)
    with pytest.raises(CoefficientError, match="'coefficients' object"):
        load_coefficients(_write(tmp_path, [1, 2]))


def test_write_report_files(tmp_path):
    report = cam_cost_report(PAPER_POINT, 256, top_n=30)
    written = cam_report.write_cam_report(report, tmp_path)
    assert [path.name for path in written] == list(cam_report.REPORT_FILENAMES)
    assert json.loads((tmp_path / "cam_report.json").read_text())["per_layer"]["had"]["total"]["area_mm2"] == 6.724
    markdown = (tmp_path / "cam_report.md").read_text()
    assert "78.85% less area" in markdown and "87.05% less power" in markdown
    assert "CAMformer hardware_modules.csv" in markdown  # coefficients listed with their sources
    assert (tmp_path / "cam_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- packing


def _pack_loop(signs):
    """Plain-Python reference of the layout: bit i of word j is dimension 64 * j + i, set for +1."""
    words = [0] * -(-len(signs) // 64)
    for dim, sign in enumerate(signs):
        if sign >= 0:
            words[dim // 64] |= 1 << (dim % 64)
    return words


@pytest.mark.parametrize("dim", [1, 8, 63, 64, 65, 130])
def test_pack_matches_python_loop_and_round_trips(dim):
    rng = np.random.default_rng(dim)
    values = rng.standard_normal((3, 4, dim))
    values[0, 0, 0] = 0.0  # sign(0) = +1
    words = pack_signs(values)
    assert words.dtype == np.uint64 and words.shape == (3, 4, -(-dim // 64))
    for index in np.ndindex(3, 4):
        assert [int(w) for w in words[index]] == _pack_loop(values[index].tolist())
    signs = unpack_signs(words, dim)
    assert signs.dtype == np.int8
    np.testing.assert_array_equal(signs, np.where(values >= 0, 1, -1))
    np.testing.assert_array_equal(pack_signs(signs), words)  # ±1 input packs the same as its floats
    np.testing.assert_array_equal(pack_signs(torch.from_numpy(values)), words)  # torch input


def test_bit_layout_example():
    signs = -np.ones(130, dtype=np.int8)
    signs[[0, 3, 64, 129]] = 1
    words = pack_signs(signs)
    assert words.tolist() == [0b1001, 1, 2]  # dims 0, 3 -> word 0; dim 64 -> word 1 bit 0; dim 129 -> word 2 bit 1


def test_hamming_distance_matches_loop():
    rng = np.random.default_rng(0)
    queries, keys = rng.choice([-1, 1], size=(2, 5, 100)), rng.choice([-1, 1], size=(2, 7, 100))
    distance = hamming_distance(pack_signs(queries), pack_signs(keys))
    assert distance.shape == (2, 5, 7)
    for b, i, j in np.ndindex(2, 5, 7):
        assert distance[b, i, j] == sum(int(q != k) for q, k in zip(queries[b, i], keys[b, j]))
    np.testing.assert_array_equal(
        binary_scores(pack_signs(queries), pack_signs(keys), 100), queries @ keys.transpose(0, 2, 1)
    )


def test_popcount_fallback_without_numpy_bitwise_count(monkeypatch):
    words = np.array([0, 1, 2**64 - 1, 0x8000_0000_0000_0001], dtype=np.uint64)
    expected = [0, 1, 64, 2]
    assert popcount(words).tolist() == expected
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    assert popcount(words).tolist() == expected


def test_packing_errors():
    with pytest.raises(ValueError, match="NaN"):
        pack_signs(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="take 2 words"):
        unpack_signs(np.zeros(1, dtype=np.uint64), 100)
    with pytest.raises(TypeError, match="uint64"):
        unpack_signs(np.zeros(1, dtype=np.float32), 10)
