"""The console script's report/info commands and Scores persistence."""

import json
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


# ---------------------------------------------------------------------------------------------------- descriptions
@pytest.fixture(scope="module")
def described_dir(fitted):
    scores = fitted["scores"]
    n_query, n_train = scores.shape
    described = scores.with_descriptions(
        train_text=[f"sentence {j} <b>" for j in range(n_train)],
        query_text=[f"question {q}" for q in range(n_query)],
        train_images=torch.rand(n_train, 6, 6, generator=torch.Generator().manual_seed(0)),
        query_labels=torch.arange(n_query),
        query_predictions=torch.tensor([q if q % 2 == 0 else 9 for q in range(n_query)]),
    )
    return described, described.save(fitted["root"] / "described")


def test_descriptions_round_trip_and_only_then_is_the_format_version_3(fitted, described_dir, capsys):
    described, directory = described_dir
    loaded = hookinf.load_scores(directory)
    original, got = described.descriptions, loaded.descriptions
    assert got.train_text == original.train_text
    assert got.query_text == original.query_text
    assert torch.equal(got.train_images, original.train_images)
    assert torch.equal(got.query_labels, original.query_labels)
    assert torch.equal(got.query_predictions, original.query_predictions)
    assert got.query_images is None
    assert torch.equal(loaded.total, described.total)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["version"] == 3
    assert manifest["descriptions"] == ["train_text", "query_text", "train_images", "query_labels", "query_predictions"]
    plain = json.loads((fitted["scores_dir"] / "manifest.json").read_text())
    assert plain["version"] == 2  # without descriptions: the format older hookinf reads
    assert "descriptions" not in plain
    assert hookinf.load_scores(fitted["scores_dir"]).descriptions is None
    assert main(["info", str(directory)]) == 0
    listed = "descriptions: train_text, query_text, train_images, query_labels, query_predictions"
    assert listed in capsys.readouterr().out


def test_report_html_uses_saved_descriptions_and_chosen_queries(fitted, described_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    described, directory = described_dir
    target = tmp_path / "chosen.html"
    assert main(["report", str(directory), "--html", str(target), "--query", "3,1", "--query", "0", "--top", "2"]) == 0
    text = target.read_text(encoding="utf-8")
    assert re.findall(r'<div class="query" id="influence-q(\d+)"', text) == ["3", "1", "0"]
    column = int(described.top_k(2).harmful[3, 0])
    assert f"sentence {column} &lt;b&gt;" in text
    assert "Query 1: label 1, predicted 9 · question 1" in text
    assert text.count("<img") == 3 * 2 * 2  # a thumbnail per listed training example (no query pictures saved)
    assert main(["report", str(directory), "--misclassified", "--queries", "10"]) == 0
    out = capsys.readouterr().out
    wrong = [q for q in described.top_queries(described.shape[0]) if q % 2 == 1]
    assert re.findall(r"Query (\d+): most harmful", out) == [str(q) for q in wrong]
    assert "label 1, predicted 9 · question 1" in out
    assert "sentence" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--query", "1,x"], "'x' is not a query row"),
        (["--query", "99"], "99 is not a query index"),
        (["--query", "1", "--queries", "2"], "leave out --queries N"),
        (["--misclassified"], "--misclassified: choosing the misclassified queries needs"),
    ],
)
def test_report_query_choice_errors_are_one_line(fitted, capsys, args, message):
    assert main(["report", str(fitted["scores_dir"]), *args]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


def test_report_query_and_misclassified_exclude_each_other(fitted, capsys):
    with pytest.raises(SystemExit):
        main(["report", str(fitted["scores_dir"]), "--query", "1", "--misclassified"])
    assert "not allowed with argument" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- what prints
def test_info_of_a_store_pluralises_and_shows_the_compressor_as_its_call(fitted, capsys):
    assert main(["info", str(fitted["store_dir"])]) == 0
    out = capsys.readouterr().out
    store = hookinf.GradientStore(fitted["store_dir"])
    n = len(store.shards)
    assert f"{n} shard{'' if n == 1 else 's'}" in out
    assert "1 shards" not in out
    assert "LoGra(r_in=2, r_out=2, init='gaussian', seed=0)" in out
    assert "{'kind'" not in out


def test_store_repr_is_one_short_line(tmp_path):
    case = MODEL_CASES["seq-linear"]()
    store = hookinf.log(
        case.model, [case.make_batch(0)], case.loss_fn, compress=hookinf.LoGra(2, 2), path=tmp_path / "s",
        progress=False,
    )  # fmt: skip
    text = repr(store)
    assert "\n" not in text
    assert "1 shard," in text
    assert f"{len(store.layers)} layer" in text
    # many long layer names: the first two, the last, and a count; the names cut in the middle
    shape = next(iter(store.layers.values()))
    store.layers = {f"encoder.layer.{i}.attention.self.query.lora_A.default.long.suffix": shape for i in range(200)}
    many = repr(store)
    assert "\n" not in many
    assert len(many) < 300, many
    assert "200 layers" in many
    assert many.count("…") >= 3  # the elided layers, and each long name cut in the middle
    assert "…199.attentio" in many  # the last layer, cut where the names read alike


def test_demo_help_shows_percent_signs_once(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "10% flipped labels" in out
    assert "%%" not in out
