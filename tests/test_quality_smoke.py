"""The quality benchmark's smoke variant: the whole pipeline (world, training graph, stock sampling,
judge, table, grids) on the tiny random model, so the benchmark never rots."""
import sys
from pathlib import Path

import pytest

QUALITY = Path(__file__).resolve().parent.parent / "benchmarks" / "quality"


@pytest.mark.slow
def test_quality_benchmark_smoke(comfy_runtime, tmp_path, tiny_checkpoint_path):
    sys.path.insert(0, str(QUALITY))
    import evaluate

    methods = list(evaluate.METHODS)  # every method's graph, so none of them rots
    table = evaluate.run(methods, tiny_checkpoint_path, count=2, base_count=1, steps=2, sample_steps=2, cfg=1.0,
                         out_dir=tmp_path, classifier_steps=5)
    assert list(table) == methods
    for name, row in table.items():
        for metric in ("subject_fidelity", "prompt_fidelity", "preservation"):
            assert 0.0 <= row[metric] <= 1.0, (name, metric)
        assert row["artifact_mb"] > 0 and row["train_seconds"] > 0 and row["diversity"] >= 0, (name, row)
        assert (tmp_path / f"grid_{name}.png").is_file()
