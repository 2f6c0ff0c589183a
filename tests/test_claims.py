from pipelines.claims import ClaimReport, compare


def test_compare_is_computed_from_means_and_direction():
    up = compare("a beats b", "acc", [0.9, 0.8, 0.85], [0.7, 0.75, 0.8])
    assert up.reproduced and up.seeds == 3
    assert abs(up.method - 0.85) < 1e-12 and abs(up.baseline - 0.75) < 1e-12
    assert not compare("a beats b", "acc", [0.7], [0.9]).reproduced
    assert compare("lower is better", "ppl", [10.0, 11.0], [12.0, 13.0], higher_is_better=False).reproduced
    assert not compare("needs margin", "auroc", [0.55, 0.58], [0.5], margin=0.1).reproduced
    assert compare("needs margin", "auroc", [0.75, 0.8], [0.5], margin=0.1).reproduced


def test_report_json_and_table():
    report = ClaimReport(compare("h", "m", [1.0], [0.0]), [compare("x", "y", [0.0], [1.0])])
    data = report.to_json()
    assert {"claim", "metric", "method", "baseline", "seeds", "reproduced", "deviations", "more"} <= set(data)
    assert data["reproduced"] is True and data["more"][0]["reproduced"] is False
    table = report.table().splitlines()
    assert table[0].split()[:2] == ["claim", "metric"] and len(table) == 4
