"""The presets benchmark measures a model per dtype in processes of their own (tiny model)."""

from __future__ import annotations

import argparse

from benchmarks import presets


def test_each_dtype_gets_a_row_from_its_own_process() -> None:
    options = argparse.Namespace(model="tiny-llama", dtypes="float32,bfloat16", prefill=32,
                                 decode=4)
    result = presets.run(quick=True, options=options)
    assert [row["dtype"] for row in result.rows] == ["float32", "bfloat16"]
    for row in result.rows:
        assert row["model"] == "tiny-llama:0"
        assert row["rss_loaded_mib"] > 0 and row["prefill_tok_s"] > 0
        assert row["decode_tok_s"] > 0
    assert result.summary["fastest_decode"] in ("float32", "bfloat16")
