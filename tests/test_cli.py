"""The console script's report/info commands and Scores persistence."""

import re
import subprocess
import sys

import pytest
import torch
from conftest import MODEL_CASES

import hookinf
from hookinf.cli import main


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    case = MODEL_CASES["seq-linear"]()
    train = [case.make_batch(seed) for seed in range(3)]
    query = [case.make_batch(10)]
    root = tmp_path_factory.mktemp("cli")
    scores = hookinf.influence(case.model, train, query, case.loss_fn, method="ekfac", per_token=True, progress=False)
    curvature = hookinf.fit(case.model, train, case.loss_fn, method="kfac", progress=False)
    store = hookinf.log(
        case.model, train, case.loss_fn, compress=hookinf.LoGra(2, 2), path=root / "store", progress=False
    )
    return {
        "scores": scores,
        "scores_dir": scores.save(root / "scores"),
        "curvature_dir": curvature.save(root / "curvature"),
        "store_dir": store.path,
        "root": root,
    }


def test_scores_round_trip_bit_exactly(fitted):
    loaded = hookinf.load_scores(fitted["scores_dir"])
    original = fitted["scores"]
    assert loaded.layers == original.layers
    assert loaded.method == original.method
    assert loaded.damping == original.damping
    for name in original.layers:
        assert torch.equal(loaded.per_layer[name], original.per_layer[name])
        assert torch.equal(loaded.per_token[name], original.per_token[name])
    assert torch.equal(loaded.total, original.total)


def test_scores_with_store_ids_round_trip(fitted):
    case = MODEL_CASES["seq-linear"]()
    store = hookinf.GradientStore(fitted["store_dir"])
    scores = hookinf.influence(
        case.model, store, [case.make_batch(10)], case.loss_fn, method="identity", progress=False
    )
    loaded = hookinf.load_scores(scores.save(fitted["root"] / "with-ids"))
    assert torch.equal(loaded.ids, store.ids)


def test_report_prints_layers_concentration_and_top_examples(fitted, capsys):
    assert main(["report", str(fitted["scores_dir"]), "--queries", "2", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "proj" in out
    assert "head" in out
    assert "top 1%" in out
    detailed = fitted["scores"].top_queries(2)  # --queries N details the N queries with the largest |influence|
    for q in detailed:
        assert f"Query {q}: most harmful" in out
    assert out.count(": most harmful") == 2


def test_report_html_writes_a_self_contained_file_and_says_where(fitted, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    target = tmp_path / "report.html"
    assert main(["report", str(fitted["scores_dir"]), "--html", str(target), "--queries", "1", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert str(target) in out
    assert "Query" not in out  # the report went to the file, not the terminal
    text = target.read_text(encoding="utf-8")
    scores = fitted["scores"]
    q = scores.top_queries(1)[0]
    top = scores.top_k(2)
    harmful = re.findall(r'<tr data-train="(\d+)"', text[text.index(f'id="influence-q{q}-harmful"') :])[:2]
    assert [int(i) for i in harmful] == top.harmful[q].tolist()
    for name in scores.layers:
        assert f'data-layer="{name}" data-share="{scores.layer_shares()[name]!r}"' in text
    assert "<script" not in text


@pytest.mark.parametrize(
    "args",
    [
        ["--html", "{missing}/report.html"],  # the output's directory does not exist
        ["--queries", "-1"],
        ["--top", "0", "--html", "{tmp}/x.html"],
    ],
    ids=["unwritable-html", "negative-queries", "zero-top"],
)
def test_report_bad_output_or_option_is_one_line_on_stderr(fitted, tmp_path, args):
    args = [a.format(missing=tmp_path / "missing", tmp=tmp_path) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "hookinf", "report", str(fitted["scores_dir"]), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("hookinf report: ")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.html").exists()


@pytest.mark.parametrize(
    ("key", "expected"), [("curvature_dir", "kfac curvature"), ("store_dir", "GradientStore"), ("scores_dir", "Scores")]
)
def test_info_describes_each_kind_of_directory(fitted, capsys, key, expected):
    assert main(["info", str(fitted[key])]) == 0
    assert expected in capsys.readouterr().out


@pytest.mark.parametrize("command", ["info", "report", "report --html"])
def test_missing_or_corrupt_path_is_one_line_on_stderr_and_status_1(tmp_path, command):
    extra = ["--html", str(tmp_path / "out.html")] if command.endswith("--html") else []
    for target in (tmp_path / "missing", tmp_path / "corrupt"):
        if target.name == "corrupt":
            target.mkdir()
            (target / "manifest.json").write_text("{not json")
        proc = subprocess.run(
            [sys.executable, "-m", "hookinf", command.split()[0], str(target), *extra],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 1
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert str(target) in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "out.html").exists()


def test_concentration_is_a_share_between_the_uniform_and_the_top_pair(fitted):
    scores = fitted["scores"]
    share = scores.concentration(0.01)
    assert 0 < share <= 1
    assert scores.concentration(1.0) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_reports_of_non_finite_scores_say_so_without_a_traceback(tmp_path, capsys, bad):
    part = torch.randn(3, 5, dtype=torch.float64)
    broken = part.clone()
    broken[2, 4] = bad
    path = hookinf.Scores({"fc1": part, "fc2": broken}, method="identity").save(tmp_path / "s")
    assert main(["report", str(path)]) == 1
    err = capsys.readouterr().err
    assert "not finite: 1 entry is NaN or infinite" in err
    assert "layer 'fc2', query 2, training example 4" in err
    assert "Traceback" not in err
    assert main(["report", str(path), "--html", str(tmp_path / "r.html")]) == 1
    assert not (tmp_path / "r.html").exists()
    assert main(["info", str(path)]) == 0  # info describes the directory, and says the shares are not finite
    assert "not finite" in capsys.readouterr().out
